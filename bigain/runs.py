"""Run folders: resumable, multi-process-safe storage of an evaluation's records.

Layout of a run folder::

    run.json            config, fingerprint, seed, versions, device, world size, status, outcome
    config.yaml         the full resolved configuration (re-runnable with --config)
    shards/             records-rank{R}.jsonl, one JSON record per line, appended as work finishes
                        bad-rank{R}.jsonl, images left out because they could not be read
    records.parquet     every record, one per dataset index (written by rank 0 at the end)
    summary.csv / .md   the run's summary

Each rank appends only to its own shard and flushes after every batch, so a run killed at any point
keeps what it finished; a restarted run reads every shard, skips the indices already done, and rank 0
merges shards, dropping duplicate indices. Nothing here uses collectives.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from bigain.errors import RunFolderError

__all__ = ["RunFolder", "RecordWriter", "fingerprint", "environment_info", "is_rank_zero_process"]


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of the result-affecting configuration."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_rank_zero_process() -> bool:
    """True in the process that will be global rank 0 (before any process group exists)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return os.environ.get("NODE_RANK", "0") in ("", "0")


def environment_info(trainer: Any = None) -> dict[str, Any]:
    """Library versions, device and world size, for ``run.json``."""
    from importlib import metadata

    import torch

    versions = {"python": platform.python_version()}
    for dist in ("bigain", "torch", "diffusers", "transformers", "lightning", "timm", "torchmetrics", "pandas"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    device: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        device["cuda"] = torch.version.cuda
        device["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info: dict[str, Any] = {"versions": versions, "device": device}
    if trainer is not None:
        info["world_size"] = int(trainer.world_size)
        info["accelerator"] = type(trainer.accelerator).__name__
        info["strategy"] = type(trainer.strategy).__name__
        info["precision"] = str(trainer.precision)
    return info


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that record is redone on resume
    return rows


class RunFolder:
    """One evaluation's folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.shards = self.path / "shards"

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def read_meta(self) -> dict[str, Any] | None:
        if not self.run_json.is_file():
            return None
        return json.loads(self.run_json.read_text())

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=False, default=str))
        tmp.replace(self.run_json)

    def update_meta(self, **fields: Any) -> dict[str, Any]:
        meta = self.read_meta() or {}
        meta.update(fields)
        self.write_meta(meta)
        return meta

    # -- starting ------------------------------------------------------------------------------
    def prepare(self, *, task: str, result_config: dict[str, Any], full_config: str | None = None,
                overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
        """Check the folder against the configuration and claim it; returns the metadata.

        A folder holding results of a different configuration is refused unless ``overwrite``
        (its results are deleted) or ``resume`` (kept, and the differences are recorded). The same
        configuration resumes by itself. Only the rank-0 process writes.
        """
        fp = fingerprint(result_config)
        meta = self.read_meta()
        rank0 = is_rank_zero_process()
        if meta is not None and not overwrite:
            if meta.get("task") not in (None, task):
                raise RunFolderError(
                    f"{self.path} holds a {meta.get('task')!r} run, not {task!r}; choose another run folder "
                    f"or pass --overwrite to replace it"
                )
            if meta.get("fingerprint") != fp and not resume:
                old, new = _flatten(meta.get("result_config", {})), _flatten(result_config)
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise RunFolderError(
                    f"{self.path} holds results of a different configuration (differs in: {', '.join(diff)}). "
                    f"Use another run folder, pass --overwrite to delete those results, or --resume to keep "
                    f"them and continue with this configuration"
                )
        if rank0:
            if overwrite and self.path.exists():
                for name in ("shards", "records.parquet", "summary.csv", "summary.md", "run.json", "config.yaml"):
                    target = self.path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
                meta = None
            history = list((meta or {}).get("history", []))
            if meta is not None and meta.get("fingerprint") != fp:
                history.append({"fingerprint": meta.get("fingerprint"), "result_config": meta.get("result_config"),
                                "replaced": _now()})
            meta = {**(meta or {}), "task": task, "fingerprint": fp, "result_config": result_config,
                    "status": "running", "started": (meta or {}).get("started") or _now(), "history": history}
            self.write_meta(meta)
            self.shards.mkdir(parents=True, exist_ok=True)
            if full_config is not None:
                (self.path / "config.yaml").write_text(full_config)
        return meta or {}

    # -- records -------------------------------------------------------------------------------
    def shard_files(self, kind: str = "records") -> list[Path]:
        return sorted(self.shards.glob(f"{kind}-rank*.jsonl")) if self.shards.is_dir() else []

    def read_shards(self, kind: str = "records") -> list[dict]:
        rows: list[dict] = []
        for path in self.shard_files(kind):
            rows += _read_jsonl(path)
        return rows

    def done_indices(self) -> set[int]:
        return {int(r["index"]) for r in self.read_shards() if "index" in r}

    def append(self, rank: int, rows: Iterable[dict], kind: str = "records") -> None:
        rows = list(rows)
        if not rows:
            return
        self.shards.mkdir(parents=True, exist_ok=True)
        path = self.shards / f"{kind}-rank{rank}.jsonl"
        with path.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def merged_records(self):
        """Every record of every shard, one per index (first written wins), sorted by index."""
        import pandas as pd

        rows = self.read_shards()
        if not rows:
            return pd.DataFrame(columns=["index"])
        df = pd.DataFrame(rows).drop_duplicates(subset="index", keep="first")
        return df.sort_values("index").reset_index(drop=True)

    def bad_images(self) -> list[dict]:
        seen, out = set(), []
        for row in self.read_shards("bad"):
            if row.get("index") not in seen:
                seen.add(row.get("index"))
                out.append(row)
        return sorted(out, key=lambda r: r.get("index", -1))


class RecordWriter(BasePredictionWriter):
    """Appends each batch's records (``prediction["records"]``) to this rank's shard.

    The module's ``predict_step`` returns ``{"records": [...], "bad": [...]}``; nothing is kept in
    memory, so memory stays flat however long the run.
    """

    def __init__(self, run: RunFolder) -> None:
        super().__init__(write_interval="batch")
        self.run = run

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if not prediction:
            return
        rank = trainer.global_rank
        self.run.append(rank, prediction.get("records", []))
        self.run.append(rank, prediction.get("bad", []), kind="bad")
