"""Records -> numbers: per-run summaries and the statistics reports are built from.

Everything takes pandas DataFrames of records (one row per dataset index) and returns plain dicts or
DataFrames, so it can be used from notebooks as well as by ``bigain report``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

__all__ = ["wilson_interval", "mcnemar_exact", "classification_summary", "write_summary", "load_runs",
           "paired_comparison", "summarize_runs", "write_report"]


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
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
    for col in ("evaluations", "forward_calls", "seconds"):
        if col in records:
            out[f"{col}_per_image"] = float(records[col].mean())
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
            "dataset": (meta.get("data") or {}).get("name") or str(data.get("class_path", "")).rsplit(".", 1)[-1],
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
        records = folder.records()  # records.parquet, or the shards when it is missing or unreadable
        if len(records):
            record_frames.append(records.assign(run=str(path)))
            if row["task"] == "classify" and "correct" in records:
                row.update(classification_summary(records))  # the records are the truth
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
    """Accuracy difference of ``other`` over ``base`` on the images both scored, with McNemar's exact
    test on the discordant pairs."""
    merged = base[["index", "correct"]].merge(other[["index", "correct"]], on="index", suffixes=("_a", "_b"))
    a, b = merged["correct_a"].astype(bool), merged["correct_b"].astype(bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = len(merged)
    return {"paired_images": n, "delta_accuracy": (b.sum() - a.sum()) / n if n else float("nan"),
            "only_baseline_right": only_a, "only_method_right": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}


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
            for metric in ("seconds_per_image",):
                if metric in row and metric in b and pd.notna(row[metric]) and row[metric]:
                    res["speedup"] = b[metric] / row[metric]
            if pd.notna(row.get("gflops")) and pd.notna(b.get("gflops")) and row.get("gflops"):
                res["flops_ratio"] = row["gflops"] / b["gflops"]
        if row["method"] == baseline:
            res["speedup"] = 1.0
        out.append(res)
    return pd.DataFrame(out)


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


def _display(part: pd.DataFrame, task: str, baseline: str) -> pd.DataFrame:
    """The human-readable table of one task (the CSV keeps every column): one column per metric
    with a value (header and cell from the metric), then the paired and cost columns."""
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
            row[metric.column] = None if value is None or (isinstance(value, float) and pd.isna(value)) else value
        if task == "classify":
            row[f"vs {baseline}"] = f"{r['delta_accuracy']:+.3f}" if pd.notna(r.get("delta_accuracy")) else ""
            row["McNemar p"] = r.get("mcnemar_p")
        else:
            row["features"] = r.get("feature_extractor")
        row["pairing"] = r.get("pairing")
        row["speedup"] = r.get("speedup")
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


def write_report(paths, out_dir, *, baseline: str = "none", title: str = "bigain report",
                 spectrum: Any = None) -> dict[str, Any]:
    """Merge runs, compare each with its baseline, and write ``summary.csv``, ``summary.md``,
    ``summary.html``, ``records.parquet`` and the trade-off plots into ``out_dir``. ``spectrum`` (the
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
    for task, label in (("classify", "Classification"), ("generate", "Generation")):
        part = summary[summary["task"] == task] if not summary.empty else summary
        if part.empty:
            continue
        directions = "; ".join(f"{m.label}: {m.direction_label}" for m in _task_metrics(part, task))
        sections += [f"## {label}", "", _markdown(_display(part, task, baseline)), ""]
        if directions:
            sections += [f"Direction - {directions}.", ""]
    for task in ("classify", "generate"):
        part = summary[summary["task"] == task] if not summary.empty else summary
        if part.empty:
            continue
        for metric in (m for m in _task_metrics(part, task) if m.plot):
            name = re.sub(r"[^\w.-]", "_", metric.name) + "_vs_speedup.png"
            plot_title = f"{metric.label[:1].upper()}{metric.label[1:]} vs speedup"
            if tradeoff_plot(part, x="speedup", y=metric.name, path=out / name, title=plot_title,
                             xlabel="measured speedup (seconds per image, baseline / method)", ylabel=metric.label,
                             higher_is_better=metric.higher_is_better):
                files[name] = str(out / name)
                sections += [f"![{plot_title}]({name})", ""]
    notes = sorted({p for p in summary.get("pairing", []) if p and p not in ("paired", "baseline")}) \
        if not summary.empty else []
    if notes:
        sections += ["## Pairing notes", ""] + [f"- {n}" for n in notes] + [""]
    from bigain.runs import RunFolder

    for run_path in (runs["run"] if "run" in runs else []):
        skipped = RunFolder(run_path).bad_images()
        if skipped:
            sections += [*skipped_markdown(skipped, run=run_path), ""]
    if spectrum is not None:
        from bigain.analysis.spectrum import spectrum_markdown

        sections += ["## Frequency retention (bigain visualize)", "",
                     spectrum_markdown(pd.read_csv(spectrum), title=None), ""]
    markdown = "\n".join(sections)
    (out / "summary.md").write_text(markdown)
    (out / "summary.html").write_text(_html(title, summary, files))
    return {"summary": summary, "records": records, "markdown": markdown, "files": files}


def _html(title: str, summary: pd.DataFrame, files: dict[str, str]) -> str:
    import html

    body = summary.drop(columns=["run"], errors="ignore").to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                                  na_rep="", border=0)
    imgs = "".join(f'<p><img src="{html.escape(name)}" alt="{html.escape(name)}"></p>' for name in files)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{padding:3px 8px;border-bottom:1px solid #ddd}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}{imgs}</body></html>")
