"""Sweeps: a grid of compressors x hyperparameters x tasks x datasets, one run folder per cell.

A sweep file::

    out: runs/sweep-toy
    tasks: [classify, generate]
    datasets:                          # LightningCLI data sections; a registered name is enough
      - toy
      - {class_path: pets, init_args: {root: /data/pets}}
    compressors:
      - none
      - {name: tome, grid: {ratio: [0.5, 0.7]}}
      - {name: bigain_td, options: {factor: 2}, grid: {alpha: [0.5, 0.9]}}
    classify:                          # the rest of each task's config (model / trainer sections,
      model: {backbone: toy}           # and data: {init_args: ...} overriding the dataset's options)
    generate:
      model: {backbone: toy, steps: 50}

Each cell is ``<out>/<task>/<dataset>/<method>`` holding ``cell.yaml`` (its full config), the run's
files and ``log.txt``. An optional ``backbones`` axis runs every cell on each of several models::

    backbones:                         # each label's model options are laid over the tasks' model sections
      - {label: dit, model: {backbone: toy, blocks: [1, 2, 3, 4]}}
      - {label: unet, model: {backbone: toy-unet}}

and the cells become ``<out>/<task>/<dataset>/<label>/<method>`` (the label's keys replace the task's
keys of the same name). Finished cells (``run.json`` complete, same ``cell.yaml``) are skipped, unless
their backbone's weights changed under the same name (a retrained toy model): that cell fails with what
to do. A cell that fails is recorded with its error in ``sweep.json`` and the others go on. SIGINT (Ctrl-C) or
SIGTERM stops the sweep: the running cell saves what it finished and is recorded as
``interrupted``, no later cell starts, and running the sweep again resumes it. One sweep at a time
works in a sweep folder (``sweep.lock``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bigain import interrupts
from bigain.errors import ConfigError
from bigain.registry import create_compressor
from bigain.runs import RunLock, atomic_write_text

__all__ = ["Cell", "expand_sweep", "run_sweep", "load_sweep"]

TASKS = ("classify", "generate")


@dataclass
class Cell:
    task: str
    dataset: str
    method: str
    folder: Path
    config: dict[str, Any]
    backbone: str | None = None

    @property
    def config_text(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_label(v) for v in value)
    return str(value).replace("/", "_").replace(" ", "")


def _compressor_configs(entry: Any) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"a sweep compressor must be a name or {{name:, options:, grid:}}, got {entry!r}")
    unknown = set(entry) - {"name", "options", "grid"}
    if unknown:
        raise ConfigError(f"sweep compressor {entry['name']!r} has unknown keys {sorted(unknown)}; use options/grid")
    fixed = dict(entry.get("options") or {})
    grid = dict(entry.get("grid") or {})
    keys = list(grid)
    out = []
    for values in itertools.product(*[grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]):
        options = {**fixed, **dict(zip(keys, values))}
        create_compressor(entry["name"], **options)  # validate every cell before running any
        out.append((entry["name"], options))
    return out


def _dataset_section(entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        entry = {"class_path": entry}
    if not isinstance(entry, dict) or "class_path" not in entry:
        raise ConfigError(f"a sweep dataset must be a name or {{class_path:, init_args:}}, got {entry!r}")
    label = entry.get("label") or str(entry["class_path"]).rsplit(".", 1)[-1]
    section = {k: v for k, v in entry.items() if k != "label"}
    return _label(label), section


def _backbone_axis(spec: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    entries = spec.get("backbones")
    if entries is None:
        return [(None, {})]
    if not isinstance(entries, list) or not entries:
        raise ConfigError("sweep backbones must be a non-empty list of {label:, model: {backbone: ..., ...}}")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) - {"label", "model"} or not isinstance(entry.get("model"), dict):
            raise ConfigError(f"a sweep backbone must be {{label:, model: {{backbone: ..., ...}}}}, got {entry!r}")
        label = _label(entry.get("label") or entry["model"].get("backbone") or "")
        if not label:
            raise ConfigError(f"sweep backbone {entry!r} needs a label or a model.backbone")
        out.append((label, dict(entry["model"])))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"sweep backbone labels must differ (they name the cells' folders), got {labels}")
    return out


def expand_sweep(spec: dict[str, Any], out: str | Path | None = None) -> list[Cell]:
    """The cells of a sweep, validated (unknown tasks or compressor options fail before any run)."""
    out = Path(out or spec.get("out") or "runs/sweep")
    tasks = spec.get("tasks") or ["classify"]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"unknown sweep task(s) {bad}; tasks are {list(TASKS)}")
    datasets = [_dataset_section(d) for d in (spec.get("datasets") or ["toy"])]
    compressors = [c for entry in (spec.get("compressors") or ["none"]) for c in _compressor_configs(entry)]
    backbones = _backbone_axis(spec)
    cells = []
    for task, (dlabel, dsection), (blabel, bmodel), (name, options) in itertools.product(
            tasks, datasets, backbones, compressors):
        base = copy.deepcopy(spec.get(task) or {})
        model = {**dict(base.get("model") or {}), **copy.deepcopy(bmodel)}
        model["compressor"] = name
        model["compressor_options"] = options
        data = copy.deepcopy(dsection)
        overrides = (base.pop("data", None) or {}).get("init_args") or {}
        data["init_args"] = {**(data.get("init_args") or {}), **overrides}  # per-task data options
        config = {**base, "model": model, "data": data}
        method = name + "".join(f"-{k}{_label(v)}" for k, v in sorted(options.items()))
        folder = out / task / dlabel / blabel / method if blabel else out / task / dlabel / method
        cells.append(Cell(task, dlabel, method, folder, config, blabel))
    return cells


def load_sweep(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping (out, tasks, datasets, compressors, ...)")
    return spec


def _finished_run(cell: Cell) -> dict[str, Any] | None:
    """The cell's ``run.json`` when its run is complete with the same ``cell.yaml``, else ``None``."""
    meta_path, cfg_path = cell.folder / "run.json", cell.folder / "cell.yaml"
    if not (meta_path.is_file() and cfg_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: the cell's run rebuilds it
    return meta if meta.get("status") == "complete" and cfg_path.read_text() == cell.config_text else None


def _stale_weights(cell: Cell, meta: dict[str, Any]) -> str | None:
    """Why a finished cell's results (``meta``, its ``run.json``) came from other weights than its backbone now
    loads, or ``None``.

    Weights rebuilt under the same name (a retrained toy model) leave ``cell.yaml`` as it was; the run
    records their digest as ``model.weights``.
    """
    recorded = ((meta.get("result_config") or {}).get("model") or {}).get("weights")
    if recorded is None:  # made before runs recorded a digest (or a backbone without one): nothing to compare
        return None
    current = _weights_digest(cell.config.get("model") or {}, default=recorded)
    if recorded == current:
        return None
    return (f"{cell.folder} holds results of other weights (model.weights {recorded}; the "
            f"backbone now loads {current}): delete that folder, or run the sweep with another --out, to redo it")


def _weights_digest(model: dict[str, Any], *, default: str | None) -> str | None:
    """The digest a run of ``model`` records as ``model.weights`` (``default`` when the backbone is not named)."""
    from bigain.backbones import BACKBONES

    name = model.get("backbone")
    if not isinstance(name, str) or name not in BACKBONES.names():
        return default
    return BACKBONES.get(name).weights_digest(dict(model.get("backbone_options") or {}))


def _run_subprocess(args: list[str], log: Path) -> tuple[int, str]:
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bigain.cli", *args], stdout=fh, stderr=subprocess.STDOUT)
        with interrupts.forward_to(lambda: [proc.pid] if proc.poll() is None else []):
            try:
                code = proc.wait()
            except interrupts.Interrupted:  # the signal went on to the cell: let it save and stop
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
    return code, log.read_text()[-2000:]


def _run_cell(cell: Cell, *, in_process: bool, extra_args: list[str]) -> tuple[int, str]:
    cell.folder.mkdir(parents=True, exist_ok=True)
    if not (cell.folder / "cell.yaml").is_file() or (cell.folder / "cell.yaml").read_text() != cell.config_text:
        atomic_write_text(cell.folder / "cell.yaml", cell.config_text)
    args = [cell.task, "--config", str(cell.folder / "cell.yaml"), "--run_dir", str(cell.folder), *extra_args]
    log = cell.folder / "log.txt"
    if not in_process:
        return _run_subprocess(args, log)
    from bigain.cli import main

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = main(args)
    except interrupts.Interrupted:
        log.write_text(buffer.getvalue())
        raise
    except BaseException as exc:  # a failing cell must not stop the sweep (a stop signal does)
        if isinstance(exc, KeyboardInterrupt):
            raise
        buffer.write(traceback.format_exc())
        code = getattr(exc, "code", 1) if isinstance(exc, SystemExit) else 1
    log.write_text(buffer.getvalue())
    return int(code or 0), buffer.getvalue()[-2000:]


def run_sweep(
    spec: dict[str, Any],
    *,
    out: str | Path | None = None,
    in_process: bool = False,
    extra_args: list[str] | None = None,
    progress: Callable[[int, int, Cell, str], None] | None = None,
) -> dict[str, Any]:
    """Run every cell not finished yet; returns the sweep record also written to ``sweep.json``."""
    cells = expand_sweep(spec, out)
    root = Path(out or spec.get("out") or "runs/sweep")
    root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(root / "sweep.lock", option="--out")
    with interrupts.handle_signals():
        lock.acquire()
        try:
            return _run_cells(cells, root, in_process=in_process, extra_args=list(extra_args or []),
                              progress=progress)
        finally:
            lock.release()


def _run_cells(cells: list[Cell], root: Path, *, in_process: bool, extra_args: list[str],
               progress: Callable[[int, int, Cell, str], None] | None) -> dict[str, Any]:
    results: list[dict[str, Any]] = []

    def save() -> None:
        atomic_write_text(root / "sweep.json", json.dumps({"cells": results, "total": len(cells)}, indent=2))

    for i, cell in enumerate(cells):
        entry = {"task": cell.task, "dataset": cell.dataset, "method": cell.method, "folder": str(cell.folder)}
        if cell.backbone:
            entry["backbone"] = cell.backbone
        results.append(entry)
        finished = _finished_run(cell)
        stale = _stale_weights(cell, finished) if finished is not None else None
        if stale is not None:  # never mixed with, nor silently replaced by, results of the new weights
            entry["status"] = "failed"
            entry["error"] = stale
        elif finished is not None:
            entry["status"] = "skipped (finished)"
        else:
            start = time.perf_counter()
            try:
                code, tail = _run_cell(cell, in_process=in_process, extra_args=extra_args)
            except interrupts.Interrupted as exc:
                code, tail = exc.exit_code, ""
            entry["seconds"] = round(time.perf_counter() - start, 1)
            signum = interrupts.requested()
            if signum is not None or code in (130, 143):  # stopped by a signal: not a failure
                entry["status"] = "interrupted"
                entry["log"] = str(cell.folder / "log.txt")
                save()
                raise interrupts.Interrupted(signum or code - 128)
            if code == 0:
                entry["status"] = "complete"
            else:
                entry["status"] = "failed"
                entry["error"] = tail.strip().splitlines()[-1] if tail.strip() else f"exit code {code}"
                entry["log"] = str(cell.folder / "log.txt")
        save()
        if progress is not None:
            progress(i + 1, len(cells), cell, entry["status"])
    return {"cells": results, "total": len(cells), "failed": sum(r["status"] == "failed" for r in results)}
