"""``sdxl``: Stable Diffusion XL pipelines (UNet with text-time conditioning, VAE, two CLIP encoders).

A DDPM-trained epsilon model like SD 1.x / 2.x, with what SDXL adds to the UNet:

* prompts are encoded as ``StableDiffusionXLPipeline`` encodes them: the penultimate hidden states
  of both CLIP text encoders (77 tokens each) concatenated on channels, and the pooled embedding
  (the second encoder's projection);
* every call carries the pooled embedding and the six size / crop ids the pipeline adds
  (original size, top-left crop ``(0, 0)``, target size: the image's size in pixels), computed from
  the latent's shape - no host read;
* guidance's null condition is all zeros when the pipeline says ``force_zeros_for_empty_prompt``
  (SDXL base does), else the encoded empty prompt;
* a VAE marked ``force_upcast`` (SDXL's overflows in float16) runs in float32 when the model runs
  in float16, as the pipeline does.

Compressors attach through the ``unet`` adapter, at the full-resolution attention level by default
(SDXL's first attention level is its second, 64x64 at 1024 px: ``max_downsample: 2`` reaches it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.backbones.base import CachedPrompts, DiffusionBackbone, PooledConditions, VAELatents
from bigain.backbones.loading import is_local, load_component, require_subfolders
from bigain.errors import CheckpointError, ConfigError

__all__ = ["StableDiffusionXL"]

_PARTS = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]


class StableDiffusionXL(VAELatents, CachedPrompts, DiffusionBackbone):
    """A Stable Diffusion XL pipeline's parts, loaded with diffusers/transformers ``from_pretrained``.

    Args:
        path: a hub id (``stabilityai/stable-diffusion-xl-base-1.0``) or a local pipeline folder with
            ``unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/``, as written
            by ``StableDiffusionXLPipeline.save_pretrained``. The scheduler config's
            ``prediction_type`` says what the UNet predicts.
        dtype: precision the networks run in; noising and losses stay float32.
        zeros_for_empty_prompt: guidance's null condition is zeros (``True``) or the encoded empty
            prompt (``False``); ``None``: what the pipeline's ``model_index.json`` says
            (``force_zeros_for_empty_prompt``, true for SDXL base), true without one.
        text_batch: prompts encoded per text-encoder call.
    """

    family = "unet"
    text_conditioned = True

    def __init__(self, *, path: str = "stabilityai/stable-diffusion-xl-base-1.0",
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32",
                 zeros_for_empty_prompt: bool | None = None, text_batch: int = 16) -> None:
        super().__init__(dtype=dtype)
        if zeros_for_empty_prompt is not None and not isinstance(zeros_for_empty_prompt, bool):
            raise ConfigError(f"zeros_for_empty_prompt must be true, false or null, got {zeros_for_empty_prompt!r}")
        if isinstance(text_batch, bool) or not isinstance(text_batch, int) or text_batch < 1:
            raise ConfigError(f"text_batch must be a positive integer, got {text_batch!r}")
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.path = str(path)
        if is_local(self.path):
            require_subfolders(self.path, _PARTS, what="Stable Diffusion XL")
        dt = self.model_dtype
        self.unet = load_component(UNet2DConditionModel, self.path, "unet", what="SDXL UNet", torch_dtype=dt)
        self.vae = load_component(AutoencoderKL, self.path, "vae", what="VAE", torch_dtype=dt)
        if dt == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)  # SDXL's VAE overflows in float16
        self.text_encoder = load_component(CLIPTextModel, self.path, "text_encoder", what="first CLIP text encoder",
                                           torch_dtype=dt)
        self.text_encoder_2 = load_component(CLIPTextModelWithProjection, self.path, "text_encoder_2",
                                             what="second CLIP text encoder", torch_dtype=dt)
        self.tokenizer = load_component(CLIPTokenizer, self.path, "tokenizer", what="first CLIP tokenizer")
        self.tokenizer_2 = load_component(CLIPTokenizer, self.path, "tokenizer_2", what="second CLIP tokenizer")
        self.use_schedule(self.path)
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            module.eval().requires_grad_(False)
        self.denoiser = self.unet
        cfg = self.unet.config
        if cfg.addition_embed_type != "text_time":
            raise CheckpointError(f"the UNet of {self.path} has addition_embed_type={cfg.addition_embed_type!r}, "
                                  f"not SDXL's 'text_time'; use the stable-diffusion backbone for SD 1.x / 2.x")
        width = int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)
        if width != int(cfg.cross_attention_dim):
            raise CheckpointError(f"the CLIP encoders of {self.path} give {width} channels together, but the UNet "
                                  f"cross-attends to {cfg.cross_attention_dim}; the folder mixes parts of different "
                                  f"models")
        pooled = int(self.text_encoder_2.config.projection_dim)
        if pooled + 6 * int(cfg.addition_time_embed_dim) != int(cfg.projection_class_embeddings_input_dim):
            raise CheckpointError(f"the UNet of {self.path} expects {cfg.projection_class_embeddings_input_dim} added "
                                  f"conditioning channels, not the pooled {pooled} + 6 size ids x "
                                  f"{cfg.addition_time_embed_dim}; the folder mixes parts of different models")
        self.zeros_for_empty_prompt = (self._pipeline_zeros() if zeros_for_empty_prompt is None
                                       else zeros_for_empty_prompt)
        self.text_batch = text_batch
        self._time_ids: dict[tuple[int, int, str], Tensor] = {}

    def _pipeline_zeros(self) -> bool:
        index = Path(self.path).expanduser() / "model_index.json"
        if index.is_file():
            return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
        return True

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // self.latent_factor
        return (int(self.unet.config.in_channels), side, side)

    # -- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PooledConditions:
        """Text tokens ``[K, 77, D1 + D2]`` (both encoders' penultimate hidden states) and the
        second encoder's pooled projection ``[K, P]`` of ``prompts``."""
        embeds, pooled = [], []
        for start in range(0, len(prompts), self.text_batch):
            chunk = list(prompts[start:start + self.text_batch])
            states = []
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
                out = encoder(ids.to(self.device), output_hidden_states=True)
                states.append(out.hidden_states[-2])
            embeds.append(torch.cat(states, dim=-1))
            pooled.append(out.text_embeds)
        return PooledConditions(torch.cat(embeds), torch.cat(pooled))

    def null_conditions(self, batch: int) -> PooledConditions:
        """Zeros shaped like a prompt's conditions (``zeros_for_empty_prompt``) or the encoded empty prompt."""
        if not self.zeros_for_empty_prompt:
            return super().null_conditions(batch)
        if self._null is None or self._null.embeds.device != self.device:
            empty = self.encode_prompts([""])
            self._null = PooledConditions(torch.zeros_like(empty.embeds), torch.zeros_like(empty.pooled))
        return self._null.expand(batch)

    # -- the model -----------------------------------------------------------------------------
    def time_ids(self, height: int, width: int, batch: int) -> Tensor:
        """The six size ids per sample: original size, crop top-left (0, 0), target size (pixels)."""
        key = (height, width, str(self.device))
        if key not in self._time_ids:  # built once per size: no host-to-device copy per forward
            self._time_ids[key] = torch.tensor([height, width, 0, 0, height, width], dtype=self.model_dtype,
                                               device=self.device)
        return self._time_ids[key].expand(batch, -1)

    def predict_output(self, x_t: Tensor, t: Tensor, cond: PooledConditions) -> Tensor:
        if not isinstance(cond, PooledConditions):
            raise TypeError(f"SDXL conditions are PooledConditions (from class_conditions / prompt_conditions / "
                            f"null_conditions), got {type(cond).__name__}")
        b, _, h, w = x_t.shape
        added = {"text_embeds": cond.pooled.to(self.device, self.model_dtype),
                 "time_ids": self.time_ids(h * self.latent_factor, w * self.latent_factor, b)}
        out = self.unet(x_t.to(self.device, self.model_dtype), t.to(self.device),
                        encoder_hidden_states=cond.embeds.to(self.device, self.model_dtype),
                        added_cond_kwargs=added).sample
        return out[:, : x_t.shape[1]].float()

    def describe(self) -> dict[str, Any]:
        path = Path(self.path).expanduser()
        return {**super().describe(), "path": str(path.resolve()) if path.exists() else self.path,
                "zeros_for_empty_prompt": self.zeros_for_empty_prompt}
