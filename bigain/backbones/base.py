"""The :class:`DiffusionBackbone` interface both evaluation tasks run on.

A backbone holds a pretrained diffusion model and exposes what classification and generation need:
``encode`` images to the space the model denoises in, build conditions for classes (and, for text
models, prompts), ``predict_output`` - what the model predicts, in the first ``C`` output channels
(learned-sigma channels dropped) - and ``predict_noise``, the same prediction converted to the noise
``epsilon``, the training schedule's ``alphas_cumprod``, and the ``denoiser`` module that compressors
attach to. Inputs and outputs of ``encode`` / ``predict_output`` / ``predict_noise`` are float32
whatever dtype the model runs in, so noising and losses stay in float32 (half-precision noising and
losses lose the small differences between classes that the classifier ranks on).

What the model predicts is its scheduler config's ``prediction_type`` (diffusers' names):
``epsilon`` (the noise), ``v_prediction`` (``v = sqrt(a) * eps - sqrt(1 - a) * x0``, as Stable
Diffusion 2.0 at 768 px) or ``sample`` (``x0`` itself), with ``a = alphas_cumprod[t]`` and
``x_t = sqrt(a) * x0 + sqrt(1 - a) * eps``. Classification ranks classes on the epsilon error by
default, whatever the model predicts (``target: native`` ranks on the error of the model's own
target instead, see :class:`bigain.tasks.classification.DiffusionClassifier`); generation hands
the model's own output to a diffusers scheduler configured with the same ``prediction_type``.

Flow-matching models (Stable Diffusion 3, :class:`RectifiedFlow`) have no ``alphas_cumprod``: they
noise by ``x_t = (1 - s) * x0 + s * eps`` and predict the velocity ``v = eps - x0``. The tasks never
ask which kind a backbone is; they call the methods below, whose defaults are the DDPM maths above:

* :meth:`DiffusionBackbone.add_noise` - ``x_t`` at training-schedule indices ``t`` (``0 .. T - 1``,
  the classifier's timestep grid);
* :meth:`DiffusionBackbone.timestep_input` - the timestep the model receives for those indices (DDPM:
  the index itself; rectified flow: ``1000 * sigma``);
* :meth:`DiffusionBackbone.native_target` - what the model is trained to output there;
* :meth:`DiffusionBackbone.sampling_scheduler` - the diffusers scheduler generation steps with;
* :attr:`DiffusionBackbone.classification_target` - what ``target: auto`` ranks classes on.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from bigain.errors import ConfigError

__all__ = ["DiffusionBackbone", "VAELatents", "ClassLabels", "TextConditions", "PooledConditions", "CachedPrompts",
           "RectifiedFlow", "DTYPES", "COMPILE_MODES", "CompileMode", "resolve_dtype", "folder_digest",
           "PREDICTION_TYPES", "FLOW_PREDICTION", "check_prediction_type", "to_epsilon", "to_sample", "to_target",
           "ddpm_noise"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: How a task runs its denoiser: eagerly (``none``) or through ``torch.compile`` in one of its modes.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)} (none = eager), got {mode!r}")
    return mode


#: What a denoiser may be trained to predict (diffusers' ``prediction_type`` names).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


#: What a flow-matching model predicts: the velocity ``v = eps - x0`` (diffusers' name for it).
FLOW_PREDICTION = "flow_prediction"


def check_prediction_type(value: Any, *, where: str = "the scheduler config") -> str:
    """``value`` if it is one of :data:`PREDICTION_TYPES`, else a :class:`ConfigError` naming them."""
    if value not in PREDICTION_TYPES:
        raise ConfigError(
            f"{where} says prediction_type={value!r}, which bigain does not know; the accepted values are "
            f"{', '.join(repr(v) for v in PREDICTION_TYPES)} (diffusers' names). Fix the checkpoint's "
            f"scheduler/scheduler_config.json to say what the model was trained to predict"
        )
    return value


def _coefficients(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``sqrt(a_t)`` and ``sqrt(1 - a_t)`` (float64 maths, returned in ``like``'s dtype) shaped to
    broadcast over ``like`` ``[B, C, h, w]``."""
    a = alphas_cumprod.to(like.device)[t.to(like.device).round().long()]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a.sqrt().to(like.dtype).view(shape), (1 - a).sqrt().to(like.dtype).view(shape)


def to_epsilon(output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """The noise ``eps`` implied by a model ``output`` of ``prediction_type`` at ``x_t``, timesteps ``t``.

    ``v_prediction``: ``eps = sqrt(a) * v + sqrt(1 - a) * x_t``; ``sample``:
    ``eps = (x_t - sqrt(a) * x0) / sqrt(1 - a)``; ``epsilon``: the output itself.
    """
    check_prediction_type(prediction_type, where="to_epsilon")
    if prediction_type == "epsilon":
        return output
    sa, s1 = _coefficients(alphas_cumprod, t, output)
    if prediction_type == "v_prediction":
        return sa * output + s1 * x_t
    return (x_t - sa * output) / s1


def to_sample(output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """The clean sample ``x0`` implied by a model ``output`` of ``prediction_type``.

    ``v_prediction``: ``x0 = sqrt(a) * x_t - sqrt(1 - a) * v``; ``epsilon``:
    ``x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a)``; ``sample``: the output itself.
    """
    check_prediction_type(prediction_type, where="to_sample")
    if prediction_type == "sample":
        return output
    sa, s1 = _coefficients(alphas_cumprod, t, output)
    if prediction_type == "v_prediction":
        return sa * x_t - s1 * output
    return (x_t - s1 * output) / sa


def to_target(x0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """The ground truth a model of ``prediction_type`` is trained to output for the clean ``x0``, the
    noise ``eps`` (both ``[B, C, h, w]`` float32) and timesteps ``t`` ``[B]``: ``eps``, ``x0``, or
    ``v = sqrt(a) * eps - sqrt(1 - a) * x0`` with ``a = alphas_cumprod[t]`` (float64 maths)."""
    check_prediction_type(prediction_type, where="native_target")
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    a = alphas_cumprod.to(device=eps.device, dtype=torch.float64)[t.to(eps.device).long()].view(-1, 1, 1, 1)
    return (a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()).float()


def ddpm_noise(x0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """``x_t = sqrt(a) * x0 + sqrt(1 - a) * eps`` with ``a = alphas_cumprod[t]`` (``t`` ``[B]`` long,
    ``eps`` ``[B, C, h, w]``, ``x0`` broadcasting to it; ``a`` gathered in float64, the maths in float32)."""
    a = alphas_cumprod.to(device=eps.device, dtype=torch.float64)[t.to(eps.device)].float().view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * eps


def folder_digest(path: str | Path) -> str | None:
    """SHA-256 (hex, first 16 digits) of every weight and config file under ``path`` (``*.safetensors``,
    ``*.bin``, ``*.json``), names and contents, in a fixed order; for small, local checkpoints. ``None``
    when ``path`` is not a folder (the backbone's own loading then says what is missing)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for file in sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".json")):
        h.update(file.relative_to(root).as_posix().encode() + b"\0")
        h.update(file.read_bytes())
    return h.hexdigest()[:16]


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class VAELatents:
    """``encode`` / ``decode`` through a diffusers ``AutoencoderKL`` in ``self.vae``: the posterior mean
    scaled by :attr:`vae_scale` (the VAE config's ``scaling_factor``), as the latent-diffusion
    backbones (Stable Diffusion, PixArt, SD3) share them; a VAE whose config has a ``shift_factor``
    (SD3's) is shifted first: ``(mean - shift_factor) * scaling_factor``, and back in ``decode``.
    Mix in before :class:`DiffusionBackbone`."""

    vae: nn.Module

    @property
    def vae_scale(self) -> float:
        """The VAE config's ``scaling_factor``."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_shift(self) -> float | None:
        """The VAE config's ``shift_factor`` (``None`` when it has none: Stable Diffusion 1/2, PixArt)."""
        shift = getattr(self.vae.config, "shift_factor", None)
        return None if shift is None else float(shift)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel along each side: 2 per VAE down block after the first."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist  # an upcast VAE: float32
        shift = self.vae_shift
        mean = dist.mean.float()
        return (mean if shift is None else mean - shift) * self.vae_scale

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        shift = self.vae_shift
        z = x0 / self.vae_scale
        out = self.vae.decode((z if shift is None else z + shift).to(self.vae.dtype)).sample
        return out.float().clamp(-1, 1)


class ClassLabels:
    """Conditions that are class ids in the model's label space (DiT, the toy models): the dataset's
    classes map to ids through the datamodule's ``label_ids`` (or are the model's classes, in order),
    and guidance uses the null class ``num_model_classes`` when the model was trained with label
    dropout. Subclasses set ``num_model_classes`` and ``null_class`` (``None``: no null class). Mix in
    before :class:`DiffusionBackbone`."""

    num_model_classes: int
    null_class: int | None
    device: torch.device
    _label_ids: Tensor | None = None

    def set_classes(self, *, prompts: Sequence[str], label_ids: Sequence[int] | None = None) -> None:
        k, n, what = len(prompts), self.num_model_classes, type(self).__name__
        if label_ids is None and k != n:
            raise ConfigError(
                f"the dataset has {k} classes with no ids in this {what}'s label space ({n} classes): a "
                f"class-conditional model can only score classes it was trained on. Use a dataset whose datamodule "
                f"maps its classes to the model's ids (label_ids; ImageNet and ImageNet-100 do, for DiT-XL/2), or "
                f"a text-conditioned model (stable-diffusion) for other datasets"
            )
        ids = list(range(k)) if label_ids is None else [int(i) for i in label_ids]
        if len(ids) != k:
            raise ConfigError(f"label_ids has {len(ids)} entries for {k} classes")
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ConfigError(
                f"this {what} knows {n} classes, but the dataset's classes map to ids {bad[:5]}...; use a "
                f"dataset in the model's label space (ImageNet / ImageNet-100 for DiT-XL/2) or a datamodule "
                f"whose label_ids map into it"
            )
        self._label_ids = torch.tensor(ids, dtype=torch.long)

    def class_conditions(self, classes: Tensor) -> Tensor:
        if self._label_ids is None:
            raise RuntimeError("call set_classes(...) before class_conditions")
        return self._label_ids.to(classes.device)[classes].to(self.device)

    def null_conditions(self, batch: int) -> Tensor:
        if self.null_class is None:
            raise ConfigError(f"this {type(self).__name__} was trained without label dropout: it has no null class "
                              "for guidance; use guidance_scale=1")
        return torch.full((batch,), self.null_class, dtype=torch.long, device=self.device)


class TextConditions:
    """A batch of text conditions: a frozen dataclass of tensors, batch first (the text tokens
    ``embeds`` first). Indexing, ``to``, ``expand`` and :meth:`cat` act on every field."""

    def _map(self, fn: Any) -> Any:
        return type(self)(*[fn(getattr(self, f.name)) for f in fields(self)])

    def __len__(self) -> int:
        return int(getattr(self, fields(self)[0].name).shape[0])

    def __getitem__(self, index: Any) -> Any:
        return self._map(lambda t: t[index])

    def to(self, device: Any) -> Any:
        return self._map(lambda t: t.to(device))

    def expand(self, batch: int) -> Any:
        """A batch of ``batch`` copies of a single condition."""
        if len(self) != 1:
            raise ValueError(f"expand() needs a single condition, this batch has {len(self)}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    @classmethod
    def cat(cls, conds: Sequence[Any]) -> Any:
        """One batch of several, field by field."""
        return cls(*[torch.cat([getattr(c, f.name) for c in conds]) for f in fields(cls)])


@dataclass(frozen=True)
class PooledConditions(TextConditions):
    """Prompt conditions of a model that reads text tokens and a pooled text embedding (SDXL, SD3,
    Flux): the text tokens ``embeds`` ``[B, L, D]`` and the pooled embedding ``pooled`` ``[B, P]``."""

    embeds: Tensor
    pooled: Tensor


class CachedPrompts:
    """Class and prompt conditions of a text-conditioned backbone, from its
    ``encode_prompts(prompts) -> TextConditions``: the class prompts are encoded once and cached,
    guidance's null condition is the empty prompt. Mix in before :class:`DiffusionBackbone`."""

    device: torch.device
    encode_prompts: Any  # (prompts) -> TextConditions, the backbone's own
    _class_prompts: tuple[str, ...] = ()
    _class_cond: TextConditions | None = None
    _null: TextConditions | None = None

    def set_classes(self, *, prompts: Sequence[str], label_ids: Sequence[int] | None = None) -> None:
        if tuple(prompts) != self._class_prompts or self._class_cond is None:
            self._class_prompts = tuple(prompts)
            self._class_cond = self.encode_prompts(self._class_prompts)  # computed once, then cached

    def class_conditions(self, classes: Tensor) -> TextConditions:
        if self._class_cond is None:
            raise RuntimeError("call set_classes(prompts=...) before class_conditions")
        if self._class_cond.embeds.device != self.device:
            self._class_cond = self._class_cond.to(self.device)
        return self._class_cond[classes.to(self.device)]

    def prompt_conditions(self, prompts: Sequence[str]) -> TextConditions:
        return self.encode_prompts(prompts)

    def null_conditions(self, batch: int) -> TextConditions:
        """The empty prompt's conditions (the pipelines' negative prompt for guidance), ``batch`` times."""
        if self._null is None or self._null.embeds.device != self.device:
            self._null = self.encode_prompts([""])
        return self._null.expand(batch)

    def concat_conditions(self, conds: Sequence[TextConditions]) -> TextConditions:
        return type(conds[0]).cat(conds)


class DiffusionBackbone(nn.Module, ABC):
    """A diffusion model as the tasks see it.

    Subclasses set ``denoiser`` (the module compressors attach to), register ``alphas_cumprod``
    (float64 buffer of the training schedule), set ``prediction_type`` from the checkpoint's
    scheduler config (checked with :func:`check_prediction_type`) and implement the abstract methods.
    """

    #: The denoiser family's name, as its adapter is registered (``"unet"``, ``"dit"``, ``"pixart"``):
    #: recorded by :meth:`describe`. Where compressors attach is the adapter's business, not this name's.
    family: ClassVar[str] = ""
    #: True when classes are conditioned through text prompts (Stable Diffusion).
    text_conditioned: ClassVar[bool] = False
    #: What classification's ``target: auto`` ranks classes on: ``epsilon`` (the noise) for the
    #: DDPM-trained models, ``native`` (the model's own target: the velocity) for flow-matching ones.
    classification_target: ClassVar[str] = "epsilon"
    #: The samplers generation can use with this model (the first is the fallback of ``sampler: auto``).
    samplers: ClassVar[tuple[str, ...]] = ("euler", "ddim")
    #: Generation's classifier-free guidance scale when ``guidance_scale`` is not given; ``None``: 7.5
    #: for text-conditioned models, 4.0 for class-conditional ones (FLUX: 1.0, no guidance batch).
    default_guidance_scale: ClassVar[float | None] = None

    denoiser: nn.Module
    alphas_cumprod: Tensor
    #: What the denoiser predicts: one of :data:`PREDICTION_TYPES`.
    prediction_type: str = "epsilon"

    def __init__(self, *, dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        super().__init__()
        self.dtype_name = dtype
        self.model_dtype = resolve_dtype(dtype)
        self.compile_mode = "none"

    @classmethod
    def weights_digest(cls, options: dict[str, Any]) -> str | None:
        """A digest of the weights the backbone built with ``options`` would load, or ``None`` when the options
        name the weights well enough (a hub id, a folder of a released checkpoint).

        A run's identity includes it, so that a run folder never mixes results of two sets of weights that
        share a name: the toy backbones, whose shipped weights ``bigain toy train`` can rebuild in place,
        return :func:`folder_digest` of their folder.
        """
        return None

    def use_schedule(self, path: str) -> None:
        """Read the checkpoint's scheduler config at ``path``: sets ``scheduler_config``,
        ``prediction_type`` and the ``alphas_cumprod`` buffer (see :func:`bigain.backbones.loading.load_schedule`)."""
        from bigain.backbones.loading import load_schedule

        self.scheduler_config, self.prediction_type, alphas_cumprod = load_schedule(path)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @abstractmethod
    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """Shape ``(C, h, w)`` of ``encode`` outputs for square images of ``image_size`` pixels."""

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> float32 ``x0`` in the model's space."""

    @abstractmethod
    def decode(self, x0: Tensor) -> Tensor:
        """float32 ``x0`` -> images ``[B, 3, H, W]`` in ``[-1, 1]``."""

    @abstractmethod
    def set_classes(self, *, prompts: Sequence[str], label_ids: Sequence[int] | None = None) -> None:
        """Tell the backbone the dataset's classes (one prompt each; ids in the model's label space)."""

    @abstractmethod
    def class_conditions(self, classes: Tensor) -> Any:
        """Conditions for dataset class indices ``[B]`` (after :meth:`set_classes`)."""

    @abstractmethod
    def null_conditions(self, batch: int) -> Any:
        """Unconditional conditions for classifier-free guidance."""

    @abstractmethod
    def predict_output(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The model's own float32 prediction ``[B, C, h, w]`` (of :attr:`prediction_type`) for
        float32 ``x_t``, timesteps ``[B]``; learned-sigma channels dropped."""

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """float32 epsilon prediction ``[B, C, h, w]`` for float32 ``x_t``, timesteps ``[B]``,
        whatever the model predicts (converted from :meth:`predict_output`)."""
        return to_epsilon(self.predict_output(x_t, t, cond), x_t.float(), t, self.alphas_cumprod,
                          self.prediction_type)

    def predict_sample(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """float32 prediction of the clean sample ``x0`` (converted from :meth:`predict_output`)."""
        return to_sample(self.predict_output(x_t, t, cond), x_t.float(), t, self.alphas_cumprod,
                         self.prediction_type)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """float32 ``x_t`` for clean ``x0`` (broadcasting to ``eps``), noise ``eps`` ``[B, C, h, w]`` and
        training-schedule indices ``t`` ``[B]`` long: ``sqrt(a) * x0 + sqrt(1 - a) * eps``, ``a =
        alphas_cumprod[t]``."""
        return ddpm_noise(x0, eps, t, self.alphas_cumprod)

    def timestep_input(self, t: Tensor) -> Tensor:
        """The timesteps the model's ``predict_*`` methods take for training-schedule indices ``t``
        ``[B]``: the indices themselves for a DDPM-trained model."""
        return t

    def native_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What :meth:`predict_output` is trained to output for ``x0``, ``eps`` ``[B, C, h, w]`` and
        training-schedule indices ``t`` ``[B]`` (see :func:`to_target`)."""
        return to_target(x0, eps, t, self.alphas_cumprod, self.prediction_type)

    def sampling_scheduler(self, sampler: str) -> Any:
        """A fresh diffusers scheduler for ``sampler`` (``euler`` or ``ddim``), from the checkpoint's
        scheduler config, stepping the model's own output (``prediction_type``); timesteps not yet set."""
        from diffusers import DDIMScheduler, EulerDiscreteScheduler

        if sampler not in self.samplers:
            raise ConfigError(f"{type(self).__name__} samples with {', '.join(self.samplers)}, not {sampler!r}")
        cls = EulerDiscreteScheduler if sampler == "euler" else DDIMScheduler
        return cls.from_config(self.scheduler_config, prediction_type=self.prediction_type)

    def set_sampling_timesteps(self, scheduler: Any, steps: int, *, device: Any = None,
                               shape: Sequence[int] | None = None) -> None:
        """Set the ``steps`` sampling timesteps of a :meth:`sampling_scheduler` for latents of ``shape``
        ``(C, h, w)``: the scheduler's own spacing (``set_timesteps(steps)``) here."""
        scheduler.set_timesteps(steps, device=device)

    def compile_denoiser(self, mode: CompileMode) -> None:
        """Run the denoiser through ``torch.compile`` in ``mode`` from now on (``none``: eager).

        Compiled in place (``nn.Module.compile``), after the compressor is attached, so the
        compressed forward is what is traced; ``reduce-overhead`` replays it as a CUDA graph.
        """
        check_compile_mode(mode)
        if mode != "none":
            self.denoiser.compile(mode=None if mode == "default" else mode)
        self.compile_mode = mode

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Run the denoiser eagerly inside the block, even if it is compiled (FLOP counting, probes)."""
        compiled = self.denoiser.__dict__.get("_compiled_call_impl")
        self.denoiser._compiled_call_impl = None
        try:
            yield
        finally:
            self.denoiser._compiled_call_impl = compiled

    def concat_conditions(self, conds: Sequence[Any]) -> Any:
        """Join condition batches (for guidance batches): tensors are concatenated on dim 0."""
        return torch.cat(list(conds), dim=0)

    def describe(self) -> dict[str, Any]:
        """What the run records about the model (``run.json``)."""
        return {"backbone": type(self).__name__, "family": self.family, "dtype": self.dtype_name,
                "num_train_timesteps": self.num_train_timesteps, "prediction_type": self.prediction_type,
                "compile": self.compile_mode}


class RectifiedFlow:
    """Flow-matching maths for a backbone trained on ``x_t = (1 - s) * x0 + s * eps`` to predict the
    velocity ``v = eps - x0`` (Stable Diffusion 3, FLUX), with the checkpoint's
    ``FlowMatchEulerDiscreteScheduler`` config. Mix in before :class:`DiffusionBackbone`.

    The training schedule has ``T = num_train_timesteps`` levels: index ``i`` (``0 .. T - 1``, the
    classifier's timestep grid) is the noise level ``s_i = shift * u / (1 + (shift - 1) * u)`` with
    ``u = (i + 1) / T`` - the scheduler's own (shifted) training sigmas, lowest noise first - and the
    model receives the timestep ``T * s_i``. :meth:`predict_noise` converts the velocity to the noise,
    ``eps = x_t + (1 - s) * v``; :meth:`predict_sample` to the clean sample, ``x0 = x_t - s * v``.

    Resolution-dependent shifting (``use_dynamic_shifting``, FLUX.1-dev; only for a class that sets
    :attr:`dynamic_shifting`): the sigmas are shifted by ``mu``, linear in the image's token count
    ``n`` from ``(base_image_seq_len, base_shift)`` to ``(max_image_seq_len, max_shift)``, as the
    diffusers pipelines compute it: ``s = e^mu / (e^mu + (1 / u - 1))`` (``mu / (mu + (1 / u - 1))``
    with ``time_shift_type: linear``), for the classifier's noise levels and the sampler alike. The
    token count comes from the latents (:meth:`image_seq_len`): :meth:`add_noise` reads it from its
    noise and remembers it, so :meth:`timestep_input` (which sees only indices) gives the timesteps
    of the latents last noised.
    """

    classification_target: ClassVar[str] = "native"
    samplers: ClassVar[tuple[str, ...]] = ("euler",)
    #: True when the backbone knows its token count and accepts ``use_dynamic_shifting`` checkpoints.
    dynamic_shifting: ClassVar[bool] = False
    prediction_type: str = FLOW_PREDICTION
    flow_sigmas: Tensor
    _flow_seq_len: int | None = None

    def use_flow_schedule(self, path: str) -> None:
        """Read the checkpoint's ``scheduler/`` config (a ``FlowMatchEulerDiscreteScheduler``): sets
        ``scheduler_config``, ``prediction_type`` and the float64 ``flow_sigmas`` buffer ``[T]``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from bigain.backbones.loading import is_local
        from bigain.errors import CheckpointError

        try:
            raw = dict(FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
        except (OSError, ValueError) as exc:
            hint = "" if is_local(path) else " If this machine is offline, give the checkpoint's local folder."
            raise CheckpointError(f"could not load the scheduler config from {path}/scheduler: {exc}.{hint}") from exc
        kind = raw.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if "FlowMatch" not in str(kind):
            raise CheckpointError(f"the scheduler config of {path} is a {kind}; a flow-matching model needs a "
                                  f"FlowMatchEulerDiscreteScheduler config (scheduler/scheduler_config.json)")
        if raw.get("use_dynamic_shifting") and not self.dynamic_shifting:
            raise CheckpointError(f"the scheduler config of {path} shifts its sigmas by image resolution "
                                  f"(use_dynamic_shifting), which {type(self).__name__} does not support; use a "
                                  f"checkpoint with a fixed shift (Stable Diffusion 3 / 3.5)")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(raw)
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = FLOW_PREDICTION
        # the training sigmas, highest noise first in diffusers: flipped so index i means u = (i + 1) / T
        # (unshifted with use_dynamic_shifting: the shift is applied per token count in sigma())
        self.register_buffer("flow_sigmas", scheduler.sigmas.double().flip(0).clone(), persistent=False)
        self._flow_seq_len = None

    @property
    def shifts_by_resolution(self) -> bool:
        """True when the checkpoint's sigmas are shifted by the image's token count (``use_dynamic_shifting``)."""
        return bool(self.scheduler_config.get("use_dynamic_shifting"))

    def image_seq_len(self, shape: Sequence[int]) -> int:
        """The number of image tokens the denoiser sees for latents of ``shape`` (``[..., C, h, w]``)."""
        raise NotImplementedError(f"{type(self).__name__} does not count its image tokens")

    def shift_mu(self, seq_len: int) -> float:
        """The resolution shift ``mu`` for ``seq_len`` image tokens (the scheduler config's base / max
        shift at its base / max sequence lengths, linear in between and beyond)."""
        cfg = self.scheduler_config
        n0, n1 = float(cfg.get("base_image_seq_len", 256)), float(cfg.get("max_image_seq_len", 4096))
        m0, m1 = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
        slope = (m1 - m0) / (n1 - n0)
        return seq_len * slope + (m0 - slope * n0)

    def _seq_len(self, shape: Sequence[int] | None) -> int:
        if shape is not None:
            return self.image_seq_len(shape)
        if self._flow_seq_len is None:
            raise RuntimeError(f"{type(self).__name__}'s noise levels depend on the image's token count: noise a "
                               f"batch with add_noise (or pass the latent shape) before asking for its timesteps")
        return self._flow_seq_len

    def sigma(self, t: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """float64 noise levels ``s`` ``[B]`` for training-schedule indices ``t`` ``[B]`` (with
        resolution shifting: for latents of ``shape``, by default those last noised)."""
        s = self.flow_sigmas.to(t.device)[t.long()]
        if not self.shifts_by_resolution:
            return s
        mu = self.shift_mu(self._seq_len(shape))
        inv = 1.0 / s - 1.0
        if self.scheduler_config.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + inv)
        return math.exp(mu) / (math.exp(mu) + inv)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.flow_sigmas.numel())

    def _level(self, t: Tensor, like: Tensor) -> Tensor:
        """``s = t / T`` for model timesteps ``t`` ``[B]``, float32, shaped to broadcast over ``like``."""
        s = t.to(like.device, torch.float64) / self.num_train_timesteps
        return s.to(like.dtype).view((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - s) * x0 + s * eps`` with ``s = flow_sigmas[t]`` (float32 maths; shifted for
        ``eps``'s token count, which is remembered, with resolution shifting)."""
        if self.shifts_by_resolution:
            self._flow_seq_len = self.image_seq_len(eps.shape)
        s = self.sigma(t.to(eps.device)).float().view(-1, 1, 1, 1)
        return (1.0 - s) * x0 + s * eps

    def timestep_input(self, t: Tensor) -> Tensor:
        """float32 model timesteps ``T * s`` for training-schedule indices ``t`` (with resolution
        shifting: at the token count of the latents last noised)."""
        return (self.sigma(t) * self.num_train_timesteps).float()

    def native_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The velocity ``v = eps - x0``."""
        return eps - x0

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """float32 noise ``eps = x_t + (1 - s) * v`` from the velocity prediction; ``t`` are model
        timesteps (``T * s``)."""
        v = self.predict_output(x_t, t, cond)
        x = x_t.float()
        return x + (1.0 - self._level(t, x)) * v

    def predict_sample(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """float32 clean sample ``x0 = x_t - s * v`` from the velocity prediction."""
        v = self.predict_output(x_t, t, cond)
        x = x_t.float()
        return x - self._level(t, x) * v

    def sampling_scheduler(self, sampler: str) -> Any:
        """A fresh ``FlowMatchEulerDiscreteScheduler`` from the checkpoint's config (its ``shift``
        included): the flow Euler sampler, the only one (``euler``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if sampler not in self.samplers:
            raise ConfigError(f"{type(self).__name__} is a flow-matching model: it samples with the flow Euler "
                              f"sampler (sampler: euler or auto), not {sampler!r}")
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def sampling_sigmas(self, steps: int) -> Any:
        """The unshifted sigmas to sample ``steps`` steps at, or ``None`` for the scheduler's own spacing
        (Stable Diffusion 3's)."""
        return None

    def set_sampling_timesteps(self, scheduler: Any, steps: int, *, device: Any = None,
                               shape: Sequence[int] | None = None) -> None:
        """Set the flow sampler's timesteps: :meth:`sampling_sigmas` (or the scheduler's own spacing),
        shifted by the checkpoint's ``shift`` or, with resolution shifting, by ``mu`` for latents of
        ``shape`` (by default those last noised)."""
        extra = {"mu": self.shift_mu(self._seq_len(shape))} if self.shifts_by_resolution else {}
        sigmas = self.sampling_sigmas(steps)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, **extra)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, **extra)
