"""The :class:`DiffusionBackbone` interface both evaluation tasks run on.

A backbone holds a pretrained diffusion model and exposes what classification and generation need:
``encode`` images to the space the model denoises in, build conditions for classes (and, for text
models, prompts), ``predict_noise`` with the first ``C`` output channels only (learned-sigma
channels dropped), the training schedule's ``alphas_cumprod``, and the ``denoiser`` module that
compressors attach to. Inputs and outputs of ``encode`` / ``predict_noise`` are float32 whatever
dtype the model runs in, so noising and losses stay in float32 (half-precision noising and losses lose the small
differences between classes that the classifier ranks on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from bigain.errors import ConfigError

__all__ = ["DiffusionBackbone", "DTYPES", "COMPILE_MODES", "CompileMode", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: How a task runs its denoiser: eagerly (``none``) or through ``torch.compile`` in one of its modes.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)} (none = eager), got {mode!r}")
    return mode


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class DiffusionBackbone(nn.Module, ABC):
    """A diffusion model as the tasks see it.

    Subclasses set ``denoiser`` (the module compressors attach to), register ``alphas_cumprod``
    (float64 buffer of the training schedule) and implement the abstract methods.
    """

    #: ``"unet"`` or ``"dit"``: where compressors attach and how levels/blocks are chosen.
    family: ClassVar[str] = ""
    #: True when classes are conditioned through text prompts (Stable Diffusion).
    text_conditioned: ClassVar[bool] = False

    denoiser: nn.Module
    alphas_cumprod: Tensor

    def __init__(self, *, dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        super().__init__()
        self.dtype_name = dtype
        self.model_dtype = resolve_dtype(dtype)
        self.compile_mode = "none"

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
    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """float32 epsilon prediction ``[B, C, h, w]`` for float32 ``x_t``, timesteps ``[B]``."""

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
                "num_train_timesteps": self.num_train_timesteps, "compile": self.compile_mode}
