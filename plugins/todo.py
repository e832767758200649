"""``todo``: ToDo token downsampling (Smith et al., 2024), keys/values only.

Keys and values come from the ``nearest-exact`` downsampling of the attention input by ``factor``
along each axis (for ``factor=2`` the bottom-right token of every 2x2 cell); queries are intact.
Levels are chosen by their spatial size (``max_downsample``), not by channel width.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bigain.compressor import LayerContext
from bigain.plugins._kv import KVDownsample

__all__ = ["ToDo", "nearest_exact"]


def nearest_exact(g: Tensor, factor: int) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, C, h // factor, w // factor]`` with ``nearest-exact`` sampling."""
    h, w = g.shape[-2:]
    return F.interpolate(g, size=(h // factor, w // factor), mode="nearest-exact")


class ToDo(KVDownsample):
    """ToDo.

    Args:
        factor: downsampling factor per axis (2 keeps a quarter of the keys/values; 1 is no-op).
    """

    name = "todo"

    def __init__(self, *, factor: int = 2) -> None:
        super().__init__(factor=factor)

    def downsample(self, grid_tokens: Tensor, ctx: LayerContext) -> Tensor:
        return nearest_exact(grid_tokens, self.factor)
