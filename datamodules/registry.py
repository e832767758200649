"""The registry of datamodules, fed by the entry-point group ``bigain.datamodules``."""

from __future__ import annotations

from bigain.datamodules.base import BigainDataModule
from bigain.registry import PluginRegistry, is_import_path

__all__ = ["DATAMODULES", "datamodule_class_path"]

DATAMODULES: PluginRegistry = PluginRegistry("bigain.datamodules", kind="datamodule", base=BigainDataModule)


def datamodule_class_path(name: str) -> str:
    """The class path a config's ``data: {class_path: ...}`` needs, from a registered name
    (``"toy"`` -> ``"bigain.datamodules.toy.ToyDataModule"``) or an import path
    (``"my_data:MyDataModule"``, imported and checked to be a :class:`BigainDataModule`); dotted
    class paths and unknown names are returned unchanged."""
    if is_import_path(name):
        cls = DATAMODULES.get(name)
    elif "." in name or name not in DATAMODULES.names():
        return name
    else:
        cls = DATAMODULES.get(name)
    return f"{cls.__module__}.{cls.__qualname__}"
