"""Records -> numbers: per-run summaries and the statistics reports are built from.

Everything takes pandas DataFrames of records (one row per dataset index) and returns plain dicts or
DataFrames, so it can be used from notebooks as well as by ``bigain report``.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["wilson_interval", "mcnemar_exact", "classification_summary", "write_summary"]


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
    (only B right): the binomial test of ``b`` against ``Binomial(b + c, 1/2)``."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


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
        out["top5_accuracy"] = float(sum(int(lab) in list(top) for lab, top in zip(records["label"], records["top5"])) / n)
    if "average_precision" in records:
        out["mAP"] = float(records["average_precision"].mean())
    for col in ("evaluations", "forward_calls", "seconds"):
        if col in records:
            out[f"{col}_per_image"] = float(records[col].mean())
    return out


def write_summary(row: dict[str, Any], folder, title: str = "Summary") -> None:
    """Write one summary row as ``summary.csv`` and ``summary.md``."""
    from pathlib import Path

    folder = Path(folder)
    df = pd.DataFrame([row])
    df.to_csv(folder / "summary.csv", index=False)
    lines = [f"# {title}", "", "| field | value |", "|---|---|"]
    for key, value in row.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"| {key} | {value} |")
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
