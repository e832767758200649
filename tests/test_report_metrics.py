"""Metrics as plugins in reports, and pairing on the whole result fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from bigain.errors import PluginLoadError
from bigain.metric import METRICS, Metric, get_metric, list_metrics, metrics_for, register_metric
from bigain.reporting import load_runs, pairing_differences, summarize_runs, write_report
from bigain.runs import RunFolder


def make_run(root, name, method, correct, *, task="classify", seed=0, hp=None, seconds=1.0, model_extra=None,
             data_extra=None, metrics=None):
    folder = RunFolder(root / name)
    if task == "classify":
        folder.append(0, [{"index": i, "label": 0, "prediction": 0 if c else 1, "correct": bool(c),
                           "seconds": seconds} for i, c in enumerate(correct)])
    else:
        folder.append(0, [{"index": i, "path": f"images/{i}.png", "seconds": seconds} for i in range(len(correct))])
    model = {"backbone": "toy", "compressor": method, "compressor_options": hp or {}, "seed": seed,
             "n_samples": [5, 20], "to_keep": [5, 1], **(model_extra or {})}
    data = {"class_path": "bigain.datamodules.toy.ToyDataModule", "init_args": {"length": 10, **(data_extra or {})}}
    folder.write_meta({"task": task, "status": "complete", "data": {"name": "toy"},
                       "result_config": {"task": task, "model": model, "data": data},
                       "summary": {"seconds_per_image": seconds}, "metrics": metrics or {}})
    return folder


# -- pairing ----------------------------------------------------------------------------------------

def test_runs_pair_only_when_the_fingerprints_agree_apart_from_the_compressor(tmp_path):
    make_run(tmp_path, "base", "none", [1, 1, 1, 0], seconds=2.0)
    make_run(tmp_path, "tome", "tome", [1, 0, 1, 0], hp={"ratio": 0.7})
    make_run(tmp_path, "later", "tome", [1, 1, 0, 0], hp={"ratio": 0.5}, model_extra={"new_option": True})
    make_run(tmp_path, "data", "todo", [1, 1, 1, 1], data_extra={"image_size": 16})
    s = summarize_runs(*load_runs([tmp_path])).set_index("run")
    assert s.loc[str(tmp_path / "tome"), "pairing"] == "paired"
    assert s.loc[str(tmp_path / "tome"), "delta_accuracy"] == pytest.approx(-0.25)
    later = s.loc[str(tmp_path / "later")]
    assert later["pairing"] == ("not paired: the closest 'none' run differs in model.new_option "
                                "(this run: True, baseline: None)")
    assert pd.isna(later["delta_accuracy"]) and pd.isna(later["speedup"])
    assert "data.init_args.image_size (this run: 16, baseline: None)" in s.loc[str(tmp_path / "data"), "pairing"]
    md = write_report([tmp_path], tmp_path / "report")["markdown"]
    assert "## Pairing notes" in md and "differs in model.new_option" in md


def test_pairing_differences_ignore_only_the_compressor_and_its_options():
    a = {"result_config": '{"task": "classify", "model": {"compressor": "none", "compressor_options": {}, "seed": 0}}'}
    b = {"result_config": '{"task": "classify", "model": {"compressor": "tome", "compressor_options": '
                          '{"ratio": 0.5}, "seed": 0}}'}
    c = {"result_config": '{"task": "classify", "model": {"compressor": "tome", "compressor_options": {}, "seed": 3,'
                          ' "precision": "bf16"}}'}
    assert pairing_differences(a, b) == {}
    assert pairing_differences(a, c) == {"model.precision": (None, "bf16"), "model.seed": (0, 3)}


def test_no_baseline_of_the_task_is_said(tmp_path):
    make_run(tmp_path, "tome", "tome", [1, 0])
    s = summarize_runs(*load_runs([tmp_path]))
    assert s.iloc[0]["pairing"] == "not paired: no 'none' run of this task"


# -- metrics ----------------------------------------------------------------------------------------

def test_the_builtin_metrics_are_registered_with_label_direction_and_task():
    assert {"accuracy", "top5_accuracy", "mAP", "fid", "kid", "is", "clip_score", "class_fidelity"} <= set(
        list_metrics())
    fid, acc = get_metric("fid"), get_metric("accuracy")
    assert (fid.label, fid.direction, fid.tasks) == ("FID", "lower", ("generate",))
    assert (acc.direction, acc.tasks, acc.column) == ("higher", ("classify",), "accuracy [95% CI]")
    assert [m.name for m in metrics_for("generate")][:2] == ["fid", "kid"]
    assert "accuracy" not in [m.name for m in metrics_for("generate")]


class ErrorRate(Metric):
    label = "error rate"
    higher_is_better = False
    tasks = ("classify",)

    def from_records(self, records):
        return float(1 - records["correct"].astype(bool).mean())


@pytest.fixture
def error_rate():
    register_metric("error_rate", ErrorRate)
    yield
    METRICS.unregister("error_rate")


def test_a_registered_metric_gets_its_column_direction_and_plot(tmp_path, error_rate, monkeypatch):
    import bigain.plots

    drawn = []
    real = bigain.plots.tradeoff_plot
    monkeypatch.setattr(bigain.plots, "tradeoff_plot", lambda *a, **k: drawn.append(k) or real(*a, **k))
    make_run(tmp_path / "runs", "base", "none", [1, 1, 1, 0], seconds=2.0)
    make_run(tmp_path / "runs", "tome", "tome", [1, 0, 0, 0], hp={"ratio": 0.7}, seconds=1.0)
    out = write_report([tmp_path / "runs"], tmp_path / "report")
    summary = out["summary"].set_index("method")
    assert summary.loc["tome", "error_rate"] == pytest.approx(0.75)
    assert "| error rate |" in out["markdown"].replace(" | vs none", " |")
    assert "error rate: lower is better" in out["markdown"]
    plot = [k for k in drawn if k["y"] == "error_rate"][0]
    assert (plot["ylabel"], plot["higher_is_better"]) == ("error rate", False)
    assert (tmp_path / "report" / "error_rate_vs_speedup.png").is_file()


def test_a_metric_without_from_records_shows_what_the_run_recorded(tmp_path):
    class Sharpness(Metric):
        label = "sharpness"
        tasks = ("generate",)
        plot = False

    register_metric("sharpness", Sharpness)
    try:
        make_run(tmp_path, "g0", "none", [1, 1], task="generate", metrics={"sharpness": {"value": 0.25}})
        make_run(tmp_path, "g1", "tome", [1, 1], task="generate", metrics={"sharpness": {"value": 0.5}})
        md = write_report([tmp_path], tmp_path / "report")["markdown"]
        assert "| sharpness |" in md and "| 0.5 |" in md and "sharpness: higher is better" in md
        assert not (tmp_path / "report" / "sharpness_vs_speedup.png").exists()
    finally:
        METRICS.unregister("sharpness")


def test_a_metric_for_an_unknown_task_is_refused():
    class Wrong(Metric):
        tasks = ("segment",)

    register_metric("wrong_task", Wrong)
    try:
        with pytest.raises(PluginLoadError, match=r"unknown task\(s\) \['segment'\]"):
            get_metric("wrong_task")
        with pytest.warns(UserWarning, match="metric 'wrong_task' left out"):
            assert "wrong_task" not in [m.name for m in metrics_for("classify")]
    finally:
        METRICS.unregister("wrong_task")


PLUGIN = textwrap.dedent('''
    from bigain.metric import Metric


    class ErrorRate(Metric):
        label = "error rate"
        higher_is_better = False
        tasks = ("classify",)

        def from_records(self, records):
            return float(1 - records["correct"].astype(bool).mean())
''')


def test_bigain_report_shows_a_metric_a_plugin_declares_by_entry_point(tmp_path):
    site = tmp_path / "site"
    (site / "my_metric_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "my_metric_plugin.py").write_text(PLUGIN)
    (site / "my_metric_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: my-metric-plugin\nVersion: 0.1\n")
    (site / "my_metric_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[bigain.metrics]\nerror_rate = my_metric_plugin:ErrorRate\n")
    make_run(tmp_path / "runs", "base", "none", [1, 1, 1, 0], seconds=2.0)
    make_run(tmp_path / "runs", "tome", "tome", [1, 0, 0, 0], hp={"ratio": 0.7}, seconds=1.0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "bigain.cli", "report", str(tmp_path / "runs"), "--out",
                          str(tmp_path / "report")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    md = (tmp_path / "report" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| backbone"))
    assert "| error rate |" in header
    assert "error rate: lower is better" in md
    assert "![Error rate vs speed-up](error_rate_vs_speedup.png)" in md
    assert (tmp_path / "report" / "error_rate_vs_speedup.png").is_file()
    csv = pd.read_csv(tmp_path / "report" / "summary.csv").set_index("method")
    assert csv.loc["tome", "error_rate"] == pytest.approx(0.75) and csv.loc["none", "error_rate"] == pytest.approx(0.25)
