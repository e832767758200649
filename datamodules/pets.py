"""``pets``: Oxford-IIIT Pets (37 cat and dog breeds) through torchvision's ``OxfordIIITPet``.

torchvision reads ``<root>/oxford-iiit-pet/images/<image_id>.jpg`` and the split list
``<root>/oxford-iiit-pet/annotations/{test,trainval}.txt`` (lines ``<image_id> <class 1..37> <species
1=cat 2=dog> <breed id>``). The test split has 3,669 images. Items keep the order of the split list;
``index`` is the position in it. Images are read through :func:`~bigain.datamodules.base.load_image`.

The class names are torchvision's (``"Abyssinian"``, ``"American Bulldog"``, ...). The prompts are
the paper's: ``"a photo of a {breed} {cat|dog}, a type of pet."`` - the breed followed by its species
(not repeated when the breed name already ends with it: ``"American Bulldog"``), as in the released
``pets_prompts.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from bigain.datamodules.base import BigainDataModule, SplitIndex, load_image
from bigain.datamodules.prompts import PETS_TEMPLATE, fill
from bigain.errors import ConfigError, DatasetError

__all__ = ["PetsDataModule", "NUM_BREEDS"]

NUM_BREEDS = 37
_SPECIES = {1: "cat", 2: "dog"}


def _instructions(root: str) -> str:
    return (
        "To get Oxford-IIIT Pets:\n"
        f"  1. Pass download=True (e.g. --data.download true) to let torchvision download and extract it into "
        f"{root}/oxford-iiit-pet, or\n"
        "  2. download images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ and "
        f"extract both into {root}/oxford-iiit-pet (giving {root}/oxford-iiit-pet/images/*.jpg and "
        f"{root}/oxford-iiit-pet/annotations/test.txt), then\n"
        f"  3. pass root={root} (the folder that holds oxford-iiit-pet/)."
    )


class PetsDataModule(BigainDataModule):
    """Oxford-IIIT Pets, 37 breeds.

    Args:
        root: the folder that holds ``oxford-iiit-pet/`` (torchvision's layout).
        split: ``"test"`` (3,669 images, the paper's) or ``"trainval"``.
        download: let torchvision download the dataset into ``root`` in :meth:`prepare_data` (the
            dataset is free to download; off by default, so nothing is fetched unless asked).
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

    name = "pets"

    def __init__(
        self,
        *,
        root: str | None = None,
        split: Literal["test", "trainval"] = "test",
        download: bool = False,
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
        if split not in ("test", "trainval"):
            raise ConfigError(f"Pets split must be 'test' or 'trainval', got {split!r}")
        self.root = root
        self.split_name = split
        self.download = download
        self._classes: list[str] = []
        self._species: list[str] = []
        self._item_prompts: list[str] | None = None

    # -- files ---------------------------------------------------------------------------------
    def _root(self) -> Path:
        if self.root is None:
            raise DatasetError(f"no Pets root was given.\n{_instructions('<root>')}")
        return Path(self.root).expanduser()

    def _torchvision_dataset(self, download: bool = False):
        from torchvision.datasets import OxfordIIITPet

        root = self._root()
        base = root / "oxford-iiit-pet"
        try:
            return OxfordIIITPet(str(root), split=self.split_name, target_types="category", download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found"
            missing = [str(p) for p in (base / "images", base / "annotations") if not p.is_dir()]
            raise DatasetError(f"Oxford-IIIT Pets not found under {root}: missing {', '.join(missing) or base} "
                               f"({exc}).\n{_instructions(str(root))}") from exc
        except FileNotFoundError as exc:
            raise DatasetError(f"the Pets split list {base / 'annotations' / (self.split_name + '.txt')} does not "
                               f"exist; the annotations are incomplete: re-extract annotations.tar.gz into {base} "
                               f"(or pass download=True)") from exc
        except ValueError as exc:
            raise DatasetError(f"the Pets split list {base / 'annotations' / (self.split_name + '.txt')} is "
                               f"malformed ({exc}); each line must be '<image_id> <class> <species> <breed id>': "
                               f"re-extract annotations.tar.gz (or pass download=True)") from exc
        except OSError as exc:  # a failed download
            raise DatasetError(f"could not download Oxford-IIIT Pets into {base} ({exc}); download it by hand:\n"
                               f"{_instructions(str(root))}") from exc

    def prepare_data(self) -> None:
        """Downloads (through torchvision) only when ``download=True``; otherwise verifies the files."""
        if self.download:
            self._torchvision_dataset(download=True)
        self.split  # noqa: B018 - builds (and caches) the split, raising DatasetError on a bad layout

    def build_split(self) -> SplitIndex:
        ds = self._torchvision_dataset()
        ann = self._root() / "oxford-iiit-pet" / "annotations" / f"{self.split_name}.txt"
        images = self._root() / "oxford-iiit-pet" / "images"
        labels: list[int] = []
        refs: list[str] = []
        species: dict[int, int] = {}
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                image_id, label, kind = parts[0], int(parts[1]) - 1, int(parts[2])
                if len(parts) != 4 or kind not in _SPECIES or not 0 <= label < NUM_BREEDS:
                    raise ValueError
            except (ValueError, IndexError):
                raise DatasetError(f"{ann}:{lineno} is malformed ({line.strip()!r}); expected '<image_id> "
                                   f"<class 1..{NUM_BREEDS}> <species 1|2> <breed id>': re-extract "
                                   f"annotations.tar.gz") from None
            if species.setdefault(label, kind) != kind:
                raise DatasetError(f"{ann}:{lineno} gives class {label + 1} species {kind}, other lines "
                                   f"{species[label]}; re-extract annotations.tar.gz")
            labels.append(label)
            refs.append(str(images / f"{image_id}.jpg"))
        classes = list(ds.classes)
        if len(labels) != len(ds) or len(classes) != NUM_BREEDS or sorted(species) != list(range(NUM_BREEDS)):
            absent = [i + 1 for i in range(NUM_BREEDS) if i not in species]
            raise DatasetError(f"{ann} lists {len(classes)} of the {NUM_BREEDS} breeds (absent classes: "
                               f"{absent[:10]}); the file is truncated or not the Oxford-IIIT Pets list: re-extract "
                               f"annotations.tar.gz")
        absent_files = [r for r in refs if not Path(r).is_file()]
        if absent_files:
            raise DatasetError(f"{len(absent_files)} images of the Pets {self.split_name} split are missing from "
                               f"{images} (e.g. {absent_files[0]}); re-extract images.tar.gz (or pass download=True)")
        self._classes = classes
        self._species = [_SPECIES[species[i]] for i in range(NUM_BREEDS)]
        return SplitIndex(labels=labels, refs=refs)

    # -- classes -------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """torchvision's breed names, in label order (reads the split list on first use)."""
        self.split  # noqa: B018
        return list(self._classes)

    @property
    def species(self) -> list[str]:
        """``"cat"`` or ``"dog"`` per class."""
        self.split  # noqa: B018
        return list(self._species)

    @property
    def default_prompts(self) -> list[str]:
        names = [breed if breed.lower().endswith(kind) else f"{breed} {kind}"
                 for breed, kind in zip(self.classes, self.species)]
        return fill(PETS_TEMPLATE, names)

    def load_item(self, index: int, ref: Any) -> dict:
        if self._item_prompts is None:
            self._item_prompts = self.prompts
        label = self.split.labels[index]
        return {"image": load_image(ref, self.image_size), "label": label, "prompt": self._item_prompts[label]}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": None if self.root is None else str(self._root()),
                "split": self.split_name, "download": self.download}
