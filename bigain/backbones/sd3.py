"""``sd3``: Stable Diffusion 3 / 3.5 pipelines (``SD3Transformer2DModel``, VAE, two CLIP encoders, T5).

A flow-matching backbone (:class:`~bigain.backbones.base.RectifiedFlow`): images are noised as
``x_t = (1 - s) * x0 + s * eps`` and the transformer predicts the velocity ``v = eps - x0``, at the
timestep ``1000 * s``; ``s`` runs over the checkpoint's shifted sigma schedule
(``FlowMatchEulerDiscreteScheduler`` with its ``shift``, 3.0 for the released models). Classification
ranks classes on the velocity error by default; generation samples with the flow Euler scheduler.

What this backbone adds to the transformer:

* latents are the VAE's posterior mean shifted and scaled, ``(mean - shift_factor) * scaling_factor``;
* prompts are encoded as ``StableDiffusion3Pipeline`` encodes them: the penultimate hidden states of
  the two CLIP text encoders (77 tokens each), concatenated on channels and zero-padded to the T5
  width, followed on the sequence by ``max_sequence_length`` T5 tokens (zeros when the checkpoint has
  no ``text_encoder_3/`` or ``use_t5`` is false, as the pipeline does without T5); the pooled
  embedding is the two CLIP projections concatenated;
* guidance's null condition is the empty prompt, encoded the same way.

Compressors attach to the image tokens of every block's joint attention (and SD3.5's ``attn2``)
through the ``sd3`` denoiser adapter, with the DiT block selection; the text tokens are never
compressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bigain.backbones.base import CachedPrompts, DiffusionBackbone, PooledConditions, RectifiedFlow, VAELatents
from bigain.backbones.loading import is_local, load_component, require_subfolders
from bigain.errors import CheckpointError, ConfigError

__all__ = ["StableDiffusion3", "SD3Conditions"]

_PARTS = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]


#: SD3's prompt conditions: the joint text tokens ``[B, 77 + L, D]`` and the pooled CLIP embedding.
SD3Conditions = PooledConditions


def _positive_int(value: Any, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer{hint}, got {value!r}")
    return value


class StableDiffusion3(VAELatents, CachedPrompts, RectifiedFlow, DiffusionBackbone):
    """A Stable Diffusion 3 / 3.5 pipeline's parts, loaded with diffusers/transformers ``from_pretrained``.

    Args:
        path: a hub id (``stabilityai/stable-diffusion-3-medium-diffusers``,
            ``stabilityai/stable-diffusion-3.5-medium``) or a local pipeline folder with ``transformer/
            vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/`` and optionally
            ``text_encoder_3/ tokenizer_3/`` (T5), as written by ``StableDiffusion3Pipeline.save_pretrained``.
            The scheduler must be a ``FlowMatchEulerDiscreteScheduler`` config.
        dtype: precision the networks run in; noising and losses stay float32.
        use_t5: encode prompts with the T5 encoder (``text_encoder_3/``) when the checkpoint has one;
            ``False`` skips loading it (about 9 GB in float16) and uses zeros for its tokens, as the
            diffusers pipeline does with ``text_encoder_3=None``.
        max_sequence_length: T5 tokens per prompt (256, the pipeline's default; at most 512).
        text_batch: prompts encoded per text-encoder call.
    """

    family = "sd3"
    text_conditioned = True

    def __init__(self, *, path: str = "stabilityai/stable-diffusion-3-medium-diffusers",
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32", use_t5: bool = True,
                 max_sequence_length: int = 256, text_batch: int = 16) -> None:
        super().__init__(dtype=dtype)
        _positive_int(max_sequence_length, "max_sequence_length", " (256 is the SD3 pipeline's default, 512 the most)")
        _positive_int(text_batch, "text_batch", "")
        if not isinstance(use_t5, bool):
            raise ConfigError(f"use_t5 must be true or false, got {use_t5!r}")
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self.path = str(path)
        local = is_local(self.path)
        if local:
            root = require_subfolders(self.path, _PARTS, what="Stable Diffusion 3")
            has_t5 = (root / "text_encoder_3").is_dir()
            if has_t5 and not (root / "tokenizer_3").is_dir():
                raise CheckpointError(f"Stable Diffusion 3 checkpoint folder {root} has text_encoder_3/ but no "
                                      f"tokenizer_3/; save the pipeline's T5 tokenizer there, or remove "
                                      f"text_encoder_3/ (or set use_t5: false) to run without T5")
        else:
            has_t5 = True
        dt = self.model_dtype
        self.transformer = load_component(SD3Transformer2DModel, self.path, "transformer",
                                          what="SD3 transformer", torch_dtype=dt)
        self.vae = load_component(AutoencoderKL, self.path, "vae", what="VAE", torch_dtype=dt)
        self.text_encoder = load_component(CLIPTextModelWithProjection, self.path, "text_encoder",
                                           what="first CLIP text encoder", torch_dtype=dt)
        self.text_encoder_2 = load_component(CLIPTextModelWithProjection, self.path, "text_encoder_2",
                                             what="second CLIP text encoder", torch_dtype=dt)
        self.tokenizer = load_component(CLIPTokenizer, self.path, "tokenizer", what="first CLIP tokenizer")
        self.tokenizer_2 = load_component(CLIPTokenizer, self.path, "tokenizer_2", what="second CLIP tokenizer")
        self.text_encoder_3 = self.tokenizer_3 = None
        if use_t5 and has_t5:
            from transformers import AutoTokenizer, T5EncoderModel

            self.text_encoder_3 = load_component(T5EncoderModel, self.path, "text_encoder_3",
                                                 what="T5 text encoder", torch_dtype=dt)
            self.tokenizer_3 = load_component(AutoTokenizer, self.path, "tokenizer_3", what="T5 tokenizer")
        self.use_flow_schedule(self.path)
        for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if module is not None:
                module.eval().requires_grad_(False)
        self.denoiser = self.transformer
        cfg = self.transformer.config
        self.in_channels = int(cfg.in_channels)
        out_channels = int(cfg.out_channels if cfg.out_channels is not None else cfg.in_channels)
        if out_channels != self.in_channels:
            raise CheckpointError(f"the SD3 transformer of {self.path} outputs {out_channels} channels for "
                                  f"{self.in_channels} input channels; a velocity prediction has as many as its "
                                  f"input. Check transformer/config.json")
        self.patch_size = int(cfg.patch_size)
        self.joint_attention_dim = int(cfg.joint_attention_dim)
        self.pos_embed_max_size = cfg.pos_embed_max_size
        pooled = int(self.text_encoder.config.projection_dim) + int(self.text_encoder_2.config.projection_dim)
        if pooled != int(cfg.pooled_projection_dim):
            raise CheckpointError(f"the CLIP encoders of {self.path} project to {pooled} channels together, but the "
                                  f"transformer's pooled_projection_dim is {cfg.pooled_projection_dim}; the pipeline "
                                  f"folder mixes parts of different models")
        clip_width = int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)
        if clip_width > self.joint_attention_dim:
            raise CheckpointError(f"the CLIP encoders of {self.path} give {clip_width} channels together, more than "
                                  f"the transformer's joint_attention_dim {self.joint_attention_dim}")
        self.clip_length = int(self.tokenizer.model_max_length)  # 77, both CLIP encoders (as the pipeline)
        self.max_sequence_length = max_sequence_length
        self.text_batch = text_batch

    @property
    def uses_t5(self) -> bool:
        """True when prompts go through the T5 encoder (else its tokens are zeros)."""
        return self.text_encoder_3 is not None

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        step = self.latent_factor * self.patch_size
        if image_size % step:
            raise ConfigError(f"image_size {image_size} is not a multiple of {step} (the VAE's factor "
                              f"{self.latent_factor} x the transformer's patch size {self.patch_size}); "
                              f"use e.g. {max(step, image_size // step * step)}")
        side = image_size // self.latent_factor
        if self.pos_embed_max_size is not None and side // self.patch_size > int(self.pos_embed_max_size):
            most = int(self.pos_embed_max_size) * step
            raise ConfigError(f"image_size {image_size} is too large for this SD3 transformer: its position "
                              f"embedding covers {self.pos_embed_max_size} patches a side ({most} px); use at "
                              f"most {most}")
        return (self.in_channels, side, side)

    # -- prompts -------------------------------------------------------------------------------
    def _clip(self, encoder: Any, tokenizer: Any, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Penultimate hidden states ``[K, 77, d]`` and projected pooled embedding ``[K, p]``."""
        tokens = tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                           return_tensors="pt")
        out = encoder(tokens.input_ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _t5(self, prompts: list[str]) -> Tensor:
        """T5 hidden states ``[K, max_sequence_length, D]`` (zeros without the T5 encoder)."""
        if self.text_encoder_3 is None:
            return torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=self.device,
                               dtype=self.model_dtype)
        tokens = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, add_special_tokens=True, return_tensors="pt")
        return self.text_encoder_3(tokens.input_ids.to(self.device))[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> SD3Conditions:
        """Joint text tokens ``[K, 77 + max_sequence_length, D]`` and pooled embeddings of ``prompts``."""
        embeds, pooled = [], []
        for start in range(0, len(prompts), self.text_batch):
            chunk = list(prompts[start:start + self.text_batch])
            h1, p1 = self._clip(self.text_encoder, self.tokenizer, chunk)
            h2, p2 = self._clip(self.text_encoder_2, self.tokenizer_2, chunk)
            t5 = self._t5(chunk)
            clip = torch.cat([h1, h2], dim=-1).to(t5.dtype)
            clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            embeds.append(torch.cat([clip, t5], dim=-2))
            pooled.append(torch.cat([p1, p2], dim=-1))
        return SD3Conditions(torch.cat(embeds), torch.cat(pooled))

    # -- the model -----------------------------------------------------------------------------
    def predict_output(self, x_t: Tensor, t: Tensor, cond: SD3Conditions) -> Tensor:
        """The float32 velocity prediction for ``x_t`` at model timesteps ``t`` (``1000 * s``)."""
        if not isinstance(cond, PooledConditions):
            raise TypeError(f"SD3 conditions are SD3Conditions (from class_conditions / prompt_conditions / "
                            f"null_conditions), got {type(cond).__name__}")
        out = self.transformer(hidden_states=x_t.to(self.device, self.model_dtype),
                               encoder_hidden_states=cond.embeds.to(self.device, self.model_dtype),
                               pooled_projections=cond.pooled.to(self.device, self.model_dtype),
                               timestep=t.to(self.device), return_dict=False)[0]
        return out.float()

    def describe(self) -> dict[str, Any]:
        path = Path(self.path).expanduser()
        return {**super().describe(), "path": str(path.resolve()) if path.exists() else self.path,
                "shift": float(self.scheduler_config.get("shift", 1.0)), "t5": self.uses_t5,
                "max_sequence_length": self.max_sequence_length}
