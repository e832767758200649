"""Classification results pooled over noise seeds: one row per (model, method, options), paired tests
on every (seed, image) the runs share.

A seed changes the noise every image is scored with, so two seeds of the same images are two
draws of the same experiment: pooling them doubles the pairs a McNemar test sees. Runs are pooled
when they differ in the seed only; two pooled groups are compared on the ``(seed, index)`` pairs
both scored. Each method is compared with the baseline (``none``) and, where ``versus`` names
one, with its reference method at the same shared options (``bigain_tm`` with ``tome`` at the
same ratio, ``bigain_td`` with ``todo`` at the same factor). The p-values of one model and dataset
form one family, adjusted with Holm's method.

``bigain report --pool_seeds`` writes this table (``pooled.csv``, ``pooled.md``) beside the report.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from bigain.reporting import holm_adjust, paired_comparison, short_hyperparameters, wilson_interval

__all__ = ["DEFAULT_VERSUS", "pool_seeds", "pooled_markdown"]

#: The reference each method is compared with, besides the baseline.
DEFAULT_VERSUS: dict[str, str] = {"bigain_tm": "tome", "bigain_td": "todo"}

_CONTEXT = ["backbone", "backbone_options", "dataset", "data_config", "protocol"]


def _reference(hp: dict[str, Any], candidates: dict[str, dict[str, Any]]) -> str | None:
    """The candidate hyperparameters (JSON key) agreeing with ``hp`` on every key both have and
    sharing the most keys with it; ``None`` when there is none or two tie."""
    scored = []
    for key, other in candidates.items():
        shared = set(hp) & set(other)
        if all(hp[k] == other[k] for k in shared):
            scored.append((len(shared), key))
    scored.sort(reverse=True)
    if not scored or (len(scored) > 1 and scored[0][0] == scored[1][0]):
        return None
    return scored[0][1]


def pool_seeds(runs: pd.DataFrame, records: pd.DataFrame, *, baseline: str = "none",
               versus: dict[str, str] | None = None) -> pd.DataFrame:
    """Pool finished classification runs over seeds (``runs`` / ``records`` as
    :func:`bigain.reporting.load_runs` returns them) and compare the pooled groups.

    Returns one row per (context, method, hyperparameters): ``seeds``, ``pairs`` (seed x image),
    ``accuracy`` with its Wilson interval, and for the baseline and the reference method
    (``versus``, default :data:`DEFAULT_VERSUS`) the accuracy difference, its paired interval, the
    discordant pairs, McNemar's exact p and the Holm-adjusted p.
    """
    versus = DEFAULT_VERSUS if versus is None else versus
    if runs.empty:
        return pd.DataFrame()
    done = runs[(runs["task"] == "classify") & (runs["status"] == "complete")]
    recs = records.merge(done[["run", "seed"]], on="run")
    if recs.empty or "correct" not in recs:
        return pd.DataFrame()
    recs = recs.assign(index=recs["seed"].astype(str) + ":" + recs["index"].astype(str))  # the pair key
    rows = []
    for ctx, part in done.groupby(_CONTEXT, dropna=False, sort=False):
        groups: dict[tuple[str, str], pd.DataFrame] = {}
        seeds: dict[tuple[str, str], list] = {}
        for (method, hp), members in part.groupby(["method", "hyperparameters"], sort=False):
            groups[(method, hp)] = recs[recs["run"].isin(members["run"])][["index", "correct"]]
            seeds[(method, hp)] = sorted(members["seed"].dropna().unique().tolist())
        base_key = next((k for k in groups if k[0] == baseline), None)
        family: list[tuple[int, str, float]] = []
        for key, recs_k in groups.items():
            method, hp = key
            n, hits = len(recs_k), int(recs_k["correct"].astype(bool).sum())
            low, high = wilson_interval(hits, n)
            row: dict[str, Any] = {**dict(zip(_CONTEXT, ctx)), "method": method, "hyperparameters": hp,
                                   "seeds": seeds[key], "pairs": n, "accuracy": hits / n if n else float("nan"),
                                   "accuracy_low": low, "accuracy_high": high}
            targets = {"baseline": base_key if key != base_key else None}
            ref_method = versus.get(method)
            if ref_method is not None:
                candidates = {h: json.loads(h) for m, h in groups if m == ref_method}
                ref_hp = _reference(json.loads(hp), candidates)
                targets["reference"] = (ref_method, ref_hp) if ref_hp is not None else None
            for role, target in targets.items():
                if target is None:
                    continue
                res = paired_comparison(groups[target], recs_k)
                row[f"{role}"] = f"{target[0]} {short_hyperparameters(*target)}".strip()
                row[f"{role}_pairs"] = res["paired_images"]
                row[f"{role}_delta"] = res["delta_accuracy"]
                row[f"{role}_delta_low"] = res["delta_accuracy_low"]
                row[f"{role}_delta_high"] = res["delta_accuracy_high"]
                row[f"{role}_only_method_right"] = res["only_method_right"]
                row[f"{role}_only_other_right"] = res["only_baseline_right"]
                row[f"{role}_p"] = res["mcnemar_p"]
                family.append((len(rows), role, res["mcnemar_p"]))
            rows.append(row)
        for (i, role, _), adjusted in zip(family, holm_adjust([p for _, _, p in family])):
            rows[i][f"{role}_p_holm"] = adjusted
    return pd.DataFrame(rows)


def _pct(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{100 * value:.1f}"


def _delta(row: pd.Series, role: str) -> str:
    if pd.isna(row.get(f"{role}_delta")):
        return ""
    return (f"{100 * row[f'{role}_delta']:+.1f} [{100 * row[f'{role}_delta_low']:+.1f}, "
            f"{100 * row[f'{role}_delta_high']:+.1f}]")


def _p(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.3g}"


def pooled_markdown(pooled: pd.DataFrame) -> str:
    """The pooled table as markdown, one section per model and dataset: accuracy (%) with its 95%
    interval, and against the baseline and the reference the difference in points with its paired
    95% interval, McNemar's p and Holm's p."""
    if pooled.empty:
        return "No finished classification runs to pool."
    lines = []
    for (backbone, dataset), part in pooled.groupby(["backbone", "dataset"], sort=False):
        seeds = sorted({s for row in part["seeds"] for s in row})
        lines += [f"### {backbone} on {dataset} (seeds {', '.join(map(str, seeds))})", "",
                  "| method | pairs | accuracy % [95%] | vs baseline: points [95%] | p | Holm p | vs | "
                  "points [95%] | p | Holm p |", "|---|---|---|---|---|---|---|---|---|---|"]
        for _, row in part.iterrows():
            name = f"{row['method']} {short_hyperparameters(row['method'], row['hyperparameters'])}".strip()
            acc = f"{_pct(row['accuracy'])} [{_pct(row['accuracy_low'])}, {_pct(row['accuracy_high'])}]"
            lines.append(" | ".join([
                f"| {name}", str(row["pairs"]), acc, _delta(row, "baseline"), _p(row.get("baseline_p")),
                _p(row.get("baseline_p_holm")), str(row.get("reference") or "") if "reference" in row and
                not pd.isna(row.get("reference")) else "", _delta(row, "reference"), _p(row.get("reference_p")),
                _p(row.get("reference_p_holm"))]) + " |")
        lines.append("")
    return "\n".join(lines)
