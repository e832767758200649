"""Frequency retention: how much of each spatial frequency band of a layer's attention output survives
compression.

For every layer and method, the attention output (``attn1``'s output, ``[B, N, C]``) of the
uncompressed forward ``u`` and of the compressed forward ``c`` is laid out on the token grid
``[C, h, w]`` and transformed with an orthonormal 2D FFT over the grid. Each frequency bin gets a
*normalised radial frequency*

    r = sqrt(fy**2 + fx**2) / 0.5

with ``fy``, ``fx`` in cycles per token (``numpy.fft.fftfreq``: ``[-0.5, 0.5)``), so ``r = 1`` is the
Nyquist frequency along one axis and the checkerboard sits at ``r = sqrt(2)``; non-square grids
use each axis's own frequencies. The bands (:data:`BAND_EDGES`):

* ``low``:  ``0 <= r < 1/4`` (includes the mean, ``r = 0``),
* ``mid``:  ``1/4 <= r < 1/2``,
* ``high``: ``r >= 1/2``.

Per band, summed over channels: ``retained = E_band(c) / E_band(u)`` (above 1 means energy was
added, for instance blocky copies) and ``relative_error = ||F_c - F_u||^2_band / ||F_u||^2_band``.

``mode="isolated"`` (default) compresses one layer at a time, so the layer's input is exactly the
uncompressed one and the numbers are that layer's own doing; ``mode="joint"`` compresses all the
given layers in one forward, so errors of earlier layers carry into later ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from bigain.analysis.probe import LayerInfo, MethodSpec, OnlyLayers, Probe, all_layers_options, list_layers
from bigain.errors import ConfigError
from bigain.patching import apply, find_denoiser
from bigain.plots import pyplot, save_figure

__all__ = ["BANDS", "BAND_EDGES", "radial_frequency", "band_masks", "band_energies", "band_errors",
           "frequency_retention", "spectrum_table", "spectrum_markdown", "plot_spectrum", "plot_spectrum_layers",
           "write_spectrum"]

BANDS: tuple[str, ...] = ("low", "mid", "high")
#: Edges between low/mid and mid/high, in normalised radial frequency (1 = Nyquist along one axis).
BAND_EDGES: tuple[float, float] = (0.25, 0.5)


def radial_frequency(h: int, w: int) -> Tensor:
    """``[h, w]`` normalised radial frequency of each bin of an ``h x w`` FFT (see the module docstring)."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(h, 1)
    fx = torch.fft.fftfreq(w, dtype=torch.float64).view(1, w)
    return torch.sqrt(fy**2 + fx**2) / 0.5


def band_masks(h: int, w: int, *, edges: tuple[float, float] = BAND_EDGES) -> dict[str, Tensor]:
    """Boolean ``[h, w]`` mask of each band's FFT bins; the three masks partition the spectrum."""
    lo, hi = edges
    if not 0 < lo < hi:
        raise ConfigError(f"band edges must satisfy 0 < low/mid < mid/high, got {edges}")
    r = radial_frequency(h, w)
    return {"low": r < lo, "mid": (r >= lo) & (r < hi), "high": r >= hi}


def band_energies(grid: Tensor, *, edges: tuple[float, float] = BAND_EDGES) -> dict[str, float]:
    """Spectral energy per band of ``grid`` (``[..., h, w]``; leading dimensions are summed).

    The FFT is orthonormal, so the three energies add up to ``(grid ** 2).sum()`` (Parseval).
    """
    grid = torch.as_tensor(grid)
    if grid.ndim < 2:
        raise ConfigError(f"band_energies needs a [..., h, w] grid, got shape {tuple(grid.shape)}")
    h, w = grid.shape[-2:]
    power = torch.fft.fft2(grid.detach().to(torch.float64).cpu(), norm="ortho").abs().pow(2)
    power = power.reshape(-1, h, w).sum(dim=0)
    return {band: float(power[mask].sum()) for band, mask in band_masks(h, w, edges=edges).items()}


def band_errors(compressed: Tensor, uncompressed: Tensor, *,
                edges: tuple[float, float] = BAND_EDGES) -> dict[str, float]:
    """``||F_c - F_u||^2_band / ||F_u||^2_band`` per band (the FFT is linear: the error's own band energy)."""
    err = band_energies(torch.as_tensor(compressed).double() - torch.as_tensor(uncompressed).double(), edges=edges)
    ref = band_energies(uncompressed, edges=edges)
    return {b: err[b] / ref[b] if ref[b] > 0 else float("nan") for b in BANDS}


# -- measuring ---------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a hook once the layer of interest has run (the rest of the forward is not needed)."""


def _capture(probe: Probe, names: dict[int, str], *, stop_after: int | None = None) -> dict[int, Tensor]:
    denoiser = find_denoiser(probe.model)[0]
    modules = dict(denoiser.named_modules())
    outputs: dict[int, Tensor] = {}
    hooks = []
    for index, name in names.items():
        def hook(module: Any, args: Any, output: Any, _i: int = index) -> None:
            out = output[0] if isinstance(output, tuple) else output
            outputs.setdefault(_i, out[:1].detach().float().cpu())
            if stop_after is not None and _i == stop_after:
                raise _Stop
        hooks.append(modules[name].register_forward_hook(hook))
    try:
        probe.forward()
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return outputs


def _on_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[1, N, C]`` -> ``[C, h, w]``."""
    return tokens[0].transpose(0, 1).reshape(-1, *grid)


def frequency_retention(probe: Probe, methods: Sequence[MethodSpec], *, layers: Sequence[int] | None = None,
                        mode: Literal["isolated", "joint"] = "isolated", seed: int = 0,
                        edges: tuple[float, float] = BAND_EDGES) -> pd.DataFrame:
    """Band energies of every layer's attention output with and without each method.

    Args:
        probe: the forward to measure.
        methods: the methods (``none`` gives retained 1 and error 0: a sanity row).
        layers: layer indices (default: every compressible layer).
        mode: ``"isolated"`` (one layer compressed at a time) or ``"joint"`` (all ``layers`` at once).
        seed: the compressors' seed.
        edges: band edges (:data:`BAND_EDGES`).

    Returns:
        One row per (method, layer, band): ``method, label, hyperparameters, layer, layer_name, grid,
        band, r_from, r_to, energy_uncompressed, energy_compressed, retained, relative_error,
        compressed, mode, timestep``.
    """
    if mode not in ("isolated", "joint"):
        raise ConfigError(f"mode must be 'isolated' or 'joint', got {mode!r}")
    infos = list_layers(probe, seed=seed)
    chosen = list(range(len(infos))) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < len(infos)]
    if bad or not chosen:
        raise ConfigError(f"layers {bad or chosen} do not exist: this denoiser has {len(infos)} compressible "
                          f"self-attention layers, give indices between 0 and {len(infos) - 1}")
    chosen = [i for i in chosen if infos[i].grid is not None]
    names = {i: infos[i].name for i in chosen}
    reference = _capture(probe, names)
    family_options = all_layers_options(probe.family)
    ranges = {"low": (0.0, edges[0]), "mid": edges, "high": (edges[1], float("inf"))}
    rows = []
    for spec in methods:
        comp = spec.build()
        outputs: dict[int, Tensor] = {}
        compressed: dict[int, bool] = {}
        groups = [[i] for i in chosen] if mode == "isolated" else [chosen]
        for group in groups:
            with apply(probe.model, OnlyLayers(inner=comp, layers=tuple(group)), seed=seed, **family_options) as h:
                got = _capture(probe, {i: names[i] for i in group}, stop_after=group[0] if mode == "isolated" else None)
                stats = h.stats()
            outputs.update(got)
            compressed.update({i: stats[i]["compressed_calls"] > 0 for i in group})
        for i in chosen:
            info: LayerInfo = infos[i]
            u = _on_grid(reference[i], info.grid)
            c = _on_grid(outputs[i], info.grid)
            eu, ec = band_energies(u, edges=edges), band_energies(c, edges=edges)
            err = band_energies(c.double() - u.double(), edges=edges)
            for band in BANDS:
                rows.append({
                    "method": spec.name, "label": spec.label,
                    "hyperparameters": json.dumps(spec.options, sort_keys=True),
                    "layer": i, "layer_name": info.name, "grid": f"{info.grid[0]}x{info.grid[1]}",
                    "band": band, "r_from": ranges[band][0], "r_to": ranges[band][1],
                    "energy_uncompressed": eu[band], "energy_compressed": ec[band],
                    "retained": ec[band] / eu[band] if eu[band] > 0 else float("nan"),
                    "relative_error": err[band] / eu[band] if eu[band] > 0 else float("nan"),
                    "compressed": compressed[i], "mode": mode, "timestep": probe.timestep,
                })
    return pd.DataFrame(rows)


# -- tables and plots --------------------------------------------------------------------------

def spectrum_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: mean over layers of ``retained`` and ``relative_error`` per band."""
    order = list(dict.fromkeys(df["label"]))
    mean = df.groupby(["label", "band"], sort=False)[["retained", "relative_error"]].mean()
    out = []
    for label in order:
        row: dict[str, Any] = {"method": label, "layers": int(df[df["label"] == label]["layer"].nunique())}
        for band in BANDS:
            row[f"{band} retained"] = mean.loc[(label, band), "retained"]
        for band in BANDS:
            row[f"{band} rel. error"] = mean.loc[(label, band), "relative_error"]
        out.append(row)
    return pd.DataFrame(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def spectrum_markdown(df: pd.DataFrame, *, title: str | None = "Frequency retention") -> str:
    """A markdown table of :func:`spectrum_table` (for ``bigain report`` and the docs), with the band
    definitions under it."""
    if df.empty:
        return "_no spectrum measured_\n"
    table = spectrum_table(df)
    cols = list(table.columns)
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |" for _, r in table.iterrows()]
    first = df.iloc[0]
    lo, hi = float(df[df["band"] == "mid"]["r_from"].iloc[0]), float(df[df["band"] == "mid"]["r_to"].iloc[0])
    lines += ["", f"Mean over layers of the attention output's band energy, {first['mode']} compression, "
                  f"timestep {first['timestep']}. Bands in normalised radial frequency r (1 = Nyquist along one "
                  f"axis): low r < {lo:g}, mid {lo:g} <= r < {hi:g}, high r >= {hi:g}. "
                  "`retained` = E_band(compressed) / E_band(uncompressed) (1 is ideal; above 1 means energy was "
                  "added); `rel. error` = ||F_c - F_u||^2 / ||F_u||^2 in the band (0 is ideal).", ""]
    return "\n".join(lines)


def _band_note(df: pd.DataFrame) -> str:
    lo, hi = float(df[df["band"] == "mid"]["r_from"].iloc[0]), float(df[df["band"] == "mid"]["r_to"].iloc[0])
    return f"bands in normalised radial frequency r (1 = Nyquist): low r<{lo:g}, mid {lo:g}<=r<{hi:g}, high r>={hi:g}"


def plot_spectrum(df: pd.DataFrame, path: str | Path, *, title: str) -> Path:
    """Grouped bars per band and method: energy retained and relative error (mean over layers; the
    whiskers span the layers' minimum to maximum)."""
    plt = pyplot()
    labels = list(dict.fromkeys(df["label"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), layout="constrained")
    width = 0.8 / max(len(labels), 1)
    x = np.arange(len(BANDS))
    colours = plt.get_cmap("tab10")(np.arange(len(labels)) % 10)
    for ax, column, ylabel in ((axes[0], "retained", "E_band(compressed) / E_band(uncompressed)"),
                               (axes[1], "relative_error", "||F_c - F_u||^2 / ||F_u||^2 in the band")):
        for k, label in enumerate(labels):
            part = df[df["label"] == label].groupby("band")[column]
            mean = part.mean().reindex(BANDS).to_numpy()
            lo = mean - part.min().reindex(BANDS).to_numpy()
            hi = part.max().reindex(BANDS).to_numpy() - mean
            ax.bar(x + (k - (len(labels) - 1) / 2) * width, mean, width, yerr=np.stack([lo, hi]), capsize=2,
                   color=colours[k], label=label, error_kw={"lw": 0.8})
        ax.set_xticks(x)
        ax.set_xticklabels([f"{b} band" for b in BANDS])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="black", lw=0.8, ls="--", label="uncompressed (ideal)")
    axes[0].set_title("Energy retained per band (1 = all kept; >1 = energy added)")
    axes[1].set_title("Relative error per band (0 = identical to uncompressed)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{_band_note(df)}; bars: mean over layers, whiskers: min-max", fontsize=10)
    return save_figure(fig, path, dpi=110)


def plot_spectrum_layers(df: pd.DataFrame, path: str | Path, *, title: str) -> Path:
    """Relative error per layer, one panel per band, one line per method."""
    plt = pyplot()
    labels = list(dict.fromkeys(df["label"]))
    fig, axes = plt.subplots(1, len(BANDS), figsize=(5 * len(BANDS), 5), layout="constrained")
    for ax, band in zip(axes, BANDS):
        for label in labels:
            part = df[(df["label"] == label) & (df["band"] == band)].sort_values("layer")
            ax.plot(part["layer"], part["relative_error"], marker="o", label=label)
        ax.set_title(f"{band} band")
        ax.set_xlabel("layer index")
        ax.set_ylabel("relative error ||F_c - F_u||^2 / ||F_u||^2")
        ax.set_xticks(sorted(df["layer"].unique()))
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{_band_note(df)}", fontsize=10)
    return save_figure(fig, path, dpi=110)


def write_spectrum(probe: Probe, methods: Sequence[MethodSpec], out_dir: str | Path, *,
                   layers: Sequence[int] | None = None, mode: Literal["isolated", "joint"] = "isolated",
                   seed: int = 0) -> dict[str, Any]:
    """Write ``spectrum.csv`` (long format), ``spectrum.md``, ``spectrum.png`` and ``spectrum_layers.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = frequency_retention(probe, methods, layers=layers, mode=mode, seed=seed)
    df.to_csv(out / "spectrum.csv", index=False)
    markdown = spectrum_markdown(df)
    (out / "spectrum.md").write_text(markdown)
    title = f"Frequency retention of the attention output ({mode} compression): {probe.description}"
    files = [out / "spectrum.csv", out / "spectrum.md", plot_spectrum(df, out / "spectrum.png", title=title),
             plot_spectrum_layers(df, out / "spectrum_layers.png", title=title)]
    return {"files": files, "frame": df, "markdown": markdown}
