"""DiT (``diffusers.DiTTransformer2DModel``): a flat stack of blocks on one patch grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.adapters.base import AttentionSite, DenoiserAdapter, argument
from bigain.errors import ConfigError

__all__ = ["DiTAdapter", "PAPER_DIT_BLOCKS", "default_dit_blocks", "select_blocks"]

#: The DiT-XL/2 blocks the paper compresses (``block_tome_flags``): 1-5 and 7-11 of 28.
PAPER_DIT_BLOCKS: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 8, 9, 10, 11)
_PAPER_DIT_DEPTH = 28


def default_dit_blocks(depth: int) -> list[int]:
    """The paper's DiT block selection scaled to a model of ``depth`` blocks.

    Block ``i`` is selected when block ``floor(i * 28 / depth)`` of DiT-XL/2 is: exactly the paper's
    blocks for depth 28, never the first block, and about the first 40% of any deeper or shallower
    model (for example blocks 1-2 of 6, 1-5 of 12).
    """
    return [i for i in range(depth) if (i * _PAPER_DIT_DEPTH) // depth in PAPER_DIT_BLOCKS]


def select_blocks(sites: list[AttentionSite], blocks: Sequence[int] | Literal["paper", "all"], depth: int,
                  *, what: str = "DiT") -> tuple[list[AttentionSite], list[tuple[str, str]]]:
    """The sites whose ``block_index`` is selected by ``blocks`` (``"paper"``: the paper's DiT blocks
    scaled to ``depth`` by :func:`default_dit_blocks`; ``"all"``; or block indices), and
    ``(name, reason)`` for the others."""
    if blocks == "paper":
        chosen = set(default_dit_blocks(depth))
    elif blocks == "all":
        chosen = set(range(depth))
    elif isinstance(blocks, str):
        raise ConfigError(f"blocks must be 'paper', 'all' or a list of block indices, got {blocks!r}")
    else:
        chosen = {int(b) for b in blocks}
        bad = sorted(b for b in chosen if not 0 <= b < depth)
        if bad:
            raise ConfigError(f"blocks {bad} do not exist: this {what} has blocks 0..{depth - 1}")
    return ([s for s in sites if s.block_index in chosen],
            [(s.name, "block not selected") for s in sites if s.block_index not in chosen])


class DiTAdapter(DenoiserAdapter):
    """``transformer_blocks[i].attn1`` of a DiT; every block at level 1 on the
    ``(H / patch, W / patch)`` grid; the metric is the attention input (after AdaLN modulation),
    as the BiGain DiT code scores."""

    family = "dit"
    default_metric = "attention"
    model_class = "diffusers:DiTTransformer2DModel"
    handles = "DiTTransformer2DModel"

    def sites(self) -> list[AttentionSite]:
        return [AttentionSite(f"transformer_blocks.{i}.attn1", block, getattr(block, "attn1", None), 1, i)
                for i, block in enumerate(self.denoiser.transformer_blocks)]

    def select(self, sites: list[AttentionSite], *, max_downsample: int,
               blocks: Sequence[int] | Literal["paper", "all"]) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
        return select_blocks(sites, blocks, len(sites))

    def token_size(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        sample = argument(args, kwargs, 0, ("hidden_states", "sample"))
        if isinstance(sample, Tensor) and sample.ndim == 4:
            p = int(self.denoiser.config.patch_size)
            return int(sample.shape[-2]) // p, int(sample.shape[-1]) // p
        return None

    def grid(self, site: AttentionSite, num_tokens: int, size: tuple[int, int]) -> tuple[int, int] | None:
        return size if size[0] * size[1] == num_tokens else None

    def example_inputs(self, batch_size: int, size: tuple[int, int], *, generator: Any = None) -> dict[str, Any]:
        cfg = self.denoiser.config
        return {"hidden_states": torch.randn(batch_size, cfg.in_channels, *size, generator=generator),
                "timestep": torch.full((batch_size,), 500),
                "class_labels": torch.zeros(batch_size, dtype=torch.long)}
