"""PixArt-alpha / PixArt-Sigma (``diffusers.PixArtTransformer2DModel``): a DiT with text
cross-attention and one shared AdaLN-single timestep modulation.

The self-attention layers (``transformer_blocks[i].attn1``), their grid and the block selection are
a DiT's: every block on the ``(H / patch, W / patch)`` grid, the paper's DiT blocks scaled to the
model's depth by default. The text enters through ``attn2`` (cross-attention), which is never
compressed; the metric is the self-attention input, as for a DiT.
"""

from __future__ import annotations

from bigain.adapters.dit import DiTAdapter

__all__ = ["PixArtAdapter"]


class PixArtAdapter(DiTAdapter):
    """``transformer_blocks[i].attn1`` of a PixArt transformer, selected like DiT blocks."""

    family = "pixart"
    model_class = "diffusers:PixArtTransformer2DModel"
    handles = "PixArtTransformer2DModel (PixArt-alpha / PixArt-Sigma)"
