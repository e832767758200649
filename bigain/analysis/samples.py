"""Side-by-side samples: one row per generation run (the uncompressed ``none`` first), one column per
image index, so the same seed and prompt line up down each column.

A generation run folder holds ``images/{index:06d}.png`` and ``run.json``, whose
``result_config.model.compressor`` and ``result_config.model.compressor_options`` name the method.
Prompts or labels are taken from the run's records (``records.parquet`` or its shards) when it has
them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigain.errors import ConfigError, RunFolderError
from bigain.plots import pyplot, save_figure

__all__ = ["GenerationRun", "load_generation_run", "common_indices", "plot_samples", "write_samples"]


@dataclass
class GenerationRun:
    """What the samples grid needs from one generation run folder."""

    path: Path
    method: str
    options: dict[str, Any]
    images: dict[int, Path]
    captions: dict[int, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.options.items())
        base = f"{self.method} ({shown})" if shown else self.method
        return f"{base}\nuncompressed" if self.method == "none" else base


def _captions(path: Path) -> dict[int, str]:
    try:
        from bigain.runs import RunFolder

        parquet = path / "records.parquet"
        if parquet.is_file():
            import pandas as pd

            records = pd.read_parquet(parquet)
        else:
            records = RunFolder(path).merged_records()
    except Exception:  # records are optional here: the images are what is shown
        return {}
    out = {}
    for _, row in records.iterrows():
        for key, fmt in (("prompt", "{}"), ("class_name", "{}"), ("label", "class {}")):
            value = row.get(key)
            if value is not None and value == value and "index" in row:
                out[int(row["index"])] = fmt.format(value)
                break
    return out


def load_generation_run(path: str | Path) -> GenerationRun:
    """Read one generation run folder.

    Raises:
        RunFolderError: the folder, its ``run.json`` or its ``images/`` is missing or names no method.
    """
    root = Path(path).expanduser()
    meta_path = root / "run.json"
    if not meta_path.is_file():
        raise RunFolderError(f"{root} is not a generation run folder: it has no run.json; give folders written by "
                             f"`bigain generate` (each with run.json and images/)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise RunFolderError(f"{meta_path} is not valid JSON ({exc}); the run may still be starting or was "
                             f"interrupted while writing it") from exc
    model = (meta.get("result_config") or {}).get("model") or {}
    method = model.get("compressor")
    if not method:
        raise RunFolderError(f"{meta_path} names no compressor (result_config.model.compressor); is it a "
                             f"generation run written by `bigain generate`?")
    images_dir = root / "images"
    images = {}
    if images_dir.is_dir():
        for p in images_dir.glob("*.png"):
            if p.stem.isdigit():
                images[int(p.stem)] = p
    if not images:
        raise RunFolderError(f"{root} has no generated images (images/NNNNNN.png); let the run finish or "
                             f"resume it, then try again")
    options = model.get("compressor_options") or {}
    return GenerationRun(root, str(method), dict(options), images, _captions(root))


def common_indices(runs: Sequence[GenerationRun], *, indices: Sequence[int] | None = None,
                   max_images: int = 8) -> list[int]:
    """The image indices every run has: ``indices`` if given (all must exist), else the first
    ``max_images`` shared ones."""
    shared = set.intersection(*(set(r.images) for r in runs))
    if indices is not None:
        missing = {r.path.name: sorted(set(indices) - set(r.images))[:5] for r in runs
                   if set(indices) - set(r.images)}
        if missing:
            raise ConfigError(f"image indices missing from some runs: {missing}; choose indices every run "
                              f"generated (shared: {sorted(shared)[:20]})")
        return list(indices)
    if not shared:
        raise ConfigError("the runs share no image index; give runs over the same dataset indices "
                          "(same data and seed), or pass --sample-indices that each run has")
    return sorted(shared)[:max_images]


def _order(runs: Sequence[GenerationRun]) -> list[GenerationRun]:
    """The uncompressed run(s) first, the others in the order given."""
    return [r for r in runs if r.method == "none"] + [r for r in runs if r.method != "none"]


def plot_samples(runs: Sequence[GenerationRun], indices: Sequence[int], path: str | Path, *,
                 title: str = "Samples side by side") -> Path:
    """The grid: one row per run, one column per index."""
    from PIL import Image

    plt = pyplot()
    runs = _order(runs)
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):  # the same method twice: tell the rows apart by folder
        labels = [f"{lab}\n[{r.path.name}]" for lab, r in zip(labels, runs)]
    rows, cols = len(runs), len(indices)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 1.6, 1.9 * rows + 1.0), squeeze=False)
    for r, (run, label) in enumerate(zip(runs, labels)):
        for c, index in enumerate(indices):
            ax = axes[r][c]
            ax.imshow(np.asarray(Image.open(run.images[index]).convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                caption = runs[0].captions.get(index, "")
                caption = caption if len(caption) <= 28 else caption[:26] + "..."
                ax.set_title(f"#{index}" + (f"\n{caption}" if caption else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
    note = "" if any(r.method == "none" for r in runs) else " (no uncompressed run given)"
    fig.suptitle(f"{title}{note}\nrows: method (uncompressed first); columns: image index, same seed and "
                 f"prompt/class down each column", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, path, dpi=110)


def write_samples(run_dirs: Sequence[str | Path], out_dir: str | Path, *, indices: Sequence[int] | None = None,
                  max_images: int = 8) -> dict[str, Any]:
    """Write ``samples.png`` for the given generation run folders; returns ``{"files", "indices", "runs"}``."""
    if not run_dirs:
        raise ConfigError("side-by-side samples need generation run folders: give --runs RUN_DIR [RUN_DIR ...]")
    if max_images < 1:
        raise ConfigError(f"--max-samples must be >= 1, got {max_images}")
    runs = [load_generation_run(p) for p in run_dirs]
    chosen = common_indices(runs, indices=indices, max_images=max_images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = plot_samples(runs, chosen, out / "samples.png")
    return {"files": [path], "indices": chosen, "runs": [r.path for r in _order(runs)]}
