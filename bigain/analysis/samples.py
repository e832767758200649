"""Side-by-side samples: one row per generation run (the uncompressed ``none`` first), one column per
image index, so the same seed and prompt line up down each column.

A generation run folder holds ``images/{index:06d}.png`` and ``run.json``, whose
``result_config.model.compressor`` and ``result_config.model.compressor_options`` name the method.
Each image is captioned with what tells it apart: its class name (from the record's
``class_name``, else its class prompt with the words every class prompt shares taken off - "a toy
image of a circle" becomes "circle" - else the run's datamodule's class list) or, for captioned
datasets, its caption. :func:`write_contact_sheet` draws a run's images with those captions.
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

__all__ = ["GenerationRun", "load_generation_run", "common_indices", "plot_samples", "write_samples",
           "distinguishing_parts", "write_contact_sheet", "write_run_contact_sheet"]


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


def distinguishing_parts(texts: Sequence[str]) -> list[str]:
    """``texts`` with the words all of them begin and end with taken off, so what tells them apart
    is left: ``["a toy image of a circle", "a toy image of a ring"]`` -> ``["circle", "ring"]``,
    ``"a photo of a pug, a type of pet."`` -> ``"pug"``. Texts that share fewer than two such
    words (free captions), or one text alone, come back unchanged; a text that would be left empty
    keeps its last word."""
    texts = [str(t) for t in texts]
    words = [t.split() for t in texts]
    if len(set(texts)) < 2:
        return texts
    shortest = min(len(w) for w in words)
    head = 0
    while head < shortest and len({w[head] for w in words}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head and len({w[-1 - tail] for w in words}) == 1:
        tail += 1
    if head + tail < 2:  # one shared word ("A ...") is chance, not a template: captions stay whole
        return texts
    return [" ".join(w[head:len(w) - tail] or w[-1:]).rstrip(",;:") for w in words]


def _datamodule_classes(meta: dict[str, Any]) -> list[str] | None:
    """The class names of the run's datamodule, built from ``run.json``'s data configuration; None
    when it cannot be built here (a dataset root on another machine, an uninstalled plugin)."""
    data = (meta.get("result_config") or {}).get("data") or {}
    try:
        import importlib

        from bigain.datamodules.registry import DATAMODULES

        path = str(data.get("class_path", ""))
        if path in DATAMODULES.names() or ":" in path:
            cls = DATAMODULES.get(path)
        else:
            module, _, attr = path.rpartition(".")
            cls = getattr(importlib.import_module(module), attr)
        return [str(c) for c in cls(**(data.get("init_args") or {})).classes]
    except Exception:  # captions then fall back to "class N"
        return None


def _captions(path: Path, meta: dict[str, Any] | None = None) -> dict[int, str]:
    """Per image index, its caption: the class name, else the (shortened) prompt, else ``class N``."""
    try:
        from bigain.runs import RunFolder

        records = RunFolder(path).records()
    except Exception:  # records are optional here: the images are what is shown
        return {}
    if "index" not in records or not len(records):
        return {}
    rows = records.to_dict("records")
    known = lambda v: isinstance(v, str) and v != ""  # noqa: E731
    prompts = {int(r["index"]): r["prompt"] for r in rows if known(r.get("prompt"))}
    short = dict(zip(prompts, distinguishing_parts(list(prompts.values()))))
    classes = None
    out = {}
    for row in rows:
        index = int(row["index"])
        label = row.get("label")
        if known(row.get("class_name")):
            out[index] = row["class_name"]
        elif index in short:
            out[index] = short[index]
        elif label is not None and label == label:
            if classes is None:
                classes = _datamodule_classes(meta or {}) or []
            out[index] = classes[int(label)] if 0 <= int(label) < len(classes) else f"class {int(label)}"
    return out


def _wrap(text: str, width: int, lines: int = 2) -> list[str]:
    """``text`` in at most ``lines`` lines of ``width`` characters, the last cut with "..." if needed."""
    import textwrap

    wrapped = textwrap.wrap(text, width=max(4, width), break_long_words=True) or [""]
    if len(wrapped) > lines:
        last = " ".join(wrapped[lines - 1:])
        wrapped = wrapped[:lines - 1] + [last[: max(1, width - 3)].rstrip() + "..."]
    return wrapped


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
    return GenerationRun(root, str(method), dict(options), images, _captions(root, meta))


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
                          "(same data and seed), or pass --sample_indices that each run has")
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
                caption = "\n".join(_wrap(runs[0].captions.get(index, ""), 24))
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
        raise ConfigError(f"--max_samples must be >= 1, got {max_images}")
    runs = [load_generation_run(p) for p in run_dirs]
    chosen = common_indices(runs, indices=indices, max_images=max_images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = plot_samples(runs, chosen, out / "samples.png")
    return {"files": [path], "indices": chosen, "runs": [r.path for r in _order(runs)]}


def write_contact_sheet(path: str | Path, images: Sequence[Any], captions: Sequence[str], *, columns: int = 8,
                        tile: int = 128) -> Path:
    """A grid of (up to 64) images, each with its caption under it in up to two lines (cut with
    "..." only past that), written to a temporary name and renamed. ``images``: uint8 ``[3, H, W]``
    tensors, arrays or PIL images; ``captions``: e.g. ``"12: circle"``, as
    :func:`write_run_contact_sheet` makes them."""
    import os

    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    n = min(len(images), 64)
    if n == 0:
        raise ConfigError("a contact sheet needs at least one image")
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 27)), "white")
    draw = ImageDraw.Draw(sheet)
    sample = "horizontal stripes"
    width = max(4, int((tile - 4) * len(sample) / max(1.0, draw.textlength(sample, font=font))))  # chars per line
    strip = 27
    for k in range(n):
        img = images[k]
        if not isinstance(img, Image.Image):
            array = img.permute(1, 2, 0).numpy() if hasattr(img, "permute") else np.asarray(img)
            img = Image.fromarray(array)
        img = img.convert("RGB")
        img = img.resize((tile, tile), Image.NEAREST if img.width < tile else Image.BICUBIC)
        x, y = (k % columns) * tile, (k // columns) * (tile + strip)
        sheet.paste(img, (x, y))
        text = str(captions[k]).encode("ascii", "replace").decode()  # the fallback bitmap font is Latin-1 only
        for i, line in enumerate(_wrap(text, width)):
            draw.text((x + 2, y + tile + 1 + 12 * i), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)  # never half a sheet
    return path


def write_run_contact_sheet(run_dir: str | Path, path: str | Path | None = None, *, max_images: int = 64,
                            columns: int = 8) -> Path:
    """The contact sheet of one generation run folder (default ``<run>/contact_sheet.png``): its
    first ``max_images`` images by index, each captioned ``"<index>: <class name or caption>"``."""
    from PIL import Image

    run = load_generation_run(run_dir)
    indices = sorted(run.images)[:max_images]
    images = [Image.open(run.images[i]) for i in indices]
    captions = [f"{i}: {run.captions.get(i, '')}".rstrip(": ") for i in indices]
    return write_contact_sheet(Path(path) if path else run.path / "contact_sheet.png", images, captions,
                               columns=columns)
