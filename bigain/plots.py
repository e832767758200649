"""Plots (matplotlib on the Agg backend, written as PNG): the speed/quality trade-off plot (one panel per
backbone and dataset, one line per method across its hyperparameters, interval bars on both axes where
the report has them, the Pareto frontier, the baseline in every panel) and the helpers every figure of
the project is drawn with (:func:`pyplot`, :func:`save_figure`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bigain.reporting import short_hyperparameters

__all__ = ["pyplot", "save_figure", "tradeoff_plot", "pareto_frontier"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend selected (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110, **savefig: Any) -> Path:
    """Write ``fig`` to ``path`` (``savefig``: more options of ``Figure.savefig``), close it
    (pyplot keeps open figures alive) and return the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, **savefig)
    pyplot().close(fig)
    return path


def pareto_frontier(xs, ys, *, higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both axes (``x`` higher is better, ``y`` as
    given), ordered by ``x``: the best trade-offs, the line a trade-off plot draws."""
    points = [(float(x), float(y) if higher_is_better else -float(y), i) for i, (x, y) in enumerate(zip(xs, ys))]
    front = []
    for x, y, i in points:
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy, _ in points)
        if not dominated:
            front.append((x, i))
    return [i for _, i in sorted(front)]


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _bounds(rows: pd.DataFrame, centre: str, interval: tuple[str, ...] | None):
    """``[[below], [above]]`` error-bar lengths from absolute bounds ``(low, high)`` or a spread
    ``(std,)``; None when the rows have none. Bounds that do not bracket the centre draw no bar."""
    if not interval or any(col not in rows for col in interval):
        return None
    c = rows[centre].astype(float)
    if len(interval) == 1:
        spread = rows[interval[0]].astype(float).fillna(0.0)
        below, above = spread, spread
    else:
        below = (c - rows[interval[0]].astype(float)).clip(lower=0).fillna(0.0)
        above = (rows[interval[1]].astype(float) - c).clip(lower=0).fillna(0.0)
    if not (below.any() or above.any()):
        return None
    return [below.to_numpy(), above.to_numpy()]


def tradeoff_plot(summary: pd.DataFrame, *, x: str, y: str, path: str | Path, title: str,
                  xlabel: str | None = None, ylabel: str | None = None, higher_is_better: bool = True,
                  baseline: str = "none", x_interval: tuple[str, ...] | None = None,
                  y_interval: tuple[str, ...] | None = None, percent: bool = False) -> Path | None:
    """Plot ``y`` against ``x`` with one panel per (backbone, dataset); returns the path, or None if
    there is nothing to plot.

    Every panel holds the ``baseline`` run (a black star, with dotted lines through it; a note when
    the panel has none), one line per other method through its hyperparameter settings (each point
    labelled), error bars from the columns ``x_interval`` / ``y_interval`` (``(low, high)``
    bounds, or ``(std,)`` for ``± std``) and the Pareto frontier (dashed, its points ringed): the
    settings no other point beats on both axes. ``percent`` shows ``y`` (a fraction) in percent.
    """
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    if x not in summary or y not in summary:
        return None
    data = summary.dropna(subset=[x, y])
    if data.empty:
        return None
    methods = sorted({str(m) for m in data["method"] if m != baseline})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(methods)}
    panels = list(data.groupby(["backbone", "dataset"], dropna=False))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.6 * rows + 0.6), squeeze=False)
    direction = "higher is better" if higher_is_better else "lower is better"
    handles: dict[str, Any] = {}
    for ax, ((backbone, dataset), panel) in zip(axes.flat, panels):
        base = panel[panel["method"] == baseline]
        for method in methods:
            group = panel[panel["method"] == method].sort_values(x)
            if group.empty:
                continue
            color = colors[method]
            (line,) = ax.plot(group[x], group[y], marker=markers[method], color=color, label=method, zorder=3)
            handles.setdefault(method, line)
            xerr, yerr = _bounds(group, x, x_interval), _bounds(group, y, y_interval)
            if xerr is not None or yerr is not None:
                ax.errorbar(group[x], group[y], xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=1,
                            capsize=2.5, alpha=0.7, zorder=2)
            for _, r in group.iterrows():
                label = short_hyperparameters(method, r["hyperparameters"])
                ax.annotate(label, (r[x], r[y]), textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
        if base.empty:
            ax.text(0.02, 0.02, f"no {baseline} run for this panel", transform=ax.transAxes, fontsize=8, color="0.3")
        else:
            bx, by = float(base[x].iloc[0]), float(base[y].iloc[0])
            ax.axhline(by, color="black", linestyle=":", linewidth=0.8, zorder=1)
            ax.axvline(bx, color="black", linestyle=":", linewidth=0.8, zorder=1)
            yerr = _bounds(base, y, y_interval)
            if yerr is not None:
                ax.errorbar(base[x], base[y], yerr=yerr, fmt="none", ecolor="black", elinewidth=1, capsize=2.5,
                            zorder=4)
            handles.setdefault("baseline", ax.scatter(base[x], base[y], marker="*", s=200, color="black",
                                                      zorder=5, label=f"{baseline} (baseline)"))
        front = pareto_frontier(panel[x], panel[y], higher_is_better=higher_is_better)
        if front:  # dashed through the frontier's points, each ringed (a lone best point is ringed only)
            pts = panel.iloc[front]
            (pline,) = ax.plot(pts[x], pts[y], linestyle="--", color="0.45", linewidth=1.2, marker="o",
                               markersize=14, markerfacecolor="none", markeredgecolor="0.45", zorder=1.5,
                               label="Pareto frontier")
            handles.setdefault("frontier", pline)
        ax.set_title(f"backbone {backbone}, dataset {dataset}", fontsize=10)
        ax.set_xlabel(xlabel or x, fontsize=9)
        ax.set_ylabel(f"{ylabel or y}{' (%)' if percent else ''}, {direction}", fontsize=9)
        if percent:
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    bars = []
    if y_interval:
        bars.append("y: 95 % interval" if len(y_interval) == 2 else "y: ± 1 std")
    if x_interval and any(col in data and data[col].notna().any() for col in x_interval):
        bars.append("x: interquartile range of per-image speed-ups")
    order = [k for k in ("baseline", *methods, "frontier") if k in handles]
    fig.suptitle(title + (f"\nbars - {'; '.join(bars)}" if bars else ""), fontsize=11)
    fig.tight_layout()
    fig.legend([handles[k] for k in order], [handles[k].get_label() for k in order], loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    return save_figure(fig, path, dpi=130, bbox_inches="tight")
