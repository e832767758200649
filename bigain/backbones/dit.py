"""``dit``: a diffusers DiT checkpoint (class-id conditioned); ``toy``: the bundled pixel-space DiT."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.backbones.base import ClassLabels, DiffusionBackbone, folder_digest
from bigain.backbones.loading import is_local, load_component, require_subfolders
from bigain.errors import CheckpointError

__all__ = ["DiT", "ToyDiT", "TOY_DIT_PATH"]

TOY_DIT_PATH = Path(__file__).resolve().parents[1] / "toy" / "assets" / "toy-dit"


class DiT(ClassLabels, DiffusionBackbone):
    """A ``DiTTransformer2DModel`` (+ VAE when the checkpoint has one), loaded with ``from_pretrained``.

    Args:
        path: a hub id (``facebook/DiT-XL-2-256``) or a local folder with ``transformer/`` and
            ``scheduler/`` (and ``vae/`` for latent models; without it the model is pixel-space).
            The scheduler config's ``prediction_type`` says what the transformer predicts
            (``epsilon`` for DiT-XL/2).
        dtype: precision the networks run in; noising and losses stay float32.
    """

    family = "dit"

    def __init__(self, *, path: str = "facebook/DiT-XL-2-256",
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        super().__init__(dtype=dtype)
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        self.path = str(path)
        local = is_local(self.path)
        if local:
            require_subfolders(self.path, ["transformer", "scheduler"], what="DiT")
        dt = self.model_dtype
        self.transformer = load_component(DiTTransformer2DModel, self.path, "transformer", what="DiT transformer",
                                          torch_dtype=dt)
        has_vae = (Path(self.path).expanduser() / "vae").is_dir() if local else True
        self.vae = load_component(AutoencoderKL, self.path, "vae", what="VAE", torch_dtype=dt) if has_vae else None
        self.use_schedule(self.path)
        for module in (self.transformer, self.vae):
            if module is not None:
                module.eval().requires_grad_(False)
        self.denoiser = self.transformer
        cfg = self.transformer.config
        self.in_channels = int(cfg.in_channels)
        self.num_model_classes = int(cfg.num_embeds_ada_norm)
        table = self.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        self.null_class: int | None = self.num_model_classes if table.num_embeddings > self.num_model_classes else None
        self.vae_scale = float(self.vae.config.scaling_factor) if self.vae is not None else 1.0
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // self.latent_factor
        return (self.in_channels, side, side)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        images = images.to(self.device)
        if self.vae is None:
            return images.float()
        return self.vae.encode(images.to(self.model_dtype)).latent_dist.mean.float() * self.vae_scale

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        if self.vae is None:
            return x0.float().clamp(-1, 1)
        return self.vae.decode((x0 / self.vae_scale).to(self.model_dtype)).sample.float().clamp(-1, 1)

    def predict_output(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        out = self.transformer(x_t.to(self.device, self.model_dtype), timestep=t.to(self.device),
                               class_labels=cond.to(self.device)).sample
        return out[:, : self.in_channels].float()  # learned-sigma channels dropped

    def describe(self) -> dict[str, Any]:
        path = Path(self.path).expanduser()
        return {**super().describe(), "path": str(path.resolve()) if path.exists() else self.path,
                "latent": self.vae is not None}


class ToyDiT(DiT):
    """The bundled toy model: a pixel-space class-conditional DiT on 32x32 images (10 classes),
    loaded through exactly the code a real DiT checkpoint takes.

    Args:
        path: the folder holding it (default: the copy shipped in ``bigain/toy/assets``).
        dtype: precision the network runs in.
    """

    @classmethod
    def weights_digest(cls, options: dict[str, Any]) -> str | None:
        return folder_digest(options.get("path") or TOY_DIT_PATH)

    def __init__(self, *, path: str | None = None,
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        path = str(TOY_DIT_PATH if path is None else path)
        if not (Path(path) / "transformer").is_dir():
            raise CheckpointError(
                f"the toy DiT is missing from {path}; reinstall bigain, or rebuild it with "
                f"`bigain toy train --out {Path(path).parent}`"
            )
        super().__init__(path=path, dtype=dtype)
