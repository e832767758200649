"""Shared machinery of the key/value downsampling methods (``todo``, ``bigain_td``).

Queries keep all ``N`` tokens; keys and values are computed from a ``factor``-times smaller grid of
the same tokens, so the attention output needs no restoring. Downsampling the attention input before
the key/value projections equals downsampling the keys and values themselves, since every pooling
used here is linear with weights summing to one.

With token positions (``ctx.positions``, a rotary family such as Flux) the queries keep their own
positions and each key/value token sits at the same downsampling of the positions of the tokens it
is pooled from (``todo``: its anchor token's position; ``bigain_td``: the alpha blend of the anchor's
position and its cell's centre), computed in float32.
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
        if ctx.positions is None:
            return Compressed(x, context)
        positions = from_grid(self.downsample(to_grid(ctx.positions, ctx.grid), ctx))
        return Compressed(x, context, query_positions=ctx.positions, context_positions=positions)
