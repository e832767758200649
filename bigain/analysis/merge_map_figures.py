"""Figures of merge maps: a :class:`~bigain.analysis.merge_maps.TokenMap` drawn over its image.

Merge/prune methods: merged and pruned tokens filled with the colour of the cluster they join
(qualitative colormap), destinations marked, and the cluster size per token. Key/value methods: the
weight of every token in its key/value token over the image, the key/value grid, the anchors, and
the effective pooling kernel of one cell as an annotated heatmap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigain.analysis.merge_maps import ROLE_DESTINATION, ROLE_KEPT, ROLE_MERGED, ROLE_NAMES, ROLE_PRUNED, TokenMap
from bigain.analysis.probe import MethodSpec
from bigain.compressor import TokenCompressor
from bigain.plots import pyplot, save_figure

__all__ = ["plot_method", "plot_comparison"]


def _colours(n: int) -> np.ndarray:
    """``[n, 4]`` qualitative colours (tab20), shuffled so that neighbouring clusters differ."""
    plt = pyplot()
    palette = plt.get_cmap("tab20")(np.arange(20))
    perm = np.random.default_rng(0).permutation(max(n, 1))
    return palette[perm % 20][:n]


def _marker_size(ax: Any, grid: tuple[int, int], scale: float) -> float:
    width_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
    cell = width_pt / max(grid[1], 1)
    return max((scale * cell) ** 2, 1.0)


def _draw_stride_cells(ax: Any, comp: TokenCompressor, grid: tuple[int, int]) -> None:
    sx, sy = getattr(comp, "sx", None), getattr(comp, "sy", None)
    h, w = grid
    if not (isinstance(sx, int) and isinstance(sy, int)) or max(h // sy, w // sx) > 32:
        return
    for c in range(0, (w // sx) * sx + 1, sx):
        ax.axvline(c, color="white", lw=0.4, alpha=0.5)
    for r in range(0, (h // sy) * sy + 1, sy):
        ax.axhline(r, color="white", lw=0.4, alpha=0.5)


def _kv_weight_norm(tmap: TokenMap) -> Any:
    from matplotlib.colors import TwoSlopeNorm

    total = tmap.kv_weights.sum(axis=0)
    vmax = max(float(total.max()), 1e-6)
    vmin = min(float(total.min()), -1e-6 * vmax, -0.05 * vmax)
    return total, TwoSlopeNorm(vmin=vmin, vcenter=0.0, vmax=vmax)


def _draw_overlay(ax: Any, tmap: TokenMap, comp: TokenCompressor, image: np.ndarray, *,
                  colorbar: bool = True) -> None:
    """The image with the map drawn over it, in token coordinates."""
    h, w = tmap.grid
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ys, xs = np.divmod(np.arange(tmap.num_tokens), w)
    if tmap.kind == "merge":
        colours = _colours(tmap.num_queries)
        sizes = tmap.cluster_sizes()
        rgba = colours[tmap.assignment].copy()
        rgba[:, 3] = np.where(sizes > 1, 0.7, 0.0)
        ax.imshow(rgba.reshape(h, w, 4), extent=(0, w, h, 0), interpolation="nearest")
        _draw_stride_cells(ax, comp, tmap.grid)
        s = _marker_size(ax, tmap.grid, 0.55)
        dest = tmap.role == ROLE_DESTINATION
        ax.scatter(xs[dest] + 0.5, ys[dest] + 0.5, s=s, c=colours[tmap.assignment[dest]], edgecolors="black",
                   linewidths=0.8, marker="o", zorder=3)
        kept = tmap.role == ROLE_KEPT
        ax.scatter(xs[kept] + 0.5, ys[kept] + 0.5, s=s * 0.3, c="white", edgecolors="black", linewidths=0.5,
                   marker="s", zorder=3)
        pruned = tmap.role == ROLE_PRUNED
        ax.scatter(xs[pruned] + 0.5, ys[pruned] + 0.5, s=s * 0.5, c="black", linewidths=0.7, marker="x", zorder=3)
    elif tmap.kind == "kv" and tmap.kv_weights is not None:
        total, norm = _kv_weight_norm(tmap)
        im = ax.imshow(total.reshape(h, w), extent=(0, w, h, 0), cmap="RdBu_r", norm=norm, alpha=0.75,
                       interpolation="nearest")
        if colorbar:
            cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            cb.set_label("weight of the token in its key/value token")
        if tmap.kv_factor and tmap.kv_grid:
            f = tmap.kv_factor
            for c in range(0, tmap.kv_grid[1] * f + 1, f):
                ax.axvline(c, color="black", lw=0.6, alpha=0.7)
            for r in range(0, tmap.kv_grid[0] * f + 1, f):
                ax.axhline(r, color="black", lw=0.6, alpha=0.7)
        anchors = tmap.kv_anchor
        s = _marker_size(ax, tmap.grid, 0.5)
        ax.scatter(xs[anchors] + 0.5, ys[anchors] + 0.5, s=s, facecolors="none", edgecolors="black",
                   linewidths=0.9, marker="o", zorder=3)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xlabel("token column")
    ax.set_ylabel("token row")


def _legend_handles(kinds: set[str], roles: set[int]) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    if "merge" in kinds:
        if ROLE_DESTINATION in roles:
            handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="tab:orange", markeredgecolor="black",
                                  label="destination / kept token: the others of its colour take its output"))
        if ROLE_KEPT in roles:
            handles.append(Line2D([], [], marker="s", ls="", markerfacecolor="white", markeredgecolor="black",
                                  markersize=5, label=ROLE_NAMES[ROLE_KEPT]))
        if ROLE_MERGED in roles:
            handles.append(Patch(facecolor="tab:orange", alpha=0.7,
                                 label="merged: averaged into the destination of the same colour"))
        if ROLE_PRUNED in roles:
            handles.append(Line2D([], [], marker="x", ls="", color="black",
                                  label="pruned: dropped, copies the output of the kept token of its colour"))
    if "kv" in kinds:
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="black",
                              label="key/value anchor (largest weight in its key/value token)"))
        handles.append(Line2D([], [], color="black", lw=0.8, label="key/value grid: each cell -> one key/value"))
    if "identity" in kinds:
        handles.append(Patch(facecolor="none", edgecolor="none", label="none: every token attends, nothing merged"))
    return handles


def _draw_kernel(ax: Any, tmap: TokenMap, comp: TokenCompressor) -> None:
    from matplotlib.colors import TwoSlopeNorm

    found = tmap.cell_kernel()
    if found is None:
        ax.text(0.5, 0.5, "no key/value grid to show", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    kernel, (i, j), outside = found
    vmax = max(float(np.abs(kernel).max()), 1e-6)
    im = ax.imshow(kernel, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax))
    for (r, c), v in np.ndenumerate(kernel):
        ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=11,
                color="white" if abs(v) > 0.6 * vmax else "black")
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("weight")
    f = tmap.kv_factor
    ax.set_xticks(range(kernel.shape[1]))
    ax.set_yticks(range(kernel.shape[0]))
    ax.set_xlabel("column in the cell")
    ax.set_ylabel("row in the cell")
    note = f"sum {kernel.sum():.3f}" + (f", {outside:.3f} outside the cell" if outside > 1e-6 else "")
    alpha = getattr(comp, "alpha", None)
    if f == 2 and isinstance(alpha, float) and getattr(comp, "alpha_schedule", None) is None:
        note += f"\nalpha={alpha:g}: (1+3a)/4={(1 + 3 * alpha) / 4:.3f} bottom-right, (1-a)/4={(1 - alpha) / 4:.3f}"
    ax.set_title(f"Effective pooling kernel: key/value token ({i}, {j})\n{f}x{f} input tokens -> 1 key/value; "
                 f"{note}", fontsize=9)


def _summary_line(tmap: TokenMap) -> str:
    n = tmap.num_tokens
    return (f"{tmap.num_queries}/{n} tokens attend as queries, "
            f"{tmap.num_keys_values}/{n} keys/values")


def plot_method(tmap: TokenMap, comp: TokenCompressor, image: np.ndarray, path: str | Path, *, title: str) -> Path:
    """One method's figure: the map over the image, plus the cluster sizes (merge/prune) or the
    effective pooling kernel (key/value methods)."""
    plt = pyplot()
    panels = 1 if tmap.kind == "identity" else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 6.2), squeeze=False)
    ax = axes[0][0]
    _draw_overlay(ax, tmap, comp, image)
    ax.set_title(f"{tmap.label}\n{_summary_line(tmap)}", fontsize=10)
    if tmap.kind == "merge":
        h, w = tmap.grid
        sizes = tmap.cluster_sizes().reshape(h, w)
        im = axes[0][1].imshow(sizes, cmap="viridis", extent=(0, w, h, 0), interpolation="nearest",
                               vmin=1, vmax=max(int(sizes.max()), 2))
        cb = fig.colorbar(im, ax=axes[0][1], fraction=0.046, pad=0.04)
        cb.set_label("tokens sharing this token's attention output")
        counts = tmap.role_counts()
        axes[0][1].set_title("Cluster size per token (1 = attends as itself)\n"
                             + ", ".join(f"{v} {k}" for k, v in counts.items() if v), fontsize=10)
        axes[0][1].set_xlabel("token column")
        axes[0][1].set_ylabel("token row")
    elif tmap.kind == "kv":
        _draw_kernel(axes[0][1], tmap, comp)
    roles = set(np.unique(tmap.role).tolist())
    fig.legend(handles=_legend_handles({tmap.kind}, roles), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return save_figure(fig, path, dpi=110)


def plot_comparison(maps: Sequence[tuple[MethodSpec, TokenCompressor, TokenMap]], image: np.ndarray,
                    path: str | Path, *, title: str) -> Path:
    """All methods' maps side by side, at the same layer, timestep and ratio."""
    plt = pyplot()
    n = len(maps)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 5.2 * rows + 1.2), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, (_, comp, tmap) in zip(axes.flat, maps):
        _draw_overlay(ax, tmap, comp, image, colorbar=tmap.kind == "kv")
        ax.set_title(f"{tmap.label}\n{_summary_line(tmap)}", fontsize=9)
    kinds = {m[2].kind for m in maps}
    roles = set(np.concatenate([m[2].role for m in maps]).tolist())
    fig.legend(handles=_legend_handles(kinds, roles), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=12)
    return save_figure(fig, path, dpi=100)
