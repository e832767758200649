"""The whole plugin contract: :class:`TokenCompressor`, :class:`Compressed` and :class:`LayerContext`.

Every method in bigain reduces to one operation on a self-attention call. Given the attention input
``x`` (``[B, N, C]``, tokens laid out row-major on an ``h x w`` grid), a compressor returns

* ``queries`` - the tokens that attend (merged or pruned ``x`` for ToMe-like methods, ``x`` itself
  for key/value methods),
* ``context`` - the tokens keys and values are computed from,
* ``restore`` - a function mapping the attention output (one row per query) back to ``N`` tokens.

The framework then calls the attention processor that was already installed on the layer with
``(queries, context)`` and applies ``restore``: no attention maths lives in a compressor.
"""

from __future__ import annotations

import hashlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor

from bigain.keyed_random import hash_words, keyed_randint, keyed_randn, quantize_timesteps, split_seed

__all__ = ["TokenCompressor", "Compressed", "LayerContext", "derive_seed"]


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Compressed:
    """What :meth:`TokenCompressor.compress` returns.

    Attributes:
        queries: ``[B, Nq, C]`` tokens that attend.
        context: ``[B, Nk, C]`` tokens keys and values are computed from. Return the *same object*
            as ``queries`` for plain self-attention over the compressed tokens.
        restore: maps the attention output ``[B, Nq, C']`` back to ``[B, N, C']``.
        query_positions: ``[B, Nq, P]`` float32 positions of the queries, on the coordinates of
            :attr:`LayerContext.positions`. Needed only when the context has positions (a family
            with rotary position embeddings, such as Flux); ``None`` otherwise.
        context_positions: ``[B, Nk, P]`` float32 positions of the context tokens (the same object
            as ``query_positions`` when ``context`` is ``queries``).
    """

    queries: Tensor
    context: Tensor
    restore: Callable[[Tensor], Tensor] = _identity
    query_positions: Tensor | None = None
    context_positions: Tensor | None = None

    @classmethod
    def identity(cls, x: Tensor) -> Compressed:
        """No compression: the framework then calls the processor with its original arguments."""
        return cls(x, x, _identity)

    @property
    def is_identity(self) -> bool:
        return self.restore is _identity and self.queries is self.context


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived deterministically from ``parts`` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class LayerContext:
    """Everything a compressor may know about the attention call it compresses.

    Attributes:
        name: the attention module's qualified name in the denoiser.
        grid: the token grid ``(h, w)``; ``h * w == N``. Never assume it is square or divisible.
        level: the downsample level of the layer (1 for the full-resolution level of a UNet and for
            every DiT block; 2, 4, 8 for deeper UNet levels).
        timesteps: ``[B]`` float32 diffusion timesteps of the batch, one per sample.
        metric: ``[B, N, C]`` tokens to score and match on: the transformer block's input for a
            UNet (as ToMe-SD does), the attention input for a DiT (as the BiGain DiT code does).
        seed: the framework seed of this application (``bigain.apply(..., seed=)``).
        layer_index: position of the layer among all compressible layers of the denoiser.
        num_train_timesteps: the length of the model's training noise schedule.
        timestep_values: ``timesteps`` as Python floats, when a caller already has them on the host;
            only :attr:`generator` reads them. The framework never fills it (it never reads
            timesteps back to the host).
        text_tokens: the number of text tokens of a joint-attention call (SD3, Flux), which attend
            and are attended to beside ``x`` but are not part of it and are never compressed; 0 for
            plain self-attention.
        positions: ``[B, N, P]`` float32 positions of the tokens of ``x`` for a family that applies
            rotary position embeddings inside attention (Flux: the ``img_ids`` coordinates), or
            ``None``. When it is set, a compressor that compresses returns the positions of its
            queries and context tokens (:attr:`Compressed.query_positions`, ``context_positions``),
            computed with the same token operation it applies to ``x``.
    """

    name: str
    grid: tuple[int, int]
    level: int
    timesteps: Tensor
    metric: Tensor
    seed: int = 0
    layer_index: int = 0
    num_train_timesteps: int = 1000
    timestep_values: tuple[float, ...] | None = None
    text_tokens: int = 0
    positions: Tensor | None = None

    @classmethod
    def for_tokens(
        cls,
        x: Tensor,
        *,
        grid: tuple[int, int],
        timesteps: Tensor | float = 500.0,
        metric: Tensor | None = None,
        name: str = "layer",
        level: int = 1,
        seed: int = 0,
        layer_index: int = 0,
        positions: Tensor | None = None,
    ) -> LayerContext:
        """Build a context for calling a compressor directly on ``x`` (tests, notebooks, analysis).

        ``positions`` (``[N, P]`` or ``[B, N, P]``) are the tokens' coordinates, as a rotary family
        passes them; ``None`` for the families without rotary embeddings.
        """
        h, w = grid
        if h * w != x.shape[1]:
            raise ValueError(f"grid {grid} holds {h * w} tokens but x has {x.shape[1]}")
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        if positions is not None:
            positions = positions.to(device=x.device, dtype=torch.float32)
            if positions.ndim == 2:
                positions = positions.expand(x.shape[0], *positions.shape)
            if positions.shape[:2] != x.shape[:2]:
                raise ValueError(f"positions of shape {tuple(positions.shape)} do not match x {tuple(x.shape)}")
        return cls(name=name, grid=(int(h), int(w)), level=level, timesteps=t,
                   metric=x if metric is None else metric, seed=seed, layer_index=layer_index, positions=positions)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @cached_property
    def generator(self) -> torch.Generator:
        """A ``torch.Generator`` seeded from ``(seed, layer, timesteps)``, for eager-only code.

        Seeding it reads the timesteps back to the host (a device sync) and a generator cannot be
        traced, so a compressor that uses it breaks ``torch.compile`` graphs and CUDA graphs. Prefer
        :meth:`sample_randint` / :meth:`sample_randn`, which are traceable and batch-independent.
        """
        values = self.timestep_values if self.timestep_values is not None else tuple(self.timesteps.tolist())
        key = derive_seed("call", self.seed, self.layer_index, values)
        return torch.Generator(device=self.metric.device).manual_seed(key)

    def sample_keys(self, stream: int = 0) -> Tensor:
        """``[B]`` int64 keys of this call's per-sample random draws: a hash of
        ``(seed, layer_index, stream, timestep of the sample)``.

        Samples that share a timestep share a key. Use different ``stream`` values for independent
        draws within one call.
        """
        lo, hi = split_seed(self.seed)
        return hash_words([lo, hi, self.layer_index, stream, quantize_timesteps(self.timesteps)],
                          device=self.timesteps.device)

    def sample_randint(self, high: int, size: tuple[int, ...], *, stream: int = 0) -> Tensor:
        """``[B, *size]`` int64 integers in ``[0, high)``, one draw per distinct timestep.

        Samples that share a timestep (for example the two halves of a classifier-free-guidance
        batch, or every class scored at one timestep) get the same draw, and the draw does not
        depend on batch size or order: it is a counter-based hash of ``(seed, layer, stream,
        timestep, position)`` computed with integer tensor operations, so it is the same on every
        device, needs no host round trip and traces into one ``torch.compile`` graph.
        """
        return keyed_randint(self.sample_keys(stream), high, size).to(self.metric.device)

    def sample_randn(self, size: tuple[int, ...], *, stream: int = 0) -> Tensor:
        """``[B, *size]`` float32 standard normals, one draw per distinct timestep (see above)."""
        return keyed_randn(self.sample_keys(stream), size).to(self.metric.device)


class TokenCompressor(ABC):
    """Base class of every compression method.

    Subclasses take their hyperparameters as typed keyword-only ``__init__`` arguments with
    defaults, validate them there (raising :class:`bigain.errors.ConfigError` with a fix), and store
    each one as an attribute of the same name. They implement :meth:`compress` and may override
    :meth:`applies_to`.

    Class attributes:
        identity_params: hyperparameters under which the compressor must leave the model bitwise
            unchanged (the conformance suite checks it), or ``None`` if there are none.
        not_applicable_checks: conformance checks that do not apply to the compressor by design,
            each with the reason (``{"compresses": "only compresses levels 4 and deeper"}``); the
            suite then warns instead of running them.
    """

    name: ClassVar[str] = ""
    identity_params: ClassVar[Mapping[str, Any] | None] = None
    not_applicable_checks: ClassVar[Mapping[str, str]] = {}

    @abstractmethod
    def compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        """Compress the attention input ``x`` (``[B, N, C]``) of one self-attention call."""

    def applies_to(self, ctx: LayerContext) -> bool:
        """Whether to compress this call (default: always). Called once per attention call."""
        return True

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        sig = inspect.signature(cls.__init__)
        return tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)

    def hyperparameters(self) -> dict[str, Any]:
        """The compressor's hyperparameters, as given to ``__init__`` (for configs and reports)."""
        out = {}
        for name in self.hyperparameter_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.hyperparameters() == other.hyperparameters()

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))
