"""``toy``: the procedural shapes & textures dataset (:mod:`bigain.toy.data`) as a datamodule.

No files: every image is generated from ``(seed, index)``. ``image_size`` other than 32 resizes
the rendered image bicubically (for backbones that need larger inputs).
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F

from bigain.datamodules.base import BigainDataModule, SplitIndex
from bigain.errors import ConfigError
from bigain.toy.data import IMAGE_SIZE, TOY_CLASSES, ToyShapes, toy_prompts

__all__ = ["ToyDataModule"]


class ToyDataModule(BigainDataModule):
    """The toy dataset.

    Args:
        split: ``"test"`` (default) or ``"train"``; they use disjoint seeds.
        length: number of images in the split (labels cycle through the 10 classes).
        seed: overrides the split's seed.

    The other options are :class:`~bigain.datamodules.base.BigainDataModule`'s (``image_size``
    defaults to 32).
    """

    name = "toy"

    def __init__(
        self,
        *,
        split: Literal["train", "test"] = "test",
        length: int = 500,
        seed: int | None = None,
        image_size: int = IMAGE_SIZE,
        batch_size: int = 8,
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
        if length < 1:
            raise ConfigError(f"toy length must be >= 1, got {length}")
        self.data = ToyShapes(split, length=length, seed=seed)

    @property
    def classes(self) -> list[str]:
        return list(TOY_CLASSES)

    @property
    def default_prompts(self) -> list[str]:
        return toy_prompts()

    def build_split(self) -> SplitIndex:
        n = len(self.data)
        return SplitIndex(labels=[i % len(TOY_CLASSES) for i in range(n)], refs=list(range(n)))

    def load_item(self, index: int, ref: Any) -> dict:
        item = self.data[int(ref)]
        if self.image_size != IMAGE_SIZE:
            image = F.interpolate(item["image"][None], size=(self.image_size, self.image_size),
                                  mode="bicubic", align_corners=False)[0].clamp(-1, 1)
            item["image"] = image
        return item

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "split": self.data.split, "seed": self.data.seed}
