"""Image generation under compression as a LightningModule (predict loop only).

One image per dataset item: Stable Diffusion is prompted with the item's caption (COCO) or its
class prompt; class-conditional models (DiT, the toy DiT) get the item's label. The compressor is
attached to the denoiser once and so runs at every sampling step; its hook hands each sample's
timestep to timestep-dependent methods.

Reproducibility: an image's initial noise is drawn on the CPU from a generator seeded with
``derive_seed("generate-noise", seed, index)``, so a dataset index starts from the same noise for
every compressor, batch size and GPU count. Latents and scheduler maths are float32, and each batch
gets its own scheduler object (schedulers keep step state). With data ``batch_size: 1`` every image
is computed alone, so runs on one GPU or several give bit-identical PNGs. With larger batches the
starting noise is still the same, but the images are only equal up to floating-point rounding when
batches are composed differently (batched kernels may round differently, and compressors that draw
one random pattern per batch see other draws): compare runs with the same batch size and the same
number of processes, or use batch size 1, when bit-identity matters.

Each image is saved as ``images/{index:06d}.png`` in the run folder (written to a temporary name and
renamed, so a crash never leaves half a file) before its record is written (``image_format:
paper-jpeg`` saves ``images/{index:06d}.jpg`` as the released BiGain scripts saved theirs); a
restarted run skips the recorded indices and overwrites any image that has no record.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from bigain.backbones import DiffusionBackbone
from bigain.backbones.base import CompileMode, check_compile_mode
from bigain.compressor import derive_seed
from bigain.errors import ConfigError
from bigain.metrics import METRIC_NAMES, parse_extractor, reference_files
from bigain.tasks.base import DiffusionTask
from bigain.tasks.timing import ForwardTimer

__all__ = ["DiffusionGenerator", "initial_noise", "save_png", "save_image", "to_uint8", "METRIC_OPTIONS",
           "IMAGE_FORMATS"]

#: Options that only change how a run is scored, never its images (left out of the fingerprint).
METRIC_OPTIONS = ("metrics", "feature_extractor", "clip_model", "fidelity_classifier", "fid_reference")
#: How generated images are saved: ``png`` (lossless, 8-bit values rounded to nearest) or
#: ``paper-jpeg`` (as the released BiGain scripts: values truncated, ``floor(255 * (x + 1) / 2)``,
#: then JPEG at quality 100 with Pillow's default 4:2:0 chroma subsampling).
IMAGE_FORMATS = ("png", "paper-jpeg")


def initial_noise(seed: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """The float32 starting noise of dataset item ``index`` (CPU; independent of batch and device)."""
    generator = torch.Generator().manual_seed(derive_seed("generate-noise", int(seed), int(index)))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def to_uint8(images: Tensor, *, truncate: bool = False) -> Tensor:
    """Images in ``[-1, 1]`` -> uint8 ``[B, 3, H, W]`` on the CPU: rounded to the nearest value, or
    truncated (``truncate=True``: ``floor(255 * (x + 1) / 2)``, as the released scripts' ``astype``)."""
    scaled = (images.float().clamp(-1, 1) + 1) * 127.5
    return (scaled.floor() if truncate else scaled.round()).clamp(0, 255).to(torch.uint8).cpu()


def save_png(image: Tensor, path: Path) -> None:
    """Save a uint8 ``[3, H, W]`` image as PNG atomically (temporary file, then rename)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_image(image: Tensor, path: Path, image_format: str = "png") -> None:
    """Save a uint8 ``[3, H, W]`` image atomically in one of :data:`IMAGE_FORMATS`."""
    if image_format == "png":
        return save_png(image, path)
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="JPEG", quality=100)
    os.replace(tmp, path)


class DiffusionGenerator(DiffusionTask):
    """Generate one image per dataset item with a (compressed) diffusion model.

    Args:
        backbone: registered backbone name: ``toy``, ``dit``, ``stable-diffusion``, ``pixart``.
        backbone_options: its options, e.g. ``{"path": "stabilityai/stable-diffusion-2-base", "dtype": "float16"}``.
        compressor: registered compressor name (``none``, ``tome``, ``bigain_tm``, ``todo``, ``bigain_td``, ``sito``).
        compressor_options: its hyperparameters, e.g. ``{"ratio": 0.7}``.
        max_downsample: UNet levels to compress (1 = full resolution only).
        blocks: DiT blocks to compress: ``paper`` (scaled paper selection), ``all``, or a list.
        sampler: ``euler``, ``ddim`` (eta 0), or ``auto``: Euler for text-conditioned models (SD),
            DDIM for class-conditional ones (DiT, toy). Built from the checkpoint's scheduler config;
            a flow-matching model (SD3) samples with the flow Euler sampler
            (``FlowMatchEulerDiscreteScheduler``, its ``shift`` from the checkpoint), ``euler`` or ``auto``.
        steps: sampling steps (1..1000).
        guidance_scale: classifier-free guidance with the empty prompt / null class; ``None``: 7.5
            for SD, 4.0 for DiT and toy, 1.0 for Flux (FLUX.1-dev is guidance-distilled: its strength is
            the backbone's ``guidance`` option, and it refuses any other value); 1.0 disables guidance.
        seed: seeds every image's starting noise (with its dataset index) and the compressor.
        compile: run the compressed denoiser through ``torch.compile`` (``default``,
            ``reduce-overhead`` for CUDA graphs, ``max-autotune``) or eagerly (``none``); recorded in
            ``run.json``, not part of the result fingerprint. A smaller last batch compiles once more.
        metrics: which of ``fid``, ``kid``, ``is``, ``clip_score``, ``class_fidelity`` to compute.
        feature_extractor: FID/KID/IS features: ``inception``, ``inception:/path/weights.pth``,
            ``timm:<model>``, ``timm:<model>@<weights file>``, ``toy``.
        clip_model: CLIP hub id or local folder for ``clip_score``.
        fidelity_classifier: classifier spec (same syntax) judging ``class_fidelity``.
        image_format: ``png`` (default) or ``paper-jpeg``: saved as the released BiGain scripts
            saved theirs (8-bit values truncated, JPEG quality 100), so FIDs can be compared with
            the paper's. Part of the run's identity.
        fid_reference: a folder of real images to compute FID and KID against instead of the
            datamodule's split: every image file in it (not its subfolders), whole and uncropped,
            as the paper did (e.g. ``oxford-iiit-pet/images``, both splits); with
            ``feature_extractor: pytorch-fid:<weights>`` the FID is computed as the paper computed it.
    """

    def __init__(
        self,
        *,
        backbone: str = "toy",
        backbone_options: dict[str, Any] | None = None,
        compressor: str = "none",
        compressor_options: dict[str, Any] | None = None,
        max_downsample: int = 1,
        blocks: list[int] | Literal["paper", "all"] = "paper",
        sampler: Literal["auto", "euler", "ddim"] = "auto",
        steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        compile: CompileMode = "none",
        metrics: list[str] = ["fid", "kid", "is", "clip_score", "class_fidelity"],  # noqa: B006 - shown in --help
        feature_extractor: str = "inception",
        clip_model: str | None = None,
        fidelity_classifier: str | None = None,
        image_format: Literal["png", "paper-jpeg"] = "png",
        fid_reference: str | None = None,
    ) -> None:
        super().__init__(backbone=backbone, compressor=compressor, compressor_options=compressor_options)
        check_compile_mode(compile)
        text = bool(self.backbone_class.text_conditioned)
        if sampler not in ("auto", "euler", "ddim"):
            raise ConfigError(f"sampler must be 'auto', 'euler' or 'ddim', got {sampler!r}")
        samplers = tuple(getattr(self.backbone_class, "samplers", ("euler", "ddim")))
        if sampler != "auto" and sampler not in samplers:
            raise ConfigError(f"backbone {backbone!r} samples with {' or '.join(samplers)} (or auto), not {sampler!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise ConfigError(f"steps must be an integer from 1 to 1000, got {steps!r}; 50 is the usual choice")
        if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 1.0):
            raise ConfigError(f"guidance_scale must be >= 1 (1 disables guidance; 7.5 is SD's usual, 4.0 DiT's), "
                              f"got {guidance_scale!r}")
        unknown = sorted(set(metrics) - set(METRIC_NAMES))
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
        parse_extractor(feature_extractor)
        if fidelity_classifier is not None:
            parse_extractor(fidelity_classifier)
        if image_format not in IMAGE_FORMATS:
            raise ConfigError(f"image_format must be one of {list(IMAGE_FORMATS)} (paper-jpeg: as the released "
                              f"scripts saved their images), got {image_format!r}")
        if fid_reference is not None:
            reference_files(fid_reference)  # a missing or empty folder fails now, not after generating
        self.save_hyperparameters()
        self.text_conditioned = text
        auto = "euler" if text else "ddim"
        self.sampler_name = sampler if sampler != "auto" else (auto if auto in samplers else samplers[0])
        default = getattr(self.backbone_class, "default_guidance_scale", None)
        self.guidance = float(guidance_scale if guidance_scale is not None
                              else default if default is not None else (7.5 if text else 4.0))
        self.image_dir: Path | None = None  # default: <run folder>/images
        self._done = 0
        self.timer = ForwardTimer()  # the time inside the denoiser's forwards, per batch

    # -- configuration ---------------------------------------------------------------------
    def result_config(self) -> dict[str, Any]:
        """The options that change the images (the metric options do not: a run can be rescored)."""
        hp = {k: v for k, v in dict(self.hparams).items() if k not in METRIC_OPTIONS and k != "compile"}
        if hp.get("image_format") == "png":
            hp.pop("image_format")  # the default leaves earlier runs' identity unchanged
        hp.update(sampler=self.sampler_name, guidance_scale=self.guidance)
        return self.add_shared_identity(hp)

    def check_backbone(self, backbone: DiffusionBackbone) -> None:
        if self.hparams.steps > backbone.num_train_timesteps:
            raise ConfigError(f"steps={self.hparams.steps} exceeds the model's {backbone.num_train_timesteps} "
                              f"training timesteps; use fewer steps")

    def on_predict_start(self) -> None:
        dm = self.prepare_predict("it provides prompts, labels and the image size")
        self.image_size = int(dm.image_size)
        self.class_prompts = list(dm.prompts)
        if not self.text_conditioned:
            self.backbone.set_classes(prompts=self.class_prompts, label_ids=dm.label_ids)
        if self.guidance != 1.0:
            self.backbone.null_conditions(1)  # a model without a null class fails here, saying what to do
        if self.image_dir is None:
            from bigain.runs import RecordWriter

            writers = [cb for cb in self.trainer.callbacks if isinstance(cb, RecordWriter)]
            if not writers:
                raise ConfigError("DiffusionGenerator saves images into a run folder: run it with "
                                  "`bigain generate`, or set module.image_dir")
            self.image_dir = writers[0].run.path / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)

    # -- sampling ------------------------------------------------------------------------------
    def make_scheduler(self, shape: tuple[int, ...] | None = None):
        """A fresh diffusers scheduler for one batch of latents of ``shape`` ``(C, h, w)``, with its
        timesteps set (by the backbone: a resolution-shifted flow model's depend on the shape)."""
        # steps the model's own output: the scheduler converts eps, v or x0 by the checkpoint's type
        # (a flow-matching backbone's is the flow Euler scheduler, stepping the velocity)
        scheduler = self.backbone.sampling_scheduler(self.sampler_name)
        self.backbone.set_sampling_timesteps(scheduler, self.hparams.steps, device=self.backbone.device, shape=shape)
        return scheduler

    @torch.no_grad()
    def sample(self, cond: Any, noise: Tensor) -> Tensor:
        """Denoise float32 ``noise`` ``[B, C, h, w]`` under ``cond``; returns images in ``[-1, 1]``.

        The model's own prediction (``eps``, ``v`` or ``x0``, :attr:`DiffusionBackbone.prediction_type`;
        a flow model's velocity) is guided and handed to the scheduler, which is configured with the
        same type; guidance is linear in the output, so it mixes any of them alike.
        """
        bb, g = self.backbone, self.guidance
        scheduler = self.make_scheduler(tuple(noise.shape[1:]))
        latents = noise.to(bb.device, torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
        n = latents.shape[0]
        both = bb.concat_conditions([cond, bb.null_conditions(n)]) if g != 1.0 else None
        extra = {"eta": 0.0} if self.sampler_name == "ddim" else {}
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(latents, t).float() if hasattr(scheduler, "scale_model_input") \
                else latents
            if both is None:
                eps = self.timer.call(bb.predict_output, x_in, t.reshape(1).expand(n), cond)
            else:
                eps_c, eps_u = self.timer.call(bb.predict_output, torch.cat([x_in, x_in]), t.reshape(1).expand(2 * n),
                                               both).chunk(2)
                eps = eps_u + g * (eps_c - eps_u)
            latents = scheduler.step(eps.float(), t, latents, **extra).prev_sample.float()
        return bb.decode(latents)

    def _prompt(self, batch: dict, i: int) -> str:
        caption = (batch.get("caption") or [None] * (i + 1))[i]
        if isinstance(caption, str) and caption:
            return caption
        label = batch["label"][i]
        if isinstance(label, (list, tuple)):
            return self.class_prompts[int(label[0])] if label else ""
        return self.class_prompts[int(label)]

    def _conditions(self, batch: dict) -> tuple[Any, list[str] | None]:
        if self.text_conditioned:
            prompts = [self._prompt(batch, i) for i in range(len(batch["index"]))]
            return self.backbone.prompt_conditions(prompts), prompts
        labels = batch["label"]
        if any(isinstance(lab, (list, tuple)) for lab in labels):
            raise ConfigError("a class-conditional model needs one label per image; this datamodule is multi-label "
                              "(use a text-conditioned model with its captions)")
        return self.backbone.class_conditions(torch.tensor([int(lab) for lab in labels])), None

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, list]:
        indices = [int(i) for i in batch["index"]]
        if not indices:
            return {"records": [], "bad": list(batch.get("bad", []))}
        hp = self.hparams
        start = time.perf_counter()
        self.timer.reset()
        cond, prompts = self._conditions(batch)
        shape = self.backbone.latent_shape(self.image_size)
        noise = torch.stack([initial_noise(hp.seed, index, shape) for index in indices])
        paper = hp.get("image_format", "png") == "paper-jpeg"
        images = to_uint8(self.sample(cond, noise), truncate=paper)
        if self.backbone.device.type == "cuda":
            torch.cuda.synchronize(self.backbone.device)
        seconds = (time.perf_counter() - start) / len(indices)
        denoiser_seconds = self.timer.seconds() / len(indices)  # the batch's denoiser time, shared out
        records = []
        for i, index in enumerate(indices):
            path = self.image_dir / f"{index:06d}{'.jpg' if paper else '.png'}"
            save_image(images[i], path, hp.get("image_format", "png"))
            label = batch["label"][i]
            record: dict[str, Any] = {"index": index}
            if prompts is not None:
                record["prompt"] = prompts[i]
            if isinstance(label, (list, tuple)):
                record["labels"] = [int(v) for v in label]
            else:
                record["label"] = int(label)
            record.update(seed=int(hp.seed), noise_seed=derive_seed("generate-noise", int(hp.seed), index),
                          seconds=seconds, denoiser_seconds=denoiser_seconds,
                          path=f"{self.image_dir.name}/{path.name}")
            records.append(record)
        self._done += len(records)
        return {"records": records, "bad": list(batch.get("bad", []))}

    def progress_postfix(self) -> dict[str, str]:
        """Shown on the progress bar: images generated by this rank."""
        return {"images": str(self._done)}
