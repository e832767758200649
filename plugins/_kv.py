"""Shared machinery of the key/value downsampling methods (``todo``, ``bigain_td``).

Queries keep all ``N`` tokens; keys and values are computed from a ``factor``-times smaller grid of
the same tokens, so the attention output needs no restoring. Downsampling the attention input before
the key/value projections equals downsampling the keys and values themselves, since every pooling
used here is linear with weights summing to one.
"""

from __future__ import annotations

from abc import abstractmethod

from torch import Tensor

from bigain.compressor import Compressed, LayerContext, TokenCompressor
from bigain.plugins._tokens import check_factor, from_grid, to_grid

__all__ = ["KVDownsample"]


class KVDownsample(TokenCompressor):
    identity_params = {"factor": 1}

    def __init__(self, *, factor: int) -> None:
        check_factor(factor, method=self.name or type(self).__name__)
        self.factor = factor

    def applies_to(self, ctx: LayerContext) -> bool:
        h, w = ctx.grid
        return h // self.factor >= 1 and w // self.factor >= 1

    @abstractmethod
    def downsample(self, grid_tokens: Tensor, ctx: LayerContext) -> Tensor:
        """``[B, C, h, w]`` -> ``[B, C, h // factor, w // factor]``."""

    def compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        if self.factor == 1:
            return Compressed.identity(x)
        context = from_grid(self.downsample(to_grid(x, ctx.grid), ctx))
        return Compressed(x, context)
