"""Merge maps: which tokens a compressor keeps at one layer, and where the others go.

The map is derived from the compressor's own output, without modifying it. For the layer input ``x``
and context captured in a real forward (:func:`bigain.analysis.probe.capture_layer`):

* ``compress(x, ctx)`` gives the real ``(queries, context, restore)``; pushing a one-hot identity
  ``[1, Nq, Nq]`` through ``restore`` tells, for every input token, which query row its output is
  copied from (its *cluster*);
* ``compress(E, ctx)`` with ``E`` the one-hot identity over the ``N`` input tokens (as channels; the
  matching still uses ``ctx.metric``, so it is the same matching) gives the weight of every input
  token in every query and every key/value token. The member of a cluster with the largest weight is
  its *representative* (the destination of a merge, the kept token of a prune; ties between the
  equal weights of a plain mean go to the cell destination of a cell-based merge, then to the lowest
  index). A member with zero weight was *pruned* (dropped, copies the output); a member with
  positive weight was *merged* (averaged in).

Key/value methods keep every query; their key/value weights give the effective pooling kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from bigain.analysis._mpl import pyplot
from bigain.analysis.probe import CapturedLayer, MethodSpec, Probe, capture_layer, default_layer
from bigain.compressor import LayerContext, TokenCompressor

__all__ = ["TokenMap", "token_map", "merge_maps", "plot_method", "plot_comparison", "write_merge_maps",
           "ROLE_KEPT", "ROLE_DESTINATION", "ROLE_MERGED", "ROLE_PRUNED", "ROLE_NAMES"]

ROLE_KEPT, ROLE_DESTINATION, ROLE_MERGED, ROLE_PRUNED = 0, 1, 2, 3
ROLE_NAMES = {ROLE_KEPT: "kept (attends as itself)", ROLE_DESTINATION: "destination (absorbs others)",
              ROLE_MERGED: "merged (averaged into its destination)",
              ROLE_PRUNED: "pruned (dropped; copies a kept token's output)"}


@dataclass(frozen=True)
class TokenMap:
    """What one compressor does to the ``N`` tokens of one attention call (sample 0).

    Attributes:
        label: the method's display label.
        kind: ``"identity"``, ``"merge"`` (fewer queries: merge or prune) or ``"kv"`` (every query
            kept, fewer keys/values).
        grid: token grid ``(h, w)``.
        num_queries: query rows the attention computes.
        num_keys_values: key/value tokens.
        assignment: ``[N]`` the query row each token's output is taken from.
        representative: ``[Nq]`` the input token standing for each query row (-1 if none reads it).
        role: ``[N]`` one of the ``ROLE_*`` codes.
        kv_weights: ``[Nk, N]`` weight of each input token in each key/value token (None if kept).
        kv_grid: the key/value token grid, when it is a grid; ``kv_factor`` its factor per axis.
    """

    label: str
    kind: str
    grid: tuple[int, int]
    num_queries: int
    num_keys_values: int
    assignment: np.ndarray
    representative: np.ndarray
    role: np.ndarray
    kv_weights: np.ndarray | None = None
    kv_grid: tuple[int, int] | None = None
    kv_factor: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_kept(self) -> int:
        """Tokens that are their own representative: the query rows that attend."""
        return int(np.isin(self.role, (ROLE_KEPT, ROLE_DESTINATION)).sum())

    @property
    def kv_anchor(self) -> np.ndarray | None:
        """``[Nk]`` the input token with the largest absolute weight in each key/value token."""
        return None if self.kv_weights is None else np.abs(self.kv_weights).argmax(axis=1)

    def cluster_sizes(self) -> np.ndarray:
        """``[N]`` how many tokens share each token's attention output (1: it attends as itself)."""
        counts = np.bincount(self.assignment, minlength=self.num_queries)
        return counts[self.assignment]

    def role_counts(self) -> dict[str, int]:
        return {name: int((self.role == code).sum()) for code, name in
                ((ROLE_KEPT, "kept"), (ROLE_DESTINATION, "destinations"), (ROLE_MERGED, "merged"),
                 (ROLE_PRUNED, "pruned"))}

    def cell_kernel(self, kv_index: int | None = None) -> tuple[np.ndarray, tuple[int, int], float] | None:
        """The ``f x f`` input weights of one key/value token (default: the one at the grid centre),
        its position on the key/value grid, and the absolute weight it puts outside its cell."""
        if self.kv_weights is None or self.kv_grid is None or not self.kv_factor:
            return None
        hk, wk = self.kv_grid
        f = self.kv_factor
        k = (hk // 2) * wk + wk // 2 if kv_index is None else kv_index
        i, j = divmod(k, wk)
        full = self.kv_weights[k].reshape(self.grid)
        kernel = full[i * f:(i + 1) * f, j * f:(j + 1) * f]
        outside = float(np.abs(full).sum() - np.abs(kernel).sum())
        return kernel, (i, j), outside


def _one_hot(n: int, start: int, k: int, device: torch.device) -> Tensor:
    e = torch.zeros(1, n, k, device=device)
    e[0, torch.arange(start, start + k, device=device), torch.arange(k, device=device)] = 1.0
    return e


def _linear_weights(comp: TokenCompressor, n: int, ctx: LayerContext, chunk: int,
                    device: torch.device) -> tuple[np.ndarray, np.ndarray] | None:
    """``([Nq, N], [Nk, N])``: weight of every input token in every query and key/value token."""
    qs, ks = [], []
    try:
        for start in range(0, n, chunk):
            out = comp.compress(_one_hot(n, start, min(chunk, n - start), device), ctx)
            qs.append(out.queries[0].float().cpu())
            ks.append(out.context[0].float().cpu())
    except Exception:  # a third-party compressor that does not act linearly on its input: fall back
        return None
    return torch.cat(qs, 1).numpy(), torch.cat(ks, 1).numpy()


def _assignment(restore: Any, nq: int, n: int, chunk: int, device: torch.device) -> np.ndarray:
    best = torch.full((n,), -float("inf"))
    idx = torch.zeros(n, dtype=torch.long)
    for start in range(0, nq, chunk):
        k = min(chunk, nq - start)
        r = restore(_one_hot(nq, start, k, device))[0].float().cpu()  # [N, k]
        value, which = r.max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        idx = torch.where(better, which + start, idx)
    return idx.numpy()


def _cell_destinations(comp: TokenCompressor, x: Tensor, ctx: LayerContext) -> np.ndarray | None:
    from bigain.plugins._tokens import cell_counts, dst_mask
    from bigain.plugins.tome import CellMerge

    if not isinstance(comp, CellMerge):
        return None
    cells = cell_counts(ctx.grid, comp.sx, comp.sy)
    choice = comp.choose_destinations(x, ctx, cells)
    return dst_mask(choice, ctx.grid, comp.sx, comp.sy)[0].cpu().numpy()


def _kv_factor(comp: TokenCompressor, grid: tuple[int, int], nk: int) -> int | None:
    h, w = grid
    candidates = [getattr(comp, "factor", None)] + list(range(2, max(h, w) + 1))
    for f in candidates:
        if isinstance(f, int) and f >= 1 and (h // f) * (w // f) == nk:
            return f
    return None


def token_map(comp: TokenCompressor, x: Tensor, ctx: LayerContext, *, label: str | None = None,
              chunk: int = 2048) -> TokenMap:
    """Derive the :class:`TokenMap` of ``comp`` on the layer input ``x`` (sample 0 of the batch).

    Args:
        comp: the compressor; it is only called, never modified.
        x: ``[B, N, C]`` attention input captured at the layer.
        ctx: the :class:`LayerContext` captured with it.
        label: display label (default: the compressor's repr).
        chunk: one-hot columns per call (bounds memory on large grids).
    """
    device = x.device
    x = x[:1].float()
    ctx = replace(ctx, metric=ctx.metric[:1].float(), timesteps=ctx.timesteps[:1])
    n = x.shape[1]
    label = label or repr(comp)
    out = comp.compress(x, ctx)
    arange = np.arange(n)
    if out.is_identity:
        return TokenMap(label, "identity", ctx.grid, n, n, arange, arange.copy(), np.full(n, ROLE_KEPT))
    nq, nk = out.queries.shape[1], out.context.shape[1]
    assignment = _assignment(out.restore, nq, n, chunk, device)
    weights = _linear_weights(comp, n, ctx, chunk, device)
    if weights is not None and (weights[0].shape[0] != nq or weights[1].shape[0] != nk):
        weights = None
    qw = weights[0][assignment, arange] if weights is not None else np.ones(n)
    dst = _cell_destinations(comp, x, ctx)
    is_dst = dst.astype(np.int64) if dst is not None else np.zeros(n, dtype=np.int64)
    # per cluster: the largest weight first, then a cell destination, then the lowest index
    order = np.lexsort((arange, -is_dst, -np.round(qw, 6), assignment))
    first = np.ones(n, dtype=bool)
    first[1:] = assignment[order][1:] != assignment[order][:-1]
    representative = np.full(nq, -1, dtype=np.int64)
    representative[assignment[order][first]] = order[first]
    sizes = np.bincount(assignment, minlength=nq)[assignment]
    is_rep = representative[assignment] == arange
    role = np.where(is_rep, np.where(sizes > 1, ROLE_DESTINATION, ROLE_KEPT),
                    np.where(qw > 1e-6, ROLE_MERGED, ROLE_PRUNED))
    kind = "merge" if nq < n else ("kv" if nk != n else "identity")
    kv_weights = kv_grid = kv_factor = None
    if nk != n and weights is not None:
        kv_weights = weights[1]
        kv_factor = _kv_factor(comp, ctx.grid, nk)
        if kv_factor:
            kv_grid = (ctx.grid[0] // kv_factor, ctx.grid[1] // kv_factor)
    return TokenMap(label, kind, ctx.grid, nq, nk, assignment, representative, role, kv_weights, kv_grid,
                    kv_factor)


def _identity() -> TokenCompressor:
    from bigain.registry import create_compressor

    return create_compressor("none")


def merge_maps(probe: Probe, methods: Sequence[MethodSpec], *, layer: int | None = None,
               seed: int = 0) -> tuple[CapturedLayer, list[tuple[MethodSpec, TokenCompressor, TokenMap]]]:
    """Capture layer ``layer`` (default: the first the default application compresses) in the probe's
    forward and derive every method's :class:`TokenMap` on it."""
    captured = capture_layer(probe, default_layer(probe) if layer is None else layer, seed=seed)
    out = []
    for spec in methods:
        comp = spec.build()
        if not comp.applies_to(captured.ctx):
            tmap = token_map(_identity(), captured.x, captured.ctx, label=spec.label + " (does not apply here)")
        else:
            tmap = token_map(comp, captured.x, captured.ctx, label=spec.label)
        out.append((spec, comp, tmap))
    return captured, out


# -- drawing -----------------------------------------------------------------------------------

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
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_merge_maps(probe: Probe, methods: Sequence[MethodSpec], out_dir: str | Path, *,
                     layer: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write ``merge_maps/<method>.png`` per method, ``merge_maps/grid.png`` and ``merge_maps/summary.csv``.

    Returns:
        ``{"files": [paths], "summary": DataFrame, "layer": LayerInfo}``.
    """
    out = Path(out_dir) / "merge_maps"
    out.mkdir(parents=True, exist_ok=True)
    captured, maps = merge_maps(probe, methods, layer=layer, seed=seed)
    info = captured.layer
    where = (f"layer {info.index} ({info.name}), token grid {info.grid[0]}x{info.grid[1]}, "
             f"timestep {probe.timestep}")
    files, rows = [], []
    for spec, comp, tmap in maps:
        path = plot_method(tmap, comp, probe.image, out / f"{spec.slug}.png",
                           title=f"Merge map of {spec.label}: {where}\n{probe.description}")
        files.append(path)
        anchors = tmap.kv_anchor
        rows.append({"method": spec.name, "label": spec.label, "kind": tmap.kind, "layer": info.index,
                     "layer_name": info.name, "timestep": probe.timestep, "tokens": tmap.num_tokens,
                     "queries": tmap.num_queries, "keys_values": tmap.num_keys_values,
                     "kept_tokens": tmap.num_kept, **tmap.role_counts(),
                     "kv_anchors": int(len(np.unique(anchors))) if anchors is not None else tmap.num_keys_values,
                     "figure": path.name})
    grid_path = plot_comparison(maps, probe.image, out / "grid.png",
                                title=f"Merge maps compared: {where}\n{probe.description}")
    files.append(grid_path)
    summary = pd.DataFrame(rows)
    summary.to_csv(out / "summary.csv", index=False)
    return {"files": files, "summary": summary, "layer": info}
