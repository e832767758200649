"""Flux (``diffusers.FluxTransformer2DModel``): double-stream and single-stream blocks with rotary
position embeddings.

Sites, numbered in execution order as one block index: the ``num_layers`` double-stream blocks
(``transformer_blocks[i].attn``: joint attention, the text as ``encoder_hidden_states``), then the
``num_single_layers`` single-stream blocks (``single_transformer_blocks[j].attn``: one
self-attention over ``[text | image]``, the text first). Only the image tokens are compressed.

The image grid: Flux receives packed latents ``[B, h * w, C]`` and the tokens' coordinates
``img_ids`` (``[h * w, 3]``: 0, row, column), not a 2-D shape. The grid is read from ``img_ids`` the
first time a token count is seen - one small host read, remembered for that count - or declared
ahead with :meth:`FluxAdapter.set_grid` (``handle.adapter.set_grid(h, w)``), which a compiled
denoiser needs: inside a ``torch.compile`` graph an unknown count is never read, and the call is
passed through uncompressed with the reason in ``handle.stats()``. ``bigain classify`` /
``generate`` declare it for you (:meth:`FluxAdapter.declare_latent`, from the image size).

Rotary embeddings: ``ctx.positions`` are the ``img_ids`` coordinates; a compressor returns the
positions of its queries and keys, and the tables are recomputed from them with the model's own
``pos_embed`` (see the attachment page for each method's positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.adapters.base import AttentionSite, DenoiserAdapter, argument
from bigain.adapters.dit import select_blocks
from bigain.errors import ConfigError

__all__ = ["FluxAdapter"]


class FluxAdapter(DenoiserAdapter):
    """Double- and single-stream ``attn`` layers of a Flux transformer, image tokens only."""

    family = "flux"
    default_metric = "attention"
    model_class = "diffusers:FluxTransformer2DModel"
    handles = "FluxTransformer2DModel (FLUX.1)"
    timestep_scale = 1000.0  # Flux receives t / 1000 and multiplies by 1000 itself

    def __init__(self, denoiser: Any) -> None:
        super().__init__(denoiser)
        #: ``{number of image tokens: (h, w)}``: the grids read from ``img_ids`` or declared.
        self.grids: dict[int, tuple[int, int]] = {}

    def sites(self) -> list[AttentionSite]:
        double = list(self.denoiser.transformer_blocks)
        out = [AttentionSite(f"transformer_blocks.{i}.attn", block, block.attn, 1, i,
                             text="encoder", kv="projections", rotary=True) for i, block in enumerate(double)]
        out += [AttentionSite(f"single_transformer_blocks.{j}.attn", block, block.attn, 1, len(double) + j,
                              text="prefix", kv="projections", rotary=True)
                for j, block in enumerate(self.denoiser.single_transformer_blocks)]
        return out

    def select(self, sites: list[AttentionSite], *, max_downsample: int,
               blocks: Sequence[int] | Literal["paper", "all"]) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
        return select_blocks(sites, blocks, len(sites), what="Flux transformer (double- then single-stream blocks)")

    def set_grid(self, height: int, width: int) -> None:
        """Declare the ``height x width`` token grid of the packed latents (for example 64 x 64 at
        1024 px), so no call ever reads ``img_ids`` to find it."""
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (height, width)):
            raise ConfigError(f"set_grid needs two positive integers (token rows, columns), got {height!r}, {width!r}")
        self.grids[height * width] = (height, width)

    def declare_latent(self, shape: tuple[int, int, int]) -> None:
        """The ``(C, h, w)`` latent packs into 2x2 patches: an ``h/2 x w/2`` token grid."""
        _, height, width = (int(v) for v in shape)
        self.set_grid(height // 2, width // 2)

    def _image_ids(self, args: tuple, kwargs: dict) -> Tensor | None:
        ids = argument(args, kwargs, 4, ("img_ids",))
        if not isinstance(ids, Tensor):
            return None
        return ids[0] if ids.ndim == 3 else ids

    def token_size(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        ids = self._image_ids(args, kwargs)
        if ids is None or ids.ndim != 2 or ids.shape[-1] < 3:
            return None
        n = int(ids.shape[0])
        grid = self.grids.get(n)
        if grid is None and not torch.compiler.is_compiling():
            grid = self._read_grid(ids)
        return grid

    def _read_grid(self, ids: Tensor) -> tuple[int, int] | None:
        """The grid of row-major ``img_ids`` (row ``n // w``, column ``n % w``): one host read."""
        n = ids.shape[0]
        rows, cols = ids[:, 1].long(), ids[:, 2].long()
        h, w = rows.max() + 1, cols.max() + 1
        ok = ((rows * w + cols) == torch.arange(n, device=ids.device)).all()
        h, w, ok = (int(v) for v in torch.stack([h, w, ok.long()]).tolist())
        if not ok or h * w != n:
            return None
        self.grids[n] = (h, w)
        return h, w

    def timesteps(self, args: tuple, kwargs: dict) -> Any:
        return argument(args, kwargs, 3, ("timestep",))

    def grid(self, site: AttentionSite, num_tokens: int, size: tuple[int, int]) -> tuple[int, int] | None:
        return size if size[0] * size[1] == num_tokens else None

    def positions(self, args: tuple, kwargs: dict) -> Tensor | None:
        return self._image_ids(args, kwargs)

    def rotary_table(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        b, m, p = positions.shape
        cos, sin = self.denoiser.pos_embed(positions.reshape(b * m, p))
        return cos.reshape(b, m, -1), sin.reshape(b, m, -1)

    def apply_rotary(self, x: Tensor, table: tuple[Tensor, Tensor]) -> Tensor:
        """diffusers' ``apply_rotary_emb`` (interleaved real pairs) with one table per sample."""
        cos, sin = (t[:, :, None, :].to(x.device) for t in table)
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)

    def example_inputs(self, batch_size: int, size: tuple[int, int], *, generator: Any = None,
                       text_tokens: int = 512) -> dict[str, Any]:
        """Packed latents of a ``size`` latent (``(size[0] // 2) x (size[1] // 2)`` tokens),
        ``text_tokens`` T5 tokens (FLUX.1-dev's 512), pooled CLIP embeddings, their ids and, for a
        guidance-distilled model, the guidance scale."""
        cfg = self.denoiser.config
        h, w = size[0] // 2, size[1] // 2
        rows = torch.arange(h).repeat_interleave(w)
        ids = torch.stack([torch.zeros(h * w), rows.float(), torch.arange(w).repeat(h).float()], dim=1)
        inputs = {"hidden_states": torch.randn(batch_size, h * w, cfg.in_channels, generator=generator),
                  "encoder_hidden_states": torch.randn(batch_size, text_tokens, cfg.joint_attention_dim,
                                                       generator=generator),
                  "pooled_projections": torch.randn(batch_size, cfg.pooled_projection_dim, generator=generator),
                  "timestep": torch.full((batch_size,), 0.5),
                  "img_ids": ids, "txt_ids": torch.zeros(text_tokens, 3)}
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch_size,), 3.5)
        return inputs
