"""Plugin discovery through entry points.

Compressors are found in the entry-point group ``bigain.compressors`` (datamodules in
``bigain.datamodules``). The built-ins are declared in bigain's own ``pyproject.toml`` exactly as a
third party declares theirs::

    [project.entry-points."bigain.compressors"]
    my_method = "my_package.module:MyCompressor"

Rules:

* Listing reads package metadata only; plugin code is imported the first time a name is used.
* A plugin that fails to import is reported by name, distribution and error, and never breaks the
  others.
* Two distributions registering one name is a conflict: using that name raises an error naming both
  (pass ``override=True`` to :func:`register_compressor` to settle it in-process).
* ``BIGAIN_DISABLE_PLUGIN_AUTOLOAD=1`` turns discovery of third-party plugins off; only bigain's own
  entry points and names registered in-process are then used.
* Local plugins: wherever a name is accepted, an import path ``package.module:ClassName`` names a
  class in any importable module (on ``PYTHONPATH``) without packaging it; :func:`load_object`
  resolves it, and :func:`source_info` gives the module file and its sha256 for the run records.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

from bigain.errors import PluginConflictError, PluginLoadError, UnknownNameError

__all__ = [
    "DISABLE_AUTOLOAD_ENV",
    "PluginInfo",
    "PluginRegistry",
    "COMPRESSORS",
    "list_compressors",
    "get_compressor",
    "create_compressor",
    "register_compressor",
    "plugin_report",
    "is_import_path",
    "load_object",
    "source_info",
]

DISABLE_AUTOLOAD_ENV = "BIGAIN_DISABLE_PLUGIN_AUTOLOAD"
_OWN_DISTRIBUTION = "bigain"

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    """One row of :func:`plugin_report`."""

    name: str
    target: str  # "module:attribute", or the class path for in-process registrations
    distribution: str
    version: str
    status: str  # "ok" or "failed: <reason>"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class _Candidate:
    name: str
    target: str
    distribution: str
    version: str
    entry_point: metadata.EntryPoint | None = None
    obj: Any = None


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: group -> its registry, so that :func:`load_object` resolves registered names of any group.
_REGISTRIES: dict[str, PluginRegistry] = {}


def is_import_path(spec: object) -> bool:
    """Whether ``spec`` is an import path ``package.module:Name`` (rather than a registered name)."""
    return isinstance(spec, str) and ":" in spec


def _import(spec: str, group: str) -> Any:
    if not _IMPORT_PATH.match(spec):
        raise PluginLoadError(
            f"{spec!r} is not a valid import path for {group}; write it as package.module:ClassName "
            f"(dotted module path, one colon, then the attribute)"
        )
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginLoadError(
                f"cannot import module {module_name!r} of {spec!r} ({group}): no module named {exc.name!r}. Put "
                f"the folder that holds it on PYTHONPATH (or install it), or check the spelling"
            ) from exc
        raise PluginLoadError(f"module {module_name!r} of {spec!r} ({group}) failed to import: "
                              f"ModuleNotFoundError: {exc}; install what it needs") from exc
    except Exception as exc:  # any import-time failure of the user's code
        raise PluginLoadError(f"module {module_name!r} of {spec!r} ({group}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for depth, part in enumerate(attribute.split(".")):
        if not hasattr(obj, part):
            where = module_name + "".join(f".{p}" for p in attribute.split(".")[:depth])
            names = sorted(n for n in dir(obj) if not n.startswith("_") and isinstance(getattr(obj, n), type))
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise PluginLoadError(
                f"{where} has no attribute {part!r} ({spec!r}, {group}).{hint} Its classes: "
                f"{', '.join(names) or '(none)'}"
            )
        obj = getattr(obj, part)
    return obj


def load_object(spec: str, *, group: str) -> Any:
    """The object a spec names in an entry-point group: an import path ``package.module:Name``
    (imported, no packaging needed), or a name registered in ``group``.

    Args:
        spec: ``"package.module:ClassName"`` (nested attributes as ``module:Outer.Inner``) or a
            registered name.
        group: the entry-point group the object belongs to (``"bigain.compressors"``,
            ``"bigain.datamodules"``, ...), used to resolve names and in messages.

    Raises:
        PluginLoadError: the module cannot be imported or has no such attribute.
        UnknownNameError: a name that nothing registers in ``group``.

    Example:
        >>> from bigain.registry import load_object
        >>> load_object("bigain.plugins.tome:ToMe", group="bigain.compressors").__name__
        'ToMe'
    """
    if is_import_path(spec):
        return _import(spec, group)
    registry = _REGISTRIES.get(group)
    if registry is None:
        raise UnknownNameError(f"{spec!r} is not an import path (package.module:ClassName) and no registry "
                               f"serves the group {group!r}; give the import path")
    return registry.get(spec)


def source_info(obj: Any) -> dict[str, Any]:
    """Where a class or function comes from, for run records: its import path, its module's file
    and that file's sha256 (``None`` for modules without a file)."""
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    path = getattr(module, "__file__", None)
    digest = None
    if path and Path(path).is_file():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"import_path": f"{obj.__module__}:{obj.__qualname__}", "file": str(path) if path else None,
            "sha256": digest}


class PluginRegistry(Generic[T]):
    """A lazy registry of plugin classes of one kind, fed by one entry-point group.

    Args:
        group: the entry-point group.
        kind: what the plugins are, for messages ("compressor").
        base: the class every plugin must subclass.
        entry_points: a fixed list of entry points to use instead of the installed ones (tests).
    """

    def __init__(self, group: str, *, kind: str, base: type, entry_points=None) -> None:
        self.group = group
        self.kind = kind
        self.base = base
        self._fixed_entry_points = entry_points
        self._discovered: dict[str, list[_Candidate]] | None = None
        self._registered: dict[str, _Candidate] = {}
        self._loaded: dict[str, type] = {}
        _REGISTRIES.setdefault(group, self)

    # -- discovery -------------------------------------------------------------------------
    def _entry_points(self) -> list[metadata.EntryPoint]:
        if self._fixed_entry_points is not None:
            return list(self._fixed_entry_points)
        return list(metadata.entry_points(group=self.group))

    def _discover(self) -> dict[str, list[_Candidate]]:
        if self._discovered is None:
            found: dict[str, list[_Candidate]] = {}
            disabled = _autoload_disabled()
            for ep in self._entry_points():
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else "<unknown>"
                version = dist.version if dist is not None else "?"
                if disabled and (dist_name or "").lower() != _OWN_DISTRIBUTION:
                    continue
                cands = found.setdefault(ep.name, [])
                if not any(c.distribution == dist_name for c in cands):  # same dist seen twice on sys.path
                    cands.append(_Candidate(ep.name, ep.value, dist_name, version, entry_point=ep))
            self._discovered = found
        return self._discovered

    def refresh(self) -> None:
        """Forget what was discovered and loaded (after installing a plugin in this process)."""
        self._discovered = None
        self._loaded.clear()

    def names(self) -> list[str]:
        """Every known name, sorted, without importing any plugin code."""
        return sorted(set(self._discover()) | set(self._registered))

    # -- registration ----------------------------------------------------------------------
    def register(self, name: str, cls: type | None = None, *, override: bool = False):
        """Register ``cls`` under ``name`` in this process; usable as a decorator."""

        def _do(obj: type) -> type:
            self._check_class(name, obj, distribution="<in-process>")
            if not override and (name in self._registered or name in self._discover()):
                where = self._registered[name].distribution if name in self._registered else ", ".join(
                    c.distribution for c in self._discover()[name])
                raise PluginConflictError(
                    f"{self.kind} name {name!r} is already provided by {where}; pick another name, or "
                    f"pass override=True to replace it in this process"
                )
            self._registered[name] = _Candidate(name, f"{obj.__module__}:{obj.__qualname__}",
                                                "<in-process>", "-", obj=obj)
            self._loaded.pop(name, None)
            return obj

        return _do(cls) if cls is not None else _do

    def unregister(self, name: str) -> None:
        self._registered.pop(name, None)
        self._loaded.pop(name, None)

    # -- loading ---------------------------------------------------------------------------
    def _unknown(self, name: str) -> UnknownNameError:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(names) or '(none)'}. "
            f"Third-party {self.kind}s register under the entry-point group {self.group!r}; "
            f"run `bigain plugins` to see what was found and what failed to load."
        )

    def _check_class(self, name: str, obj: Any, *, distribution: str) -> None:
        if not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise PluginLoadError(
                f"{self.kind} {name!r} from {distribution} is {obj!r}, not a subclass of "
                f"{self.base.__module__}.{self.base.__qualname__}; fix its entry point"
            )

    def _candidate(self, name: str) -> _Candidate:
        if name in self._registered:
            return self._registered[name]
        cands = self._discover().get(name)
        if not cands:
            raise self._unknown(name)
        if len(cands) > 1:
            listing = "; ".join(f"{c.distribution} {c.version} ({c.target})" for c in cands)
            raise PluginConflictError(
                f"{self.kind} name {name!r} is registered by more than one distribution: {listing}. "
                f"Uninstall one of them, or register the one you want in-process with "
                f"bigain.register_compressor({name!r}, cls, override=True)."
            )
        return cands[0]

    def get(self, name: str) -> type:
        """The plugin class registered as ``name``, or named by an import path
        ``package.module:ClassName`` (imported on first use)."""
        if name in self._loaded:
            return self._loaded[name]
        if is_import_path(name):
            obj = _import(name, self.group)
            self._check_class(name, obj, distribution="its import path")
            self._loaded[name] = obj
            return obj
        cand = self._candidate(name)
        obj = cand.obj
        if obj is None:
            try:
                obj = cand.entry_point.load()
            except Exception as exc:  # any import-time failure of third-party code
                raise PluginLoadError(
                    f"{self.kind} {name!r} ({cand.target}) from distribution {cand.distribution} "
                    f"{cand.version} failed to load: {type(exc).__name__}: {exc}"
                ) from exc
        self._check_class(name, obj, distribution=cand.distribution)
        self._loaded[name] = obj
        return obj

    def describe(self, name: str) -> dict[str, Any]:
        """What run records say about the plugin ``name``: its target, distribution, version and
        status; for an import path also its module file and the file's sha256."""
        if is_import_path(name):
            info = source_info(self.get(name))
            return {"name": name, "target": name, "distribution": None, "version": None, "status": "ok",
                    "file": info["file"], "sha256": info["sha256"]}
        cand = self._candidate(name)
        try:
            self.get(name)
            status = "ok"
        except Exception as exc:
            status = f"failed: {exc}"
        return PluginInfo(name, cand.target, cand.distribution, cand.version, status).__dict__

    def describe_class(self, cls: type) -> dict[str, Any]:
        """:meth:`describe` of a loaded class: by its registered name when an entry point or an
        in-process registration provides it, else by its import path (with the file's sha256)."""
        target = f"{cls.__module__}:{cls.__qualname__}"
        for name in self.names():
            cands = [self._registered[name]] if name in self._registered else self._discover()[name]
            if any(c.target == target or c.obj is cls for c in cands) and len(cands) == 1:
                return self.describe(name)
        return self.describe(target)

    def report(self) -> list[PluginInfo]:
        """Every discovered or registered plugin, loaded to tell whether it works."""
        rows = []
        for name in self.names():
            cands = [self._registered[name]] if name in self._registered else self._discover()[name]
            for cand in cands:
                try:
                    self.get(name)
                    status = "ok"
                except Exception as exc:
                    status = f"failed: {exc}"
                rows.append(PluginInfo(name, cand.target, cand.distribution, cand.version, status))
        return rows


def _compressor_base() -> type:
    from bigain.compressor import TokenCompressor

    return TokenCompressor


COMPRESSORS: PluginRegistry = PluginRegistry("bigain.compressors", kind="compressor", base=_compressor_base())


def list_compressors() -> list[str]:
    """Names of every available compressor, without importing plugin code."""
    return COMPRESSORS.names()


def get_compressor(name: str) -> type:
    """The compressor class registered as ``name``."""
    return COMPRESSORS.get(name)


def create_compressor(compressor, /, **kwargs):
    """A compressor instance from a name, an import path ``package.module:ClassName``, a class, or
    an instance (returned as is, no kwargs).

    Example:
        >>> import bigain
        >>> bigain.create_compressor("bigain_td", factor=2, alpha=0.5)
        BiGainTD(factor=2, alpha=0.5, alpha_schedule=None)
    """
    from bigain.compressor import TokenCompressor
    from bigain.errors import ConfigError

    if isinstance(compressor, TokenCompressor):
        if kwargs:
            raise ConfigError(
                f"got a compressor instance ({compressor!r}) and extra options {sorted(kwargs)}; "
                f"pass either a name with options or a ready instance"
            )
        return compressor
    cls = compressor if isinstance(compressor, type) else COMPRESSORS.get(str(compressor))
    if not issubclass(cls, TokenCompressor):
        raise ConfigError(f"{cls!r} is not a TokenCompressor subclass")
    allowed = cls.hyperparameter_names()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        label = cls.name or cls.__name__
        raise ConfigError(
            f"{label} has no option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(allowed) or '(none)'}"
        )
    return cls(**kwargs)


def register_compressor(name: str, cls: type | None = None, *, override: bool = False):
    """Register a compressor class in this process (also usable as a decorator)."""
    return COMPRESSORS.register(name, cls, override=override)


def plugin_report() -> list[PluginInfo]:
    """Name, class, distribution, version and load status of every compressor found."""
    return COMPRESSORS.report()
