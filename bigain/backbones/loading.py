"""Loading diffusers / transformers components with errors that say what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigain.errors import CheckpointError

__all__ = ["is_local", "require_subfolders", "load_component", "load_schedule"]


def is_local(path: str) -> bool:
    """True when ``path`` names something on disk (or clearly means to: starts with . / ~)."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~"))


def require_subfolders(path: str, required: list[str], *, what: str) -> Path:
    """Check a local checkpoint folder holds ``required`` subfolders; raise naming what is missing."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(
            f"{what} checkpoint folder {root} does not exist; give a local folder saved with "
            f"save_pretrained, or a Hugging Face hub id"
        )
    if not root.is_dir():
        raise CheckpointError(f"{what} checkpoint {root} is a file; give the folder that holds {required}")
    missing = [sub for sub in required if not (root / sub).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir())
        raise CheckpointError(
            f"{what} checkpoint folder {root} is incomplete: missing {missing} (found {present}). "
            f"A diffusers pipeline folder ({'/, '.join(required)}/) is expected, as written by "
            f"pipeline.save_pretrained(...)"
        )
    return root


def load_component(cls: Any, path: str, subfolder: str | None, *, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, subfolder=...)`` with a :class:`CheckpointError` on failure."""
    try:
        if subfolder:
            return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        where = f"{path}/{subfolder}" if subfolder else path
        hint = ("" if is_local(path) else
                " If this machine is offline, download the checkpoint elsewhere and give its local folder.")
        raise CheckpointError(f"could not load the {what} from {where}: {exc}.{hint}") from exc


def load_schedule(path: str) -> tuple[dict[str, Any], str, Any]:
    """The training noise schedule of the checkpoint at ``path`` (its ``scheduler/`` config):
    ``(config, prediction_type, alphas_cumprod)``, the prediction type checked and the cumulative
    alphas in float64. Any diffusers scheduler config with betas loads (DDPM, PNDM, DPM-Solver, ...)."""
    from diffusers import DDPMScheduler

    from bigain.backbones.base import check_prediction_type

    scheduler = load_component(DDPMScheduler, path, "scheduler", what="scheduler config")
    config = dict(scheduler.config)
    prediction_type = check_prediction_type(config.get("prediction_type", "epsilon"),
                                            where=f"the scheduler config of {path}")
    return config, prediction_type, scheduler.alphas_cumprod.double()
