"""Denoiser adapters: one per model family, discovered through the ``bigain.adapters`` entry points.

The built-ins are declared in bigain's own ``pyproject.toml`` exactly as a third party declares a
new family::

    [project.entry-points."bigain.adapters"]
    my_family = "my_package.adapter:MyAdapter"

:func:`find_adapter` asks every registered adapter, in name order, whether it handles a model.
"""

from __future__ import annotations

from typing import Any

from bigain.adapters.base import AttentionSite, DenoiserAdapter, argument
from bigain.errors import BigainError, UnsupportedModelError
from bigain.registry import PluginRegistry

__all__ = ["ADAPTERS", "AttentionSite", "DenoiserAdapter", "adapter_class", "argument", "find_adapter",
           "register_adapter"]

#: Every denoiser adapter: entry-point group ``bigain.adapters``.
ADAPTERS: PluginRegistry = PluginRegistry("bigain.adapters", kind="denoiser adapter", base=DenoiserAdapter)

_WRAPPER_ATTRIBUTES = ("denoiser", "unet", "transformer")


def register_adapter(name: str, cls: type | None = None, *, override: bool = False):
    """Register a :class:`DenoiserAdapter` subclass under ``name`` in this process (a decorator too)."""
    return ADAPTERS.register(name, cls, override=override)


def adapter_class(family: str) -> type[DenoiserAdapter]:
    """The registered adapter class whose :attr:`~DenoiserAdapter.family` is ``family``.

    Raises:
        UnsupportedModelError: no registered adapter names that family (the message lists them).
    """
    known = []
    for name in ADAPTERS.names():
        try:
            cls = ADAPTERS.get(name)
        except BigainError:
            continue
        if cls.family == family:
            return cls
        known.append(cls.family or name)
    raise UnsupportedModelError(f"no denoiser adapter of family {family!r}; the registered families are "
                                f"{', '.join(sorted(known))}")


def _match(module: Any, failures: list[str]) -> DenoiserAdapter | None:
    for name in ADAPTERS.names():
        try:
            cls = ADAPTERS.get(name)
        except BigainError as exc:  # a broken third-party adapter never hides the others
            failures.append(str(exc))
            continue
        try:
            matched = cls.matches(module)
        except Exception as exc:
            failures.append(f"adapter {name!r} ({cls.__module__}.{cls.__qualname__}) failed in matches(): "
                            f"{type(exc).__name__}: {exc}")
            continue
        if matched:
            return cls(module)
    return None


def find_adapter(obj: Any) -> DenoiserAdapter:
    """The adapter of ``obj``: a denoiser, or an object (a diffusers pipeline, a bigain backbone)
    whose ``denoiser``, ``unet`` or ``transformer`` attribute is one.

    Raises:
        UnsupportedModelError: no registered adapter handles it (the message lists the families).
    """
    failures: list[str] = []
    adapter = _match(obj, failures)
    for attr in _WRAPPER_ATTRIBUTES:
        if adapter is not None:
            break
        inner = getattr(obj, attr, None)
        if inner is not None and inner is not obj:
            adapter = _match(inner, failures)
    if adapter is not None:
        return adapter
    known = []
    for name in ADAPTERS.names():
        try:
            known.append(f"{name}: {ADAPTERS.get(name).handles or name}")
        except BigainError:
            pass
    broken = f" Adapters that failed to load: {'; '.join(failures)}." if failures else ""
    raise UnsupportedModelError(
        f"bigain cannot compress a {type(obj).__module__}.{type(obj).__qualname__}: no denoiser adapter "
        f"handles it. Supported ({'; '.join(known)}), or a pipeline/backbone holding one as .unet / "
        f".transformer / .denoiser. A new family is one DenoiserAdapter subclass registered under the "
        f"entry-point group 'bigain.adapters'.{broken}"
    )
