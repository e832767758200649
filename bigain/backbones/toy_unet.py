"""``toy-unet``: the bundled UNet, conditioned through cross-attention on class prompts.

A diffusers ``UNet2DConditionModel`` - the model class of Stable Diffusion, so compressors attach
to it exactly as to SD (the ``unet`` adapter; by default the full-resolution level) - whose
cross-attention reads a learned prompt of a few tokens per class instead of a text encoder's
output. The prompt table (one row per class and a last, null row for classifier-free guidance) is
saved beside the UNet as ``class_prompts.safetensors``.

Its "latent" is the image itself with each ``p`` x ``p`` block of pixels stacked into channels
(``pixel_unshuffle``; the shipped UNet: ``p = 2``, 12 x 16 x 16, 256 tokens), a lossless stand-in
for Stable Diffusion's VAE. ``p`` is read from the UNet's ``out_channels`` (``3 * p**2``); a
3-channel UNet works on the pixels. A UNet with more input than output channels also reads where
each token sits: the extra input channels are fixed sinusoidal position features
(:func:`bigain.toy.train.position_channels`), appended to the noisy latent on every call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.backbones.base import ClassLabels, DiffusionBackbone, folder_digest
from bigain.backbones.loading import load_component, require_subfolders
from bigain.errors import CheckpointError, ConfigError
from bigain.toy.train import from_patches, to_patches, with_positions

__all__ = ["ToyUNet", "TOY_UNET_PATH"]

TOY_UNET_PATH = Path(__file__).resolve().parents[1] / "toy" / "assets" / "toy-unet"
_PROMPTS_FILE = "class_prompts.safetensors"


class ToyUNet(ClassLabels, DiffusionBackbone):
    """The bundled toy UNet on 32x32 images (10 classes), loaded with ``from_pretrained``.

    Args:
        path: the folder holding ``unet/``, ``scheduler/`` and ``class_prompts.safetensors``
            (default: the copy shipped in ``bigain/toy/assets``; ``bigain toy train --model unet``
            writes one).
        dtype: precision the network runs in; noising and losses stay float32.
    """

    family = "unet"

    @classmethod
    def weights_digest(cls, options: dict[str, Any]) -> str | None:
        return folder_digest(options.get("path") or TOY_UNET_PATH)

    def __init__(self, *, path: str | None = None,
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        super().__init__(dtype=dtype)
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        self.path = str(TOY_UNET_PATH if path is None else path)
        root = Path(self.path).expanduser()
        if path is None and not (root / "unet").is_dir():
            raise CheckpointError(f"the toy UNet is missing from {root}; reinstall bigain, or rebuild it with "
                                  f"`bigain toy train --model unet --out {root.parent}`")
        require_subfolders(self.path, ["unet", "scheduler"], what="toy UNet")
        if not (root / _PROMPTS_FILE).is_file():
            raise CheckpointError(f"toy UNet folder {root} has no {_PROMPTS_FILE} (the class prompt table the UNet "
                                  f"cross-attends to); give a folder written by `bigain toy train --model unet`")
        self.unet = load_component(UNet2DConditionModel, self.path, "unet", what="toy UNet",
                                   torch_dtype=self.model_dtype)
        self.unet.eval().requires_grad_(False)
        self.denoiser = self.unet
        self.use_schedule(self.path)
        prompts = load_file(str(root / _PROMPTS_FILE))["prompts"]
        width = int(self.unet.config.cross_attention_dim)
        if prompts.ndim != 3 or prompts.shape[-1] != width or prompts.shape[0] < 2:
            raise CheckpointError(f"{root / _PROMPTS_FILE} holds a prompt table of shape {tuple(prompts.shape)}; "
                                  f"[classes + 1, tokens, {width}] is expected (the last row the null prompt)")
        self.register_buffer("prompts", prompts.float(), persistent=False)
        self.num_model_classes = int(prompts.shape[0]) - 1
        self.null_class = self.num_model_classes
        self.in_channels = int(self.unet.config.out_channels)  # the latent's channels
        self.unet_in_channels = int(self.unet.config.in_channels)  # and the position channels after them
        self.patch = math.isqrt(self.in_channels // 3)
        positions = self.unet_in_channels - self.in_channels
        if 3 * self.patch**2 != self.in_channels or positions < 0 or positions % 4:
            raise CheckpointError(f"the toy UNet in {root} has {self.unet_in_channels} input and "
                                  f"{self.in_channels} output channels; a toy UNet sees p x p pixel patches of an "
                                  f"RGB image, 3 * p**2 channels out (3, 12, 27, ...) and as many in, plus a "
                                  f"multiple of 4 position channels")
        self.latent_factor = self.patch  # pixels per token along each side

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.patch:
            raise ConfigError(f"the toy UNet works on {self.patch}x{self.patch} pixel patches; image size "
                              f"{image_size} is not a multiple of {self.patch}")
        return (self.in_channels, image_size // self.patch, image_size // self.patch)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return to_patches(images.to(self.device).float(), self.patch)

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        return from_patches(x0.float(), self.patch).clamp(-1, 1)

    def predict_output(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        prompts = self.prompts.to(self.device, self.model_dtype)[cond.to(self.device)]
        x_t = with_positions(x_t.to(self.device, self.model_dtype), self.unet_in_channels)
        out = self.unet(x_t, t.to(self.device), encoder_hidden_states=prompts).sample
        return out.float()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(Path(self.path).expanduser().resolve())}
