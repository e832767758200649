"""Prompt templates of the paper and the class lists bundled with bigain (``bigain/datamodules/data``).

The templates are those of the released BiGain prompt files: one prompt per class,
``"a photo of a {}."`` for ImageNet, ImageNet-100 and COCO, ``"a photo of a {}, a type of pet."`` for
Oxford-IIIT Pets.

Bundled files:

- ``imagenet_classes.csv`` (``classidx,wnid,classname``): the 1,000 ImageNet-1K classes in the standard
  sorted-wnid order (class 0 is ``n01440764``, tench). The wnids are timm's ``imagenet_synsets.txt``; the
  names are the OpenAI CLIP class names (open_clip's ``IMAGENET_CLASSNAMES``), the names of the
  diffusion-classifier ``prompts/imagenet_prompts.csv`` that the paper's prompts come from.
- ``imagenet100_wnids.txt``: the standard ImageNet-100 class list of Contrastive Multiview Coding
  (HobbitLong/CMC ``imagenet100.txt``), 100 wnids in that file's order.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = [
    "IMAGENET_TEMPLATE",
    "PETS_TEMPLATE",
    "COCO_TEMPLATE",
    "ImageNetClass",
    "read_data_file",
    "imagenet_classes",
    "imagenet100_wnids",
    "fill",
]

#: ImageNet-1K and ImageNet-100 (and the paper's default for object datasets).
IMAGENET_TEMPLATE = "a photo of a {}."
#: Oxford-IIIT Pets.
PETS_TEMPLATE = "a photo of a {}, a type of pet."
#: COCO-2017 categories.
COCO_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class ImageNetClass:
    """One ImageNet-1K class: its id (0..999), WordNet id and name."""

    classidx: int
    wnid: str
    classname: str


def read_data_file(name: str) -> str:
    """Text of a file bundled in ``bigain/datamodules/data``."""
    return resources.files("bigain.datamodules").joinpath("data", name).read_text(encoding="utf-8")


@cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1,000 ImageNet-1K classes, in class-id (= sorted wnid) order."""
    rows = list(csv.DictReader(io.StringIO(read_data_file("imagenet_classes.csv"))))
    classes = tuple(ImageNetClass(int(r["classidx"]), r["wnid"], r["classname"]) for r in rows)
    wnids = [c.wnid for c in classes]
    if [c.classidx for c in classes] != list(range(1000)) or wnids != sorted(wnids):
        raise RuntimeError("the bundled imagenet_classes.csv is damaged; reinstall bigain")
    return classes


@cache
def imagenet100_wnids() -> tuple[str, ...]:
    """The 100 wnids of ImageNet-100 (CMC list), sorted (= the order of labels 0..99)."""
    wnids = sorted(set(read_data_file("imagenet100_wnids.txt").split()))
    if len(wnids) != 100:
        raise RuntimeError("the bundled imagenet100_wnids.txt is damaged; reinstall bigain")
    return tuple(wnids)


def fill(template: str, names: list[str] | tuple[str, ...]) -> list[str]:
    """One prompt per class name."""
    return [template.format(name) for name in names]
