"""Stable Diffusion 1.x / 2.x / XL UNets (``diffusers.UNet2DConditionModel``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bigain.adapters.base import AttentionSite, DenoiserAdapter, argument
from bigain.errors import ConfigError

__all__ = ["UNetAdapter", "unet_levels"]


def _transformer_blocks(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{name}", mod) for name, mod in module.named_modules()
            if type(mod).__name__ == "BasicTransformerBlock"]


def unet_levels(unet: nn.Module) -> dict[str, int]:
    """Downsample level of every ``BasicTransformerBlock`` of a UNet, from its structure: the level
    doubles after each down block with a downsampler and halves after each up block with an
    upsampler."""
    levels: dict[str, int] = {}
    level = 1
    for i, block in enumerate(unet.down_blocks):
        levels.update({name: level for name, _ in _transformer_blocks(block, f"down_blocks.{i}")})
        if getattr(block, "downsamplers", None):
            level *= 2
    if getattr(unet, "mid_block", None) is not None:
        levels.update({name: level for name, _ in _transformer_blocks(unet.mid_block, "mid_block")})
    for i, block in enumerate(unet.up_blocks):
        levels.update({name: level for name, _ in _transformer_blocks(block, f"up_blocks.{i}")})
        if getattr(block, "upsamplers", None):
            level //= 2
    return levels


class UNetAdapter(DenoiserAdapter):
    """The ``attn1`` of every ``BasicTransformerBlock``; levels from the down/up structure; the
    metric is the block's input (as ToMe for SD scores); the grid follows the latent's shape."""

    family = "unet"
    default_metric = "block"
    model_class = "diffusers:UNet2DConditionModel"
    handles = "UNet2DConditionModel (Stable Diffusion 1.x / 2.x / XL)"
    selects_blocks = False

    def sites(self) -> list[AttentionSite]:
        levels = unet_levels(self.denoiser)
        out = []
        for name, block in self.denoiser.named_modules():
            if type(block).__name__ != "BasicTransformerBlock":
                continue
            out.append(AttentionSite(f"{name}.attn1", block, getattr(block, "attn1", None), levels.get(name, 1)))
        return out

    def select(self, sites: list[AttentionSite], *, max_downsample: int,
               blocks: Sequence[int] | Literal["paper", "all"]) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
        if not isinstance(blocks, str) or blocks != "paper":
            raise ConfigError("blocks= selects DiT blocks; for a UNet select levels with max_downsample=")
        chosen = [s for s in sites if s.level <= max_downsample]
        skipped = [(s.name, f"level {s.level} > max_downsample={max_downsample}") for s in sites
                   if s.level > max_downsample]
        return chosen, skipped

    def token_size(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        sample = argument(args, kwargs, 0, ("sample",))
        if isinstance(sample, Tensor) and sample.ndim == 4:
            return int(sample.shape[-2]), int(sample.shape[-1])
        return None

    def all_layers(self) -> dict[str, Any]:
        return {"max_downsample": 1 << 16}

    def example_inputs(self, batch_size: int, size: tuple[int, int], *, generator: Any = None,
                       text_tokens: int = 77) -> dict[str, Any]:
        """A latent, ``text_tokens`` CLIP-sized text tokens and, for an SDXL UNet (``text_time``
        additional conditioning), pooled text embeddings and the size / crop time ids."""
        cfg = self.denoiser.config
        inputs: dict[str, Any] = {
            "sample": torch.randn(batch_size, cfg.in_channels, *size, generator=generator),
            "timestep": torch.full((batch_size,), 500),
            "encoder_hidden_states": torch.randn(batch_size, text_tokens, cfg.cross_attention_dim, generator=generator),
        }
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            h, w = size[0] * 8, size[1] * 8
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch_size, pooled, generator=generator),
                                           "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * batch_size)}
        return inputs
