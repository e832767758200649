"""The evaluation tasks: LightningModules that run a compressed diffusion model on one job.

* :class:`DiffusionClassifier` (:mod:`bigain.tasks.classification`) - the Diffusion Classifier
  protocol, one record per image (``bigain classify``);
* :class:`DiffusionGenerator` (:mod:`bigain.tasks.generation`) - one generated image per dataset
  item, scored afterwards from the saved PNGs (``bigain generate``);
* :class:`DiffusionTask` (:mod:`bigain.tasks.base`) - what both share: the backbone built in
  ``configure_model`` with the compressor attached to its denoiser;
* :mod:`bigain.tasks.adaptive` - the adaptive classification protocol as pure functions of a
  denoiser, usable without Lightning.

The task classes need the evaluation stack (``pip install 'bigain[eval]'``). They are imported on
first use, so ``bigain.tasks.adaptive`` stays importable with PyTorch alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigain.tasks.base import DiffusionTask
    from bigain.tasks.classification import DiffusionClassifier
    from bigain.tasks.generation import DiffusionGenerator

__all__ = ["DiffusionTask", "DiffusionClassifier", "DiffusionGenerator"]

_LAZY = {
    "DiffusionTask": "bigain.tasks.base",
    "DiffusionClassifier": "bigain.tasks.classification",
    "DiffusionGenerator": "bigain.tasks.generation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bigain.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
