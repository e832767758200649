"""``bigain_tm``: Laplacian-gated token merging (BiGain-TM, "LGTM").

ToMe with one change: in every ``sy x sx`` cell the destination is the token with the *lowest*
Laplacian score (the smoothest token), chosen per sample. The score is the depthwise 3x3 Laplacian
of the metric tokens on their grid (zero padding), reduced over channels by the L1 (default) or L2
norm. Smooth destinations absorb similar smooth sources, while high-contrast tokens (edges, texture)
match no destination well, fall outside the top-``r`` and survive unmerged.

Deviation from the released code, on purpose: the cell grouping. The released code takes the
argmin over 1 x (sx*sy) strips of consecutive values of each ``sy x w`` slab instead of the true
``sy x sx`` cells (a reshape without the transpose), so the chosen destination is usually not the
cell's smoothest token; ``legacy_grouping=True`` reproduces it for comparison.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from bigain.compressor import LayerContext
from bigain.errors import ConfigError
from bigain.plugins._tokens import cell_values, to_grid
from bigain.plugins.tome import CellMerge

__all__ = ["BiGainTM", "laplacian_scores"]


def laplacian_scores(tokens: Tensor, grid: tuple[int, int], *, norm: Literal["l1", "l2"] = "l1") -> Tensor:
    """Per-token high-frequency score ``[B, h, w]`` (float32) of ``tokens`` ``[B, N, C]``.

    ``s(p) = || sum_{q in N4(p)} x(q) - 4 x(p) ||`` over channels, neighbours outside the grid
    counting as zero.
    """
    g = to_grid(tokens.float(), grid)
    p = F.pad(g, (1, 1, 1, 1))
    lap = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4.0 * g
    if norm == "l1":
        return lap.abs().sum(dim=1)
    return lap.pow(2).sum(dim=1).sqrt()


class BiGainTM(CellMerge):
    """Laplacian-gated token merging.

    Args:
        ratio: fraction of tokens merged away, ``r = int(N * ratio)``; at most ``1 - 1/(sx*sy)``.
        sx: stride cell width.
        sy: stride cell height.
        norm: channel reduction of the Laplacian response, ``"l1"`` (the paper's) or ``"l2"``.
        legacy_grouping: reproduce the released code's 1x4-strip grouping instead of true cells.
        similarity: the similarity search, ``"blocked"`` (eager, the default) or ``"fused"`` (a Triton
            kernel for CUDA GPUs that never writes the similarity matrix); the same merges up to
            float32 summation order.
    """

    name = "bigain_tm"

    def __init__(self, *, ratio: float = 0.5, sx: int = 2, sy: int = 2,
                 norm: Literal["l1", "l2"] = "l1", legacy_grouping: bool = False,
                 similarity: Literal["blocked", "fused"] = "blocked") -> None:
        super().__init__(ratio=ratio, sx=sx, sy=sy, similarity=similarity)
        if norm not in ("l1", "l2"):
            raise ConfigError(f"bigain_tm: norm must be 'l1' or 'l2', got {norm!r}")
        self.norm = norm
        self.legacy_grouping = bool(legacy_grouping)

    def choose_destinations(self, x: Tensor, ctx: LayerContext, cells: tuple[int, int]) -> Tensor:
        scores = laplacian_scores(ctx.metric, ctx.grid, norm=self.norm)
        return cell_values(scores, self.sx, self.sy, legacy_grouping=self.legacy_grouping).argmin(dim=-1)
