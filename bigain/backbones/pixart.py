"""``pixart``: PixArt-alpha / PixArt-Sigma pipelines (``PixArtTransformer2DModel``, VAE, T5 encoder).

A PixArt transformer is a DiT conditioned on T5 caption embeddings through cross-attention, with
one shared AdaLN-single timestep modulation. What this backbone adds to the DiT code path:

* prompts are T5-encoded to ``max_sequence_length`` tokens (120 for PixArt-alpha, 300 for
  PixArt-Sigma) and passed with their attention mask, so padding is never attended to;
* the resolution / aspect-ratio micro-conditions are passed only when the transformer uses them
  (``use_additional_conditions``; diffusers turns them on for ``sample_size`` 128, the 1024 px
  PixArt-alpha model), computed from the latent size in pixels;
* learned sigma: the transformer outputs ``2 x C`` channels (prediction, variance); the first ``C``
  are the prediction;
* the scheduler config's ``prediction_type`` says what the prediction is (``epsilon`` for the
  released checkpoints).

Compressors attach to the transformer's self-attention (``attn1``) through the ``pixart`` denoiser
adapter, with the DiT block selection; the text cross-attention is never compressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.backbones.base import CachedPrompts, DiffusionBackbone, TextConditions, VAELatents
from bigain.backbones.loading import is_local, load_component, require_subfolders
from bigain.errors import CheckpointError, ConfigError

__all__ = ["PixArt", "PromptConditions"]

_PARTS = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]


@dataclass(frozen=True)
class PromptConditions(TextConditions):
    """T5 caption embeddings ``[B, L, D]`` and their attention mask ``[B, L]`` (1 = a real token)."""

    embeds: Tensor
    mask: Tensor


class PixArt(VAELatents, CachedPrompts, DiffusionBackbone):
    """A PixArt-alpha / PixArt-Sigma pipeline's parts, loaded with diffusers/transformers ``from_pretrained``.

    Args:
        path: a hub id (``PixArt-alpha/PixArt-XL-2-512x512``, ``PixArt-alpha/PixArt-Sigma-XL-2-512-MS``)
            or a local pipeline folder with ``transformer/ vae/ text_encoder/ tokenizer/ scheduler/``
            (as written by ``PixArtAlphaPipeline.save_pretrained``). The scheduler config's
            ``prediction_type`` says what the transformer predicts.
        dtype: precision the networks run in; noising and losses stay float32.
        max_sequence_length: T5 tokens per prompt (padded and truncated to it): 120 for PixArt-alpha,
            300 for PixArt-Sigma, the lengths they were trained with.
        text_batch: prompts encoded per text-encoder call.
    """

    family = "pixart"
    text_conditioned = True

    def __init__(self, *, path: str = "PixArt-alpha/PixArt-XL-2-512x512",
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32", max_sequence_length: int = 120,
                 text_batch: int = 16) -> None:
        super().__init__(dtype=dtype)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length must be a positive integer (120 for PixArt-alpha, 300 for "
                              f"PixArt-Sigma), got {max_sequence_length!r}")
        if isinstance(text_batch, bool) or not isinstance(text_batch, int) or text_batch < 1:
            raise ConfigError(f"text_batch must be a positive integer, got {text_batch!r}")
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import AutoTokenizer, T5EncoderModel

        self.path = str(path)
        if is_local(self.path):
            require_subfolders(self.path, _PARTS, what="PixArt")
        dt = self.model_dtype
        self.transformer = load_component(PixArtTransformer2DModel, self.path, "transformer",
                                          what="PixArt transformer", torch_dtype=dt)
        self.vae = load_component(AutoencoderKL, self.path, "vae", what="VAE", torch_dtype=dt)
        self.text_encoder = load_component(T5EncoderModel, self.path, "text_encoder", what="T5 text encoder",
                                           torch_dtype=dt)
        self.tokenizer = load_component(AutoTokenizer, self.path, "tokenizer", what="T5 tokenizer")
        self.use_schedule(self.path)
        for module in (self.transformer, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)
        self.denoiser = self.transformer
        cfg = self.transformer.config
        self.in_channels = int(cfg.in_channels)
        out_channels = int(cfg.out_channels if cfg.out_channels is not None else cfg.in_channels)
        if out_channels not in (self.in_channels, 2 * self.in_channels):
            raise CheckpointError(
                f"the PixArt transformer of {self.path} outputs {out_channels} channels for {self.in_channels} "
                f"input channels; bigain expects {self.in_channels} (a prediction) or {2 * self.in_channels} "
                f"(prediction and learned sigma). Check transformer/config.json"
            )
        self.learned_sigma = out_channels == 2 * self.in_channels
        # diffusers resolves use_additional_conditions=None from sample_size (on for 128, the 1024 px model)
        self.additional_conditions = bool(getattr(self.transformer, "use_additional_conditions",
                                                  cfg.use_additional_conditions))
        self.patch_size = int(cfg.patch_size)
        self.max_sequence_length = max_sequence_length
        self.text_batch = text_batch

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        step = self.latent_factor * self.patch_size
        if image_size % step:
            raise ConfigError(f"image_size {image_size} is not a multiple of {step} (the VAE's factor "
                              f"{self.latent_factor} x the transformer's patch size {self.patch_size}); "
                              f"use e.g. {max(step, image_size // step * step)}")
        side = image_size // self.latent_factor
        return (self.in_channels, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptConditions:
        """T5 hidden states ``[K, max_sequence_length, D]`` of ``prompts`` and their attention mask."""
        embeds, masks = [], []
        for start in range(0, len(prompts), self.text_batch):
            tokens = self.tokenizer(list(prompts[start:start + self.text_batch]), padding="max_length",
                                    max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                    return_tensors="pt")
            mask = tokens.attention_mask.to(self.device)
            embeds.append(self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0])
            masks.append(mask)
        return PromptConditions(torch.cat(embeds), torch.cat(masks))

    def added_conditions(self, x_t: Tensor) -> dict[str, Tensor | None]:
        """``added_cond_kwargs`` for a batch of latents: resolution ``[B, 2]`` (height, width in pixels)
        and aspect ratio ``[B, 1]`` when the transformer uses them, else ``None`` for both."""
        if not self.additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        b, (h, w) = x_t.shape[0], x_t.shape[-2:]
        height, width = float(h * self.latent_factor), float(w * self.latent_factor)
        resolution = torch.tensor([[height, width]], device=self.device, dtype=self.model_dtype).expand(b, 2)
        aspect = torch.tensor([[height / width]], device=self.device, dtype=self.model_dtype).expand(b, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def predict_output(self, x_t: Tensor, t: Tensor, cond: PromptConditions) -> Tensor:
        if not isinstance(cond, PromptConditions):
            raise TypeError(f"PixArt conditions are PromptConditions (from class_conditions / prompt_conditions / "
                            f"null_conditions), got {type(cond).__name__}")
        out = self.transformer(x_t.to(self.device, self.model_dtype), timestep=t.to(self.device),
                               encoder_hidden_states=cond.embeds.to(self.device, self.model_dtype),
                               encoder_attention_mask=cond.mask.to(self.device),
                               added_cond_kwargs=self.added_conditions(x_t), return_dict=False)[0]
        return out[:, : self.in_channels].float()  # learned-sigma channels dropped

    def describe(self) -> dict[str, Any]:
        path = Path(self.path).expanduser()
        return {**super().describe(), "path": str(path.resolve()) if path.exists() else self.path,
                "max_sequence_length": self.max_sequence_length, "learned_sigma": self.learned_sigma,
                "additional_conditions": self.additional_conditions}
