"""``sito``: SiTo, similarity-based token pruning with recovery (Zhang et al., 2025).

Every token gets a representativeness score ``g_i = beta * sum_j cos(x_i, x_j) + alpha * eps_i``
(``eps`` standard normal noise); the highest-scoring token of each ``sy x sx`` cell is a
destination and is always kept. Of the other tokens, the ``int(N * ratio)`` most similar to some
destination are pruned (dropped, not averaged); the rest are kept. After attention over the kept
tokens, each pruned token copies the output of its most similar kept token.

Differences from the released code: similarities in float32 (not fp16), the noise comes from the
framework's generator keyed by (seed, layer, timestep) instead of the global RNG, and grids may be
non-square. ``sum_j cos(x_i, x_j)`` is computed as ``x_i . sum_j x_j`` on normalised tokens, without
the ``N x N`` matrix.

With token positions (``ctx.positions``, a rotary family such as Flux) every kept token keeps its
own position; pruned tokens have none (they are recovered after attention).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from bigain.compressor import Compressed, LayerContext, TokenCompressor
from bigain.errors import ConfigError
from bigain.plugins._tokens import (
    cell_counts,
    cell_values,
    check_ratio,
    check_similarity,
    dst_mask,
    gather_tokens,
    most_similar,
    split_by_mask,
    unit_vectors,
)

__all__ = ["SiTo"]


class SiTo(TokenCompressor):
    """SiTo token pruning.

    Args:
        ratio: fraction of tokens pruned, ``int(N * ratio)``; at most ``1 - 1/(sx*sy)``.
        sx: stride cell width.
        sy: stride cell height.
        noise_alpha: weight of the random term of the destination score.
        sim_beta: weight of the similarity term of the destination score.
        similarity: the search for each token's most similar destination / kept token, ``"blocked"``
            (eager, the default) or ``"fused"`` (a Triton kernel for CUDA GPUs that never writes the
            similarity matrix); the same result up to float32 summation order.
    """

    name = "sito"
    identity_params = {"ratio": 0.0}

    def __init__(self, *, ratio: float = 0.5, sx: int = 2, sy: int = 2,
                 noise_alpha: float = 0.1, sim_beta: float = 1.0,
                 similarity: Literal["blocked", "fused"] = "blocked") -> None:
        check_ratio(ratio, sx, sy, method="sito")
        check_similarity(similarity, method="sito")
        for name, value in (("noise_alpha", noise_alpha), ("sim_beta", sim_beta)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"sito: {name} must be a number >= 0, got {value!r}")
        self.ratio = float(ratio)
        self.sx = sx
        self.sy = sy
        self.noise_alpha = float(noise_alpha)
        self.sim_beta = float(sim_beta)
        self.similarity = similarity

    def compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        b, n, _ = x.shape
        hs, ws = cell_counts(ctx.grid, self.sx, self.sy)
        num_prune = int(n * self.ratio)
        if num_prune <= 0 or hs * ws == 0:
            return Compressed.identity(x)
        m = unit_vectors(ctx.metric)
        m32 = m.float()
        score = self.sim_beta * (m32 @ m32.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(-1)
        if self.noise_alpha:
            score = score + self.noise_alpha * ctx.sample_randn((n,))
        choice = cell_values(score.view(b, *ctx.grid), self.sx, self.sy).argmax(dim=-1)
        a_idx, b_idx = split_by_mask(dst_mask(choice, ctx.grid, self.sx, self.sy), hs * ws)
        num_prune = min(num_prune, a_idx.shape[1])

        src_sim = most_similar(gather_tokens(m, a_idx), gather_tokens(m, b_idx), similarity=self.similarity)[0]
        order = src_sim.argsort(dim=-1, descending=True)
        pruned_idx = a_idx.gather(1, order[:, :num_prune])
        kept_idx = torch.cat([a_idx.gather(1, order[:, num_prune:]), b_idx], dim=1)
        # each pruned token's most similar kept token (unmerged sources included)
        nearest = most_similar(gather_tokens(m, pruned_idx), gather_tokens(m, kept_idx),
                               similarity=self.similarity)[1]

        def restore(y: Tensor) -> Tensor:
            c = y.shape[-1]
            out = y.new_empty(b, n, c)
            out.scatter_(1, kept_idx.unsqueeze(-1).expand(-1, -1, c), y)
            out.scatter_(1, pruned_idx.unsqueeze(-1).expand(-1, -1, c), gather_tokens(y, nearest))
            return out

        kept = gather_tokens(x, kept_idx)
        if ctx.positions is None:
            return Compressed(kept, kept, restore)
        positions = gather_tokens(ctx.positions, kept_idx)
        return Compressed(kept, kept, restore, query_positions=positions, context_positions=positions)
