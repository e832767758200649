"""``stable-diffusion``: any Stable Diffusion 1.x / 2.x checkpoint (UNet, VAE, CLIP text encoder).

epsilon-prediction checkpoints (SD 1.x, SD 2.0-base at 512 px) and v-prediction ones (SD 2.0 / 2.1
at 768 px) alike: what the UNet predicts is read from the checkpoint's scheduler config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.backbones.base import DiffusionBackbone, VAELatents
from bigain.backbones.loading import is_local, load_component, require_subfolders

__all__ = ["StableDiffusion"]

_PARTS = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]


class StableDiffusion(VAELatents, DiffusionBackbone):
    """A Stable Diffusion pipeline's parts, loaded with diffusers/transformers ``from_pretrained``.

    Args:
        path: a hub id (``stabilityai/stable-diffusion-2-base``; ``stabilityai/stable-diffusion-2``
            for the 768 px v-prediction model) or a local pipeline folder with
            ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``. The scheduler config's
            ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``) says what the UNet
            predicts.
        dtype: precision the networks run in; noising and losses stay float32.
        text_batch: prompts encoded per text-encoder call.
    """

    family = "unet"
    text_conditioned = True

    def __init__(self, *, path: str = "stabilityai/stable-diffusion-2-base",
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32", text_batch: int = 100) -> None:
        super().__init__(dtype=dtype)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.path = str(path)
        if is_local(self.path):
            require_subfolders(self.path, _PARTS, what="Stable Diffusion")
        dt = self.model_dtype
        self.unet = load_component(UNet2DConditionModel, self.path, "unet", what="UNet", torch_dtype=dt)
        self.vae = load_component(AutoencoderKL, self.path, "vae", what="VAE", torch_dtype=dt)
        self.text_encoder = load_component(CLIPTextModel, self.path, "text_encoder", what="text encoder",
                                           torch_dtype=dt)
        self.tokenizer = load_component(CLIPTokenizer, self.path, "tokenizer", what="tokenizer")
        self.use_schedule(self.path)
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)
        self.denoiser = self.unet
        self.text_batch = text_batch
        self._class_prompts: tuple[str, ...] = ()
        self._class_emb: Tensor | None = None

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // self.latent_factor
        return (int(self.unet.config.in_channels), side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder hidden states ``[K, L, D]`` for ``prompts`` (padded to the model length)."""
        chunks = []
        for start in range(0, len(prompts), self.text_batch):
            tokens = self.tokenizer(list(prompts[start:start + self.text_batch]), padding="max_length",
                                    max_length=self.tokenizer.model_max_length, truncation=True,
                                    return_tensors="pt")
            chunks.append(self.text_encoder(tokens.input_ids.to(self.device))[0])
        return torch.cat(chunks)

    def set_classes(self, *, prompts: Sequence[str], label_ids: Sequence[int] | None = None) -> None:
        if tuple(prompts) != self._class_prompts or self._class_emb is None:
            self._class_prompts = tuple(prompts)
            self._class_emb = self.encode_prompts(self._class_prompts)  # computed once, then cached

    def class_conditions(self, classes: Tensor) -> Tensor:
        if self._class_emb is None:
            raise RuntimeError("call set_classes(prompts=...) before class_conditions")
        if self._class_emb.device != self.device:
            self._class_emb = self._class_emb.to(self.device)
        return self._class_emb[classes.to(self.device)]

    def prompt_conditions(self, prompts: Sequence[str]) -> Tensor:
        return self.encode_prompts(prompts)

    def null_conditions(self, batch: int) -> Tensor:
        return self.encode_prompts([""]).expand(batch, -1, -1)

    def predict_output(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        out = self.unet(x_t.to(self.device, self.model_dtype), t.to(self.device),
                        encoder_hidden_states=cond.to(self.model_dtype)).sample
        return out[:, : x_t.shape[1]].float()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path if not Path(self.path).exists()
                else str(Path(self.path).resolve())}
