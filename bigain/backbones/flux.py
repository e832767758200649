"""``flux``: FLUX.1 pipelines (``FluxTransformer2DModel``, a 16-channel VAE, CLIP, T5): dev and schnell.

A flow-matching backbone (:class:`~bigain.backbones.base.RectifiedFlow`): images are noised as
``x_t = (1 - s) * x0 + s * eps`` and the transformer predicts the velocity ``v = eps - x0``.
Classification ranks classes on the velocity error by default; generation samples with the flow Euler
scheduler at the ``FluxPipeline``'s sigmas, ``linspace(1, 1 / steps, steps)`` before the shift.

What this backbone adds to the transformer:

* latents are the VAE's posterior mean shifted and scaled, ``(mean - shift_factor) * scaling_factor``,
  kept as ``[B, C, h, w]`` outside the model; the transformer sees them packed into 2x2 patches, one
  token of ``4 C`` channels per patch, row-major (``h / 2`` rows of ``w / 2`` tokens, ``h != w``
  allowed), with ``img_ids`` ``(0, row, column)``; its output is unpacked the same way;
* the transformer's ``timestep`` is ``s`` (the model timestep ``1000 * s`` divided by 1000, as the
  pipeline passes it; the model multiplies by 1000 itself);
* noise levels: FLUX.1-dev's scheduler shifts them by resolution (``use_dynamic_shifting``): ``mu``
  grows linearly with the image's token count ``(h / 2) * (w / 2)``, from ``base_shift`` at
  ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len``, and
  ``s = e^mu / (e^mu + 1 / u - 1)``, for the classifier's noise levels and the sampler alike;
  FLUX.1-schnell's is a fixed shift (1.0);
* prompts are encoded as ``FluxPipeline`` encodes them: the T5 encoder's last hidden states
  (``max_sequence_length`` tokens, ``txt_ids`` all zeros) and the CLIP text encoder's pooled output;
* guidance-distilled checkpoints (``guidance_embeds``: FLUX.1-dev) receive the ``guidance`` option
  (3.5, the pipeline's default) as their guidance embedding in every call, classification's included.
  They have no classifier-free guidance: generation runs no empty-prompt batch (``guidance_scale`` 1,
  the default; any other value is refused). Checkpoints without the embedding (FLUX.1-schnell) ignore
  ``guidance`` and accept ``guidance_scale > 1`` as true classifier-free guidance with the empty prompt.

Compressors attach to the image tokens of the double-stream blocks' joint attention and of the
single-stream blocks through the ``flux`` denoiser adapter; the text tokens are never compressed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from bigain.backbones.base import CachedPrompts, DiffusionBackbone, PooledConditions, RectifiedFlow, VAELatents
from bigain.backbones.loading import is_local, load_component, require_subfolders
from bigain.errors import CheckpointError, ConfigError

__all__ = ["Flux", "FluxConditions", "pack_latents", "unpack_latents", "image_ids"]

_PARTS = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]


#: Flux's prompt conditions: the T5 tokens ``[B, L, D]`` and the pooled CLIP embedding.
FluxConditions = PooledConditions


def _check_grid(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ConfigError(f"Flux packs its latents into 2x2 patches, but these latents are {h} x {w}: the image's "
                          f"height and width must be multiples of twice the VAE's factor (16 px for FLUX.1)")


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, (h / 2) * (w / 2), 4 C]``: token ``r * (w / 2) + c`` holds the 2x2 patch
    at rows ``2r, 2r + 1``, columns ``2c, 2c + 1``, channels ordered ``(C, dy, dx)``."""
    b, c, h, w = latents.shape
    _check_grid(h, w)
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for ``height x width`` latents."""
    b, n, d = tokens.shape
    _check_grid(height, width)
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"{n} tokens of {d} channels are not the 2x2 patches of {height} x {width} latents")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: Any = None) -> Tensor:
    """The ``img_ids`` of ``height x width`` latents: ``[(h / 2) * (w / 2), 3]`` rows ``(0, row, column)``
    of the packed tokens, in their order."""
    _check_grid(height, width)
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def _positive_int(value: Any, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer{hint}, got {value!r}")
    return value


class Flux(VAELatents, CachedPrompts, RectifiedFlow, DiffusionBackbone):
    """A FLUX.1 pipeline's parts, loaded with diffusers/transformers ``from_pretrained``.

    Args:
        path: a hub id (``black-forest-labs/FLUX.1-dev``, ``black-forest-labs/FLUX.1-schnell``) or a local
            pipeline folder with ``transformer/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/
            scheduler/``, as written by ``FluxPipeline.save_pretrained``. The scheduler must be a
            ``FlowMatchEulerDiscreteScheduler`` config (resolution-shifted or not).
        dtype: precision the networks run in (``bfloat16`` is FLUX.1's own); noising and losses stay float32.
        guidance: the guidance embedding's strength for guidance-distilled checkpoints (FLUX.1-dev),
            used in classification and generation alike (3.5, the pipeline's default); ignored by
            checkpoints without one (FLUX.1-schnell).
        max_sequence_length: T5 tokens per prompt (512, the pipeline's default and the most; FLUX.1-schnell
            was trained with 256).
        text_batch: prompts encoded per text-encoder call.
    """

    family = "flux"
    text_conditioned = True
    dynamic_shifting: ClassVar[bool] = True
    default_guidance_scale: ClassVar[float | None] = 1.0

    def __init__(self, *, path: str = "black-forest-labs/FLUX.1-dev",
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32", guidance: float = 3.5,
                 max_sequence_length: int = 512, text_batch: int = 16) -> None:
        super().__init__(dtype=dtype)
        _positive_int(max_sequence_length, "max_sequence_length", " (512 is the Flux pipeline's default and most)")
        if max_sequence_length > 512:
            raise ConfigError(f"max_sequence_length is at most 512 for Flux (its T5 was trained to 512 tokens), "
                              f"got {max_sequence_length}")
        _positive_int(text_batch, "text_batch", "")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                or guidance < 0:
            raise ConfigError(f"guidance must be a non-negative number (3.5 is FLUX.1-dev's default), got {guidance!r}")
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        self.path = str(path)
        if is_local(self.path):
            require_subfolders(self.path, _PARTS, what="Flux")
        dt = self.model_dtype
        self.transformer = load_component(FluxTransformer2DModel, self.path, "transformer",
                                          what="Flux transformer", torch_dtype=dt)
        self.vae = load_component(AutoencoderKL, self.path, "vae", what="VAE", torch_dtype=dt)
        self.text_encoder = load_component(CLIPTextModel, self.path, "text_encoder", what="CLIP text encoder",
                                           torch_dtype=dt)
        self.text_encoder_2 = load_component(T5EncoderModel, self.path, "text_encoder_2", what="T5 text encoder",
                                             torch_dtype=dt)
        self.tokenizer = load_component(CLIPTokenizer, self.path, "tokenizer", what="CLIP tokenizer")
        self.tokenizer_2 = load_component(AutoTokenizer, self.path, "tokenizer_2", what="T5 tokenizer")
        self.use_flow_schedule(self.path)
        for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2):
            module.eval().requires_grad_(False)
        self.denoiser = self.transformer
        cfg = self.transformer.config
        packed = int(cfg.in_channels)
        out_channels = int(cfg.out_channels if cfg.out_channels is not None else packed)
        if packed % 4 or out_channels != packed:
            raise CheckpointError(f"the Flux transformer of {self.path} takes {packed} and gives {out_channels} "
                                  f"channels per token; a FLUX.1 transformer takes 2x2 patches of the VAE's latents "
                                  f"(4 x its channels) and predicts as many. Check transformer/config.json")
        self.in_channels = packed // 4
        latent = int(self.vae.config.latent_channels)
        if latent != self.in_channels:
            raise CheckpointError(f"the VAE of {self.path} gives {latent} latent channels, but the transformer takes "
                                  f"2x2 patches of {self.in_channels}; the pipeline folder mixes parts of different "
                                  f"models")
        if self.vae_shift is None:
            raise CheckpointError(f"the VAE config of {self.path} has no shift_factor; FLUX.1's VAE shifts its "
                                  f"latents (shift_factor 0.1159). Check vae/config.json")
        if int(self.text_encoder.config.hidden_size) != int(cfg.pooled_projection_dim):
            raise CheckpointError(f"the CLIP encoder of {self.path} pools to {self.text_encoder.config.hidden_size} "
                                  f"channels, but the transformer's pooled_projection_dim is "
                                  f"{cfg.pooled_projection_dim}; the pipeline folder mixes parts of different models")
        if int(self.text_encoder_2.config.d_model) != int(cfg.joint_attention_dim):
            raise CheckpointError(f"the T5 encoder of {self.path} is {self.text_encoder_2.config.d_model} wide, but "
                                  f"the transformer's joint_attention_dim is {cfg.joint_attention_dim}; the pipeline "
                                  f"folder mixes parts of different models")
        self.guidance_embeds = bool(cfg.guidance_embeds)
        self.guidance = float(guidance)
        self.clip_length = int(self.tokenizer.model_max_length)  # 77, as the pipeline
        self.max_sequence_length = max_sequence_length
        self.text_batch = text_batch
        self._ids: dict[tuple[int, int, str], Tensor] = {}

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        step = 2 * self.latent_factor
        if image_size % step:
            raise ConfigError(f"image_size {image_size} is not a multiple of {step} (the VAE's factor "
                              f"{self.latent_factor} x Flux's 2x2 patches); use e.g. "
                              f"{max(step, image_size // step * step)}")
        side = image_size // self.latent_factor
        return (self.in_channels, side, side)

    def image_seq_len(self, shape: Sequence[int]) -> int:
        """Image tokens for latents ``[..., C, h, w]``: one per 2x2 patch, ``(h / 2) * (w / 2)``."""
        h, w = int(shape[-2]), int(shape[-1])
        _check_grid(h, w)
        return (h // 2) * (w // 2)

    def sampling_sigmas(self, steps: int) -> Any:
        """The pipeline's ``linspace(1, 1 / steps, steps)``, shifted by the scheduler."""
        return np.linspace(1.0, 1.0 / steps, steps)

    # -- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> FluxConditions:
        """T5 tokens ``[K, max_sequence_length, D]`` and pooled CLIP embeddings ``[K, P]`` of ``prompts``."""
        embeds, pooled = [], []
        for start in range(0, len(prompts), self.text_batch):
            chunk = list(prompts[start:start + self.text_batch])
            clip = self.tokenizer(chunk, padding="max_length", max_length=self.clip_length, truncation=True,
                                  return_tensors="pt")
            pooled.append(self.text_encoder(clip.input_ids.to(self.device), output_hidden_states=False).pooler_output)
            t5 = self.tokenizer_2(chunk, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                  return_tensors="pt")
            embeds.append(self.text_encoder_2(t5.input_ids.to(self.device), output_hidden_states=False)[0])
        return FluxConditions(torch.cat(embeds), torch.cat(pooled))

    def null_conditions(self, batch: int) -> FluxConditions:
        """The empty prompt's conditions, ``batch`` times, for true classifier-free guidance; refused by a
        guidance-distilled checkpoint (FLUX.1-dev), which has none."""
        if self.guidance_embeds:
            raise ConfigError(f"the Flux checkpoint {self.path} is guidance-distilled (guidance_embeds): it has no "
                              f"classifier-free guidance. Leave generation's guidance_scale at 1 (the default) and "
                              f"set the guidance strength with backbone_options.guidance (now {self.guidance:g})")
        return super().null_conditions(batch)

    # -- the model -----------------------------------------------------------------------------
    def _image_ids(self, height: int, width: int) -> Tensor:
        key = (height, width, str(self.device))
        if key not in self._ids:
            self._ids[key] = image_ids(height, width, self.device)
        return self._ids[key]

    def predict_output(self, x_t: Tensor, t: Tensor, cond: FluxConditions) -> Tensor:
        """The float32 velocity ``[B, C, h, w]`` for latents ``x_t`` at model timesteps ``t`` (``1000 * s``)."""
        if not isinstance(cond, PooledConditions):
            raise TypeError(f"Flux conditions are FluxConditions (from class_conditions / prompt_conditions / "
                            f"null_conditions), got {type(cond).__name__}")
        b, _, h, w = x_t.shape
        dev, dt = self.device, self.model_dtype
        embeds = cond.embeds.to(dev, dt)
        guidance = torch.full((b,), self.guidance, device=dev) if self.guidance_embeds else None
        out = self.transformer(hidden_states=pack_latents(x_t.to(dev, dt)), encoder_hidden_states=embeds,
                               pooled_projections=cond.pooled.to(dev, dt),
                               timestep=t.to(dev, torch.float32) / 1000, guidance=guidance,
                               img_ids=self._image_ids(h, w), txt_ids=torch.zeros(embeds.shape[1], 3, device=dev),
                               return_dict=False)[0]
        return unpack_latents(out.float(), h, w)

    def describe(self) -> dict[str, Any]:
        path = Path(self.path).expanduser()
        cfg = self.scheduler_config
        shift: dict[str, Any] = {"dynamic_shift": self.shifts_by_resolution}
        if self.shifts_by_resolution:
            shift.update({k: cfg.get(k) for k in ("base_shift", "max_shift", "base_image_seq_len",
                                                  "max_image_seq_len")})
        else:
            shift["shift"] = float(cfg.get("shift", 1.0))
        return {**super().describe(), "path": str(path.resolve()) if path.exists() else self.path, **shift,
                "guidance": self.guidance if self.guidance_embeds else None,
                "max_sequence_length": self.max_sequence_length}
