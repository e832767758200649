"""Stable Diffusion 3 / 3.5 (``diffusers.SD3Transformer2DModel``): MMDiT joint attention.

Every ``JointTransformerBlock`` runs one joint attention, ``transformer_blocks[i].attn``, over the
image tokens (``hidden_states``, the ``(H / patch, W / patch)`` patch grid) and the text tokens
(``encoder_hidden_states``, projected by the layer's own ``add_q/k/v_proj``). Only the image tokens
are compressed: the processor still receives every text token, so text attends to the compressed
image tokens and the image tokens attend to all of the text, and the text output keeps its length.
SD3.5's dual-attention blocks (``dual_attention_layers`` in the config) add ``attn2``, a plain
self-attention over the image tokens, compressed in the same block selection.

Positions are absolute (added to the patches before the first block), so merged tokens need no
position of their own. Keys and values of ``todo`` / ``bigain_td`` reach the processor through
``attn.to_k`` / ``attn.to_v`` (``kv="projections"``); blocks are selected like DiT blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.adapters.base import AttentionSite, DenoiserAdapter, argument
from bigain.adapters.dit import select_blocks

__all__ = ["SD3Adapter"]


class SD3Adapter(DenoiserAdapter):
    """The joint ``attn`` (and SD3.5's ``attn2``) of every ``JointTransformerBlock``, image tokens only."""

    family = "sd3"
    default_metric = "attention"
    model_class = "diffusers:SD3Transformer2DModel"
    handles = "SD3Transformer2DModel (Stable Diffusion 3 / 3.5)"

    def sites(self) -> list[AttentionSite]:
        out = []
        for i, block in enumerate(self.denoiser.transformer_blocks):
            out.append(AttentionSite(f"transformer_blocks.{i}.attn", block, block.attn, 1, i,
                                     text="encoder", kv="projections"))
            if getattr(block, "attn2", None) is not None:  # SD3.5 dual attention: image tokens only
                out.append(AttentionSite(f"transformer_blocks.{i}.attn2", block, block.attn2, 1, i,
                                         text="none", kv="projections"))
        return out

    def select(self, sites: list[AttentionSite], *, max_downsample: int,
               blocks: Sequence[int] | Literal["paper", "all"]) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
        return select_blocks(sites, blocks, len(self.denoiser.transformer_blocks), what="SD3 transformer")

    def token_size(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        sample = argument(args, kwargs, 0, ("hidden_states",))
        if isinstance(sample, Tensor) and sample.ndim == 4:
            p = int(self.denoiser.config.patch_size)
            return int(sample.shape[-2]) // p, int(sample.shape[-1]) // p
        return None

    def timesteps(self, args: tuple, kwargs: dict) -> Any:
        return argument(args, kwargs, 3, ("timestep",))

    def grid(self, site: AttentionSite, num_tokens: int, size: tuple[int, int]) -> tuple[int, int] | None:
        return size if size[0] * size[1] == num_tokens else None

    def example_inputs(self, batch_size: int, size: tuple[int, int], *, generator: Any = None,
                       text_tokens: int = 333) -> dict[str, Any]:
        """A latent, ``text_tokens`` text tokens (SD3's 77 CLIP + 256 T5 = 333) and pooled embeddings."""
        cfg = self.denoiser.config
        return {"hidden_states": torch.randn(batch_size, cfg.in_channels, *size, generator=generator),
                "encoder_hidden_states": torch.randn(batch_size, text_tokens, cfg.joint_attention_dim,
                                                     generator=generator),
                "pooled_projections": torch.randn(batch_size, cfg.pooled_projection_dim, generator=generator),
                "timestep": torch.full((batch_size,), 500.0)}
