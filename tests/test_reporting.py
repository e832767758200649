"""Report maths and pairing rules, on small synthetic run folders."""

import pandas as pd
import pytest

from bigain.reporting import load_runs, mcnemar_exact, summarize_runs, wilson_interval, write_report
from bigain.runs import RunFolder


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert wilson_interval(5, 0) != wilson_interval(5, 0)  # nan for no data


def test_mcnemar_exact_on_hand_made_tables():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def _exact_tail(b, c):
    """The two-sided exact p-value with big-integer binomial coefficients (the slow reference)."""
    import math
    from fractions import Fraction

    n, k = b + c, min(b, c)
    return min(1.0, float(2 * Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)))


@pytest.mark.parametrize("b,c", [(3, 4), (40, 70), (70, 40), (600, 700), (3000, 3300), (0, 1500)])
def test_mcnemar_exact_equals_the_big_integer_sum(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_exact_tail(b, c), rel=1e-10, abs=1e-300)


def test_mcnemar_exact_at_imagenet_size():
    # 0.001432142504802657 is the big-integer sum for (12000, 12500), computed once (it takes minutes)
    assert mcnemar_exact(12000, 12500) == pytest.approx(0.001432142504802657, rel=1e-10)
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(12000, 12500), (6300, 6100), (17, 40)]:
        reference = min(1.0, 2 * scipy_stats.binom.cdf(min(b, c), b + c, 0.5))
        assert abs(mcnemar_exact(b, c) - reference) <= 1e-12


def make_run(root, name, method, correct, *, seed=0, indices=None, hp=None, seconds=1.0, task="classify"):
    folder = RunFolder(root / name)
    indices = list(range(len(correct))) if indices is None else indices
    rows = [{"index": i, "label": 0, "prediction": 0 if c else 1, "correct": bool(c), "top5": [0, 1],
             "seconds": seconds} for i, c in zip(indices, correct)]
    folder.append(0, rows)
    result_config = {"task": task, "model": {"backbone": "toy", "compressor": method, "compressor_options": hp or {},
                                             "seed": seed, "n_samples": [5, 20], "to_keep": [5, 1]},
                     "data": {"class_path": "bigain.datamodules.toy.ToyDataModule", "init_args": {"length": 10}}}
    folder.write_meta({"task": task, "result_config": result_config, "status": "complete",
                       "summary": {"seconds_per_image": seconds}, "data": {"name": "toy"},
                       "compression": {"gflops_per_forward": 2.0 if method == "none" else 1.0}})
    return folder


def test_shards_are_merged_and_deduplicated(tmp_path):
    folder = make_run(tmp_path, "a", "none", [1, 0, 1])
    folder.append(1, [{"index": 1, "correct": True, "label": 0, "prediction": 0}])  # duplicate index, other rank
    with open(folder.shards / "records-rank1.jsonl", "a") as fh:
        fh.write('{"index": 7, "corr')  # a line cut short by a crash
    df = folder.merged_records()
    assert df["index"].tolist() == [0, 1, 2]
    assert folder.done_indices() == {0, 1, 2}


def test_pairing_against_the_baseline(tmp_path):
    make_run(tmp_path, "base", "none", [1, 1, 1, 1, 0, 1, 1, 1, 1, 1], seconds=2.0)
    make_run(tmp_path, "tome", "tome", [1, 0, 0, 1, 1, 0, 0, 1, 0, 0], hp={"ratio": 0.7}, seconds=1.0)
    make_run(tmp_path, "seed1", "tome", [1] * 10, hp={"ratio": 0.5}, seed=1)
    make_run(tmp_path, "fewer", "todo", [1, 1, 0, 1, 1], indices=[0, 2, 4, 6, 8], hp={"factor": 2})
    runs, records = load_runs([tmp_path])
    assert set(records.groupby("run").size()) == {10, 5}
    s = summarize_runs(runs, records).set_index("method", drop=False)
    tome = s[s["hyperparameters"] == '{"ratio": 0.7}'].iloc[0]
    assert tome["pairing"] == "paired"
    # baseline right only on 0-based indices 2? -> base wrong only at 4; tome right at 4 only
    assert (tome["only_baseline_right"], tome["only_method_right"]) == (6, 1)
    assert tome["delta_accuracy"] == pytest.approx((4 - 9) / 10)
    assert tome["mcnemar_p"] == pytest.approx(mcnemar_exact(6, 1))
    assert tome["speedup"] == pytest.approx(2.0) and tome["flops_ratio"] == pytest.approx(0.5)
    seed1 = s[s["hyperparameters"] == '{"ratio": 0.5}'].iloc[0]
    assert seed1["pairing"].startswith("not paired") and pd.isna(seed1.get("delta_accuracy"))
    fewer = s.loc["todo"]
    assert fewer["pairing"] == "paired on the 5 images both runs scored (of 5 and 10)"
    assert fewer["paired_images"] == 5


def test_write_report_writes_tables_and_plots(tmp_path):
    make_run(tmp_path / "runs", "base", "none", [1, 1, 0, 1], seconds=2.0)
    make_run(tmp_path / "runs", "t5", "tome", [1, 0, 0, 1], hp={"ratio": 0.5}, seconds=1.5)
    make_run(tmp_path / "runs", "t7", "tome", [0, 0, 0, 1], hp={"ratio": 0.7}, seconds=1.0)
    out = write_report([tmp_path / "runs"], tmp_path / "report")
    for name in ("summary.csv", "summary.md", "summary.html", "records.parquet", "accuracy_vs_speedup.png"):
        assert (tmp_path / "report" / name).is_file(), name
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "## Classification" in md and "| toy | toy | tome (ratio=0.7) |" in md
    assert len(pd.read_csv(tmp_path / "report" / "summary.csv")) == 3
    assert out["files"]


def test_report_of_nothing_is_an_error(tmp_path):
    from bigain.errors import RunFolderError

    with pytest.raises(RunFolderError, match="neither a run folder"):
        load_runs([tmp_path / "missing"])


def test_report_includes_the_frequency_retention_table(tmp_path):
    make_run(tmp_path / "runs", "base", "none", [1, 0])
    edges = {"low": (0.0, 0.25), "mid": (0.25, 0.5), "high": (0.5, 1.5)}
    spectrum = pd.DataFrame([{"label": "tome:ratio=0.5", "layer": 1, "band": band, "retained": 0.9,
                              "relative_error": 0.1, "r_from": lo, "r_to": hi, "mode": "single", "timestep": 500}
                             for band, (lo, hi) in edges.items()])
    spectrum.to_csv(tmp_path / "spectrum.csv", index=False)
    write_report([tmp_path / "runs"], tmp_path / "report", spectrum=tmp_path / "spectrum.csv")
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "## Frequency retention" in md and "tome:ratio=0.5" in md
