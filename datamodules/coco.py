"""``coco``: COCO-2017 - multi-label classification over the 80 categories, captions for generation.

Layout (the official archives ``val2017.zip`` and ``annotations_trainval2017.zip`` extracted into
``root``)::

    <root>/val2017/000000000139.jpg ...
    <root>/annotations/instances_val2017.json   # multi-label targets
    <root>/annotations/captions_val2017.json    # captions (not needed with caption="none")

Items are the images of the instances file ordered by image id; ``index`` is the position in that
list (5,000 images for val2017). An item's ``label`` is the sorted list of the category indices that
its instance annotations name (crowd annotations included), where category index ``i`` is the
``i``-th category by sorted COCO category id (0..79). Its ``caption`` is the image's first caption in
the captions file, or one drawn with ``(caption_seed, image id)``.

Images without instance annotations (48 in val2017) have an empty label list, which can never be
right; ``unannotated="skip"`` (default) leaves them out of the evaluated items and reports how many
(:meth:`COCODataModule.describe`, :attr:`COCODataModule.unannotated_ids`); their indices stay reserved
so that indices do not depend on this option. ``unannotated="keep"`` evaluates them (the released
code's behaviour: they always count as wrong).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bigain.datamodules.base import BigainDataModule, SplitIndex, load_image
from bigain.datamodules.prompts import COCO_TEMPLATE, fill
from bigain.errors import ConfigError, DatasetError

__all__ = ["COCODataModule"]


def _instructions(root: str, split: str) -> str:
    return (
        "To get COCO-2017:\n"
        f"  1. Download {split}2017.zip and annotations_trainval2017.zip from https://cocodataset.org/#download.\n"
        f"  2. Extract both into {root}, giving {root}/{split}2017/*.jpg and "
        f"{root}/annotations/instances_{split}2017.json (and captions_{split}2017.json).\n"
        f"  3. Pass root={root} (the folder that holds {split}2017/ and annotations/)."
    )


def _read_json(path: Path, what: str, root: str, split: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"the COCO {what} file {path} does not exist.\n{_instructions(root, split)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read the COCO {what} file {path} ({exc}); it is damaged: re-extract "
                           f"annotations_trainval2017.zip") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"the COCO {what} file {path} is not a COCO annotation file (no top-level object)")
    return data


class COCODataModule(BigainDataModule):
    """COCO-2017 (val by default) as a multi-label dataset with captions.

    Args:
        root: the folder that holds ``<split>2017/`` and ``annotations/``.
        split: ``"val"`` (5,000 images, the paper's) or ``"train"``.
        caption: which caption each item carries under ``"caption"``: ``"first"`` (its first caption in
            the captions file), ``"random"`` (one drawn with ``(caption_seed, image id)``, the same in
            every run), or ``"none"`` (no captions; the captions file is not read).
        caption_seed: seed of ``caption="random"``.
        unannotated: images without instance annotations: ``"skip"`` leaves them out of the evaluated
            items (and reports their number), ``"keep"`` evaluates them with an empty label list.
        image_size: side of the square images fed to the model.
        batch_size: images per dataloader batch.
        num_workers: dataloader worker processes.
        pin_memory: pin batches in page-locked memory (for GPUs).
        subset: ``"all"``, an integer (that many images per class, drawn with ``subset_seed`` and
            stratified by each image's first label), or the path of a file of split indices (``.npy``,
            ``.json`` list, or text with one index per line).
        subset_seed: seed of the stratified subset draw.
        prompts_csv: a CSV with columns ``classidx,classname,prompt`` overriding the category prompts.
        on_bad_image: ``"error"`` (default) raises naming an unreadable file; ``"skip"`` leaves it out
            and records it in the run's report.
    """

    name = "coco"
    multilabel = True

    def __init__(
        self,
        *,
        root: str | None = None,
        split: Literal["val", "train"] = "val",
        caption: Literal["first", "random", "none"] = "first",
        caption_seed: int = 0,
        unannotated: Literal["skip", "keep"] = "skip",
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
        if split not in ("val", "train"):
            raise ConfigError(f"COCO split must be 'val' or 'train', got {split!r}")
        if caption not in ("first", "random", "none"):
            raise ConfigError(f"caption must be 'first', 'random' or 'none', got {caption!r}")
        if unannotated not in ("skip", "keep"):
            raise ConfigError(f"unannotated must be 'skip' or 'keep', got {unannotated!r}")
        self.root = root
        self.split_name = split
        self.caption = caption
        self.caption_seed = caption_seed
        self.unannotated = unannotated
        self._categories: list[str] = []
        self._category_ids: list[int] = []
        self._image_ids: list[int] = []
        self._captions: list[str] = []
        self._unannotated_indices: set[int] = set()

    # -- files ---------------------------------------------------------------------------------
    def _root(self) -> Path:
        if self.root is None:
            raise DatasetError(f"no COCO root was given.\n{_instructions('<root>', self.split_name)}")
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"COCO root {root} does not exist.\n{_instructions(str(root), self.split_name)}")
        return root

    def prepare_data(self) -> None:
        """Only verifies the files (COCO is not downloaded by bigain)."""
        self.split  # noqa: B018 - builds (and caches) the split, raising DatasetError on a bad layout

    def build_split(self) -> SplitIndex:
        root = self._root()
        split = self.split_name
        images_dir = root / f"{split}2017"
        instances_path = root / "annotations" / f"instances_{split}2017.json"
        instances = _read_json(instances_path, "instances", str(root), split)
        if not images_dir.is_dir():
            raise DatasetError(f"the COCO image folder {images_dir} does not exist.\n{_instructions(str(root), split)}")
        missing_keys = [k for k in ("images", "annotations", "categories") if not isinstance(instances.get(k), list)]
        if missing_keys:
            raise DatasetError(f"{instances_path} lacks {missing_keys}: it is not a COCO instances file "
                               f"(expected instances_{split}2017.json from annotations_trainval2017.zip)")
        try:
            categories = sorted((int(c["id"]), str(c["name"])) for c in instances["categories"])
            cat_index = {cid: i for i, (cid, _) in enumerate(categories)}
            images = sorted((int(im["id"]), str(im["file_name"])) for im in instances["images"])
            labels_of: dict[int, set[int]] = {image_id: set() for image_id, _ in images}
            for ann in instances["annotations"]:
                image_id, cid = int(ann["image_id"]), int(ann["category_id"])
                if cid not in cat_index:
                    raise DatasetError(f"{instances_path}: annotation {ann.get('id')} names category {cid}, which "
                                       f"is not among the file's categories; the file is damaged: re-extract it")
                if image_id not in labels_of:
                    raise DatasetError(f"{instances_path}: annotation {ann.get('id')} names image {image_id}, which "
                                       f"is not among the file's images; the file is damaged: re-extract it")
                labels_of[image_id].add(cat_index[cid])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{instances_path} is not in the COCO instances format ({type(exc).__name__}: {exc}); "
                               f"re-extract annotations_trainval2017.zip") from exc
        if not images:
            raise DatasetError(f"{instances_path} lists no images")
        refs = [str(images_dir / file_name) for _, file_name in images]
        absent = [r for r in refs if not Path(r).is_file()]
        if absent:
            raise DatasetError(f"{len(absent)} of the {len(refs)} images listed in {instances_path} are missing from "
                               f"{images_dir} (e.g. {absent[0]}); re-extract {split}2017.zip into {root}")
        image_ids = [image_id for image_id, _ in images]
        labels = [sorted(labels_of[image_id]) for image_id in image_ids]
        captions = self._read_captions(root, image_ids) if self.caption != "none" else []

        self._category_ids = [cid for cid, _ in categories]
        self._categories = [name for _, name in categories]
        self._image_ids = image_ids
        self._captions = captions
        self._unannotated_indices = {i for i, lab in enumerate(labels) if not lab}
        return SplitIndex(labels=labels, refs=refs)

    def _read_captions(self, root: Path, image_ids: list[int]) -> list[str]:
        path = root / "annotations" / f"captions_{self.split_name}2017.json"
        data = _read_json(path, "captions", str(root), self.split_name)
        by_image: dict[int, list[str]] = {image_id: [] for image_id in image_ids}
        try:
            for ann in data["annotations"]:  # file order: "first" is the first one listed
                image_id = int(ann["image_id"])
                if image_id in by_image:
                    by_image[image_id].append(str(ann["caption"]).strip())
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path} is not in the COCO captions format ({type(exc).__name__}: {exc}); "
                               f"re-extract annotations_trainval2017.zip") from exc
        without = [image_id for image_id, caps in by_image.items() if not caps]
        if without:
            raise DatasetError(f"{path} has no caption for {len(without)} image(s) of the split (e.g. image id "
                               f"{without[0]}); re-extract annotations_trainval2017.zip, or pass caption='none' to "
                               f"classify without captions")
        if self.caption == "first":
            return [by_image[image_id][0] for image_id in image_ids]
        return [caps[int(np.random.default_rng([self.caption_seed, image_id]).integers(len(caps)))]
                for image_id, caps in ((i, by_image[i]) for i in image_ids)]

    # -- classes -------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Category names, ordered by COCO category id (reads the instances file on first use)."""
        self.split  # noqa: B018
        return list(self._categories)

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each class."""
        self.split  # noqa: B018
        return list(self._category_ids)

    @property
    def default_prompts(self) -> list[str]:
        return fill(COCO_TEMPLATE, self.classes)

    @property
    def image_ids(self) -> list[int]:
        """COCO image id of each item of the split (sorted)."""
        self.split  # noqa: B018
        return list(self._image_ids)

    @property
    def captions(self) -> list[str]:
        """The caption of each item of the split (empty with ``caption="none"``)."""
        self.split  # noqa: B018
        return list(self._captions)

    @property
    def unannotated_ids(self) -> list[int]:
        """Ids of the images without instance annotations (all of them, whatever ``unannotated`` says)."""
        self.split  # noqa: B018
        return [self._image_ids[i] for i in sorted(self._unannotated_indices)]

    # -- items ---------------------------------------------------------------------------------
    def selected_indices(self) -> list[int]:
        chosen = super().selected_indices()  # builds the split
        if self.unannotated == "skip":
            chosen = [i for i in chosen if i not in self._unannotated_indices]
        return chosen

    def load_item(self, index: int, ref: Any) -> dict:
        item: dict[str, Any] = {"image": load_image(ref, self.image_size), "label": list(self.split.labels[index])}
        if self.caption != "none":
            item["caption"] = self._captions[index]
        return item

    def describe(self) -> dict[str, Any]:
        selected = BigainDataModule.selected_indices(self)  # builds the split
        skipped = sum(1 for i in selected if i in self._unannotated_indices) if self.unannotated == "skip" else 0
        return {**super().describe(), "root": None if self.root is None else str(Path(self.root).expanduser()),
                "split": self.split_name, "caption": self.caption, "caption_seed": self.caption_seed,
                "unannotated": self.unannotated, "num_unannotated": len(self.unannotated_ids),
                "unannotated_skipped": skipped}
