"""``tome``: Token Merging for Stable Diffusion (Bolya & Hoffman, 2023), as in the ``tomesd`` package.

One destination per ``sy x sx`` cell (random or top-left), every other token a source; each source
finds its most cosine-similar destination; the ``r = int(N * ratio)`` most similar sources are
averaged into their destinations (plain mean). The merged tokens attend among themselves (queries,
keys and values all merged) and the output is copied back to every token a destination stands for.
With token positions (``ctx.positions``, a rotary family such as Flux) a merged token sits at the
mean of the positions of the tokens it stands for: positions are merged exactly like the tokens.

Random destinations are keyed by default (one pattern per seed, layer and timestep, whatever the
batch). ``randomness="tomesd"`` reproduces the randomness of the ``tomesd`` package and the released
BiGain scripts instead: a ``torch.Generator`` seeded once with the seed and advanced by every call,
one pattern per call shared by the batch, and top-left destinations whenever the batch size is odd.
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
    check_similarity,
    dst_mask,
    split_by_mask,
)

__all__ = ["ToMe", "CellMerge"]


class CellMerge(TokenCompressor):
    """Shared machinery of the cell-based merging methods: subclasses choose the destinations."""

    identity_params = {"ratio": 0.0}

    def __init__(self, *, ratio: float, sx: int, sy: int, similarity: Literal["blocked", "fused"] = "blocked") -> None:
        check_ratio(ratio, sx, sy, method=self.name or type(self).__name__)
        check_similarity(similarity, method=self.name or type(self).__name__)
        self.ratio = float(ratio)
        self.sx = sx
        self.sy = sy
        self.similarity = similarity

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
        matching = bipartite_soft_matching(ctx.metric, a_idx, b_idx, min(r, a_idx.shape[1]),
                                           similarity=self.similarity)
        merged = matching.merge(x)
        if ctx.positions is None:
            return Compressed(merged, merged, matching.unmerge)
        positions = matching.merge(ctx.positions)
        return Compressed(merged, merged, matching.unmerge, query_positions=positions, context_positions=positions)


class ToMe(CellMerge):
    """ToMe for Stable Diffusion.

    Args:
        ratio: fraction of tokens merged away, ``r = int(N * ratio)``; at most ``1 - 1/(sx*sy)``.
        sx: stride cell width.
        sy: stride cell height.
        dst: ``"random"`` - a random destination per cell; or ``"topleft"`` - always the cell's
            top-left token (``tomesd``'s ``use_rand=False``).
        randomness: where ``dst="random"`` draws from. ``"keyed"`` (the default): one pattern per
            (seed, layer, timestep), shared by every sample at that timestep (both halves of a
            guidance batch, every class scored at one timestep); nothing depends on batch size or
            call order, and it compiles into one graph. ``"tomesd"``: as the ``tomesd`` package and
            the released BiGain scripts draw it - a ``torch.Generator`` on the tokens' device,
            seeded once with the seed and advanced by every call, one pattern per call shared by
            the batch, and top-left destinations whenever the batch size is odd. Results then
            depend on batch size, call order and resumption; eager mode only (a stateful
            generator cannot be traced). For reproducing released numbers, never a default.
        similarity: the similarity search, ``"blocked"`` (eager, the default) or ``"fused"`` (a Triton
            kernel for CUDA GPUs that never writes the similarity matrix); the same merges up to
            float32 summation order.
    """

    name = "tome"

    def __init__(self, *, ratio: float = 0.5, sx: int = 2, sy: int = 2,
                 dst: Literal["random", "topleft"] = "random",
                 randomness: Literal["keyed", "tomesd"] = "keyed",
                 similarity: Literal["blocked", "fused"] = "blocked") -> None:
        super().__init__(ratio=ratio, sx=sx, sy=sy, similarity=similarity)
        if dst not in ("random", "topleft"):
            raise ConfigError(f"tome: dst must be 'random' or 'topleft', got {dst!r}")
        if randomness not in ("keyed", "tomesd"):
            raise ConfigError(f"tome: randomness must be 'keyed' (per seed, layer and timestep; the default) or "
                              f"'tomesd' (a generator advancing per call, as the released scripts), "
                              f"got {randomness!r}")
        self.dst = dst
        self.randomness = randomness
        self._generators: dict[tuple[str, int], torch.Generator] = {}

    def tomesd_generator(self, device: torch.device, seed: int) -> torch.Generator:
        """The generator ``randomness="tomesd"`` draws from on ``device``: created on first use,
        seeded with ``seed`` (as ``torch.Generator(device).manual_seed(seed)``), then advancing."""
        key = (str(device), int(seed))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(int(seed) & ((1 << 64) - 1))
        return self._generators[key]

    def choose_destinations(self, x: Tensor, ctx: LayerContext, cells: tuple[int, int]) -> Tensor:
        b = x.shape[0]
        if self.dst == "topleft" or (self.randomness == "tomesd" and b % 2 == 1):
            return torch.zeros((b, *cells), dtype=torch.long, device=x.device)
        if self.randomness == "tomesd":
            gen = self.tomesd_generator(x.device, ctx.seed)
            k = torch.randint(self.sx * self.sy, size=(*cells, 1), device=gen.device, generator=gen)
            return k.to(x.device).view(1, *cells).expand(b, -1, -1)
        return ctx.sample_randint(self.sx * self.sy, cells)
