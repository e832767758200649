"""The denoiser adapter contract: the one place that knows a model family.

An adapter answers, for one denoiser class: which self-attention layers can be compressed and at
which downsample level each sits, how a call's token grid and timesteps are read from the
denoiser's arguments, and which tensor compressors score tokens on by default. Everything that
attaches a compressor goes through an adapter; nothing else switches on a family name.

Adapters are found through the entry-point group ``bigain.adapters`` (see
:mod:`bigain.adapters`), so a third party adds a family with one module and one entry point.

Everything an adapter computes per call must be traceable by ``torch.compile`` without a graph
break or a device sync: read shapes (static Python ints) and pass tensors on, never call
``.item()`` / ``.tolist()`` on them.

Joint-attention families (SD3, Flux) mark their sites with :attr:`AttentionSite.text` (where the
text tokens of a call are) and :attr:`AttentionSite.kv` (how compressed keys/values reach the
processor); a family with rotary position embeddings sets :attr:`AttentionSite.rotary` and
implements :meth:`DenoiserAdapter.positions`, :meth:`DenoiserAdapter.rotary_table` and
:meth:`DenoiserAdapter.apply_rotary`.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

__all__ = ["AttentionSite", "DenoiserAdapter", "argument"]


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention layer of a denoiser, as an adapter offers it.

    Attributes:
        name: the attention module's qualified name in the denoiser.
        block: the transformer block holding it (its input is the ``"block"`` metric).
        attn: the diffusers ``Attention`` module whose processor is wrapped.
        level: downsample level of the layer's token grid (1 = the first, finest grid).
        block_index: position of the block in the family's own numbering (a DiT block index), or
            ``None`` when the family selects layers by level only.
        text: where the call's text tokens are: ``"none"`` (plain self-attention over the image
            tokens), ``"encoder"`` (joint attention: the text tokens arrive as
            ``encoder_hidden_states`` with their own projections and the processor returns
            ``(image, text)`` outputs - SD3, Flux double-stream blocks) or ``"prefix"`` (the text
            tokens are the first tokens of ``hidden_states`` - Flux single-stream blocks). Text
            tokens are never compressed; they attend to the compressed image tokens and are
            attended to by them.
        kv: how a compressor's ``context`` (the tokens keys and values come from) reaches the
            processor: ``"encoder_hidden_states"`` (passed as the processor's
            ``encoder_hidden_states``, for self-attention layers whose processor computes keys and
            values from it) or ``"projections"`` (substituted at the inputs of ``attn.to_k`` and
            ``attn.to_v`` for the duration of the call - joint attention, where
            ``encoder_hidden_states`` carries the text).
        rotary: the processor receives ``image_rotary_emb`` (rotary position embeddings applied to
            queries and keys); the adapter's :meth:`DenoiserAdapter.rotary_table` and
            :meth:`DenoiserAdapter.apply_rotary` then rotate compressed queries and keys by the
            positions the compressor gives them.
    """

    name: str
    block: nn.Module
    attn: nn.Module
    level: int
    block_index: int | None = None
    text: Literal["none", "encoder", "prefix"] = "none"
    kv: Literal["encoder_hidden_states", "projections"] = "encoder_hidden_states"
    rotary: bool = False


def argument(args: tuple, kwargs: dict, position: int, names: Sequence[str]) -> Any:
    """A call argument given by one of ``names`` as a keyword, or at ``position``; ``None`` if absent."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[position] if len(args) > position else None


class DenoiserAdapter(ABC):
    """Base class of the adapters of a model family.

    Subclasses set :attr:`family`, :attr:`default_metric` and :attr:`model_class` (or override
    :meth:`matches`), implement :meth:`sites`, :meth:`select` and :meth:`token_size`, and may
    override :meth:`timesteps` and :meth:`grid`.

    Args:
        denoiser: the denoiser module (for which :meth:`matches` returned True).
    """

    #: The family's short name ("unet", "dit"), recorded in reports.
    family: ClassVar[str] = ""
    #: What compressors score tokens on unless ``bigain.apply(metric=...)`` says otherwise.
    default_metric: ClassVar[Literal["block", "attention"]] = "attention"
    #: The denoiser classes the adapter handles, for error messages.
    handles: ClassVar[str] = ""
    #: ``"module:ClassName"`` of the denoiser class; the default :meth:`matches` is an isinstance test.
    model_class: ClassVar[str] = ""
    #: Whether layers are selected by block index (``bigain.apply(blocks=...)``); False for a family
    #: selected by level (``max_downsample=``), whose :meth:`select` refuses ``blocks``.
    selects_blocks: ClassVar[bool] = True
    #: Factor from the timesteps the denoiser receives to ``LayerContext.timesteps`` (Flux receives
    #: ``t / 1000`` and scales it by 1000 itself).
    timestep_scale: ClassVar[float] = 1.0

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.model_class and cls.matches.__func__ is DenoiserAdapter.matches.__func__:
            raise TypeError(f"{cls.__qualname__} must set model_class ('module:ClassName') or override matches()")

    @classmethod
    def matches(cls, module: Any) -> bool:
        """Whether ``module`` is a denoiser of this family (an instance of :attr:`model_class`)."""
        path, _, name = cls.model_class.partition(":")
        return isinstance(module, getattr(importlib.import_module(path), name))

    @abstractmethod
    def sites(self) -> list[AttentionSite]:
        """Every self-attention layer of the denoiser, in execution order."""

    @abstractmethod
    def select(self, sites: list[AttentionSite], *, max_downsample: int,
               blocks: Sequence[int] | Literal["paper", "all"]) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
        """The sites to compress under ``bigain.apply``'s selection options, and ``(name, reason)``
        for each site left out. Raise :class:`bigain.errors.ConfigError` for an option that does
        not apply to the family."""

    @abstractmethod
    def token_size(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """The ``(h, w)`` token grid of level 1 for one denoiser call, from its arguments' shapes."""

    def timesteps(self, args: tuple, kwargs: dict) -> Any:
        """The call's timesteps as given (a tensor or a number), or ``None``."""
        return argument(args, kwargs, 1, ("timestep", "timesteps"))

    def declare_latent(self, shape: tuple[int, int, int]) -> None:
        """Told, before the first call, the ``(C, h, w)`` latent the evaluation tasks will denoise.
        The default does nothing (the grid follows the input's shape); an adapter whose denoiser
        sees tokens without a 2-D shape (Flux's packed latents) records the grid here, so no call
        has to read it back from the device and a compiled denoiser still finds it."""
        return None

    def grid(self, site: AttentionSite, num_tokens: int, size: tuple[int, int]) -> tuple[int, int] | None:
        """The token grid of a call of ``site`` with ``num_tokens`` tokens, given the level-1 ``size``.

        The default tries the site's level first, then every other power of two, rounding up as a
        strided convolution does (``ceil(h / level)``); ``None`` if no level fits.
        """
        height, width = size
        for d in [site.level] + [2**k for k in range(8) if 2**k != site.level]:
            h, w = math.ceil(height / d), math.ceil(width / d)
            if h * w == num_tokens:
                return h, w
        return None

    def all_layers(self) -> dict[str, Any]:
        """``bigain.apply`` selection options that select every site (for analysis tools)."""
        return {"blocks": "all"}

    def selection(self, *, max_downsample: int, blocks: Any) -> dict[str, Any]:
        """The ``bigain.apply`` selection options for a caller holding both kinds (a task config, the
        bench): ``blocks`` is passed on only to a family that selects blocks (:attr:`selects_blocks`)."""
        return {"max_downsample": max_downsample, "blocks": blocks if self.selects_blocks else "paper"}

    # -- rotary position embeddings (families whose sites set ``rotary``) -------------------------
    def positions(self, args: tuple, kwargs: dict) -> Tensor | None:
        """``[N, P]`` coordinates of the image tokens of one denoiser call, from its arguments, as the
        family's rotary embedding reads them (a tensor passed on, never read on the host)."""
        return None

    def rotary_table(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The rotary ``(cos, sin)`` tables, ``[B, M, D]`` each, of ``[B, M, P]`` positions."""
        raise NotImplementedError(f"{type(self).__name__} has rotary sites but no rotary_table()")

    def apply_rotary(self, x: Tensor, table: tuple[Tensor, Tensor]) -> Tensor:
        """Rotate ``x`` (``[B, M, heads, head_dim]``, queries or keys) by ``[B, M, D]`` tables."""
        raise NotImplementedError(f"{type(self).__name__} has rotary sites but no apply_rotary()")

    def example_inputs(self, batch_size: int, size: tuple[int, int], *, generator: Any = None) -> dict[str, Any]:
        """Keyword arguments of one denoiser forward at a ``size`` latent (``(height, width)`` in
        latent pixels) with random conditioning: what the bench and tests call the denoiser with."""
        raise NotImplementedError(f"{type(self).__name__} does not build example inputs; pass the inputs yourself")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.denoiser).__name__})"
