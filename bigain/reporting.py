"""Records -> numbers: per-run summaries and the statistics reports are built from.

Everything takes pandas DataFrames of records (one row per dataset index) and returns plain dicts or
DataFrames, so it can be used from notebooks as well as by ``bigain report``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

__all__ = ["wilson_interval", "mcnemar_exact", "paired_difference_interval", "holm_adjust", "classification_summary",
           "timing_summary", "write_summary", "load_runs", "dataset_name", "paired_comparison", "paired_speedup",
           "summarize_runs", "write_report"]

#: The two-sided 95 % normal quantile every interval of a report uses.
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` (only A right) and ``c``
    (only B right): the binomial test of ``b`` against ``Binomial(b + c, 1/2)``.

    The lower tail ``P(X <= min(b, c))`` is summed in log space from its largest term down, in
    ``O(min(b, c))`` floating-point steps that stop once the terms no longer change the sum, so an
    ImageNet-sized comparison (tens of thousands of discordant pairs) takes milliseconds.
    """
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    k = min(int(b), int(c))
    if 2 * k == n:
        return 1.0
    log_top = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0)
    total, term = 1.0, 1.0  # the terms below the largest, relative to it: C(n, i-1) / C(n, i) = i / (n - i + 1)
    for i in range(k, 0, -1):
        term *= i / (n - i + 1)
        total += term
        if term < 1e-17 * total:
            break
    return min(1.0, 2.0 * math.exp(log_top + math.log(total)))


def _tango_score(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic of the paired difference ``delta`` = P(only the method right) -
    P(only the baseline right), given ``b`` images right only with the baseline, ``c`` right only
    with the method, ``n`` in all. Decreasing in ``delta``; zero at ``(c - b) / n``."""
    # the constrained maximum-likelihood estimate of P(only the baseline right) under ``delta``: the
    # larger root of 2n q^2 + W q - b delta (1 - delta) = 0 (Tango 1998, eq. 3, with the method as
    # "treatment"), kept inside the probability simplex against rounding
    w = -c - b + (2 * n - c + b) * delta
    q = (-w + math.sqrt(max(0.0, w * w + 8.0 * n * b * delta * (1.0 - delta)))) / (4.0 * n)
    q = min(max(q, max(0.0, -delta)), (1.0 - delta) / 2.0)
    numerator = c - b - n * delta
    variance = n * (2.0 * q + delta * (1.0 - delta))
    if variance <= 0.0:
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def paired_difference_interval(b: int, c: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Tango's score interval (95 % by default) for a paired accuracy difference.

    Of ``n`` images both runs scored, ``b`` are right only with the baseline and ``c`` only with the
    method; the difference is ``(c - b) / n``. The interval is every ``delta`` whose score statistic
    ``T(delta) = (c - b - n delta) / sqrt(n (2 q + delta (1 - delta)))`` - the observed discordant
    difference against its variance under ``delta``, with ``q``, the probability of "right only
    with the baseline", at its maximum-likelihood value under that constraint - is within ``z`` in
    absolute value (T. Tango, "Equivalence test and confidence interval for the difference
    in proportions for the paired-sample design", Statistics in Medicine 17, 1998). It uses only
    ``b``, ``c`` and ``n``, stays inside [-1, 1], is not degenerate when ``b = c = 0``, and covers
    close to 95 % at small ``n``, where the Wald interval ``(c - b)/n ± z sqrt(...)`` does not.
    Both ends are found by bisection of the (monotone) statistic to 1e-12.
    """
    b, c, n = int(b), int(c), int(n)
    if n <= 0:
        return (float("nan"), float("nan"))
    if b < 0 or c < 0 or b + c > n:
        raise ValueError(f"discordant counts b={b}, c={c} do not fit in n={n} paired images")
    estimate = (c - b) / n

    def solve(lo: float, hi: float, target: float) -> float:
        # the statistic is decreasing: find delta with _tango_score(delta) = target on [lo, hi]
        for _ in range(200):
            if hi - lo <= 1e-12:
                break
            mid = 0.5 * (lo + hi)
            if _tango_score(b, c, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    low = -1.0 if _tango_score(b, c, n, -1.0) <= z else solve(-1.0, estimate, z)
    high = 1.0 if _tango_score(b, c, n, 1.0) >= -z else solve(estimate, 1.0, -z)
    return (max(-1.0, min(low, estimate)), min(1.0, max(high, estimate)))


def holm_adjust(pvalues) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (one family of tests), in the order given.

    With the ``m`` p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value of the
    ``i``-th is ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where the adjusted value is
    below alpha controls the family-wise error rate at alpha. NaN entries are left out of the
    family and stay NaN.
    """
    values = [float(p) for p in pvalues]
    kept = sorted((p, i) for i, p in enumerate(values) if not math.isnan(p))
    m = len(kept)
    out = [float("nan")] * len(values)
    running = 0.0
    for rank, (p, i) in enumerate(kept):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def timing_summary(records: pd.DataFrame) -> dict[str, Any]:
    """Cost per image from a run's records: the mean and median wall-clock ``seconds``, and the
    median ``denoiser_seconds`` (the time inside the denoiser's own forwards) where recorded."""
    out: dict[str, Any] = {}
    for col, mean_key, median_key in (("seconds", "seconds_per_image", "median_seconds_per_image"),
                                      ("denoiser_seconds", None, "denoiser_seconds_per_image")):
        if col in records:
            values = pd.to_numeric(records[col], errors="coerce").dropna()
            if len(values):
                if mean_key:
                    out[mean_key] = float(values.mean())
                out[median_key] = float(values.median())
    return out


def classification_summary(records: pd.DataFrame) -> dict[str, Any]:
    """Accuracy (with a 95% Wilson interval), top-5, mAP for multi-label runs, cost per image."""
    n = int(len(records))
    if n == 0:
        return {"images": 0}
    correct = int(records["correct"].astype(bool).sum())
    low, high = wilson_interval(correct, n)
    out: dict[str, Any] = {"images": n, "correct": correct, "accuracy": correct / n,
                           "accuracy_low": low, "accuracy_high": high}
    if "label" in records and "top5" in records:
        hits = sum(int(lab) in list(top) for lab, top in zip(records["label"], records["top5"]))
        out["top5_accuracy"] = float(hits / n)
    if "average_precision" in records:
        out["mAP"] = float(records["average_precision"].mean())
    for col in ("evaluations", "forward_calls"):
        if col in records:
            out[f"{col}_per_image"] = float(records[col].mean())
    out.update(timing_summary(records))
    return out


def write_summary(row: dict[str, Any], folder, title: str = "Summary", skipped: list[dict] | None = None) -> None:
    """Write one summary row as ``summary.csv`` and ``summary.md`` (each to a temporary name, then
    renamed). ``skipped``: the images left out as unreadable (``on_bad_image: skip``), listed in
    ``summary.md``."""
    from pathlib import Path

    from bigain.runs import atomic_write_text

    folder = Path(folder)
    atomic_write_text(folder / "summary.csv", pd.DataFrame([row]).to_csv(index=False))
    lines = [f"# {title}", "", "| field | value |", "|---|---|"]
    for key, value in row.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"| {key} | {value} |")
    if skipped:
        lines += ["", *skipped_markdown(skipped)]
    atomic_write_text(folder / "summary.md", "\n".join(lines) + "\n")


def skipped_markdown(skipped: list[dict], run: str | None = None) -> list[str]:
    """Markdown lines listing skipped (unreadable) images: index, file and error."""
    where = f" in {run}" if run else ""
    lines = [f"## Skipped images{where}", "", f"{len(skipped)} image(s) could not be read and were left out "
             "(`on_bad_image: skip`):", "", "| index | file | error |", "|---|---|---|"]
    for row in skipped:
        error = str(row.get("error", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {row.get('index')} | {row.get('ref', '')} | {error} |")
    return lines


# -- many runs ------------------------------------------------------------------------------------

def _find_runs(paths) -> list:
    from pathlib import Path

    found = []
    for p in paths:
        p = Path(p)
        if (p / "run.json").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(q.parent for q in p.rglob("run.json"))
        else:
            from bigain.errors import RunFolderError

            raise RunFolderError(f"{p} is neither a run folder (with run.json) nor a folder holding runs")
    unique = []
    for p in found:
        if p.resolve() not in [u.resolve() for u in unique]:
            unique.append(p)
    return unique


def _registered_datamodule_name(class_path: str) -> str | None:
    """The registered name (``toy``) of the datamodule class ``package.module.Class``, looked up
    in the ``bigain.datamodules`` entry points without importing plugin code; else the class's own
    ``name`` attribute when it imports; else None."""
    if not class_path:
        return None
    try:
        import importlib
        from importlib import metadata

        from bigain.datamodules.registry import DATAMODULES

        if class_path in DATAMODULES.names():  # already a registered name
            return class_path
        module, _, attr = class_path.replace(":", ".").rpartition(".")
        for ep in metadata.entry_points(group=DATAMODULES.group):
            if ep.value.replace(":", ".") == f"{module}.{attr}":
                return ep.name

        cls = getattr(importlib.import_module(module), attr)
        name = getattr(cls, "name", None)
        return name if isinstance(name, str) and name else None
    except Exception:  # an unknown or broken plugin: the caller falls back to the class name
        return None


def dataset_name(meta: dict[str, Any]) -> str:
    """The dataset's name for reports: what a finished run recorded (``run.json``'s
    ``data.name``), else - for a run still going or stopped early, which has not written it yet -
    the registered name of the datamodule in its ``result_config``, so finished and unfinished runs
    of one dataset are named alike."""
    recorded = (meta.get("data") or {}).get("name")
    if recorded:
        return str(recorded)
    class_path = str(((meta.get("result_config") or {}).get("data") or {}).get("class_path", ""))
    return _registered_datamodule_name(class_path) or class_path.replace(":", ".").rsplit(".", 1)[-1]


def load_runs(paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read run folders (or folders of them, like a sweep) into ``(runs, records)``.

    ``runs`` has one row per run (its identity, configuration and summary); ``records`` holds every
    record of every run, keyed by ``(run, index)``. Runs without ``records.parquet`` (unfinished)
    are read from their shards.
    """
    import json

    from bigain.runs import RunFolder

    run_rows, record_frames = [], []
    for path in _find_runs(paths):
        folder = RunFolder(path)
        meta = folder.read_meta() or {}
        rc = meta.get("result_config", {})
        model = rc.get("model", {})
        data = rc.get("data", {})
        summary = dict(meta.get("summary") or {})
        hp = model.get("compressor_options") or {}
        row = {
            "run": str(path), "task": meta.get("task"), "status": meta.get("status"),
            "backbone": model.get("backbone"),
            "backbone_options": json.dumps(model.get("backbone_options") or {}, sort_keys=True),
            "dataset": dataset_name(meta),
            "data_config": json.dumps(data, sort_keys=True, default=str),
            "method": model.get("compressor"), "hyperparameters": json.dumps(hp, sort_keys=True),
            "seed": model.get("seed"),
            "result_config": json.dumps(rc, sort_keys=True, default=str),  # what pairing compares
            "protocol": json.dumps({k: model.get(k) for k in ("n_samples", "to_keep", "n_trials", "loss", "steps",
                                                              "sampler", "guidance_scale", "max_downsample",
                                                              "blocks")}, sort_keys=True),
            "gflops": (meta.get("compression") or {}).get("gflops_per_forward"),
            "tokens_kept": json.dumps((meta.get("compression") or {}).get("tokens_kept") or {}),
            "world_size": meta.get("world_size"),
            "device": ", ".join((meta.get("device") or {}).get("gpus") or []) or "cpu",
        }
        for key, value in summary.items():
            if key not in row and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                row[key] = value
        for name, result in (meta.get("metrics") or {}).items():
            if isinstance(result, dict) and isinstance(result.get("value"), (int, float)):
                row[name] = result["value"]
                if isinstance(result.get("std"), (int, float)) and not isinstance(result.get("std"), bool):
                    row[f"{name}_std"] = float(result["std"])  # KID's and IS's spread over subsets / splits
        records = folder.records()  # records.parquet, or the shards when it is missing or unreadable
        if len(records):
            record_frames.append(records.assign(run=str(path)))
            if row["task"] == "classify" and "correct" in records:
                row.update(classification_summary(records))  # the records are the truth
            else:
                row.update(timing_summary(records))
        run_rows.append(row)
    runs = pd.DataFrame(run_rows)
    records = pd.concat(record_frames, ignore_index=True) if record_frames else pd.DataFrame(columns=["run", "index"])
    return runs, records


#: Result-config keys two runs may differ in and still be paired: the compressor and its options.
PAIRING_IGNORES = ("model.compressor", "model.compressor_options")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _settings(row: Any) -> dict[str, Any]:
    """A run's result fingerprint (``run.json``'s result_config), flattened, without the compressor."""
    import json

    raw = row.get("result_config") if hasattr(row, "get") else None
    config = json.loads(raw) if isinstance(raw, str) and raw else {}
    flat = _flat(config)
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in PAIRING_IGNORES)}


def pairing_differences(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """``{key: (value in a, value in b)}`` for every result-config key two runs differ in, apart from
    the compressor and its options (:data:`PAIRING_IGNORES`); empty when they may be paired."""
    sa, sb = _settings(a), _settings(b)
    return {k: (sa.get(k), sb.get(k)) for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)}


def _why_not_paired(diff: dict[str, tuple[Any, Any]], baseline: str) -> str:
    shown = "; ".join(f"{k} (this run: {b!r}, baseline: {a!r})" for k, (a, b) in list(diff.items())[:4])
    more = f"; and {len(diff) - 4} more key(s)" if len(diff) > 4 else ""
    return f"not paired: the closest {baseline!r} run differs in {shown}{more}"


def _metric_values(row: Any, records: pd.DataFrame) -> dict[str, float]:
    """The values of the task's metrics that are computed from a run's records."""
    from bigain.metric import metrics_for

    mine = records[records["run"] == row["run"]] if "run" in records else records.iloc[0:0]
    out = {}
    for metric in metrics_for(str(row.get("task"))):
        value = metric.from_records(mine) if len(mine) else None
        if value is not None:
            out[metric.name] = value
    return out


def paired_comparison(base: pd.DataFrame, other: pd.DataFrame) -> dict[str, Any]:
    """Accuracy difference of ``other`` over ``base`` on the images both scored, with its 95 %
    paired interval (:func:`paired_difference_interval`) and McNemar's exact test on the discordant
    pairs."""
    merged = base[["index", "correct"]].merge(other[["index", "correct"]], on="index", suffixes=("_a", "_b"))
    a, b = merged["correct_a"].astype(bool), merged["correct_b"].astype(bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = len(merged)
    low, high = paired_difference_interval(only_a, only_b, n)
    return {"paired_images": n, "delta_accuracy": (b.sum() - a.sum()) / n if n else float("nan"),
            "delta_accuracy_low": low, "delta_accuracy_high": high,
            "only_baseline_right": only_a, "only_method_right": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}


#: Where a speed-up comes from: the time inside the denoiser's forwards, or the whole wall clock.
SPEEDUP_SOURCES = {"denoiser": "denoiser_seconds", "wall clock": "seconds"}


def paired_speedup(base: pd.DataFrame, other: pd.DataFrame, column: str = "denoiser_seconds") -> dict[str, float]:
    """The speed-up of ``other`` over ``base`` from the per-image times in ``column``.

    The speed-up is the ratio of the runs' medians (baseline / method) over the images both timed,
    a statistic a few slow images (a loaded machine, a first compiled call) barely move; ``q1`` and
    ``q3`` are the quartiles of the per-image ratios, the spread shown as bars in the plots. Empty
    when either run has no such times.
    """
    if column not in base or column not in other:
        return {}
    a = base[["index", column]].assign(t=lambda d: pd.to_numeric(d[column], errors="coerce"))
    b = other[["index", column]].assign(t=lambda d: pd.to_numeric(d[column], errors="coerce"))
    merged = a[["index", "t"]].merge(b[["index", "t"]], on="index", suffixes=("_a", "_b")).dropna()
    merged = merged[(merged["t_a"] > 0) & (merged["t_b"] > 0)]
    if merged.empty:
        return {}
    ratios = merged["t_a"] / merged["t_b"]
    return {"speedup": float(merged["t_a"].median() / merged["t_b"].median()),
            "q1": float(ratios.quantile(0.25)), "q3": float(ratios.quantile(0.75)), "images": int(len(merged))}


def summarize_runs(runs: pd.DataFrame, records: pd.DataFrame, *, baseline: str = "none") -> pd.DataFrame:
    """One row per run with its paired comparison against the baseline run of the same setting.

    The baseline of a run is a ``baseline``-method run whose result fingerprint (``run.json``'s
    ``result_config``: task, backbone, data, protocol, seed, precision, ...) agrees with the run's on
    every key but the compressor and its options. When none does, the row's ``pairing`` names the
    keys the closest baseline differs in and the row carries no paired numbers - runs are never
    paired silently; when the image sets differ, the comparison uses the images both scored. Every
    metric that computes its value from records (:meth:`bigain.metric.Metric.from_records`) is
    filled in from the run's records.
    """
    if runs.empty:
        return runs
    out = []
    for _, row in runs.iterrows():
        res = row.to_dict()
        res["pairing"] = ""
        res.update(_metric_values(row, records))
        candidates = runs[(runs["method"] == baseline) & (runs["task"] == row["task"])]
        diffs = [(pairing_differences(base, row), base) for _, base in candidates.iterrows()]
        matches = [base for diff, base in diffs if not diff]
        if row["method"] == baseline:
            res["pairing"] = "baseline"
        elif not diffs:
            res["pairing"] = f"not paired: no {baseline!r} run of this task"
        elif not matches:
            res["pairing"] = _why_not_paired(min((d for d, _ in diffs), key=len), baseline)
        else:
            b = matches[0]
            mine, theirs = records[records["run"] == row["run"]], records[records["run"] == b["run"]]
            if row["task"] == "classify" and "correct" in records:
                if set(mine["index"]) != set(theirs["index"]):
                    common = len(set(mine["index"]) & set(theirs["index"]))
                    res["pairing"] = (f"paired on the {common} images both runs scored (of {len(mine)} and "
                                      f"{len(theirs)})")
                else:
                    res["pairing"] = "paired"
                res.update(paired_comparison(theirs, mine))
            else:
                res["pairing"] = "paired"
            res["baseline_run"] = b["run"]
            res.update(_speedups(row, b, mine, theirs))
            if pd.notna(row.get("gflops")) and pd.notna(b.get("gflops")) and row.get("gflops"):
                res["flops_ratio"] = row["gflops"] / b["gflops"]
        if row["method"] == baseline:
            res["baseline_run"] = row["run"]
            mine = records[records["run"] == row["run"]] if "run" in records else records.iloc[0:0]
            res.update(_speedups(row, row, mine, mine))
            for key in ("speedup", "wall_speedup"):
                res.setdefault(key, 1.0)  # by definition, even with no times recorded
            res.setdefault("speedup_source", "wall clock")
        out.append(res)
    summary = pd.DataFrame(out)
    if "mcnemar_p" in summary:  # one family per baseline run: every method compared with it
        summary["mcnemar_p_holm"] = float("nan")
        for _, family in summary[summary["mcnemar_p"].notna()].groupby("baseline_run"):
            summary.loc[family.index, "mcnemar_p_holm"] = holm_adjust(family["mcnemar_p"])
    return summary


def _speedups(row: Any, base: Any, mine: pd.DataFrame, theirs: pd.DataFrame) -> dict[str, Any]:
    """``denoiser_speedup`` (from the timed denoiser forwards) and ``wall_speedup`` (from the
    wall clock), each with the quartiles of its per-image ratios, and ``speedup`` /
    ``speedup_source``: the denoiser's where both runs recorded it, else the wall clock's."""
    out: dict[str, Any] = {}
    for source, column in SPEEDUP_SOURCES.items():
        key = "denoiser_speedup" if source == "denoiser" else "wall_speedup"
        res = paired_speedup(theirs, mine, column)
        if not res and column == "seconds":  # no per-image times: the runs' own seconds per image
            a, b = base.get("seconds_per_image"), row.get("seconds_per_image")
            if a is not None and b is not None and pd.notna(a) and pd.notna(b) and b:
                res = {"speedup": float(a) / float(b)}
        if res:
            out[key] = res["speedup"]
            if "q1" in res:
                out[f"{key}_q1"], out[f"{key}_q3"] = res["q1"], res["q3"]
    for source, key in (("denoiser", "denoiser_speedup"), ("wall clock", "wall_speedup")):
        if key in out:
            out.update(speedup=out[key], speedup_source=source)
            if f"{key}_q1" in out:
                out.update(speedup_q1=out[f"{key}_q1"], speedup_q3=out[f"{key}_q3"])
            break
    return out


def short_hyperparameters(method: str, hyperparameters: str) -> str:
    """``ratio=0.7`` for a run's hyperparameters: the main knob (ratio / factor) and anything that
    differs from the compressor's defaults."""
    import inspect
    import json

    try:
        hp = json.loads(hyperparameters) if isinstance(hyperparameters, str) else dict(hyperparameters or {})
        from bigain.registry import get_compressor

        params = inspect.signature(get_compressor(method).__init__).parameters
        defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    except Exception:  # unknown plugin, odd value: show everything
        defaults, hp = {}, hp if isinstance(hp, dict) else {}
    keep = {k: v for k, v in hp.items() if k in ("ratio", "factor") or defaults.get(k, object()) != v
            and not (isinstance(v, list) and tuple(v) == defaults.get(k))}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


def _kept(value: Any) -> str:
    import json

    try:
        levels = json.loads(value) if isinstance(value, str) else dict(value or {})
    except ValueError:
        return str(value)
    return "; ".join(f"{v['queries']:.2f} / {v['keys_values']:.2f}" + (f" (L{k})" if len(levels) > 1 else "")
                     for k, v in levels.items())


def _task_metrics(part: pd.DataFrame, task: str) -> list:
    """The registered metrics of ``task`` that have a value in at least one run of ``part``."""
    from bigain.metric import metrics_for

    return [m for m in metrics_for(task) if m.name in part and part[m.name].notna().any()]


def _p_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.2g}" if value < 0.001 else f"{value:.3g}"


def _times(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}x"


def _with_std(value: Any, std: Any) -> Any:
    """``0.012 ± 0.003`` for a number with a spread, the value unchanged otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and std is not None and pd.notna(std):
        spread = "0" if abs(std) <= 1e-9 * max(abs(value), 1e-300) else f"{std:.2g}"  # rounding noise is 0
        return f"{value:.4g} ± {spread}"
    return value


def _display(part: pd.DataFrame, task: str, baseline: str) -> pd.DataFrame:
    """The human-readable table of one task (the CSV keeps every column): one column per metric
    with a value (header and cell from the metric; ``± std`` where the run recorded a spread, as
    KID and IS do), then the paired statistics (the difference with its 95 % paired interval,
    McNemar's raw and Holm-adjusted p-values), the two speed-ups and the cost columns."""
    metrics = _task_metrics(part, task)
    part = part.assign(_base=part["method"] != baseline).sort_values(["backbone", "dataset", "_base", "method",
                                                                      "hyperparameters"])
    rows = []
    for _, r in part.iterrows():
        row = {"backbone": r["backbone"], "dataset": r["dataset"],
               "method": f"{r['method']} ({short_hyperparameters(r['method'], r['hyperparameters'])})".replace(
                   " ()", ""), "images": r.get("images")}
        for metric in metrics:
            value = metric.format(r)
            value = None if isinstance(value, float) and pd.isna(value) else value
            std = f"{metric.name}_std"
            if std in part and part[std].notna().any():
                row[f"{metric.column} ± std"] = _with_std(value, r.get(std))
            else:
                row[metric.column] = value
        if task == "classify":
            delta, low, high = r.get("delta_accuracy"), r.get("delta_accuracy_low"), r.get("delta_accuracy_high")
            cell = ""
            if delta is not None and pd.notna(delta):
                cell = f"{delta:+.3f}" + (f" [{low:+.3f}, {high:+.3f}]" if low is not None and pd.notna(low) else "")
            row[f"vs {baseline} [95% CI]"] = cell
            row["McNemar p"] = _p_value(r.get("mcnemar_p"))
            row["Holm p"] = _p_value(r.get("mcnemar_p_holm"))
        else:
            row["features"] = r.get("feature_extractor")
        row["pairing"] = r.get("pairing")
        row["speed-up (denoiser)"] = _times(r.get("denoiser_speedup"))
        row["speed-up (wall clock)"] = _times(r.get("wall_speedup"))
        row["GFLOPs"] = r.get("gflops")
        row["tokens kept (q / kv)"] = _kept(r.get("tokens_kept"))
        row["s / image"] = r.get("seconds_per_image")
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_no runs_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines) + "\n"


#: Metrics that are fractions: their plot axes show percent.
FRACTION_METRICS = ("accuracy", "top5_accuracy", "mAP", "class_fidelity")


def _speedup_axis(part: pd.DataFrame, baseline: str) -> tuple[str, str]:
    """``(column, axis label)`` of the speed-up a task's plots use: the denoiser's own timed
    forwards when every run of the task with a speed-up recorded them, else the wall clock, said so."""
    timed = part[part["method"] != baseline]
    if "speedup" in timed:
        timed = timed[timed["speedup"].notna()]
    if "denoiser_speedup" in timed and len(timed) and timed["denoiser_speedup"].notna().all():
        return "denoiser_speedup", (f"speed-up over {baseline} (×)\nfrom the denoiser's timed forwards "
                                    f"(median seconds per image)")
    return "wall_speedup", (f"speed-up over {baseline} (×)\nfrom the wall clock per image "
                            f"(no denoiser timing recorded)")


def _speed_note(baseline: str) -> str:
    return (f"Speed-up (denoiser): the {baseline} run's median time inside the denoiser's forwards per image "
            f"divided by this run's; speed-up (wall clock): the same ratio of the whole per-image wall clock "
            f"(data, encoding, scheduler and a loaded machine included); empty where a run recorded no "
            f"denoiser timing.")


def _stats_note(baseline: str) -> str:
    return (f"vs {baseline}: accuracy minus the {baseline} run's on the images both scored, with Tango's 95 % "
            f"score interval for a paired difference; McNemar p: exact two-sided test of that difference; "
            f"Holm p: McNemar's p adjusted (Holm) over every method compared with the same {baseline} run.")


def write_report(paths, out_dir, *, baseline: str = "none", title: str = "bigain report",
                 spectrum: Any = None) -> dict[str, Any]:
    """Merge runs, compare each with its baseline, and write ``summary.csv``, ``summary.md``,
    ``summary.html`` (the same tables and the figures, one self-contained page),
    ``records.parquet`` and the trade-off plots into ``out_dir``. ``spectrum`` (the
    ``spectrum.csv`` of ``bigain visualize``) adds the frequency-retention table."""
    from pathlib import Path

    from bigain.plots import tradeoff_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, records = load_runs(paths)
    summary = summarize_runs(runs, records, baseline=baseline)
    if not records.empty:
        records.astype({c: str for c in records.columns if records[c].dtype == object}).to_parquet(
            out / "records.parquet", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    sections, files = [f"# {title}", ""], {}
    blocks: list[tuple[str, Any]] = []  # what the HTML page shows, in order: ("h2"|"p"|"table"|"img", content)
    for task, label in (("classify", "Classification"), ("generate", "Generation")):
        part = summary[summary["task"] == task] if not summary.empty else summary
        if part.empty:
            continue
        table = _display(part, task, baseline)
        directions = "; ".join(f"{m.label}: {m.direction_label}" for m in _task_metrics(part, task))
        sections += [f"## {label}", "", _markdown(table), ""]
        blocks += [("h2", label), ("table", table)]
        notes = ([f"Direction - {directions}."] if directions else []) + \
            ([_stats_note(baseline)] if task == "classify" else []) + [_speed_note(baseline)]
        for note in notes:
            sections += [note, ""]
            blocks.append(("p", note))
        x, xlabel = _speedup_axis(part, baseline)
        for metric in (m for m in _task_metrics(part, task) if m.plot):
            name = re.sub(r"[^\w.-]", "_", metric.name) + "_vs_speedup.png"
            plot_title = f"{metric.label[:1].upper()}{metric.label[1:]} vs speed-up"
            y_interval = ((f"{metric.name}_low", f"{metric.name}_high") if f"{metric.name}_low" in part
                          else (f"{metric.name}_std",) if f"{metric.name}_std" in part else None)
            if tradeoff_plot(part, x=x, y=metric.name, path=out / name, title=plot_title, xlabel=xlabel,
                             ylabel=metric.label, higher_is_better=metric.higher_is_better, baseline=baseline,
                             x_interval=(f"{x}_q1", f"{x}_q3"), y_interval=y_interval,
                             percent=metric.name in FRACTION_METRICS):
                files[name] = str(out / name)
                sections += [f"![{plot_title}]({name})", ""]
                blocks.append(("img", name))
    notes = sorted({p for p in summary.get("pairing", []) if p and p not in ("paired", "baseline")}) \
        if not summary.empty else []
    if notes:
        sections += ["## Pairing notes", ""] + [f"- {n}" for n in notes] + [""]
        blocks += [("h2", "Pairing notes"), ("ul", notes)]
    from bigain.runs import RunFolder

    for run_path in (runs["run"] if "run" in runs else []):
        skipped = RunFolder(run_path).bad_images()
        if skipped:
            lines = skipped_markdown(skipped, run=run_path)
            sections += [*lines, ""]
            blocks += [("h2", lines[0].removeprefix("## ")), ("p", lines[2]),
                       ("table", pd.DataFrame([{"index": r.get("index"), "file": r.get("ref", ""),
                                                "error": r.get("error", "")} for r in skipped]))]
    if spectrum is not None:
        from bigain.analysis.spectrum import spectrum_markdown

        spectrum_table = pd.read_csv(spectrum)
        sections += ["## Frequency retention (bigain visualize)", "", spectrum_markdown(spectrum_table, title=None), ""]
        blocks += [("h2", "Frequency retention (bigain visualize)"), ("pre", spectrum_markdown(spectrum_table,
                                                                                                title=None))]
    markdown = "\n".join(sections)
    (out / "summary.md").write_text(markdown)
    (out / "summary.html").write_text(_html(title, blocks, out))
    return {"summary": summary, "records": records, "markdown": markdown, "files": files}


def _html(title: str, blocks: list[tuple[str, Any]], folder) -> str:
    """One self-contained page: the curated tables, notes and figures (PNG as base64 data URIs),
    no external file, script or style sheet."""
    import base64
    import html

    parts = []
    for kind, content in blocks:
        if kind == "h2":
            parts.append(f"<h2>{html.escape(str(content))}</h2>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(str(content))}</p>")
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(str(content))}</pre>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in content) + "</ul>")
        elif kind == "table":
            cells = content.map(_fmt) if hasattr(content, "map") else content.applymap(_fmt)
            parts.append(cells.to_html(index=False, border=0, escape=True, na_rep=""))
        elif kind == "img":
            data = base64.b64encode((folder / content).read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(content)}">'
                         f"<figcaption>{html.escape(content)}</figcaption></figure>")
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
            "table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #ddd;"
            "text-align:left}img{max-width:100%}figcaption{font-size:12px;color:#555}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>\n")
