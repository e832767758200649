"""``imagenet`` and ``imagenet100``: ImageNet-1K and its 100-class subset, from an ImageFolder layout.

The layout is ``<root>/<split>/<wnid>/*.JPEG`` (``split="val"`` by default: 50,000 images, 50 per
class). Labels are ImageNet class ids, i.e. positions in the sorted list of wnids; the class names
and the ImageNet-100 class list are bundled with bigain (:mod:`bigain.datamodules.prompts`), so nothing
is downloaded - ImageNet's licence does not allow it, and a missing root fails with instructions.

Items are ordered by (class, file name) - the order of torchvision's ``ImageFolder`` - and ``index``
is the position in that full split.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Literal

from bigain.datamodules.base import BigainDataModule, SplitIndex, load_image, read_prompts_csv
from bigain.datamodules.prompts import IMAGENET_TEMPLATE, ImageNetClass, fill, imagenet100_wnids, imagenet_classes
from bigain.errors import DatasetError

__all__ = ["ImageNetDataModule", "ImageNet100DataModule", "IMAGE_EXTENSIONS"]

#: File name endings read as images (torchvision ``ImageFolder``'s list, compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _instructions(root: str | None, split: str) -> str:
    where = "<root>" if root is None else str(root)
    return (
        "ImageNet cannot be downloaded by bigain (its licence requires registration). To get it:\n"
        "  1. Register at https://image-net.org and download ILSVRC2012_img_val.tar (the 50,000 validation "
        "images) and the development kit ILSVRC2012_devkit_t12.tar.gz.\n"
        f"  2. Extract the images into {where}/{split} and arrange them into one folder per class, named by "
        f"wnid ({where}/{split}/n01440764/ILSVRC2012_val_00000293.JPEG, ...): e.g. run the valprep.sh script "
        "(soumith/imagenetloader.torch) inside that folder, or put both archives in "
        f"{where} and run torchvision.datasets.ImageNet('{where}', split='val') once, which does the same.\n"
        f"  3. Pass root={where} (the folder that holds {split}/), e.g. --data.root /data/imagenet."
    )


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), in ``ImageFolder`` order: sorted walk, sorted names."""
    found: list[str] = []
    for dirpath, _, fnames in sorted(os.walk(folder, followlinks=True)):
        for fname in sorted(fnames):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, fname))
    return found


class ImageNetDataModule(BigainDataModule):
    """ImageNet-1K (ILSVRC-2012) from ``<root>/<split>/<wnid>/*.JPEG``.

    Args:
        root: the folder that holds ``<split>/``; ``None`` fails with instructions for getting ImageNet.
        split: the split folder under ``root`` (``"val"``: the 50,000 validation images).
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

    name = "imagenet"

    def __init__(
        self,
        *,
        root: str | None = None,
        split: str = "val",
        image_size: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        subset: int | str = "all",
        subset_seed: int = 0,
        prompts_csv: str | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, subset=subset, subset_seed=subset_seed,
                         prompts_csv=prompts_csv, on_bad_image=on_bad_image)
        self.root = root
        self.split_name = split
        self._item_prompts: list[str] | None = None

    # -- classes -------------------------------------------------------------------------------
    def class_list(self) -> list[ImageNetClass]:
        """The classes of this dataset, in label order."""
        return list(imagenet_classes())

    @property
    def wnids(self) -> list[str]:
        """WordNet ids, in label order (= the class folder names)."""
        return [c.wnid for c in self.class_list()]

    @property
    def classes(self) -> list[str]:
        return [c.classname for c in self.class_list()]

    @property
    def default_prompts(self) -> list[str]:
        return fill(IMAGENET_TEMPLATE, self.classes)

    @property
    def label_ids(self) -> list[int]:
        """Each class's ImageNet-1K id (0..999)."""
        return [c.classidx for c in self.class_list()]

    # -- files ---------------------------------------------------------------------------------
    def split_dir(self) -> Path:
        """``<root>/<split>``, checked to exist (else :class:`DatasetError` with instructions)."""
        if self.root is None:
            raise DatasetError(f"no ImageNet root was given.\n{_instructions(None, self.split_name)}")
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"ImageNet root {root} does not exist.\n{_instructions(str(root), self.split_name)}")
        split_dir = root / self.split_name
        if not split_dir.is_dir():
            hint = ""
            known = {c.wnid for c in imagenet_classes()}
            if any(p.is_dir() and p.name in known for p in root.iterdir()):
                hint = (f" {root} itself holds class folders: pass its parent as root (root={root.parent}) "
                        f"or name the folder {split_dir}.")
            raise DatasetError(f"ImageNet root {root} has no '{self.split_name}' folder ({split_dir}).{hint}\n"
                               f"{_instructions(str(root), self.split_name)}")
        return split_dir

    def prepare_data(self) -> None:
        """Only verifies the layout: ImageNet is never downloaded."""
        self.split  # noqa: B018 - builds (and caches) the split, raising DatasetError on a bad layout

    def build_split(self) -> SplitIndex:
        split_dir = self.split_dir()
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
        folders = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        if not folders:
            loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
            if loose:
                raise DatasetError(
                    f"{split_dir} holds {len(loose)} image file(s) (e.g. {loose[0]}) but no class folders: the images "
                    f"are not arranged by class. Do step 2:\n{_instructions(self.root, self.split_name)}")
            raise DatasetError(f"{split_dir} holds no class (wnid) folders; expected {split_dir}/n01440764/*.JPEG "
                               f"and so on.\n{_instructions(self.root, self.split_name)}")
        known = {c.wnid for c in imagenet_classes()}
        unknown = [e.path for e in folders if e.name not in known]
        if unknown:
            raise DatasetError(
                f"class folder {unknown[0]} is not an ImageNet-1K class (folders must be named by wnid, e.g. "
                f"n01440764){f'; {len(unknown) - 1} more like it' if len(unknown) > 1 else ''}. Move it out of "
                f"{split_dir}, or point root at a folder with the ImageFolder layout <root>/<split>/<wnid>/*.JPEG.")
        present = {e.name for e in folders}
        wnids = self.wnids
        missing = [w for w in wnids if w not in present]
        if missing:
            raise DatasetError(
                f"{len(missing)} of the {len(wnids)} {self.name} class folders are missing from {split_dir} (e.g. "
                f"{', '.join(missing[:5])}): the copy is incomplete. Re-extract the split (step 2 of the ImageNet "
                f"instructions), or use subset=... to evaluate part of a complete copy.")
        labels: list[int] = []
        refs: list[str] = []
        for label, wnid in enumerate(wnids):  # wnids are sorted, so this is (class, file name) order
            files = list_images(split_dir / wnid)
            if not files:
                raise DatasetError(f"class folder {split_dir / wnid} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                   f"re-extract that class from the ImageNet archive.")
            labels += [label] * len(files)
            refs += files
        return SplitIndex(labels=labels, refs=refs)

    def load_item(self, index: int, ref: Any) -> dict:
        if self._item_prompts is None:
            self._item_prompts = self.prompts
        label = self.split.labels[index]
        return {"image": load_image(ref, self.image_size), "label": label, "prompt": self._item_prompts[label]}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": None if self.root is None else str(Path(self.root).expanduser()),
                "split": self.split_name}


class ImageNet100DataModule(ImageNetDataModule):
    """ImageNet-100: the 100 classes of the CMC list, labels 0..99 in sorted-wnid order.

    Works on a full ImageNet root (only the 100 class folders are read; the other ImageNet folders are
    ignored) or on an ImageNet-100 folder with the same ``<root>/<split>/<wnid>/*.JPEG`` layout; the
    indices are the same in both. :attr:`label_ids` gives each class's ImageNet-1K id.

    Args:
        root: the folder that holds ``<split>/``; ``None`` fails with instructions for getting ImageNet.
        split: the split folder under ``root`` (``"val"``: 5,000 images, 50 per class).
        image_size: side of the square images fed to the model.
        batch_size: images per dataloader batch.
        num_workers: dataloader worker processes.
        pin_memory: pin batches in page-locked memory (for GPUs).
        subset: ``"all"``, an integer (that many images per class, drawn with ``subset_seed`` and
            stratified by label), or the path of a file of split indices (``.npy``, ``.json`` list,
            or text with one index per line).
        subset_seed: seed of the stratified subset draw.
        prompts_csv: a CSV with columns ``classidx,classname,prompt`` overriding the class prompts
            (``classidx`` is the label 0..99).
        on_bad_image: ``"error"`` (default) raises naming an unreadable file; ``"skip"`` leaves it out
            and records it in the run's report.
    """

    name = "imagenet100"

    def class_list(self) -> list[ImageNetClass]:
        wanted = set(imagenet100_wnids())
        return [c for c in imagenet_classes() if c.wnid in wanted]

    @property
    def prompts(self) -> list[str]:
        """One prompt per class. ``prompts_csv`` may number the classes 0..99 or by ImageNet-1K id (as
        the paper's ``imagenet100_prompts.csv`` does)."""
        if self.prompts_csv is None:
            return list(self.default_prompts)
        try:
            return read_prompts_csv(self.prompts_csv, self.num_classes)
        except DatasetError as by_label:
            try:
                with open(self.prompts_csv, newline="", encoding="utf-8") as fh:
                    rows = {int(r["classidx"]): r["prompt"] for r in csv.DictReader(fh)}
            except (OSError, KeyError, ValueError, TypeError):
                raise by_label from None
            ids = self.label_ids
            if all(i in rows for i in ids):
                return [rows[i] for i in ids]
            raise DatasetError(f"{by_label}; nor does it have a row for every ImageNet-100 class by ImageNet-1K id "
                               f"(e.g. {ids[0]})") from None
