"""Training of the bundled toy models (``bigain toy train``).

* :func:`train_toy_dit` trains the class-conditional pixel-space DiT (diffusers
  ``DiTTransformer2DModel``, patch 2, 256 tokens) with epsilon prediction on the DDPM linear schedule
  (loss weighting ``loss_weighting``: min-SNR-5 or P2, EMA weights);
  diffusers' label embedding drops 10% of the labels to its null class during training, which is
  what classifier-free guidance needs at sampling time.
* :func:`train_toy_unet` trains the UNet (diffusers ``UNet2DConditionModel``, on 2x2 pixel patches
  rearranged into channels, 256 tokens) the same way; it is conditioned through cross-attention on
  a learned prompt per class (4 tokens), with 10% of the labels dropped to a null prompt.
* :func:`train_toy_classifier` trains the small timm classifier that serves as the toy FID feature
  extractor and as the judge of class fidelity.

All three are deterministic for a given seed, precision, PyTorch version and thread count, and write a
training log. The denoisers train in bfloat16 autocast only where the CPU computes bfloat16 natively
(``bf16=None``, the default; elsewhere it is emulated and many times slower than float32). A
denoiser's run saves its whole state every ``checkpoint_every`` steps and when stopped by a signal, and
the same call resumes it bit for bit; a finished run leaves ``training_done.json`` (its settings)
beside its weights, and the same call again keeps those weights instead of training them again.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bigain.errors import ConfigError
from bigain.interrupts import Interrupted, deferred
from bigain.precision import native_bf16_cpu
from bigain.toy.data import TOY_CLASSES, ToyShapes

__all__ = [
    "TOY_DIT_CONFIG",
    "TOY_SCHEDULER_CONFIG",
    "TOY_UNET_CONFIG",
    "TOY_UNET_PATCH",
    "TOY_PROMPT_TOKENS",
    "TOY_PROMPTS_FILE",
    "ToyUNetModel",
    "build_toy_unet",
    "to_patches",
    "position_channels",
    "with_positions",
    "from_patches",
    "train_toy_unet",
    "TOY_CLASSIFIER_ARCH",
    "LOSS_WEIGHTINGS",
    "loss_weights",
    "build_toy_dit",
    "build_toy_classifier",
    "classifier_input",
    "train_toy_dit",
    "train_toy_classifier",
]

TOY_DIT_CONFIG: dict = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 6,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": len(TOY_CLASSES),
    "norm_type": "ada_norm_zero",
}

#: The noise schedule the toy DiT is trained with (DiT's: DDPM, linear betas 1e-4..0.02, 1000 steps).
TOY_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}

#: Side of the pixel patches the toy UNet works on: its "latent" is the image rearranged space-to-depth
#: (``pixel_unshuffle``, 3 x 32 x 32 -> 12 x 16 x 16), a lossless stand-in for Stable Diffusion's VAE.
TOY_UNET_PATCH = 2

#: The toy UNet: one resolution level (16x16 = 256 tokens, as many as the toy DiT), so that every
#: long-range path runs through the self-attention the compressors act on - a down block, the middle
#: block and an up block, four transformer blocks of 4 heads x 32 channels, cross-attending to the
#: class prompt. (A three-level UNet on the 32x32 pixels decides its classes at the uncompressed
#: lower levels: 70% ToMe at its full resolution costs it nothing.)
TOY_UNET_CONFIG: dict = {
    "sample_size": 32 // TOY_UNET_PATCH,
    "in_channels": 3 * TOY_UNET_PATCH**2,
    "out_channels": 3 * TOY_UNET_PATCH**2,
    "layers_per_block": 1,
    "block_out_channels": (128,),
    "down_block_types": ("CrossAttnDownBlock2D",),
    "up_block_types": ("CrossAttnUpBlock2D",),
    "cross_attention_dim": 64,
    "attention_head_dim": (4,),  # diffusers' name: the number of heads per level (32 channels each)
    "norm_num_groups": 32,
}
#: Tokens of each class prompt the toy UNet cross-attends to.
TOY_PROMPT_TOKENS = 4
#: The file in a toy UNet folder holding the class prompt table ``[classes + 1, tokens, dim]``.
TOY_PROMPTS_FILE = "class_prompts.safetensors"

TOY_CLASSIFIER_ARCH = "resnet10t"
_CLASSIFIER_KWARGS = {"channels": (32, 64, 128, 256)}
_CLASSIFIER_INPUT = 64


def build_toy_dit():
    """A freshly initialised toy DiT, with DiT's zero-initialised modulation and output layers."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**TOY_DIT_CONFIG)
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    torch.nn.init.zeros_(model.proj_out_1.weight)
    torch.nn.init.zeros_(model.proj_out_1.bias)
    torch.nn.init.zeros_(model.proj_out_2.weight)
    torch.nn.init.zeros_(model.proj_out_2.bias)
    return model


def build_toy_classifier(pretrained_path: str | Path | None = None):
    """The toy timm classifier (a slim ``resnet10t``), optionally loaded from a safetensors file."""
    import timm

    model = timm.create_model(TOY_CLASSIFIER_ARCH, num_classes=len(TOY_CLASSES), **_CLASSIFIER_KWARGS)
    if pretrained_path is not None:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(pretrained_path)).items()}
        model.load_state_dict(state)
    return model


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Map toy images in ``[-1, 1]`` (``[B, 3, 32, 32]``) to the classifier's input.

    Nearest upsampling to 64 px keeps one-pixel textures intact; ImageNet normalisation is not used
    (the classifier is trained from scratch on this input).
    """
    return F.interpolate(images.float(), size=(_CLASSIFIER_INPUT, _CLASSIFIER_INPUT), mode="nearest")


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


LOSS_WEIGHTINGS = ("min_snr", "p2", "none")


def loss_weights(alphas_cumprod: torch.Tensor, kind: str, *, min_snr_gamma: float | None = 5.0) -> torch.Tensor:
    """Per-sample weights of the epsilon-MSE at the given ``alphas_cumprod`` (SNR = abar / (1 - abar)).

    * ``"min_snr"``: ``min(SNR, gamma) / SNR`` (Hang et al., 2023; ``min_snr_gamma=None`` means 1);
    * ``"p2"``: ``1 / (1 + SNR)`` (perception-prioritised weighting, Choi et al., 2022, k=1, gamma=1):
      weights the high-noise steps where the coarse content (shape, layout) forms;
    * ``"none"``: 1 (the plain DDPM loss).
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if kind == "min_snr":
        return torch.ones_like(snr) if min_snr_gamma is None else snr.clamp(max=min_snr_gamma) / snr
    if kind == "p2":
        return 1.0 / (1.0 + snr)
    if kind == "none":
        return torch.ones_like(snr)
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {kind!r}")


def _write_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


#: The file a stopped toy training run leaves in its folder; the same call resumes from it.
TRAINING_STATE_FILE = "training_state.pt"
#: The file a finished toy denoiser run leaves beside its weights: the settings it was trained with.
TRAINING_DONE_FILE = "training_done.json"
#: The same record for the toy classifier, beside ``classifier.safetensors``.
CLASSIFIER_DONE_FILE = "classifier_training_done.json"


def _load_training_state(path: Path, settings: dict) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    before = saved.get("settings") or {}
    if before != settings:
        differ = {k: (before.get(k), settings.get(k)) for k in sorted(set(before) | set(settings))
                  if before.get(k) != settings.get(k)}
        raise ConfigError(f"{path} holds a stopped training run with other settings (saved vs now: {differ}): "
                          f"run it again with the saved settings to resume it, or delete {path} to start over")
    return saved


def _settings(**values) -> dict:
    """What decides a toy training run's result, as JSON gives it back (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(values, default=str))


def _kept(record: Path, settings: dict, outputs: list[Path], log: Callable[[str], None] | None) -> bool:
    """True (and says so) when ``record`` says a run of exactly these settings finished and its outputs are all
    there: the caller keeps them instead of training again."""
    if not record.is_file() or not all(path.exists() for path in outputs):
        return False
    try:
        if json.loads(record.read_text()) != settings:
            return False
    except ValueError:
        return False
    _say(log, f"{outputs[0]}: already trained with these settings, kept (delete {record} to train it again)")
    return True


def _say(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def _mark_trained(record: Path, settings: dict) -> None:
    from bigain.runs import atomic_write_text

    atomic_write_text(record, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _train_denoiser(
    out: Path,
    model: torch.nn.Module,
    forward: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    min_snr_gamma: float | None,
    loss_weighting: str,
    seed: int,
    train_images: int,
    bf16: bool,
    log_every: int,
    progress: Callable[[int, dict], None] | None,
    ema_bias_correction: bool = False,
    model_space: Callable[[torch.Tensor], torch.Tensor] | None = None,
    settings: dict,
    checkpoint_every: int = 250,
    log: Callable[[str], None] | None = None,
) -> torch.nn.Module:
    """The epsilon-prediction training loop both toy denoisers share; returns the EMA copy of ``model``.

    ``forward(model, x_t, t, labels, generator)`` is the model's prediction of the noise. With
    ``ema_bias_correction`` the starting weights' share of the average (``ema_decay ** steps``: 20 %
    after 1,600 steps at 0.999) is taken out at the end, ``(ema - d**T * start) / (1 - d**T)``, as
    Adam corrects its moments; without it (the toy DiT: 1e-4 after 9,000 steps) the average is kept
    as it is. ``model_space`` maps a batch of images to the space the model denoises (the toy
    UNet's pixel patches); the noise is drawn there.

    Every ``checkpoint_every`` steps, and when the run is stopped by a signal (at the end of the step it
    is in), the whole training state goes to ``out/training_state.pt``; a later call with the same
    ``settings`` resumes from it and ends bit for bit where an uninterrupted run would. The file is
    removed when training ends.
    """
    from diffusers import DDPMScheduler

    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    initial = copy.deepcopy(model).requires_grad_(False) if ema_bias_correction else None
    scheduler = DDPMScheduler(**TOY_SCHEDULER_CONFIG)
    abar = scheduler.alphas_cumprod.float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    data = ToyShapes("train", length=train_images)

    def train_step(step: int) -> None:
        nonlocal running
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup)
        first = (step * batch_size) % train_images
        x0, labels = data.batch(range(first, first + batch_size))
        if model_space is not None:
            x0 = model_space(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = forward(model, xt, t, labels, gen)
        per_sample = (pred.float() - noise).pow(2).flatten(1).mean(dim=1)
        loss = (per_sample * loss_weights(abar[t], loss_weighting, min_snr_gamma=min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - ema_decay)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            row = {"step": step, "loss": round(loss.item(), 5), "loss_smoothed": round(running, 5),
                   "lr": round(opt.param_groups[0]["lr"], 7), "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            _write_log(out / "training_log.csv", rows)
            if progress is not None:
                progress(step, row)

    rows: list[dict] = []
    state_file = out / TRAINING_STATE_FILE
    running, first_step, elapsed = None, 0, 0.0
    if state_file.is_file():
        saved = _load_training_state(state_file, settings)
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        if initial is not None:
            initial.load_state_dict(saved["initial"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["global_rng"])
        running, first_step, elapsed, rows = saved["running"], saved["step"], saved["seconds"], saved["rows"]
        _say(log, f"{out.name}: resuming the stopped run at step {first_step} of {steps} ({state_file})")
    start = time.perf_counter() - elapsed

    def save_state(done: int) -> None:
        state = {"settings": settings, "step": done, "running": running, "rows": rows,
                 "seconds": time.perf_counter() - start, "model": model.state_dict(), "ema": ema.state_dict(),
                 "initial": None if initial is None else initial.state_dict(), "optimizer": opt.state_dict(),
                 "generator": gen.get_state(), "global_rng": torch.get_rng_state()}
        partial = state_file.with_name(state_file.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, state_file)  # a stop while saving leaves the previous state whole

    done = first_step
    try:
        for step in range(first_step, steps):
            with deferred():  # a stop signal lands between steps, never inside one
                train_step(step)
                done = step + 1
                if done % checkpoint_every == 0 and done < steps:
                    save_state(done)
    except Interrupted:
        save_state(done)
        _say(log, f"{out.name}: stopped after step {done} of {steps}; its state is in {state_file}, and the same "
                  f"command resumes it")
        raise
    if initial is not None and steps > 0:
        share = ema_decay ** steps
        with torch.no_grad():
            for pe, p0 in zip(ema.parameters(), initial.parameters()):
                pe.sub_(share * p0).div_(1.0 - share)
    scheduler.save_pretrained(out / "scheduler")
    _write_log(out / "training_log.csv", rows)
    state_file.unlink(missing_ok=True)
    return ema


def train_toy_dit(
    out_dir: str | Path,
    *,
    steps: int = 9000,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 50,
    ema_decay: float = 0.999,
    min_snr_gamma: float | None = 5.0,
    loss_weighting: str = "min_snr",
    init_from: str | Path | None = None,
    seed: int = 0,
    train_images: int = 200_000,
    bf16: bool | None = None,
    log_every: int = 25,
    checkpoint_every: int = 250,
    progress: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the toy DiT and save it (EMA weights) as a checkpoint folder ``out_dir/toy-dit`` holding
    ``transformer/`` and ``scheduler/`` (what ``bigain.backbones.DiT`` loads) and ``training_log.csv``.

    ``bf16``: bfloat16 autocast (``None``: where the CPU computes bfloat16 natively). A stopped run
    resumes from ``training_state.pt`` (saved every ``checkpoint_every`` steps and when stopped by a
    signal); a finished one with the same settings is kept, not trained again.

    Returns:
        The checkpoint folder.
    """
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    out = Path(out_dir) / "toy-dit"
    bf16 = native_bf16_cpu() if bf16 is None else bf16
    settings = _settings(model="toy-dit", config=TOY_DIT_CONFIG, steps=steps, batch_size=batch_size, lr=lr,
                         warmup=warmup, ema_decay=ema_decay, min_snr_gamma=min_snr_gamma, loss_weighting=loss_weighting,
                         init_from=init_from, seed=seed, train_images=train_images, bf16=bf16)
    if _kept(out / TRAINING_DONE_FILE, settings, [out / "transformer", out / "scheduler"], log):
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # diffusers' label dropout draws from the global RNG during training
    model = build_toy_dit().train()
    if init_from is not None:  # continue from a saved toy DiT (its transformer/ folder)
        from diffusers import DiTTransformer2DModel

        model.load_state_dict(DiTTransformer2DModel.from_pretrained(Path(init_from) / "transformer").state_dict())

    def forward(net, xt, t, labels, gen):
        return net(xt, timestep=t, class_labels=labels).sample

    ema = _train_denoiser(out, model, forward, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                          ema_decay=ema_decay, min_snr_gamma=min_snr_gamma, loss_weighting=loss_weighting, seed=seed,
                          train_images=train_images, bf16=bf16, log_every=log_every, progress=progress,
                          settings=settings, checkpoint_every=checkpoint_every, log=log)
    ema.save_pretrained(out / "transformer", safe_serialization=True)
    _mark_trained(out / TRAINING_DONE_FILE, settings)
    return out


class ToyUNetModel(torch.nn.Module):
    """The toy UNet with its class prompt table: ``prompts[label]`` (``[B, L, D]``, row
    ``len(TOY_CLASSES)`` the null prompt) is what the UNet cross-attends to. It denoises images as
    :func:`to_patches` lays them out (``[B, 12, 16, 16]``)."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(**TOY_UNET_CONFIG)
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)
        self.prompts = torch.nn.Parameter(
            torch.randn(len(TOY_CLASSES) + 1, TOY_PROMPT_TOKENS, TOY_UNET_CONFIG["cross_attention_dim"]) * 0.5)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_t = with_positions(x_t, int(self.unet.config.in_channels))
        return self.unet(x_t, t, encoder_hidden_states=self.prompts[labels]).sample


def position_channels(height: int, width: int, channels: int, *, device=None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed sinusoidal position features ``[channels, height, width]`` for a toy UNet that reads
    where each token sits (a UNet's convolutions otherwise carry position only as far as they reach).

    ``channels`` is a multiple of 4. With ``k = channels // 4`` frequencies ``f = 1, 2, 4, ...``
    (half-periods across the grid) and ``a = pi * f * (i + 0.5) / n`` at token ``i`` of ``n``, the
    channels are ``sin a`` for each ``f``, then ``cos a`` for each ``f``, of the row index, then the
    same of the column index. Deterministic, and built from ``arange`` alone (static under compile).
    """
    if channels <= 0 or channels % 4:
        raise ConfigError(f"position channels must be a positive multiple of 4 (sin and cos per frequency and "
                          f"axis); got {channels}")
    freqs = 2.0 ** torch.arange(channels // 4, device=device, dtype=torch.float32)

    def axis(n: int) -> torch.Tensor:  # [channels // 2, n]
        angle = math.pi * freqs[:, None] * (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
        return torch.cat([angle.sin(), angle.cos()])

    rows = axis(height)[:, :, None].expand(-1, height, width)
    cols = axis(width)[:, None, :].expand(-1, height, width)
    return torch.cat([rows, cols]).to(dtype)


def with_positions(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """``x`` (``[B, C, H, W]``) with :func:`position_channels` appended up to ``in_channels``
    (``x`` unchanged when it already has them all)."""
    extra = in_channels - x.shape[1]
    if extra == 0:
        return x
    pos = position_channels(x.shape[2], x.shape[3], extra, device=x.device, dtype=x.dtype)
    return torch.cat([x, pos.expand(x.shape[0], -1, -1, -1)], dim=1)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def to_patches(images: torch.Tensor, patch: int = TOY_UNET_PATCH) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` as the toy UNet sees them: each ``patch`` x ``patch`` block of pixels
    stacked into channels, ``[B, 3 * patch**2, H / patch, W / patch]`` (a permutation of the pixels,
    so Gaussian noise there is Gaussian noise on the image)."""
    return F.pixel_unshuffle(images, patch) if patch > 1 else images


def from_patches(patches: torch.Tensor, patch: int = TOY_UNET_PATCH) -> torch.Tensor:
    """The inverse of :func:`to_patches`."""
    return F.pixel_shuffle(patches, patch) if patch > 1 else patches


def build_toy_unet() -> ToyUNetModel:
    """A freshly initialised toy UNet (zero-initialised output convolution) and prompt table."""
    return ToyUNetModel()


def train_toy_unet(
    out_dir: str | Path,
    *,
    steps: int = 4500,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 50,
    ema_decay: float = 0.999,
    min_snr_gamma: float | None = 5.0,
    loss_weighting: str = "min_snr",
    label_dropout: float = 0.1,
    init_from: str | Path | None = None,
    seed: int = 0,
    train_images: int = 200_000,
    bf16: bool | None = None,
    log_every: int = 25,
    checkpoint_every: int = 250,
    progress: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the toy UNet and save it (EMA weights, float16) as ``out_dir/toy-unet`` holding ``unet/``,
    ``scheduler/``, ``class_prompts.safetensors`` (what the ``toy-unet`` backbone loads) and
    ``training_log.csv``. ``label_dropout`` of the labels are replaced by the null prompt (for
    classifier-free guidance).

    ``bf16``: bfloat16 autocast (``None``: where the CPU computes bfloat16 natively). A stopped run
    resumes from ``training_state.pt`` (saved every ``checkpoint_every`` steps and when stopped by a
    signal); a finished one with the same settings is kept, not trained again.

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    out = Path(out_dir) / "toy-unet"
    bf16 = native_bf16_cpu() if bf16 is None else bf16
    settings = _settings(model="toy-unet", config=TOY_UNET_CONFIG, prompt_tokens=TOY_PROMPT_TOKENS, steps=steps,
                         batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay, min_snr_gamma=min_snr_gamma,
                         loss_weighting=loss_weighting, label_dropout=label_dropout, init_from=init_from, seed=seed,
                         train_images=train_images, bf16=bf16)
    if _kept(out / TRAINING_DONE_FILE, settings, [out / "unet", out / "scheduler", out / TOY_PROMPTS_FILE], log):
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_toy_unet().train()
    if init_from is not None:  # continue from a saved toy UNet folder (unet/ and the prompt table)
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        config = UNet2DConditionModel.load_config(Path(init_from) / "unet")
        differ = {k: (config.get(k), v) for k, v in TOY_UNET_CONFIG.items() if _as_list(config.get(k)) != _as_list(v)}
        if differ:
            raise ConfigError(f"the toy UNet in {init_from} has another architecture than today's "
                              f"(saved vs now: {differ}); train from scratch (no init_from)")
        saved = UNet2DConditionModel.from_pretrained(Path(init_from) / "unet", torch_dtype=torch.float32)
        model.unet.load_state_dict(saved.state_dict())
        with torch.no_grad():
            model.prompts.copy_(load_file(str(Path(init_from) / TOY_PROMPTS_FILE))["prompts"])
    null = len(TOY_CLASSES)

    def forward(net, xt, t, labels, gen):
        drop = torch.rand(labels.shape, generator=gen) < label_dropout
        return net(xt, t, torch.where(drop, torch.full_like(labels, null), labels))

    ema = _train_denoiser(out, model, forward, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                          ema_decay=ema_decay, min_snr_gamma=min_snr_gamma, loss_weighting=loss_weighting, seed=seed,
                          train_images=train_images, bf16=bf16, log_every=log_every, progress=progress,
                          ema_bias_correction=True, model_space=to_patches, settings=settings,
                          checkpoint_every=checkpoint_every, log=log)
    ema.unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)  # half the package size
    save_file({"prompts": ema.prompts.detach().float().contiguous()}, str(out / TOY_PROMPTS_FILE))
    _mark_trained(out / TRAINING_DONE_FILE, settings)
    return out


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random pixel noise, 3x3 blur and contrast jitter on half the batch (images in [-1, 1])."""
    b = images.shape[0]
    pick = torch.rand(b, generator=gen) < 0.5
    kind = torch.randint(0, 3, (b,), generator=gen)
    out = images.clone()
    noisy = pick & (kind == 0)
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.3
    out = torch.where(noisy.view(-1, 1, 1, 1), out + sigma * torch.randn(out.shape, generator=gen), out)
    blurred = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    out = torch.where((pick & (kind == 1)).view(-1, 1, 1, 1), 0.5 * out + 0.5 * blurred, out)
    scale = 0.6 + 0.6 * torch.rand(b, 1, 1, 1, generator=gen)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = torch.where((pick & (kind == 2)).view(-1, 1, 1, 1), mean + scale * (out - mean), out)
    return out.clamp(-1, 1)


def train_toy_classifier(
    out_dir: str | Path,
    *,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    train_images: int = 60_000,
    augment: bool = True,
    log_every: int = 25,
    progress: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the toy timm classifier; saves ``classifier.safetensors`` (fp16) under ``out_dir``.

    With ``augment`` (default) half the images get pixel noise, blur or a contrast change, so the
    classifier judges shape and texture rather than render-perfect pixels: it also has to judge
    generated samples, which carry the artefacts of an imperfect generator.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    settings = _settings(model="classifier", arch=TOY_CLASSIFIER_ARCH, kwargs=_CLASSIFIER_KWARGS, steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, train_images=train_images, augment=augment)
    if _kept(out / CLASSIFIER_DONE_FILE, settings, [out / "classifier.safetensors"], log):
        return out / "classifier.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_toy_classifier().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    data = ToyShapes("train", length=train_images)
    rows: list[dict] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, 20)
        idx = torch.randint(0, train_images, (batch_size,), generator=gen)
        images, labels = data.batch(idx.tolist())
        if augment:
            images = _augment(images, gen)
        loss = F.cross_entropy(model(classifier_input(images)), labels, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            row = {"step": step, "loss": round(loss.item(), 5), "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            if progress is not None:
                progress(step, row)
    model.eval()
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
              str(out / "classifier.safetensors"))
    _write_log(out / "classifier_training_log.csv", rows)
    _mark_trained(out / CLASSIFIER_DONE_FILE, settings)
    return out / "classifier.safetensors"
