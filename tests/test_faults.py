"""Faults and odd input, each with its exact outcome: a torn shard line, a second process on a run
folder, a changed precision, a damaged records.parquet or run.json, a failed start, 16-bit and
EXIF-rotated images, skipped images, weak configuration. No finished record is ever lost."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bigain.cli import main
from bigain.datamodules.base import load_image, preprocess
from bigain.errors import RunFolderError
from bigain.runs import RunFolder, RunLock


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory):
    from bigain.testing import save_tiny_dit

    return save_tiny_dit(tmp_path_factory.mktemp("ckpt") / "dit")


def args(dit_path, run_dir, *extra, length=4, backbone_options=None):
    options = backbone_options or f"{{path: {dit_path}}}"
    return ["classify", "--model.backbone", "dit", "--model.backbone_options", options,
            "--model.n_samples", "[2]", "--model.to_keep", "[1]", "--data", "toy", "--data.length", str(length),
            "--data.image_size", "16", "--data.batch_size", "2", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--run_dir", str(run_dir), *extra]


def records(run_dir):
    df = pd.read_parquet(run_dir / "records.parquet")
    return df.drop(columns=["seconds", "denoiser_seconds"], errors="ignore").sort_values("index").reset_index(drop=True)


# -- shards ------------------------------------------------------------------------------------

def test_an_append_after_a_torn_line_starts_a_fresh_line(tmp_path):
    run = RunFolder(tmp_path)
    run.append(0, [{"index": 0, "x": 1}])
    with open(run.shards / "records-rank0.jsonl", "a") as fh:
        fh.write('{"index": 1, "x"')  # a crash in the middle of a write
    run.append(0, [{"index": 1, "x": 2}, {"index": 2, "x": 3}])
    assert sorted(run.done_indices()) == [0, 1, 2]
    assert run.merged_records()["x"].tolist() == [1, 2, 3]


def test_a_torn_last_line_is_redone_on_restart_and_nothing_is_lost(dit_path, tmp_path):
    run_dir = tmp_path / "run"
    assert main(args(dit_path, run_dir, length=6)) == 0
    shard = run_dir / "shards" / "records-rank0.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the last write cut in half
    (run_dir / "records.parquet").unlink()
    assert main(args(dit_path, run_dir, length=6)) == 0
    assert records(run_dir)["index"].tolist() == list(range(6))
    assert main(args(dit_path, tmp_path / "clean", length=6)) == 0
    pd.testing.assert_frame_equal(records(run_dir), records(tmp_path / "clean"))


# -- one process per folder ------------------------------------------------------------------

@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_process_on_a_folder_in_use_is_refused(dit_path, tmp_path, capsys, live_pid, overwrite):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(),
                                                  "started": "2026-01-01T00:00:00+00:00"}))
    extra = ["--overwrite", "true"] if overwrite else []
    assert main(args(dit_path, run_dir, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"is in use by process {live_pid} on {socket.gethostname()}" in err and "delete" in err
    assert not (run_dir / "shards").exists() and json.loads((run_dir / "run.lock").read_text())["pid"] == live_pid


@pytest.mark.slow
def test_two_identical_commands_started_together_compute_each_image_once(dit_path, tmp_path):
    command = [sys.executable, "-m", "bigain.cli", *args(dit_path, tmp_path / "run", length=30)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in outs) == [0, 2], outs
    assert "is in use by process" in [err for code, err in outs if code == 2][0]
    assert sum(1 for _ in open(tmp_path / "run" / "shards" / "records-rank0.jsonl")) == 30


def test_a_stale_lock_is_taken_over_and_a_foreign_live_one_is_not(dit_path, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = RunLock(tmp_path / "run.lock")
    lock.path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match="stale lock"):
        lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()
    lock.path.write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(RunFolderError, match="in use by process 1 on another-host.*delete"):
        RunLock(lock.path).acquire()
    os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"] = "77", "1"
    try:  # the same SLURM job, requeued: its earlier start's lock is stale
        lock.path.write_text(json.dumps({"pid": 1, "host": "another-host", "slurm_job_id": "77",
                                         "slurm_restart_count": "0"}))
        with pytest.warns(UserWarning, match="stale lock"):
            RunLock(lock.path).acquire()
    finally:
        del os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"]


def test_a_second_sweep_on_a_sweep_folder_in_use_is_refused(tmp_path, live_pid):
    from bigain.sweep import run_sweep

    (tmp_path / "sweep.lock").write_text(json.dumps({"pid": live_pid, "host": socket.gethostname()}))
    with pytest.raises(RunFolderError, match=f"in use by process {live_pid}.*another --out"):
        run_sweep({"compressors": ["none"]}, out=tmp_path)


# -- the fingerprint -------------------------------------------------------------------------

def test_precision_and_dtype_are_part_of_the_fingerprint(dit_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(args(dit_path, run_dir, "--trainer.precision", "bf16-mixed", length=2)) == 0
    assert json.loads((run_dir / "run.json").read_text())["result_config"]["precision"] == "bf16-mixed"
    assert main(args(dit_path, run_dir, length=2)) == 2
    err = capsys.readouterr().err
    assert "different configuration (differs in: precision)" in err
    bf16 = f"{{path: {dit_path}, dtype: bfloat16}}"
    assert main(args(dit_path, tmp_path / "dtype", length=2)) == 0
    assert main(args(dit_path, tmp_path / "dtype", length=2, backbone_options=bf16)) == 2
    assert "model.backbone_options.dtype" in capsys.readouterr().err


# -- derived files ---------------------------------------------------------------------------

def test_report_rebuilds_from_the_shards_when_records_parquet_is_damaged(dit_path, tmp_path):
    run_dir = tmp_path / "run"
    assert main(args(dit_path, run_dir, length=4)) == 0
    expected = records(run_dir)
    data = (run_dir / "records.parquet").read_bytes()
    (run_dir / "records.parquet").write_bytes(data[: len(data) // 2])  # a partly written file
    out = subprocess.run([sys.executable, "-m", "bigain.cli", "report", str(run_dir), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "records.parquet is unreadable" in out.stderr
    assert pd.read_csv(tmp_path / "r" / "summary.csv").loc[0, "images"] == 4
    got = RunFolder(run_dir).records().drop(columns=["seconds"]).sort_values("index").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[expected.columns], expected)


def test_derived_files_are_written_through_a_rename(dit_path, tmp_path, monkeypatch):
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(os.path.basename(b)), real(a, b))[1])
    assert main(args(dit_path, tmp_path / "run", length=2)) == 0
    assert {"records.parquet", "summary.csv", "summary.md", "run.json", "config.yaml"} <= set(replaced)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_an_unreadable_run_json_is_a_clear_error_and_resume_rebuilds_it(dit_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(args(dit_path, run_dir, length=2)) == 0
    (run_dir / "run.json").write_text('{"task": "classify", "fing')
    assert main(args(dit_path, run_dir, length=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "run.json is not valid JSON" in err and "--resume true" in err
    assert main(args(dit_path, run_dir, "--resume", "true", length=2)) == 0
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    assert len(records(run_dir)) == 2


# -- failed starts ---------------------------------------------------------------------------

def test_a_failed_start_leaves_nothing_in_the_way_of_the_corrected_command(dit_path, tmp_path, capsys):
    bad = f"{{path: {tmp_path / 'nowhere'}}}"
    run_dir = tmp_path / "run"
    assert main(args(dit_path, run_dir, backbone_options=bad)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not run_dir.exists()  # this start created the folder and finished nothing: gone
    assert main(args(dit_path, run_dir)) == 0
    cell = tmp_path / "cell"  # a folder that was there before (a sweep cell): kept, marked, not in the way
    cell.mkdir()
    assert main(args(dit_path, cell, backbone_options=bad)) == 2
    assert json.loads((cell / "run.json").read_text())["status"].startswith("failed: CheckpointError")
    assert main(args(dit_path, cell)) == 0
    assert json.loads((cell / "run.json").read_text())["status"] == "complete"


# -- images ----------------------------------------------------------------------------------

def test_a_16_bit_mid_grey_png_is_mid_grey(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = load_image(path, 16)
    assert image.shape == (3, 16, 16) and image.abs().max() < 1e-3
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    out = preprocess(Image.fromarray(ramp), 32)
    assert out.min() >= -1 and out.max() <= 1 and out.min() < -0.99 and out.max() > 0.99
    assert preprocess(Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)), 8).mean() == pytest.approx(-0.5)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, :16] = 255  # stored: white left half of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    image = load_image(tmp_path / "rot.jpg", 16)  # shown upright: portrait, white on top, center crop
    assert image[:, :4].mean() > 0.9 and image[:, -4:].mean() < -0.9


_BROKEN_TOY = textwrap.dedent("""
    from bigain.datamodules.base import load_image
    from bigain.datamodules.toy import ToyDataModule

    class BrokenToy(ToyDataModule):
        def __init__(self, *, broken: str = "", length: int = 4, image_size: int = 16, batch_size: int = 2,
                     on_bad_image: str = "error"):
            super().__init__(length=length, image_size=image_size, batch_size=batch_size,
                             on_bad_image=on_bad_image)
            self.broken = broken

        def load_item(self, index, ref):
            if index == 1:
                load_image(self.broken, self.image_size)
            return super().load_item(index, ref)
""")


def test_skipped_images_are_listed_in_summary_md_and_the_report(dit_path, tmp_path, monkeypatch):
    (tmp_path / "brokentoy.py").write_text(_BROKEN_TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    run_dir = tmp_path / "run"
    argv = [a for a in args(dit_path, run_dir) if a not in ("toy",)]
    argv[argv.index("--data")] = "--data=brokentoy.BrokenToy"
    assert main([*argv, "--data.broken", str(tmp_path / "bad.png"), "--data.on_bad_image", "skip"]) == 0
    assert records(run_dir)["index"].tolist() == [0, 2, 3]
    summary = (run_dir / "summary.md").read_text()
    assert "## Skipped images" in summary and "| 1 |" in summary and "bad.png" in summary
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "summary.md").read_text()
    assert "## Skipped images" in report and "bad.png" in report


# -- weak configuration ----------------------------------------------------------------------

def test_a_ratio_of_the_wrong_type_says_it_must_be_a_number(dit_path, tmp_path, capsys):
    assert main(args(dit_path, tmp_path / "run", "--model.compressor", "tome",
                     "--model.compressor_options", "{ratio: fast}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("bigain classify: error: tome: ratio must be a number in [0, 0.75] (the fraction of "
                       "tokens merged or pruned), got 'fast'")


def test_an_empty_config_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    assert main(["classify", "--config", str(tmp_path / "empty.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config file {tmp_path / 'empty.yaml'} is empty" in err[0]


def test_interrupted_is_never_reported_as_a_plain_keyboard_interrupt_exit(dit_path, tmp_path):
    """Lightning turns KeyboardInterrupt into SystemExit(1); bigain's handler never lets it get there."""
    proc = subprocess.Popen([sys.executable, "-m", "bigain.cli", *args(dit_path, tmp_path / "run", length=400)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    while not (tmp_path / "run" / "shards" / "records-rank0.jsonl").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "Detected KeyboardInterrupt" not in err and "stopped by SIGINT" in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"].startswith("interrupted (SIGINT)")


# -- a compressor that breaks mid-run ------------------------------------------------------------

def test_a_compressor_breaking_mid_run_is_one_line_naming_it_and_keeps_the_finished_records(
        dit_path, tmp_path, capsys, monkeypatch):
    from bigain.compressor import Compressed
    from bigain.registry import COMPRESSORS

    todo = COMPRESSORS.get("todo")
    real, calls = todo.compress, {"n": 0}

    def wrong_shapes_later(self, x, ctx):
        calls["n"] += 1
        out = real(self, x, ctx)
        return out if calls["n"] <= 3 else Compressed(queries=out.queries[:, :-1], context=out.context)

    monkeypatch.setattr(todo, "compress", wrong_shapes_later)
    run_dir = tmp_path / "run"
    assert main(args(dit_path, run_dir, "--model.compressor", "todo", "--model.blocks", "[1]", length=6)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bigain classify: error: compressor 'todo'") and "from bigain" in err[-1]
    assert "transformer_blocks.1.attn1" in err[-1] and "Traceback" not in "\n".join(err)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"].startswith("failed: CompressorError: compressor 'todo'")
    done = RunFolder(run_dir).done_indices()
    assert done and len(done) < 6  # what finished before the failure is kept, for a resume


def test_retrained_toy_weights_under_the_same_path_are_a_different_run(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from bigain.backbones.dit import TOY_DIT_PATH

    toy = tmp_path / "toy-dit"
    shutil.copytree(TOY_DIT_PATH, toy)
    run = ["classify", "--model.backbone", "toy", "--model.backbone_options", f"{{path: {toy}}}",
           "--model.n_samples", "[2]", "--model.to_keep", "[1]", "--data", "toy", "--data.length", "2",
           "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
           "--run_dir", str(tmp_path / "run")]
    assert main(run) == 0
    assert main(run) == 0  # the same weights: the finished run is found, nothing is redone
    weights = next((toy / "transformer").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3  # as `bigain toy train --out` rebuilding the folder would
    save_file(tensors, weights)
    capsys.readouterr()
    assert main(run) == 2
    assert "differs in: model.weights" in capsys.readouterr().err
