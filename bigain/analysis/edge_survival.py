"""Edge survival: how many of a layer's highest-Laplacian tokens a merging / pruning method keeps.

For one layer's input (captured in a real forward, :func:`bigain.analysis.probe.capture_layer`) the
*edge tokens* are the top ``q`` fraction (``ceil(q * N)`` tokens, at least one; ties to the lower
index) of the Laplacian score exactly as ``bigain_tm`` computes it
(:func:`bigain.plugins.bigain_tm.laplacian_scores`: the 4-neighbour Laplacian of the metric tokens
on their grid, zero padding, L1 over channels). A token *survives* compression when its
:class:`~bigain.analysis.merge_maps.TokenMap` role says it still attends as itself: a kept token
(an unmerged source, a token SiTo keeps) or a destination (which absorbs others). It does not
survive when it is merged into a destination or pruned. The *survival share* is the fraction of
edge tokens that survive; ``none`` gives 1. Key/value methods (``todo``, ``bigain_td``) keep every
query, so the measure does not apply to them and they are left out.

For reference, ``all_kept`` is the share of *all* tokens that survive (``1 - int(N * ratio) / N``
for the merge and prune methods): a survival share above it means the method keeps edge tokens
more often than tokens in general.

``bigain visualize --what edges`` writes the table (``OUT/edge_survival.csv``, ``.md``) and a line
plot (``OUT/edge_survival.png``), per method and timestep, averaged over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from bigain.analysis.merge_maps import ROLE_DESTINATION, ROLE_KEPT, TokenMap, token_map
from bigain.analysis.probe import MethodSpec, capture_layer, default_layer, probe_backbone
from bigain.errors import ConfigError
from bigain.plots import pyplot, save_figure

__all__ = ["EDGE_METHODS", "num_edge_tokens", "edge_tokens", "survives", "survival_share", "edge_survival",
           "edge_survival_table", "edge_survival_markdown", "plot_edge_survival", "write_edge_survival"]

#: The methods the diagnostic compares by default: the merge and prune methods, both bigain_tm groupings.
EDGE_METHODS: tuple[str, ...] = ("none", "tome", "bigain_tm", "bigain_tm:legacy_grouping=true", "sito")


def num_edge_tokens(n: int, q: float) -> int:
    """``ceil(q * n)`` (at least 1): how many tokens the top ``q`` fraction holds."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise ConfigError(f"the edge fraction q must be a number in (0, 1] (e.g. 0.1 for the top 10% of "
                          f"Laplacian scores), got {q!r}")
    return max(1, math.ceil(q * n - 1e-9))


def edge_tokens(metric: Tensor, grid: tuple[int, int], q: float) -> np.ndarray:
    """Indices of the top ``q`` fraction of tokens by ``bigain_tm``'s Laplacian score (sample 0 of
    ``metric`` ``[B, N, C]``), highest first; ties go to the lower index."""
    from bigain.plugins.bigain_tm import laplacian_scores

    scores = laplacian_scores(metric[:1], grid)[0].flatten().double().cpu().numpy()
    k = num_edge_tokens(scores.size, q)
    order = np.lexsort((np.arange(scores.size), -scores))
    return order[:k]


def survives(tmap: TokenMap) -> np.ndarray:
    """``[N]`` bool: the token still attends as itself (kept or a destination)."""
    return np.isin(tmap.role, (ROLE_KEPT, ROLE_DESTINATION))


def survival_share(tmap: TokenMap, edges: np.ndarray) -> float:
    """The share of the tokens ``edges`` that survive in ``tmap``."""
    if len(edges) == 0:
        raise ConfigError("no edge tokens to count; give a q in (0, 1]")
    return float(survives(tmap)[edges].mean())


def edge_survival(backbone: Any, images: Sequence[tuple[Tensor, int, str, str]], methods: Sequence[MethodSpec], *,
                  timesteps: Sequence[int], q: float = 0.1, layer: int | None = None,
                  seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Survival share per image, timestep and method.

    Args:
        backbone: the model (see :func:`bigain.analysis.probe.load_backbone`).
        images: ``(image [3, H, W] in [-1, 1], label, prompt, name)`` per image.
        methods: the methods; key/value methods are left out (named in the second return value).
        timesteps: diffusion timesteps to probe at.
        q: the edge fraction.
        layer: layer index (default: the first layer the default application compresses).
        seed: seed of the noise and of the compressors.

    Returns:
        ``(frame, skipped)``: one row per (method, timestep, image) with ``share``, ``edge_tokens``,
        ``surviving`` and ``all_kept``; the labels of the methods left out, with the reason.
    """
    if not images:
        raise ConfigError("give at least one image (--num_images N >= 1)")
    if not timesteps:
        raise ConfigError("give at least one timestep (--timesteps T [T ...])")
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for image, label, prompt, name in images:
        for t in timesteps:
            probe = probe_backbone(backbone, image, timestep=int(t), label=label, prompt=prompt, seed=seed)
            index = default_layer(probe) if layer is None else layer
            captured = capture_layer(probe, index, seed=seed)
            edges = edge_tokens(captured.ctx.metric, captured.ctx.grid, q)
            for spec in methods:
                comp = spec.build()
                applies = comp.applies_to(captured.ctx)
                if applies:
                    tmap = token_map(comp, captured.x, captured.ctx, label=spec.label)
                else:
                    from bigain.registry import create_compressor

                    tmap = token_map(create_compressor("none"), captured.x, captured.ctx, label=spec.label)
                if tmap.kind == "kv":
                    skipped[spec.label] = "a key/value method: it keeps every query token"
                    continue
                alive = survives(tmap)
                rows.append({"method": spec.name, "label": spec.label, "timestep": int(t), "image": name,
                             "layer": captured.layer.index, "layer_name": captured.layer.name,
                             "tokens": tmap.num_tokens, "q": float(q), "edge_tokens": len(edges),
                             "surviving": int(alive[edges].sum()), "share": float(alive[edges].mean()),
                             "all_kept": float(alive.mean()), "applies": applies})
    return pd.DataFrame(rows), [f"{k} ({v})" for k, v in skipped.items()]


def edge_survival_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (and standard deviation over images) of the survival share per method and timestep."""
    if df.empty:
        return pd.DataFrame(columns=["label", "timestep", "images", "share", "share_std", "all_kept"])
    labels = list(dict.fromkeys(df["label"]))
    out = (df.groupby(["label", "timestep"], sort=False)
           .agg(method=("method", "first"), images=("image", "nunique"), share=("share", "mean"),
                share_std=("share", "std"), all_kept=("all_kept", "mean"), edge_tokens=("edge_tokens", "first"),
                tokens=("tokens", "first"), layer=("layer", "first"))
           .reset_index())
    out["share_std"] = out["share_std"].fillna(0.0)
    out["label"] = pd.Categorical(out["label"], categories=labels, ordered=True)
    out = out.sort_values(["label", "timestep"]).reset_index(drop=True)
    out["label"] = out["label"].astype(str)
    return out


def edge_survival_markdown(table: pd.DataFrame) -> str:
    """The table as markdown: one row per method, one column per timestep (mean share over images),
    and the share of all tokens kept; the definition under it."""
    if table.empty:
        return "_no merge or prune method measured_\n"
    timesteps = sorted(table["timestep"].unique())
    labels = list(dict.fromkeys(table["label"]))
    cols = ["method"] + [f"t={t}" for t in timesteps] + ["all tokens kept"]
    lines = ["## Edge survival", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label in labels:
        part = table[table["label"] == label].set_index("timestep")
        cells = [f"{part.loc[t, 'share']:.3f}" if t in part.index else "" for t in timesteps]
        lines.append("| " + " | ".join([label.replace("|", "/"), *cells, f"{part['all_kept'].mean():.3f}"]) + " |")
    first = table.iloc[0]
    lines += ["", f"Share of the top {first['edge_tokens']} of {first['tokens']} tokens by bigain_tm's Laplacian "
                  f"score of layer {first['layer']}'s input that survive compression (stay kept tokens or "
                  f"destinations), mean over {int(table['images'].max())} image(s). `all tokens kept`: the share of "
                  "all tokens that survive (what edge tokens would get if survival ignored the Laplacian).", ""]
    return "\n".join(lines)


def plot_edge_survival(table: pd.DataFrame, path: str | Path, *, title: str) -> Path:
    """One line per method: survival share against timestep (whiskers: one standard deviation over
    images); dotted: the share of all tokens kept."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    colours = plt.get_cmap("tab10")
    for k, label in enumerate(dict.fromkeys(table["label"])):
        part = table[table["label"] == label].sort_values("timestep")
        ax.errorbar(part["timestep"], part["share"], yerr=part["share_std"], marker="o", capsize=3,
                    color=colours(k % 10), label=label)
    for value in sorted(table["all_kept"].round(6).unique()):
        if value < 1:
            ax.axhline(value, color="grey", ls=":", lw=1)
            ax.annotate(f"all tokens kept: {value:.3g}", (ax.get_xlim()[0], value), fontsize=7, color="grey",
                        va="bottom")
    ax.set_xlabel("diffusion timestep")
    ax.set_ylabel("share of top-Laplacian tokens surviving")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xticks(sorted(table["timestep"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


def write_edge_survival(backbone: Any, images: Sequence[tuple[Tensor, int, str, str]],
                        methods: Sequence[MethodSpec], out_dir: str | Path, *, timesteps: Sequence[int],
                        q: float = 0.1, layer: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write ``edge_survival.csv`` (the per-method, per-timestep table), ``edge_survival_images.csv``
    (one row per image), ``edge_survival.md`` and ``edge_survival.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame, skipped = edge_survival(backbone, images, methods, timesteps=timesteps, q=q, layer=layer, seed=seed)
    if frame.empty:
        raise ConfigError("edge survival needs a merge or prune method (none, tome, bigain_tm, sito); "
                          f"left out: {', '.join(skipped)}")
    table = edge_survival_table(frame)
    frame.to_csv(out / "edge_survival_images.csv", index=False)
    table.to_csv(out / "edge_survival.csv", index=False)
    markdown = edge_survival_markdown(table)
    (out / "edge_survival.md").write_text(markdown)
    first = table.iloc[0]
    title = (f"Edge survival at layer {first['layer']} ({frame['layer_name'].iloc[0]}): top {q:g} of tokens by "
             f"Laplacian ({first['edge_tokens']} of {first['tokens']}), {type(backbone).__name__}, "
             f"{int(table['images'].max())} image(s)")
    png = plot_edge_survival(table, out / "edge_survival.png", title=title)
    return {"files": [out / "edge_survival.csv", out / "edge_survival_images.csv", out / "edge_survival.md", png],
            "frame": frame, "table": table, "markdown": markdown, "skipped": skipped}
