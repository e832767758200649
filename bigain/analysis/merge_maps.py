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
The figures are drawn by :mod:`bigain.analysis.merge_map_figures`.
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

from bigain.analysis.probe import CapturedLayer, MethodSpec, Probe, capture_layer, default_layer
from bigain.compressor import LayerContext, TokenCompressor

__all__ = ["TokenMap", "token_map", "merge_maps", "write_merge_maps",
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


def write_merge_maps(probe: Probe, methods: Sequence[MethodSpec], out_dir: str | Path, *,
                     layer: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write ``merge_maps/<method>.png`` per method, ``merge_maps/grid.png`` and ``merge_maps/summary.csv``.

    Returns:
        ``{"files": [paths], "summary": DataFrame, "layer": LayerInfo}``.
    """
    from bigain.analysis.merge_map_figures import plot_comparison, plot_method

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
