"""Diffusion backbones: what the evaluation tasks run on.

Backbones register under the entry-point group ``bigain.backbones`` (built-ins: ``stable-diffusion``,
``dit``, ``toy``, ``pixart``), so a third party can add one the same way as a compressor.
"""

from __future__ import annotations

from typing import Any

from bigain.backbones.base import DiffusionBackbone, resolve_dtype
from bigain.registry import PluginRegistry

__all__ = ["DiffusionBackbone", "BACKBONES", "create_backbone", "resolve_dtype"]

BACKBONES: PluginRegistry = PluginRegistry("bigain.backbones", kind="backbone", base=DiffusionBackbone)


def create_backbone(name: str, **options: Any) -> DiffusionBackbone:
    """Build the backbone registered as ``name`` (``stable-diffusion``, ``dit``, ``toy``, ...)."""
    return BACKBONES.get(name)(**options)
