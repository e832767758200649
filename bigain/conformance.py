"""The named conformance checks of the compressor contract.

Each check is a small function with a name and a one-line purpose, registered with :func:`check`.
A check receives a :class:`Subject` (the compressor class, the hyperparameters under test and a
seed) and either returns (passed), calls :meth:`Subject.fail` (an ``AssertionError`` whose message
starts with ``[name]``) or :meth:`Subject.not_applicable` (a :class:`CheckNotApplicable` warning,
never a silent pass). Any other exception raised while a check runs fails that check.

Adding a check is one function::

    from bigain.conformance import Subject, check

    @check("my_property", "what it verifies, in one line")
    def check_my_property(s: Subject) -> None:
        out = s.compressor.compress(x, ctx)
        if bad(out):
            s.fail("what is wrong, and what to do")

Run them with :func:`bigain.testing.check_compressor` (every check),
:func:`bigain.testing.iter_checks` or :func:`bigain.testing.parametrize_with_checks` (one pytest
test per check).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from bigain.compressor import Compressed, LayerContext, TokenCompressor

__all__ = ["Check", "CHECKS", "CheckNotApplicable", "NotApplicable", "Subject", "check", "run_check",
           "GRIDS", "DTYPES", "TinyModel", "TINY_MODELS"]

#: Token grids of the direct calls: square, non-square, odd (not divisible by 2).
GRIDS: tuple[tuple[int, int], ...] = ((8, 8), (6, 10), (7, 5))
#: Dtypes of the direct calls.
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
_BATCH, _CHANNELS, _OUT_CHANNELS = 3, 16, 24
_TIMESTEPS = (10.0, 500.0, 500.0)


@dataclass(frozen=True)
class TinyModel:
    """A tiny denoiser the model checks run on.

    Attributes:
        build: ``seed -> model`` (a fresh, eval-mode denoiser).
        inputs: ``generator -> (args, kwargs)`` of one forward.
        options: ``bigain.apply`` options that compress every attention layer of it.
        new_values: ``(args, kwargs) -> (args, kwargs)``: the same shapes with other values (another
            sample, other timesteps), for the no-recompile check.
    """

    build: Callable[[int], nn.Module]
    inputs: Callable[[torch.Generator], tuple[tuple, dict]]
    options: Mapping[str, Any]
    new_values: Callable[[tuple, dict], tuple[tuple, dict]]


def _unet_inputs(g: torch.Generator) -> tuple[tuple, dict]:
    x = torch.randn(2, 4, 16, 12, generator=g)  # non-square latent
    return (x, torch.tensor([100, 800]), torch.randn(2, 5, 32, generator=g)), {}


def _dit_inputs(g: torch.Generator) -> tuple[tuple, dict]:
    x = torch.randn(2, 4, 8, 8, generator=g)
    return (x,), {"timestep": torch.tensor([100, 800]), "class_labels": torch.tensor([1, 7])}


def _build(name: str) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        import bigain.testing

        return getattr(bigain.testing, name)(seed)

    return build


#: The tiny models of the model checks, by name: a two-level SD-style UNet and a DiT.
TINY_MODELS: dict[str, TinyModel] = {
    "unet": TinyModel(_build("tiny_unet"), _unet_inputs, {"max_downsample": 2},
                      lambda args, kwargs: ((args[0] * 0.5 + 0.1, args[1].flip(0) + 7, *args[2:]), kwargs)),
    "dit": TinyModel(_build("tiny_dit"), _dit_inputs, {"blocks": "all"},
                     lambda args, kwargs: ((args[0] * 0.5 + 0.1, *args[1:]),
                                           {**kwargs, "timestep": kwargs["timestep"].flip(0) + 7})),
}


class CheckNotApplicable(UserWarning):
    """A conformance check did not apply to the compressor under test (the message says why)."""


class NotApplicable(Exception):
    """Raised inside a check (through :meth:`Subject.not_applicable`) when it cannot be judged."""


@dataclass(frozen=True)
class Check:
    """One registered conformance check.

    Calling it runs the check on a compressor (a registered name, a class or an instance): it
    returns ``True`` when the check passed, ``False`` (with a :class:`CheckNotApplicable` warning)
    when it does not apply, and raises ``AssertionError`` naming the check when it fails.
    """

    name: str
    purpose: str
    func: Callable[[Subject], None] = field(repr=False)

    def __call__(self, compressor: Any, *, params: Mapping[str, Any] | None = None, seed: int = 0) -> bool:
        return run_check(self, Subject.of(compressor, params=params, seed=seed))


#: Every registered check, in the order they run.
CHECKS: dict[str, Check] = {}


def check(name: str, purpose: str) -> Callable[[Callable[[Subject], None]], Callable[[Subject], None]]:
    """Register a conformance check (a decorator); ``purpose`` is its one-line description."""

    def register(func: Callable[[Subject], None]) -> Callable[[Subject], None]:
        if name in CHECKS:
            raise ValueError(f"a conformance check named {name!r} is already registered")
        CHECKS[name] = Check(name, purpose, func)
        return func

    return register


def run_check(chk: Check, subject: Subject) -> bool:
    """Run one check on one subject (see :class:`Check`)."""
    reason = subject.declared_not_applicable.get(chk.name)
    if reason is not None:
        warnings.warn(f"[{chk.name}] not applicable to {subject.label}: {reason} (declared by the compressor)",
                      CheckNotApplicable, stacklevel=2)
        return False
    try:
        chk.func(subject)
    except NotApplicable as exc:
        warnings.warn(f"[{chk.name}] not applicable to {subject.label}: {exc}", CheckNotApplicable, stacklevel=2)
        return False
    except AssertionError as exc:
        text = str(exc)
        if text.startswith(f"[{chk.name}]"):
            raise
        raise AssertionError(f"[{chk.name}] {subject.label}: {text}") from exc
    except Exception as exc:  # a crash of the compressor under test fails the check that ran it
        raise AssertionError(f"[{chk.name}] {subject.label}: raised {type(exc).__name__}: {exc}") from exc
    return True


# -- the subject ----------------------------------------------------------------------------------

@dataclass
class Subject:
    """What a check runs on: a compressor class, the hyperparameters under test, a seed.

    Attributes:
        cls: the :class:`TokenCompressor` subclass.
        params: the hyperparameters under test (the class defaults for the others).
        seed: the seed of the inputs and of :func:`bigain.apply`.
    """

    cls: type
    params: dict[str, Any]
    seed: int = 0

    @classmethod
    def of(cls, compressor: Any, *, params: Mapping[str, Any] | None = None, seed: int = 0) -> Subject:
        """A subject from a registered name (or ``module:Class`` import path), a class or an instance."""
        from bigain.registry import get_compressor

        if isinstance(compressor, TokenCompressor):
            if params:
                raise ValueError(f"got an instance ({compressor!r}) and params; pass one or the other")
            return cls(type(compressor), dict(compressor.hyperparameters()), seed)
        klass = get_compressor(compressor) if isinstance(compressor, str) else compressor
        return cls(klass, dict(params or {}), seed)

    @functools.cached_property
    def label(self) -> str:
        """The compressor's repr (its class and every hyperparameter), for messages."""
        try:
            return repr(self.compressor)
        except Exception:  # a class that breaks the contract: name what was asked for
            name = getattr(self.cls, "__name__", repr(self.cls))
            return f"{name}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    @property
    def declared_not_applicable(self) -> dict[str, str]:
        """``{check: reason}`` from the class attribute ``not_applicable_checks``, if it has one."""
        return dict(getattr(self.cls, "not_applicable_checks", None) or {})

    def build(self, **overrides: Any) -> TokenCompressor:
        """A fresh instance with the hyperparameters under test (and ``overrides``)."""
        from bigain.registry import create_compressor

        return create_compressor(self.cls, **{**self.params, **overrides})

    @functools.cached_property
    def compressor(self) -> TokenCompressor:
        """The instance under test (built once per subject)."""
        return self.build()

    def is_identity_setting(self) -> bool:
        """Whether the hyperparameters under test are the class's ``identity_params``."""
        ident = self.cls.identity_params
        if ident is None:
            return False
        sig = inspect.signature(self.cls.__init__).parameters.values()
        effective = {p.name: p.default for p in sig if p.default is not p.empty} | self.params
        return all(k in effective and effective[k] == v for k, v in dict(ident).items())

    def fail(self, message: str) -> NoReturn:
        """Fail the running check with ``message`` (say what is wrong and what to do)."""
        raise AssertionError(message)

    def not_applicable(self, reason: str) -> NoReturn:
        """Stop the running check: it cannot be judged for this compressor (warned, not passed)."""
        raise NotApplicable(reason)

    # -- inputs ---------------------------------------------------------------------------------
    def tokens(self, grid: tuple[int, int], dtype: torch.dtype = torch.float32, *, batch: int = _BATCH,
               constant: bool = False) -> Tensor:
        """``[batch, h*w, 16]`` random tokens (the same for the same arguments); with ``constant``,
        every token of a sample is the same random vector (a constant field)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + grid[0] * 37 + grid[1])
        n = grid[0] * grid[1]
        if constant:
            return torch.randn(batch, 1, _CHANNELS, generator=g).expand(batch, n, _CHANNELS).to(dtype).clone()
        return torch.randn(batch, n, _CHANNELS, generator=g).to(dtype)

    def context(self, x: Tensor, grid: tuple[int, int], timesteps: tuple[float, ...] = _TIMESTEPS) -> LayerContext:
        """A context for a direct call on ``x``, whose metric is a distinct copy of ``x`` (as in a UNet,
        where the metric is the transformer block's input, not the attention input)."""
        t = torch.tensor(timesteps[: x.shape[0]] if len(timesteps) >= x.shape[0] else timesteps[:1] * x.shape[0])
        return LayerContext.for_tokens(x, grid=grid, timesteps=t, metric=x.clone(), seed=self.seed)

    def cases(self, dtypes: tuple[torch.dtype, ...] = DTYPES, *, constant: bool = False, required: bool = True
              ) -> list[tuple[str, tuple[int, int], Tensor, LayerContext]]:
        """``(where, grid, x, ctx)`` for every test grid (:data:`GRIDS`) and dtype the compressor
        applies to. Declined inputs are warned about; when every one is declined the check is not
        applicable (``required``) or the list is empty."""
        found, declined = [], []
        for grid in GRIDS:
            for dtype in dtypes:
                x = self.tokens(grid, dtype, constant=constant)
                ctx = self.context(x, grid)
                where = f"grid {grid[0]}x{grid[1]}, {str(dtype).replace('torch.', '')}"
                if self.compressor.applies_to(ctx):
                    found.append((where, grid, x, ctx))
                else:
                    declined.append(where)
        if declined and found:
            warnings.warn(f"{self.label}: applies_to is False on {'; '.join(declined)}; those inputs were not "
                          f"checked", CheckNotApplicable, stacklevel=3)
        if not found and required:
            self.not_applicable(f"applies_to is False on every test input ({'; '.join(declined)})")
        return found

    def model(self, family: str, *, fresh: bool = False) -> tuple[nn.Module, tuple, dict, dict]:
        """A tiny model of :data:`TINY_MODELS` (``"unet"``, ``"dit"``), its inputs, and the
        ``bigain.apply`` options that compress every attention layer: ``(model, args, kwargs,
        apply_options)``. The model is shared between checks (built once per seed) unless ``fresh``;
        a check must leave it as it found it."""
        model = _tiny(family, self.seed)
        if fresh:
            model = copy.deepcopy(model)
        args, kwargs = TINY_MODELS[family].inputs(torch.Generator().manual_seed(self.seed))
        return model, args, kwargs, dict(TINY_MODELS[family].options)

    def uncompressed(self, family: str) -> Tensor:
        """The tiny model's output on :meth:`model`'s inputs, without compression."""
        key = (family, self.seed)
        if key not in _OUTPUTS:
            model, args, kwargs, _ = self.model(family, fresh=True)
            _OUTPUTS[key] = forward(model, args, kwargs)
        return _OUTPUTS[key]


_OUTPUTS: dict[tuple[str, int], Tensor] = {}
_MODELS: dict[tuple[str, int], tuple[nn.Module, dict[str, Any]]] = {}


def _processors(model: nn.Module) -> dict[str, Any]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def _tiny(family: str, seed: int) -> nn.Module:
    """The shared tiny model; rebuilt when a check left its attention processors replaced."""
    key = (family, seed)
    if key in _MODELS:
        model, processors = _MODELS[key]
        now = _processors(model)
        if now.keys() == processors.keys() and all(now[k] is processors[k] for k in processors):
            return model
    model = TINY_MODELS[family].build(seed)
    _MODELS[key] = (model, _processors(model))
    return model


def forward(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The model's output sample, without gradients."""
    with torch.no_grad():
        return model(*args, **kwargs).sample


def rows_for(out: Compressed, dtype: torch.dtype) -> Tensor:
    """A stand-in attention output for ``out``: random ``[B, Nq, 24]`` rows, one per query."""
    b, m = out.queries.shape[0], out.queries.shape[1]
    return torch.randn(b, m, _OUT_CHANNELS, generator=torch.Generator().manual_seed(m)).to(dtype)


def call(comp: TokenCompressor, x: Tensor, ctx: LayerContext, y: Tensor | None = None
         ) -> tuple[Compressed, Tensor]:
    """``compress`` then ``restore``: ``(out, restore(y))``; ``y`` defaults to :func:`rows_for`."""
    out = comp.compress(x, ctx)
    return out, out.restore(rows_for(out, x.dtype) if y is None else y)


def same(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal, NaN equal to NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


class _RngStates:
    """The global RNG states (torch, Python's ``random``, NumPy's legacy one)."""

    def __init__(self) -> None:
        import numpy as np

        self.torch, self.python, self.numpy = torch.get_rng_state(), random.getstate(), np.random.get_state()

    def changed(self) -> list[str]:
        import numpy as np

        now = _RngStates.__new__(_RngStates)
        now.torch, now.python, now.numpy = torch.get_rng_state(), random.getstate(), np.random.get_state()
        out = []
        if not torch.equal(self.torch, now.torch):
            out.append("torch")
        if self.python != now.python:
            out.append("Python's random")
        if self.numpy[0] != now.numpy[0] or not (self.numpy[1] == now.numpy[1]).all() or \
                self.numpy[2:] != now.numpy[2:]:
            out.append("NumPy's")
        return out


@contextlib.contextmanager
def fixed_global_rng(seed: int = 0) -> Iterator[None]:
    """A context in which the global torch RNG starts from ``seed`` and is put back afterwards, so
    checks other than ``global_rng`` judge a compressor that draws from it on its other merits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def hyperparameter_problems(cls: type) -> list[str]:
    """What is wrong with a class's ``__init__`` signature for the contract."""
    problems = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            problems.append(f"__init__ takes *{p.name}; list every hyperparameter as a keyword-only argument")
        elif p.kind is not p.KEYWORD_ONLY:
            problems.append(f"__init__ parameter {p.name!r} must be keyword-only (put it after '*')")
        elif p.default is p.empty:
            problems.append(f"hyperparameter {p.name!r} needs a default")
    return problems


from bigain import checks as _checks  # noqa: E402,F401  (registers the built-in checks)
