"""Errors raised by bigain. Every message says what was wrong and what to do about it."""

from __future__ import annotations

__all__ = [
    "BigainError",
    "ConfigError",
    "UnknownNameError",
    "PluginLoadError",
    "PluginConflictError",
    "UnsupportedModelError",
    "CheckpointError",
    "DatasetError",
    "RunFolderError",
    "CompressorError",
]


class BigainError(Exception):
    """Base class of every error bigain raises on purpose."""


class ConfigError(BigainError, ValueError):
    """An option or hyperparameter is out of range or inconsistent with another."""


class UnknownNameError(BigainError, KeyError):
    """A compressor, datamodule or backbone name that nothing registers."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PluginLoadError(BigainError, ImportError):
    """A plugin's entry point could not be imported or is not a valid plugin."""


class PluginConflictError(BigainError):
    """Two distributions register the same plugin name."""


class UnsupportedModelError(BigainError, TypeError):
    """``bigain.apply`` was given a model it does not know how to compress."""


class CheckpointError(BigainError, FileNotFoundError):
    """A model checkpoint folder or hub id is missing or incomplete."""


class DatasetError(BigainError):
    """A dataset root, layout, image or index file is missing or malformed."""


class RunFolderError(BigainError):
    """A run folder holds results of a different configuration."""


class CompressorError(BigainError, RuntimeError):
    """A compressor failed, or broke the contract, during a forward; names the compressor, its
    distribution and the layer."""
