"""The registry of datamodules, fed by the entry-point group ``bigain.datamodules``."""

from __future__ import annotations

from bigain.datamodules.base import BigainDataModule
from bigain.registry import PluginRegistry

__all__ = ["DATAMODULES", "datamodule_class_path"]

DATAMODULES: PluginRegistry = PluginRegistry("bigain.datamodules", kind="datamodule", base=BigainDataModule)


def datamodule_class_path(name: str) -> str:
    """``"toy"`` -> ``"bigain.datamodules.toy.ToyDataModule"``; class paths are returned unchanged."""
    if "." in name or name not in DATAMODULES.names():
        return name
    cls = DATAMODULES.get(name)
    return f"{cls.__module__}.{cls.__qualname__}"
