"""Run folders: resumable, multi-process-safe storage of an evaluation's records.

Layout of a run folder::

    run.json            config, fingerprint, seed, versions, device, world size, status, outcome
    config.yaml         the full resolved configuration (re-runnable with --config)
    run.lock            while a run is going: the pid and host of the process that holds the folder
    shards/             records-rank{R}.jsonl, one JSON record per line, appended as work finishes
                        bad-rank{R}.jsonl, images left out because they could not be read
    records.parquet     every record, one per dataset index (written by rank 0 at the end)
    summary.csv / .md   the run's summary

Each rank appends only to its own shard and flushes after every batch, so a run killed at any point
keeps what it finished; a line cut short by a crash is dropped when read (its index is redone) and
the next append starts a fresh line. A restarted run reads every shard, skips the indices already
done, and rank 0 merges shards, dropping duplicate indices. Derived files (``run.json``,
``records.parquet``, summaries) are written to a temporary name and renamed, so a reader never sees
half a file. Only one process (with its DDP ranks) works in a folder at a time: ``run.lock``.
Nothing here uses collectives.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from bigain import interrupts
from bigain.errors import RunFolderError

__all__ = ["RunFolder", "RunLock", "RecordWriter", "RankWatcher", "dead_rank_status", "fingerprint", "environment_info",
           "is_rank_zero_process", "atomic_write_text", "atomic_write_parquet"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with interrupts.deferred():  # a stop signal waits for the rename: no temporary file is left behind
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def atomic_write_parquet(df, path: str | Path) -> None:
    """``df.to_parquet(path)`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with interrupts.deferred():
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """``run.lock``: which process (pid, host) works in a run folder.

    Taken with an exclusive create, so of two processes starting together exactly one gets it. A lock
    whose holder is gone is stale and taken over: on the same host when its pid no longer runs, and
    under SLURM when it was written by an earlier start of the same (requeued) job.
    """

    def __init__(self, path: str | Path, *, option: str = "--run_dir") -> None:
        self.path = Path(path)
        self.option = option
        self.held = False

    @staticmethod
    def _me() -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}

    def holder(self) -> dict[str, Any] | None:
        """The lock's content, or None when there is no lock (an unreadable lock reads as ``{}``)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {}

    def _stale(self, info: dict[str, Any]) -> bool:
        me = self._me()
        if not info:  # empty or torn: being written this instant, or its writer died while writing it
            try:
                return _dt.datetime.now().timestamp() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        if info.get("host") == me["host"]:
            return not _pid_alive(int(info.get("pid", -1)))
        job = info.get("slurm_job_id")
        return bool(job) and job == me["slurm_job_id"] and info.get("slurm_restart_count") != me["slurm_restart_count"]

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderError` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if info is None:
                    continue  # released meanwhile: try again
                if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                    self.held = True  # this process holds it already (a nested start)
                    return
                if not self._stale(info):
                    raise RunFolderError(
                        f"{self.path.parent} is in use by process {info.get('pid')} on {info.get('host')} "
                        f"(since {info.get('started')}); wait for it to finish or stop it, or choose another "
                        f"{self.option}. If that process is gone, delete {self.path}") from None
                warnings.warn(f"{self.path}: taking over the stale lock of process {info.get('pid')} on "
                              f"{info.get('host')}, which no longer runs", stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self._me()))
            self.held = True
            return
        raise RunFolderError(f"could not take the lock {self.path}; another process keeps taking it: choose "
                             f"another {self.option}")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if not self.held:
            return
        info = self.holder()
        if info is not None and info.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


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
    from bigain.precision import cpu_bf16_flags, cpu_description

    device: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                              "cpu": cpu_description(), "cpu_native_bf16": cpu_bf16_flags()}
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
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that record is redone on resume
            if isinstance(row, dict):
                rows.append(row)
    return rows


class RunFolder:
    """One evaluation's folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.shards = self.path / "shards"
        self.lock = RunLock(self.path / "run.lock")

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def read_meta(self) -> dict[str, Any] | None:
        """``run.json``, or None when there is none; an unreadable one is an error saying what to do."""
        if not self.run_json.is_file():
            return None
        try:
            return json.loads(self.run_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunFolderError(
                f"{self.run_json} is not valid JSON ({exc}); the records are safe in {self.shards}: pass "
                f"--resume true to rebuild run.json from this configuration, or --overwrite true to start "
                f"again") from exc

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_json, json.dumps(meta, indent=2, sort_keys=False, default=str))

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
        rank0 = is_rank_zero_process()
        if rank0:  # DDP ranks started by rank 0 work under its lock
            self.lock.acquire()
        try:
            return self._prepare(task=task, result_config=result_config, fp=fp, rank0=rank0,
                                 full_config=full_config, overwrite=overwrite, resume=resume)
        except BaseException:
            self.lock.release()
            raise

    def has_results(self) -> bool:
        """True when the folder holds at least one finished record."""
        return bool(self.done_indices()) or (self.path / "records.parquet").is_file()

    def _prepare(self, *, task: str, result_config: dict[str, Any], fp: str, rank0: bool, full_config: str | None,
                 overwrite: bool, resume: bool) -> dict[str, Any]:
        try:
            meta = self.read_meta()
        except RunFolderError:
            if not (overwrite or resume):
                raise
            meta = None
        if meta is not None and not overwrite and not self.has_results():
            meta = None  # a start that failed before finishing anything claims nothing
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
                for name in ("shards", "records.parquet", "summary.csv", "summary.md", "run.json", "config.yaml",
                             "images", "contact_sheet.png"):
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
                atomic_write_text(self.path / "config.yaml", full_config)
        return meta or {}

    def release(self) -> None:
        """Give the folder up (rank 0, at the end of a run, however it ended)."""
        self.lock.release()

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
        """Append rows to this rank's shard and sync them to disk (a signal waits until it is done).

        When the shard ends in a line cut short by a crash, a newline goes first, so the torn line
        stays a line of its own (dropped when read, its index redone) and the new records are intact.
        """
        rows = list(rows)
        if not rows:
            return
        self.shards.mkdir(parents=True, exist_ok=True)
        path = self.shards / f"{kind}-rank{rank}.jsonl"
        text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
        with interrupts.deferred(), path.open("a+b") as fh:
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    text = "\n" + text
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())

    def records(self):
        """The run's records: ``records.parquet``, or the merged shards when it is missing or unreadable."""
        import pandas as pd

        parquet = self.path / "records.parquet"
        if parquet.is_file():
            try:
                return pd.read_parquet(parquet)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                warnings.warn(f"{parquet} is unreadable ({type(exc).__name__}); using the records in "
                              f"{self.shards} instead", stacklevel=2)
        return self.merged_records()

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


def dead_rank_status(procs: list) -> str | None:
    """``run.json``'s status when one of the DDP ranks ``procs`` (rank 1, 2, ...) exited with an error."""
    for rank, proc in enumerate(procs, start=1):
        code = proc.poll()
        if code not in (None, 0):
            return (f"failed: DDP rank {rank} (pid {proc.pid}) exited with code {code}; the finished records are "
                    f"kept, start the same command to resume")
    return None


class RankWatcher:
    """Watches the DDP ranks this process launched (Lightning's script launcher) for the run.

    Replaces Lightning's child-process observer for the duration of a run. When a rank exits with an
    error, the run is marked ``failed`` in ``run.json`` (naming the rank and its exit code), the
    other ranks are killed (they could wait forever in a collective) and this process exits with
    status 1. A rank stopped by SIGINT or SIGTERM passes the same signal on to this process, which
    then stops cleanly; during a stop nothing is marked failed.
    """

    def __init__(self, run: RunFolder, period: float = 1.0) -> None:
        self.run = run
        self.period = period
        self.procs: list = []
        self._patched: list[tuple[Any, Any]] = []

    def __enter__(self) -> RankWatcher:
        import lightning.pytorch.strategies.launchers.subprocess_script as launcher

        if hasattr(launcher, "_launch_process_observer"):
            self._patched.append((launcher, launcher._launch_process_observer))
            launcher._launch_process_observer = self._start
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, original in self._patched:
            module._launch_process_observer = original
        self._patched.clear()

    def pids(self) -> list[int]:
        """The ranks still running (where a stop signal is forwarded)."""
        return [p.pid for p in self.procs if p.poll() is None]

    def _start(self, child_processes: list) -> None:
        import threading

        self.procs = list(child_processes)
        threading.Thread(target=self._watch, name="bigain-rank-watcher", daemon=True).start()

    def _watch(self) -> None:
        import signal
        import time

        while True:
            time.sleep(self.period)
            codes = [p.poll() for p in self.procs]
            if all(c == 0 for c in codes):
                return
            bad = [(i + 1, p, c) for i, (p, c) in enumerate(zip(self.procs, codes)) if c not in (None, 0)]
            if not bad or interrupts.requested() is not None:
                continue
            rank, proc, code = bad[0]
            if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # that rank was stopped: stop them all
                os.kill(os.getpid(), code - 128)
                return
            with contextlib.suppress(Exception):
                self.run.update_meta(status=dead_rank_status(self.procs), finished=_now())
            for p in self.procs:
                with contextlib.suppress(OSError):
                    p.kill()
            print(f"bigain: DDP rank {rank} (pid {proc.pid}) exited with code {code}; stopping the run",
                  file=sys.stderr, flush=True)
            self.run.release()
            os._exit(1)
