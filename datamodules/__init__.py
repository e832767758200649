"""LightningDataModules, imported as ``bigain.datamodules`` and registered under the entry-point
group ``bigain.datamodules``."""

from bigain.datamodules.base import BigainDataModule, SplitIndex
from bigain.datamodules.coco import COCODataModule
from bigain.datamodules.imagenet import ImageNet100DataModule, ImageNetDataModule
from bigain.datamodules.pets import PetsDataModule
from bigain.datamodules.toy import ToyDataModule

__all__ = [
    "BigainDataModule",
    "SplitIndex",
    "ToyDataModule",
    "ImageNetDataModule",
    "ImageNet100DataModule",
    "PetsDataModule",
    "COCODataModule",
]
