"""Plots (matplotlib on the Agg backend, written as PNG): the speed/quality trade-off plot (one line per
method across its hyperparameters, the uncompressed baseline as a star) and the helpers every figure
of the project is drawn with (:func:`pyplot`, :func:`save_figure`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bigain.reporting import short_hyperparameters

__all__ = ["pyplot", "save_figure", "tradeoff_plot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend selected (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path``, close it (pyplot keeps open figures alive) and return the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def tradeoff_plot(summary: pd.DataFrame, *, x: str, y: str, path: str | Path, title: str,
                  xlabel: str | None = None, ylabel: str | None = None, higher_is_better: bool = True) -> Path | None:
    """Plot ``y`` against ``x`` per (backbone, dataset) panel; returns the path, or None if no data."""
    plt = pyplot()
    if x not in summary or y not in summary:
        return None
    data = summary.dropna(subset=[x, y])
    if data.empty:
        return None
    panels = list(data.groupby(["backbone", "dataset"], dropna=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, ((backbone, dataset), panel) in zip(axes[0], panels):
        for method, group in panel.groupby("method"):
            group = group.sort_values(x)
            if method == "none":
                ax.scatter(group[x], group[y], marker="*", s=180, color="black", zorder=5, label="none (baseline)")
                continue
            (line,) = ax.plot(group[x], group[y], marker="o", label=method)
            for _, r in group.iterrows():
                label = short_hyperparameters(method, r["hyperparameters"])
                ax.annotate(label, (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        ax.set_title(f"{backbone} on {dataset}")
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel((ylabel or y) + ("  (higher is better)" if higher_is_better else "  (lower is better)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
