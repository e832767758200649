"""PixArt-alpha / PixArt-Sigma (``diffusers.PixArtTransformer2DModel``): a DiT with text
cross-attention and one shared AdaLN-single timestep modulation.

The self-attention layers (``transformer_blocks[i].attn1``), their grid and the block selection are
a DiT's: every block on the ``(H / patch, W / patch)`` grid, the paper's DiT blocks scaled to the
model's depth by default. The text enters through ``attn2`` (cross-attention), which is never
compressed; the metric is the self-attention input, as for a DiT.
"""

from __future__ import annotations

from typing import Any

import torch

from bigain.adapters.dit import DiTAdapter

__all__ = ["PixArtAdapter"]


class PixArtAdapter(DiTAdapter):
    """``transformer_blocks[i].attn1`` of a PixArt transformer, selected like DiT blocks."""

    family = "pixart"
    model_class = "diffusers:PixArtTransformer2DModel"
    handles = "PixArtTransformer2DModel (PixArt-alpha / PixArt-Sigma)"

    def example_inputs(self, batch_size: int, size: tuple[int, int], *, generator: Any = None,
                       text_tokens: int = 120) -> dict[str, Any]:
        """A latent, ``text_tokens`` T5-sized caption tokens (PixArt-alpha's 120) and, when the model
        takes them, the resolution / aspect-ratio conditions."""
        cfg = self.denoiser.config
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        # diffusers resolves use_additional_conditions=None from sample_size (on for 128, the 1024 px model)
        if getattr(self.denoiser, "use_additional_conditions", cfg.use_additional_conditions):
            px = torch.tensor([[size[0] * 8.0, size[1] * 8.0]]).expand(batch_size, 2)
            added = {"resolution": px, "aspect_ratio": (px[:, :1] / px[:, 1:])}
        return {"hidden_states": torch.randn(batch_size, cfg.in_channels, *size, generator=generator),
                "encoder_hidden_states": torch.randn(batch_size, text_tokens, cfg.caption_channels,
                                                     generator=generator),
                "timestep": torch.full((batch_size,), 500), "added_cond_kwargs": added}
