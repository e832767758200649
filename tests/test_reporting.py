"""Report maths and pairing rules, on small synthetic run folders."""

from pathlib import Path

import pandas as pd
import pytest

from bigain.reporting import (
    holm_adjust,
    load_runs,
    mcnemar_exact,
    paired_difference_interval,
    summarize_runs,
    wilson_interval,
    write_report,
)
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


DATASETS = {"toy": "bigain.datamodules.toy.ToyDataModule", "pets": "bigain.datamodules.pets.PetsDataModule"}


def make_run(root, name, method, correct, *, seed=0, indices=None, hp=None, seconds=1.0, task="classify",
             denoiser=None, dataset="toy", finished=True, metrics=None):
    """A synthetic run folder: ``correct`` per image (classify) or one record per entry (generate);
    ``seconds`` / ``denoiser`` a number or a per-image list; an unfinished run has only its shards
    and the run.json a run has while it is going (no data name, no summary)."""
    folder = RunFolder(root / name)
    indices = list(range(len(correct))) if indices is None else indices
    per_image = lambda v, k: v[k] if isinstance(v, (list, tuple)) else v  # noqa: E731
    rows = []
    for k, (i, c) in enumerate(zip(indices, correct)):
        row = ({"index": i, "label": 0, "prediction": 0 if c else 1, "correct": bool(c), "top5": [0, 1]}
               if task == "classify" else {"index": i, "label": i % 10, "path": f"images/{i:06d}.png"})
        row["seconds"] = per_image(seconds, k)
        if denoiser is not None:
            row["denoiser_seconds"] = per_image(denoiser, k)
        rows.append(row)
    folder.append(0, rows)
    result_config = {"task": task, "model": {"backbone": "toy", "compressor": method, "compressor_options": hp or {},
                                             "seed": seed, "n_samples": [5, 20], "to_keep": [5, 1]},
                     "data": {"class_path": DATASETS[dataset], "init_args": {"length": 10}}}
    meta = {"task": task, "result_config": result_config, "status": "running"}
    if finished:
        mean = sum(r["seconds"] for r in rows) / len(rows)
        meta.update(status="complete", summary={"seconds_per_image": mean}, data={"name": dataset},
                    compression={"gflops_per_forward": 2.0 if method == "none" else 1.0}, metrics=metrics or {})
    folder.write_meta(meta)
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


# -- the paired interval, Holm ----------------------------------------------------------------------

def _score_interval_by_numerical_likelihood(b, c, n, z=1.959963984540054):
    """Tango's interval the slow, independent way: the nuisance probability maximised numerically
    (scipy), the score statistic's roots found by brentq - no closed form shared with bigain."""
    import math

    optimize = pytest.importorskip("scipy.optimize")

    def score(delta):
        # cells: c (only the method right, p = q + delta), b (only the baseline right, p = q), rest
        lo, hi = max(0.0, -delta), (1.0 - delta) / 2.0

        def nll(q):
            total = 0.0
            for count, p in ((c, q + delta), (b, q), (n - b - c, 1.0 - 2.0 * q - delta)):
                if count:
                    total -= count * math.log(max(p, 1e-300))
            return total

        q = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded",
                                     options={"xatol": 1e-13}).x if hi > lo else lo
        var = n * (2.0 * q + delta * (1.0 - delta))
        return (c - b - n * delta) / math.sqrt(var) if var > 0 else math.copysign(math.inf, c - b - n * delta)

    est = (c - b) / n
    low = -1.0 if score(-1 + 1e-12) <= z else optimize.brentq(lambda d: score(d) - z, -1 + 1e-12, est, xtol=1e-12)
    high = 1.0 if score(1 - 1e-12) >= -z else optimize.brentq(lambda d: score(d) + z, est, 1 - 1e-12, xtol=1e-12)
    return low, high


@pytest.mark.parametrize("b,c,n", [(6, 1, 10), (1, 6, 10), (0, 0, 20), (0, 5, 12), (4, 0, 4), (30, 12, 100),
                                   (24, 0, 100), (120, 145, 5000)])
def test_paired_interval_matches_the_numerical_score_inversion(b, c, n):
    low, high = paired_difference_interval(b, c, n)
    assert low <= (c - b) / n <= high
    ref_low, ref_high = _score_interval_by_numerical_likelihood(b, c, n)
    assert low == pytest.approx(ref_low, abs=2e-6) and high == pytest.approx(ref_high, abs=2e-6)


def test_paired_interval_edge_cases():
    low, high = paired_difference_interval(0, 0, 50)  # no discordant pair: not a point
    assert low < 0 < high and low == pytest.approx(-high)
    assert paired_difference_interval(0, 10, 10)[1] == 1.0 and paired_difference_interval(10, 0, 10)[0] == -1.0
    assert paired_difference_interval(3, 3, 0) != paired_difference_interval(3, 3, 0)  # nan for no data
    with pytest.raises(ValueError, match="do not fit"):
        paired_difference_interval(6, 6, 10)


def test_holm_on_a_hand_computed_family():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm_adjust([0.5, float("nan"), 0.4])  # nan is no test: a family of two
    assert adjusted[0] == pytest.approx(0.8) and adjusted[2] == pytest.approx(0.8) and adjusted[1] != adjusted[1]
    assert holm_adjust([0.6, 0.7]) == [1.0, 1.0]


def test_summary_carries_the_interval_and_holm_per_baseline(tmp_path):
    make_run(tmp_path, "base", "none", [1, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    make_run(tmp_path, "t7", "tome", [1, 0, 0, 1, 1, 0, 0, 1, 0, 0], hp={"ratio": 0.7})  # b=6, c=1
    make_run(tmp_path, "t5", "tome", [1, 1, 0, 1, 0, 1, 1, 1, 1, 0], hp={"ratio": 0.5})  # b=2, c=0
    make_run(tmp_path, "td", "todo", [0, 0, 0, 0, 1, 0, 0, 0, 0, 0], hp={"factor": 2})  # b=9, c=1
    s = summarize_runs(*load_runs([tmp_path])).set_index("run")
    t7 = s.loc[str(tmp_path / "t7")]
    assert (t7["delta_accuracy_low"], t7["delta_accuracy_high"]) == pytest.approx(paired_difference_interval(6, 1, 10))
    assert t7["delta_accuracy_low"] <= t7["delta_accuracy"] <= t7["delta_accuracy_high"]
    raw = [mcnemar_exact(6, 1), mcnemar_exact(2, 0), mcnemar_exact(9, 1)]  # 0.125, 0.5, 0.02148
    # sorted: 0.02148 x3 = 0.0645, 0.125 x2 = 0.25, 0.5 x1 -> 0.5
    expected = {"t7": 0.25, "t5": 0.5, "td": 3 * raw[2]}
    for name, value in expected.items():
        assert s.loc[str(tmp_path / name), "mcnemar_p_holm"] == pytest.approx(value)
    assert pd.isna(s.loc[str(tmp_path / "base"), "mcnemar_p_holm"])
    md = write_report([tmp_path], tmp_path / "report")["markdown"]
    header = next(line for line in md.splitlines() if line.startswith("| backbone"))
    assert "| vs none [95% CI] | McNemar p | Holm p |" in header
    low, high = paired_difference_interval(6, 1, 10)
    assert f"| -0.500 [{low:+.3f}, {high:+.3f}] | 0.125 | 0.25 |" in md
    csv = pd.read_csv(tmp_path / "report" / "summary.csv").set_index("run")
    assert csv.loc[str(tmp_path / "td"), "mcnemar_p_holm"] == pytest.approx(3 * raw[2])
    assert csv.loc[str(tmp_path / "td"), "mcnemar_p"] == pytest.approx(raw[2])


# -- speed-up ---------------------------------------------------------------------------------------

def test_speedup_comes_from_the_denoiser_timing_with_the_wall_clock_beside_it(tmp_path, monkeypatch):
    import bigain.plots

    drawn = []
    monkeypatch.setattr(bigain.plots, "tradeoff_plot", lambda *a, **k: drawn.append(k))
    # the wall clock says 2x; the denoiser says 4x; one slow image (a loaded machine) does not move the median
    make_run(tmp_path, "base", "none", [1] * 10, seconds=2.0, denoiser=1.0)
    make_run(tmp_path, "td", "todo", [1] * 10, hp={"factor": 2}, seconds=[1.0] * 9 + [30.0],
             denoiser=[0.25] * 9 + [20.0])
    out = write_report([tmp_path], tmp_path / "report")
    td = out["summary"].set_index("method").loc["todo"]
    assert td["denoiser_speedup"] == pytest.approx(4.0) and td["wall_speedup"] == pytest.approx(2.0)
    assert (td["speedup"], td["speedup_source"]) == (pytest.approx(4.0), "denoiser")
    assert td["denoiser_speedup_q1"] == pytest.approx(4.0) and td["denoiser_speedup_q3"] == pytest.approx(4.0)
    assert "| 4.00x | 2.00x |" in out["markdown"]
    assert "| speed-up (denoiser) | speed-up (wall clock) |" in out["markdown"]
    plot = drawn[0]
    assert plot["x"] == "denoiser_speedup" and "denoiser's timed forwards" in plot["xlabel"]
    assert plot["x_interval"] == ("denoiser_speedup_q1", "denoiser_speedup_q3")


def test_runs_without_denoiser_timing_fall_back_to_the_wall_clock_and_say_so(tmp_path, monkeypatch):
    import bigain.plots

    drawn = []
    monkeypatch.setattr(bigain.plots, "tradeoff_plot", lambda *a, **k: drawn.append(k))
    make_run(tmp_path, "base", "none", [1] * 4, seconds=2.0, denoiser=1.0)
    make_run(tmp_path, "old", "todo", [1] * 4, hp={"factor": 2}, seconds=1.0)  # an old run: no denoiser_seconds
    out = write_report([tmp_path], tmp_path / "report")
    old = out["summary"].set_index("method").loc["todo"]
    assert (old["speedup"], old["speedup_source"]) == (pytest.approx(2.0), "wall clock")
    assert pd.isna(old.get("denoiser_speedup"))
    assert "| todo (factor=2) |" in out["markdown"] and "|  | 2.00x |" in out["markdown"]
    assert drawn[0]["x"] == "wall_speedup" and "no denoiser timing recorded" in drawn[0]["xlabel"]


# -- an unfinished run, panels, KID, HTML ------------------------------------------------------------

def _figures(monkeypatch):
    """Capture every figure bigain.plots saves: ``[(path name, [(panel title, legend labels)])]``."""
    import bigain.plots

    seen = []
    real = bigain.plots.save_figure

    def capture(fig, path, **kwargs):
        panels = [(ax.get_title(), [h.get_label() for h in ax.collections] + [ln.get_label() for ln in ax.lines])
                  for ax in fig.axes if ax.get_visible()]
        seen.append((Path(path).name, panels))
        return real(fig, path, **kwargs)

    monkeypatch.setattr(bigain.plots, "save_figure", capture)
    return seen


def test_an_unfinished_run_is_named_like_the_finished_ones_and_every_panel_has_the_baseline(tmp_path, monkeypatch):
    seen = _figures(monkeypatch)
    runs = tmp_path / "sweep"
    make_run(runs / "toy", "none", "none", [1, 1, 1, 0], seconds=2.0, finished=False)  # still going
    make_run(runs / "toy", "tome", "tome", [1, 0, 1, 0], hp={"ratio": 0.5}, seconds=1.0)
    make_run(runs / "pets", "none", "none", [1, 1, 0, 0], seconds=2.0, dataset="pets")
    make_run(runs / "pets", "tome", "tome", [1, 0, 0, 0], hp={"ratio": 0.5}, seconds=1.0, dataset="pets",
             finished=False)
    out = write_report([runs], tmp_path / "report")
    assert sorted(out["summary"]["dataset"]) == ["pets", "pets", "toy", "toy"]
    assert set(out["summary"]["pairing"]) == {"baseline", "paired"}
    name, panels = next(f for f in seen if f[0] == "accuracy_vs_speedup.png")
    assert sorted(title for title, _ in panels) == ["backbone toy, dataset pets", "backbone toy, dataset toy"]
    for title, labels in panels:
        assert "none (baseline)" in labels and "tome" in labels and "Pareto frontier" in labels, title


def test_kid_is_shown_with_its_standard_deviation(tmp_path):
    kid = lambda v, s: {"kid": {"value": v, "std": s}, "fid": {"value": 40.0 + v}}  # noqa: E731
    make_run(tmp_path, "g0", "none", [1] * 4, task="generate", metrics=kid(0.012, 0.003))
    make_run(tmp_path, "g1", "tome", [1] * 4, task="generate", hp={"ratio": 0.5}, metrics=kid(0.02, 0.0041))
    out = write_report([tmp_path], tmp_path / "report")
    header = next(line for line in out["markdown"].splitlines() if line.startswith("| backbone"))
    assert "| KID ± std |" in header
    assert "| 0.012 ± 0.003 |" in out["markdown"] and "| 0.02 ± 0.0041 |" in out["markdown"]
    assert "0.012 ± 0.003" in (tmp_path / "report" / "summary.html").read_text()
    csv = pd.read_csv(tmp_path / "report" / "summary.csv").set_index("method")
    assert csv.loc["tome", "kid_std"] == pytest.approx(0.0041)


def test_summary_html_is_one_self_contained_page_of_the_curated_tables_and_figures(tmp_path):
    import base64
    from html.parser import HTMLParser

    make_run(tmp_path / "runs", "base", "none", [1, 1, 0, 1], seconds=2.0)
    make_run(tmp_path / "runs", "t5", "tome", [1, 0, 0, 1], hp={"ratio": 0.5}, seconds=1.5)
    out = write_report([tmp_path / "runs"], tmp_path / "report")
    page = (tmp_path / "report" / "summary.html").read_text()

    class Refs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "data")]

    parser = Refs()
    parser.feed(page)
    images = [v for tag, k, v in parser.refs if tag == "img"]
    assert len(images) == len(out["files"]) >= 1
    assert all(v.startswith("data:image/png;base64,") for _, _, v in parser.refs), parser.refs
    assert all(base64.b64decode(v.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for v in images)
    assert not {"script", "link", "iframe"} & set(parser.tags)
    assert "Holm p" in page and "accuracy [95% CI]" in page and "tome (ratio=0.5)" in page
    assert "result_config" not in page and "data_config" not in page  # not a dump of the raw columns


# -- timing and contact sheets ----------------------------------------------------------------------

def test_forward_timer_times_only_the_calls_it_wraps():
    import time

    import torch

    from bigain.tasks.timing import ForwardTimer

    timer = ForwardTimer()
    x = torch.zeros(2)
    time.sleep(0.05)  # outside: not counted
    assert timer.call(lambda t, d: (time.sleep(d), t + 1)[1], x, 0.02).tolist() == [1.0, 1.0]
    timer.call(lambda t: t, x)
    assert 0.02 <= timer.seconds() < 0.045 and timer.calls == 2
    timer.reset()
    assert timer.seconds() == 0.0 and timer.calls == 0


def test_distinguishing_parts_keep_the_class():
    from bigain.analysis.samples import distinguishing_parts

    assert distinguishing_parts(["a toy image of a circle", "a toy image of a horizontal stripes (2 px)"]) == [
        "circle", "horizontal stripes (2 px)"]
    assert distinguishing_parts(["a photo of a pug, a type of pet.", "a photo of a great pyrenees, a type of pet."]) \
        == ["pug", "great pyrenees"]
    captions = ["A man riding a horse on a beach", "A plate of food"]
    assert distinguishing_parts(captions) == captions  # free captions stay whole


def test_contact_sheet_captions_name_the_class(tmp_path):
    from PIL import Image

    from bigain.analysis.samples import load_generation_run, write_run_contact_sheet
    from bigain.toy.data import TOY_CLASSES

    run = make_run(tmp_path, "g", "none", [1] * 3, task="generate")
    (run.path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(run.path / "images" / f"{i:06d}.png")
    gen = load_generation_run(run.path)
    assert gen.captions == {i: TOY_CLASSES[i] for i in range(3)}
    assert write_run_contact_sheet(run.path).is_file()


def test_forward_timer_uses_cuda_events_on_the_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from bigain.tasks.timing import ForwardTimer

    timer = ForwardTimer()
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(3):
        y = timer.call(lambda a: a @ a, x)
    assert len(timer._events) == 3 and timer._cpu_seconds == 0.0  # GPU time, not host time
    seconds = timer.seconds()
    assert 0 < seconds < 5 and y.shape == x.shape


# -- pooled over seeds ------------------------------------------------------------------------------

def test_runs_pool_over_seeds_on_seed_image_pairs_with_holm_per_family(tmp_path, capsys):
    from bigain.analysis.study import pool_seeds, pooled_markdown
    from bigain.cli import main

    make_run(tmp_path, "n0", "none", [1, 1, 1, 1, 1], seed=0)
    make_run(tmp_path, "n1", "none", [1, 1, 1, 0, 1], seed=1)
    make_run(tmp_path, "t0", "tome", [1, 0, 0, 1, 1], seed=0, hp={"ratio": 0.7})
    make_run(tmp_path, "t1", "tome", [0, 1, 1, 1, 1], seed=1, hp={"ratio": 0.7})
    make_run(tmp_path, "g0", "bigain_tm", [1, 1, 0, 1, 1], seed=0, hp={"ratio": 0.7, "legacy_grouping": True})
    make_run(tmp_path, "g1", "bigain_tm", [1, 1, 1, 1, 1], seed=1, hp={"ratio": 0.7, "legacy_grouping": True})
    make_run(tmp_path, "u0", "tome", [1, 1, 1, 1, 1], seed=0, hp={"ratio": 0.7}, finished=False)  # not pooled
    pooled = pool_seeds(*load_runs([tmp_path])).set_index("method")
    assert pooled.loc["none", "seeds"] == [0, 1] and pooled.loc["none", "pairs"] == 10
    # by hand, pairs (seed, index): none 9/10 right, tome 7/10, bigain_tm 9/10
    assert pooled.loc["none", "accuracy"] == pytest.approx(0.9)
    assert pooled.loc["tome", "accuracy"] == pytest.approx(0.7) and pooled.loc["bigain_tm", "accuracy"] == 0.9
    # tome vs none: right only with none (0,1) (0,2) (1,0); only with tome (1,3): b=3, c=1
    assert (pooled.loc["tome", "baseline_only_other_right"], pooled.loc["tome", "baseline_only_method_right"]) == (3, 1)
    # bigain_tm vs tome at the same ratio: only tome (none); only bigain_tm (0,1) (1,0): b=0, c=2
    assert pooled.loc["bigain_tm", "reference"] == "tome ratio=0.7"
    assert (pooled.loc["bigain_tm", "reference_only_other_right"],
            pooled.loc["bigain_tm", "reference_only_method_right"]) == (0, 2)
    assert pooled.loc["bigain_tm", "reference_delta"] == pytest.approx(0.2)
    raw = [mcnemar_exact(3, 1), mcnemar_exact(1, 1), mcnemar_exact(0, 2)]  # tome vs none, tm vs none, tm vs tome
    assert pooled.loc["tome", "baseline_p"] == pytest.approx(raw[0])
    holm = holm_adjust(raw)
    assert pooled.loc["tome", "baseline_p_holm"] == pytest.approx(holm[0])
    assert pooled.loc["bigain_tm", "baseline_p_holm"] == pytest.approx(holm[1])
    assert pooled.loc["bigain_tm", "reference_p_holm"] == pytest.approx(holm[2])
    assert pd.isna(pooled.loc["none", "baseline_p"]) if "baseline_p" in pooled else True
    md = pooled_markdown(pooled.reset_index())
    assert "### toy on toy (seeds 0, 1)" in md and "| bigain_tm legacy_grouping=True, ratio=0.7 | 10 | 90.0" in md
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep"), "--pool_seeds"]) == 0
    assert "# Pooled over seeds" in (tmp_path / "rep" / "pooled.md").read_text()
    assert len(pd.read_csv(tmp_path / "rep" / "pooled.csv")) == 3
