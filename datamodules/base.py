"""The base of every bigain datamodule.

A datamodule describes one evaluation split: its classes, one prompt per class, and items
``{"index", "image", "label"}`` (plus ``"prompt"`` / ``"caption"`` where it has them), where
``index`` is the item's position in the *full* split - stable across runs, subsets and resumes, and
the key every record, seed and noise draw is derived from.

Subclasses implement :meth:`BigainDataModule.build_split` (the full split as a
:class:`SplitIndex`) and :meth:`BigainDataModule.load_item`, and provide ``classes`` and
``default_prompts``. Subsets, resume-skipping, preprocessing, bad-image handling and the dataloader
live here.
"""

from __future__ import annotations

import csv
import json
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bigain.errors import ConfigError, DatasetError

__all__ = ["BigainDataModule", "SplitIndex", "preprocess", "load_image", "collate", "HIGH_BIT_DEPTH_MODES"]


#: Single-channel PIL modes with more than 8 bits, and the value that is full white in each.
HIGH_BIT_DEPTH_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0,
                        "F": 1.0}


def preprocess(image, size: int) -> torch.Tensor:
    """PIL image -> float32 ``[3, size, size]`` in ``[-1, 1]``: bicubic resize of the short side to
    ``size``, center crop, RGB.

    8-bit images (any mode PIL converts to RGB) are scaled by 255. High-bit-depth grey images are
    scaled by their own range: 16-bit (``I;16*``, and 32-bit integer ``I`` as PNG and TIFF decoders
    give 16-bit data) by 65535, floating point (``F``) taken as ``[0, 1]``; they become grey RGB.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if image.mode in HIGH_BIT_DEPTH_MODES:
        from PIL import Image

        values = np.asarray(image, dtype=np.float32) / HIGH_BIT_DEPTH_MODES[image.mode]
        grey = Image.fromarray(np.clip(values, 0.0, 1.0), mode="F")
        grey = TF.resize(grey, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        grey = TF.center_crop(grey, [size, size])
        tensor = torch.from_numpy(np.array(grey, dtype=np.float32)).clamp(0.0, 1.0)
        return tensor.unsqueeze(0).repeat(3, 1, 1) * 2.0 - 1.0
    image = image.convert("RGB")
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    image = TF.center_crop(image, [size, size])
    return TF.to_tensor(image) * 2.0 - 1.0


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read, verify and preprocess one image file; errors name the file and the fix.

    The EXIF orientation tag is applied (a photo stored sideways with "rotate 90" is turned upright),
    as image viewers show it; see :func:`preprocess` for the scaling of each bit depth.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: truncated files fail here, not later
            return preprocess(ImageOps.exif_transpose(im), size)
    except FileNotFoundError as exc:
        raise DatasetError(f"image file {path} does not exist; check the dataset root") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"cannot read image {path} ({type(exc).__name__}: {exc}); the file is corrupt or "
            f"truncated: replace it, or pass on_bad_image='skip' to leave it out (it is then listed "
            f"in the run's report)"
        ) from exc


@dataclass(frozen=True)
class SplitIndex:
    """The full split: one entry per item, in the split's canonical order.

    Attributes:
        labels: per item, its label (``int``) or labels (``list[int]`` for multi-label datasets).
        refs: per item, whatever :meth:`BigainDataModule.load_item` needs (a path, an id).
    """

    labels: Sequence[Any]
    refs: Sequence[Any]

    def __len__(self) -> int:
        return len(self.refs)


def collate(items: list[dict]) -> dict:
    """Stack the good items; bad ones (``{"bad": ...}``) travel in ``batch["bad"]``."""
    good = [it for it in items if "bad" not in it]
    batch: dict[str, Any] = {"bad": [it["bad"] for it in items if "bad" in it]}
    if good:
        batch["index"] = torch.tensor([it["index"] for it in good])
        batch["image"] = torch.stack([it["image"] for it in good])
        batch["label"] = [it["label"] for it in good]
        for key in ("prompt", "caption"):
            if key in good[0]:
                batch[key] = [it[key] for it in good]
    else:
        batch["index"] = torch.zeros(0, dtype=torch.long)
    return batch


class _SplitDataset(Dataset):
    def __init__(self, dm: BigainDataModule, split: SplitIndex, indices: list[int]) -> None:
        self.dm, self.split, self.indices = dm, split, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        try:
            item = self.dm.load_item(index, self.split.refs[index])
        except DatasetError as exc:
            if self.dm.on_bad_image == "skip":
                return {"bad": {"index": index, "ref": str(self.split.refs[index]), "error": str(exc)}}
            raise
        item["index"] = index
        item.setdefault("label", self.split.labels[index])
        return item


class BigainDataModule(L.LightningDataModule):
    """Base class of bigain's datamodules (see the module docstring).

    Args:
        image_size: side of the square images fed to the model.
        batch_size: images per dataloader batch.
        num_workers: dataloader worker processes.
        pin_memory: pin batches in page-locked memory (for GPUs).
        subset: ``"all"``, an integer (that many images per class, drawn with ``subset_seed`` and
            stratified by label), or the path of a file of split indices (``.npy``, ``.json`` list,
            or text with one index per line).
        subset_seed: seed of the stratified subset draw.
        prompts_csv: a CSV with columns ``classidx,classname,prompt`` overriding the class prompts.
        on_bad_image: ``"error"`` (default) raises naming an unreadable file; ``"skip"`` leaves it out
            and records it in the run's report.
    """

    #: Short name under which the datamodule is registered (entry-point group ``bigain.datamodules``).
    name: ClassVar[str] = ""
    #: True when items carry a list of labels (COCO).
    multilabel: ClassVar[bool] = False

    def __init__(
        self,
        *,
        image_size: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        subset: int | str = "all",
        subset_seed: int = 0,
        prompts_csv: str | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ConfigError(f"image_size must be >= 8 pixels, got {image_size}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if on_bad_image not in ("error", "skip"):
            raise ConfigError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if isinstance(subset, int) and not isinstance(subset, bool) and subset < 1:
            raise ConfigError(f"subset must be 'all', a positive number per class, or an index file; got {subset}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.subset = subset
        self.subset_seed = subset_seed
        self.prompts_csv = prompts_csv
        self.on_bad_image = on_bad_image
        self._skip: set[int] = set()
        self._split: SplitIndex | None = None
        self.dataset: _SplitDataset | None = None

    # -- what subclasses provide ---------------------------------------------------------------
    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """Class names, in label order."""

    @property
    @abstractmethod
    def default_prompts(self) -> list[str]:
        """One prompt per class, in label order (the paper's templates)."""

    @property
    def label_ids(self) -> list[int] | None:
        """Each class's id in a standard label space (ImageNet ids for ImageNet subsets), or None."""
        return None

    @abstractmethod
    def build_split(self) -> SplitIndex:
        """The full split (verifying the files exist; raising :class:`DatasetError` otherwise)."""

    @abstractmethod
    def load_item(self, index: int, ref: Any) -> dict:
        """Item ``index``: at least ``{"image": Tensor[3, S, S]}``; ``label`` defaults to the split's."""

    # -- shared machinery ----------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        """One prompt per class: ``prompts_csv`` if given, else :attr:`default_prompts`."""
        if self.prompts_csv is None:
            return list(self.default_prompts)
        return read_prompts_csv(self.prompts_csv, len(self.classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def split(self) -> SplitIndex:
        if self._split is None:
            self._split = self.build_split()
        return self._split

    def skip_indices(self, indices: set[int]) -> None:
        """Leave these split indices out (already done by an earlier, interrupted run)."""
        self._skip = set(int(i) for i in indices)
        self.dataset = None

    def selected_indices(self) -> list[int]:
        """The split indices of the chosen subset, sorted (before resume-skipping)."""
        split = self.split
        n = len(split)
        if self.subset == "all":
            return list(range(n))
        if isinstance(self.subset, int):
            rng = np.random.default_rng(self.subset_seed)
            by_class: dict[int, list[int]] = {}
            for i, label in enumerate(split.labels):
                key = label[0] if isinstance(label, (list, tuple)) and label else label
                if isinstance(key, (list, tuple)):
                    key = -1
                by_class.setdefault(int(key), []).append(i)
            chosen: list[int] = []
            for key in sorted(by_class):
                members = by_class[key]
                take = rng.permutation(len(members))[: self.subset]
                chosen += [members[j] for j in take]
            return sorted(chosen)
        return read_index_file(self.subset, n)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            keep = [i for i in self.selected_indices() if i not in self._skip]
            self.dataset = _SplitDataset(self, self.split, keep)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, collate_fn=collate,
                          persistent_workers=False)

    def describe(self) -> dict[str, Any]:
        """What the run records about the data (``run.json``)."""
        return {"datamodule": type(self).__name__, "name": self.name, "num_classes": self.num_classes,
                "image_size": self.image_size, "subset": self.subset, "subset_seed": self.subset_seed,
                "split_size": len(self.split)}


def read_prompts_csv(path: str | Path, num_classes: int) -> list[str]:
    """Prompts from a ``classidx,classname,prompt`` CSV; every class exactly once."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prompts_csv {path} does not exist")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"classidx", "prompt"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(
                f"prompts_csv {path} lacks column(s) {sorted(missing)}; expected classidx,classname,prompt"
            )
        rows = {int(r["classidx"]): r["prompt"] for r in reader}
    absent = [i for i in range(num_classes) if i not in rows]
    if absent:
        raise DatasetError(f"prompts_csv {path} has no prompt for class(es) {absent[:10]}; give one row per class")
    return [rows[i] for i in range(num_classes)]


def read_index_file(path: str | Path, split_size: int) -> list[int]:
    """Split indices from ``.npy``, ``.json`` or a text file with one index per line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"subset {str(path)!r} is neither 'all', a number per class, nor an existing index file"
        )
    if path.suffix == ".npy":
        values = np.load(path).reshape(-1).tolist()
    elif path.suffix == ".json":
        values = json.loads(path.read_text())
    else:
        values = [int(line) for line in path.read_text().split() if line.strip()]
    values = sorted({int(v) for v in values})
    bad = [v for v in values if not 0 <= v < split_size]
    if bad:
        raise DatasetError(
            f"index file {path} points outside the split (size {split_size}): {bad[:10]}; "
            f"indices are positions in the full split, 0..{split_size - 1}"
        )
    return values
