"""Stopping cleanly: one SIGINT or SIGTERM stops a command, the interrupted run is recorded as such
(never "failed"), and starting the command again finishes it with the records of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pandas as pd
import pytest
import yaml

from bigain import interrupts
from bigain.cli import main
from bigain.sweep import run_sweep


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory):
    from bigain.testing import save_tiny_dit

    return save_tiny_dit(tmp_path_factory.mktemp("ckpt") / "dit")


def sweep_spec(dit_path, length=12):
    return {"tasks": ["classify"],
            "datasets": [{"class_path": "toy", "init_args": {"length": length, "image_size": 16, "batch_size": 1}}],
            "compressors": ["none", {"name": "tome", "grid": {"ratio": [0.5]}}],
            "classify": {"model": {"backbone": "dit", "backbone_options": {"path": dit_path},
                                   "n_samples": [2, 4], "to_keep": [3, 1]},
                         "trainer": {"accelerator": "cpu", "enable_progress_bar": False}}}


def shard_lines(folder) -> int:
    return sum(sum(1 for _ in open(p)) for p in (folder / "shards").glob("records-rank*.jsonl")) \
        if (folder / "shards").is_dir() else 0


def wait_for_records(proc, folder, timeout=120.0) -> None:
    end = time.monotonic() + timeout
    while shard_lines(folder) < 1:
        assert proc.poll() is None, f"the command ended early with status {proc.returncode}"
        assert time.monotonic() < end, "no record was written in time"
        time.sleep(0.1)


def stop(proc, signum, timeout=60.0) -> tuple[int, float]:
    start = time.monotonic()
    proc.send_signal(signum)
    code = proc.wait(timeout=timeout)  # raises TimeoutExpired: not gone within the limit
    return code, time.monotonic() - start


def records_of(folder):
    df = pd.read_parquet(folder / "records.parquet")
    return df.drop(columns=["seconds", "denoiser_seconds"], errors="ignore").sort_values("index").reset_index(drop=True)


# -- the mechanism -----------------------------------------------------------------------------

def test_a_signal_raises_interrupted_but_never_inside_a_deferred_section():
    before = signal.getsignal(signal.SIGINT)
    with interrupts.handle_signals():
        with pytest.raises(interrupts.Interrupted) as info:
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                finished = True  # the signal waits for the section to end
        assert finished and info.value.exit_code == 143 and info.value.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # the same stop request again, at once: ignored
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before  # handlers are given back


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_an_in_process_sweep_and_records_the_cell_as_interrupted(dit_path, tmp_path, signum):
    """What `bigain demo` runs: cells in this process, under Lightning's own SIGTERM handler."""
    spec = sweep_spec(dit_path, length=40)
    first = tmp_path / "classify" / "toy" / "none"

    def interrupt_when_started():
        while shard_lines(first) < 1:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(interrupts.Interrupted) as info:
        run_sweep(spec, out=tmp_path, in_process=True)
    assert info.value.exit_code == 128 + signum and time.monotonic() - start < 60
    cells = json.loads((tmp_path / "sweep.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["interrupted"]  # no later cell started
    assert not (tmp_path / "classify" / "toy" / "tome-ratio0.5").exists()
    meta = json.loads((first / "run.json").read_text())
    assert meta["status"].startswith(f"interrupted ({signal.Signals(signum).name})") and 0 < shard_lines(first) < 40
    assert not (first / "run.lock").exists()


# -- the commands, as a user runs them -----------------------------------------------------------

@pytest.mark.slow
def test_one_sigint_stops_bigain_sweep_and_a_second_run_completes_it(dit_path, tmp_path):
    spec = sweep_spec(dit_path)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**spec, "out": str(tmp_path / "sw")}))
    command = [sys.executable, "-m", "bigain.cli", "sweep", "--config", str(config), "--no_report"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = tmp_path / "sw" / "classify" / "toy" / "none"
    wait_for_records(proc, first)
    code, seconds = stop(proc, signal.SIGINT)
    output = proc.stdout.read()
    assert code == 130, output[-3000:]
    cells = json.loads((tmp_path / "sw" / "sweep.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["interrupted"], cells
    assert "failed" not in output.lower()
    assert json.loads((first / "run.json").read_text())["status"].startswith("interrupted (SIGINT)")
    assert not (tmp_path / "sw" / "classify" / "toy" / "tome-ratio0.5" / "run.json").exists()

    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    cells = json.loads((tmp_path / "sw" / "sweep.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["complete", "complete"]
    clean = run_sweep(spec, out=tmp_path / "clean", in_process=True)
    assert [c["status"] for c in clean["cells"]] == ["complete", "complete"]
    for method in ("none", "tome-ratio0.5"):
        resumed = records_of(tmp_path / "sw" / "classify" / "toy" / method)
        assert resumed["index"].tolist() == list(range(12))
        pd.testing.assert_frame_equal(resumed, records_of(tmp_path / "clean" / "classify" / "toy" / method))


def classify_args(dit_path, run_dir, *extra, length=12):
    return ["classify", "--model.backbone", "dit", "--model.backbone_options", f"{{path: {dit_path}}}",
            "--model.compressor", "tome", "--model.n_samples", "[2, 4]", "--model.to_keep", "[3, 1]",
            "--data", "toy", "--data.length", str(length), "--data.image_size", "16", "--data.batch_size", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--run_dir", str(run_dir),
            *extra]


@pytest.mark.slow
@pytest.mark.ddp
def test_sigterm_stops_a_two_process_run_and_the_same_command_resumes_it(dit_path, tmp_path):
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    command = [sys.executable, "-m", "bigain.cli", *classify_args(dit_path, tmp_path / "run", *ddp, length=16)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_records(proc, tmp_path / "run")
    code, seconds = stop(proc, signal.SIGTERM)
    output = proc.stdout.read()
    assert code == 143, output[-3000:]
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"].startswith("interrupted (SIGTERM)"), meta["status"]
    assert 0 < shard_lines(tmp_path / "run") < 16 and not (tmp_path / "run" / "run.lock").exists()
    time.sleep(1)
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
                .splitlines() if str(tmp_path / "run") in line]  # no rank left behind

    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert main(classify_args(dit_path, tmp_path / "clean", length=16)) == 0
    resumed = records_of(tmp_path / "run")
    assert resumed["index"].tolist() == list(range(16))
    pd.testing.assert_frame_equal(resumed[["index", "prediction", "top5", "correct"]],
                                  records_of(tmp_path / "clean")[["index", "prediction", "top5", "correct"]])


_RANK_KILLER = textwrap.dedent("""
    import os
    from lightning.pytorch.callbacks import Callback

    class RankOneDies(Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if trainer.global_rank == 1 and batch_idx >= 1:
                os._exit(5)
""")


@pytest.mark.slow
@pytest.mark.ddp
def test_a_dying_rank_marks_the_run_failed_and_stops_the_others(dit_path, tmp_path):
    (tmp_path / "rankkiller.py").write_text(_RANK_KILLER)
    (tmp_path / "kill.yaml").write_text("trainer:\n  callbacks:\n    - class_path: rankkiller.RankOneDies\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    args = classify_args(dit_path, tmp_path / "run", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                         "--config", str(tmp_path / "kill.yaml"), length=40)
    out = subprocess.run([sys.executable, "-m", "bigain.cli", *args], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 1, out.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"].startswith("failed: DDP rank 1"), meta["status"]
    assert "exited with code 5" in meta["status"] and not (tmp_path / "run" / "run.lock").exists()
