"""``tome``: Token Merging for Stable Diffusion (Bolya & Hoffman, 2023), as in the ``tomesd`` package.

One destination per ``sy x sx`` cell (random or top-left), every other token a source; each source
finds its most cosine-similar destination; the ``r = int(N * ratio)`` most similar sources are
averaged into their destinations (plain mean). The merged tokens attend among themselves (queries,
keys and values all merged) and the output is copied back to every token a destination stands for.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch
from torch import Tensor

from bigain.compressor import Compressed, LayerContext, TokenCompressor
from bigain.errors import ConfigError
from bigain.plugins._tokens import (
    bipartite_soft_matching,
    cell_counts,
    check_ratio,
    dst_mask,
    split_by_mask,
)

__all__ = ["ToMe", "CellMerge"]


class CellMerge(TokenCompressor):
    """Shared machinery of the cell-based merging methods: subclasses choose the destinations."""

    identity_params = {"ratio": 0.0}

    def __init__(self, *, ratio: float, sx: int, sy: int) -> None:
        check_ratio(ratio, sx, sy, method=self.name or type(self).__name__)
        self.ratio = float(ratio)
        self.sx = sx
        self.sy = sy

    @abstractmethod
    def choose_destinations(self, x: Tensor, ctx: LayerContext, cells: tuple[int, int]) -> Tensor:
        """``[B, hs, ws]`` in-cell offsets (``0 .. sy*sx - 1``) of each cell's destination."""

    def compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        n = x.shape[1]
        hs, ws = cell_counts(ctx.grid, self.sx, self.sy)
        r = int(n * self.ratio)
        if r <= 0 or hs * ws == 0:
            return Compressed.identity(x)
        choice = self.choose_destinations(x, ctx, (hs, ws))
        a_idx, b_idx = split_by_mask(dst_mask(choice, ctx.grid, self.sx, self.sy), hs * ws)
        matching = bipartite_soft_matching(ctx.metric, a_idx, b_idx, min(r, a_idx.shape[1]))
        merged = matching.merge(x)
        return Compressed(merged, merged, matching.unmerge)


class ToMe(CellMerge):
    """ToMe for Stable Diffusion.

    Args:
        ratio: fraction of tokens merged away, ``r = int(N * ratio)``; at most ``1 - 1/(sx*sy)``.
        sx: stride cell width.
        sy: stride cell height.
        dst: ``"random"`` - a random destination per cell, one pattern per (layer, timestep), shared
            by every sample at that timestep (so both halves of a guidance batch, and every class
            scored at one timestep, merge alike; nothing depends on batch size); or ``"topleft"`` -
            always the cell's top-left token (``tomesd``'s ``use_rand=False``).
    """

    name = "tome"

    def __init__(self, *, ratio: float = 0.5, sx: int = 2, sy: int = 2,
                 dst: Literal["random", "topleft"] = "random") -> None:
        super().__init__(ratio=ratio, sx=sx, sy=sy)
        if dst not in ("random", "topleft"):
            raise ConfigError(f"tome: dst must be 'random' or 'topleft', got {dst!r}")
        self.dst = dst

    def choose_destinations(self, x: Tensor, ctx: LayerContext, cells: tuple[int, int]) -> Tensor:
        if self.dst == "topleft":
            return torch.zeros((x.shape[0], *cells), dtype=torch.long, device=x.device)
        return ctx.sample_randint(self.sx * self.sy, cells)
