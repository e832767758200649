"""What several backbone tests share: an offline CLIP tokenizer and readers of a finished run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bigain.testing import save_clip_tokenizer as clip_tokenizer

__all__ = ["clip_tokenizer", "records", "pixels", "meta", "run_cli"]


def records(run_dir):
    """The run's records in index order, without the timing columns (which differ between runs)."""
    df = pd.read_parquet(f"{run_dir}/records.parquet")
    return df.drop(columns=["seconds", "denoiser_seconds"], errors="ignore").sort_values("index").reset_index(drop=True)


def pixels(run_dir):
    """``{file name: uint8 [3, H, W]}`` of the run's saved images."""
    from bigain.metrics import load_png

    return {p.name: np.asarray(load_png(p)) for p in sorted((Path(run_dir) / "images").glob("*.png"))}


def meta(run_dir):
    return json.loads((Path(run_dir) / "run.json").read_text())


def run_cli(args, env=None):
    """``bigain ARGS`` in a subprocess (one thread)."""
    env = dict(env or os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bigain.cli", *args], capture_output=True, text=True, env=env)


def kill_and_resume(args, tmp_path, kill_after, *, total: int):
    """Run ``bigain ARGS`` (``args(run_dir, *extra)``) killed after two batches, check it stopped
    part way with no records.parquet, run it again and check it finished the ``total`` records
    without redoing one; returns the run folder."""
    from bigain.cli import main

    kill, env = kill_after(batches=2)
    run = tmp_path / "run"
    killed = run_cli(args(run, "--config", kill), env=env)
    assert killed.returncode == 3, killed.stderr[-3000:]
    shard = run / "shards" / "records-rank0.jsonl"
    assert 0 < sum(1 for _ in open(shard)) < total and not (run / "records.parquet").exists()
    assert main(args(run)) == 0
    assert sum(1 for _ in open(shard)) == total  # nothing redone
    return run


def assert_same_images(a, b, count: int) -> None:
    """The two runs saved the same ``count`` images, pixel for pixel."""
    first, second = pixels(a), pixels(b)
    assert sorted(first) == sorted(second) == [f"{i:06d}.png" for i in range(count)]
    assert all(np.array_equal(first[k], second[k]) for k in first)
