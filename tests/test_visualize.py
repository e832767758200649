"""`bigain visualize`: band decomposition on known spectra, merge maps against measured token counts,
and the figures the command writes. Runs on a tiny DiT saved to disk (not the bundled toy model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import bigain
from bigain.analysis.merge_maps import ROLE_DESTINATION, ROLE_KEPT, ROLE_MERGED, ROLE_PRUNED, merge_maps, token_map
from bigain.analysis.probe import Probe, capture_layer, parse_methods, probe_backbone, toy_image
from bigain.analysis.samples import write_samples
from bigain.analysis.spectrum import BANDS, band_energies, band_errors, band_masks, spectrum_markdown
from bigain.cli import main
from bigain.errors import ConfigError, RunFolderError

METHODS = ["none", "tome", "bigain_tm", "sito", "todo", "bigain_td"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _wave(h: int, w: int, fy: float, fx: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.cos(2 * math.pi * (fy * ys + fx * xs))


def _fractions(grid: torch.Tensor) -> dict[str, float]:
    e = band_energies(grid)
    total = sum(e.values())
    assert total == pytest.approx(float((grid.double() ** 2).sum()), rel=1e-9)  # Parseval
    return {b: v / total for b, v in e.items()}


# -- band decomposition ----------------------------------------------------------------------------

def test_constant_and_very_low_frequency_grids_keep_their_energy_in_the_low_band():
    assert _fractions(torch.full((16, 16), 3.0))["low"] == pytest.approx(1.0, abs=1e-12)
    slow = _wave(16, 16, 0.0, 1 / 16) + 0.5 * _wave(16, 16, 1 / 16, 1 / 16)  # r = 0.125 and 0.177
    assert _fractions(slow)["low"] > 0.999999


def test_checkerboard_is_all_high_band():
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    board = ((ys + xs) % 2 * 2 - 1).float()
    f = _fractions(board)
    assert f["high"] > 0.999999 and f["low"] < 1e-9 and f["mid"] < 1e-9


def test_mid_frequency_cosine_lands_in_the_mid_band():
    f = _fractions(_wave(16, 16, 0.0, 3 / 16))  # r = 0.375
    assert f["mid"] > 0.999999
    f = _fractions(_wave(16, 16, 2 / 16, 2 / 16))  # r = 0.354
    assert f["mid"] > 0.999999


def test_non_square_grid_separates_the_bands_exactly():
    h, w = 12, 20
    grid = 2.0 + _wave(h, w, 0.0, 4 / 20) + _wave(h, w, 6 / 12, 0.0)  # constant, r = 0.4, Nyquist in y (r = 1)
    e = band_energies(grid)
    assert e["low"] == pytest.approx(4.0 * h * w, rel=1e-9)
    assert e["mid"] == pytest.approx(0.5 * h * w, rel=1e-9)
    assert e["high"] == pytest.approx(1.0 * h * w, rel=1e-9)
    masks = band_masks(h, w)
    assert (sum(m.long() for m in masks.values()) == 1).all()  # a partition of the spectrum
    stacked = torch.stack([grid, -grid, 2 * grid]).reshape(3, 1, h, w)  # leading dimensions are summed
    assert band_energies(stacked)["mid"] == pytest.approx(6 * e["mid"], rel=1e-9)


def test_band_errors_put_a_checkerboard_perturbation_in_the_high_band_only():
    u = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    board = ((ys + xs) % 2 * 2 - 1).double()
    err = band_errors(u + 0.1 * board, u)
    assert err["low"] < 1e-20 and err["mid"] < 1e-20
    assert err["high"] == pytest.approx(4 * 0.01 * 256 / band_energies(u)["high"], rel=1e-9)
    assert band_errors(u, u) == {b: 0.0 for b in BANDS}


# -- merge maps ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bigain.backbones import create_backbone
    from bigain.testing import save_tiny_dit

    path = save_tiny_dit(tmp_path_factory.mktemp("visualize") / "tiny-dit")
    image, label, _ = toy_image(3)
    probe = probe_backbone(create_backbone("dit", path=path), image, timestep=400, label=label, seed=0)
    return path, probe


@pytest.mark.parametrize("method", METHODS)
def test_merge_map_agrees_with_the_measured_token_counts(tiny, method):
    _, probe = tiny
    layer = 2
    (spec,) = parse_methods([method], ratio=0.5, factor=2)
    captured, [(_, _, tmap)] = merge_maps(probe, [spec], layer=layer)
    with bigain.apply(probe.model, spec.build(), blocks=[layer]) as handle:
        probe.forward()
        stats = handle.stats()[0]
    assert stats["layer"] == captured.layer.name == f"transformer_blocks.{layer}.attn1"
    n = tmap.num_tokens
    assert n == stats["tokens_in"] == 64
    assert tmap.num_kept == stats["queries"]  # tokens that are their own representative
    anchors = tmap.kv_anchor
    kv = len(np.unique(anchors)) if anchors is not None else tmap.num_keys_values
    assert kv == stats["keys_values"]
    assert (tmap.assignment[tmap.representative] == np.arange(tmap.num_queries)).all()
    if method in ("tome", "bigain_tm", "sito"):
        assert tmap.kind == "merge" and stats["queries"] == n - int(n * 0.5)
        removed = ROLE_PRUNED if method == "sito" else ROLE_MERGED
        assert (tmap.role == removed).sum() == int(n * 0.5)
    elif method in ("todo", "bigain_td"):
        assert tmap.kind == "kv" and stats["queries"] == n and stats["keys_values"] == n // 4
    else:
        assert tmap.kind == "identity" and (tmap.role == ROLE_KEPT).all()


@pytest.mark.parametrize("method", ["tome", "bigain_tm", "sito"])
def test_merge_map_reproduces_the_compressed_queries(tiny, method):
    _, probe = tiny
    captured = capture_layer(probe, 1)
    comp = parse_methods([method])[0].build()
    tmap = token_map(comp, captured.x, captured.ctx)
    x = captured.x[0].double()
    queries = comp.compress(captured.x[:1], captured.ctx).queries[0].double()
    for q in range(tmap.num_queries):
        members = np.flatnonzero(tmap.assignment == q)
        if method == "sito":  # kept tokens are gathered as they are
            expected = x[tmap.representative[q]]
        else:  # merged tokens are the plain mean of the cluster
            expected = x[members].mean(dim=0)
            if len(members) > 1:
                assert tmap.role[tmap.representative[q]] == ROLE_DESTINATION
        torch.testing.assert_close(queries[q], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("spec", "corner", "other"), [
    ("todo", 1.0, 0.0),
    ("bigain_td", (1 + 3 * 0.9) / 4, (1 - 0.9) / 4),
    ("bigain_td:alpha=1.5", (1 + 3 * 1.5) / 4, (1 - 1.5) / 4),
])
def test_key_value_kernel_is_the_documented_2x2_pooling(spec, corner, other):
    comp = parse_methods([spec], factor=2)[0].build()
    x = torch.randn(1, 60, 8, generator=torch.Generator().manual_seed(1))
    ctx = bigain.LayerContext.for_tokens(x, grid=(6, 10), timesteps=300.0)  # non-square grid
    tmap = token_map(comp, x, ctx)
    assert tmap.kv_grid == (3, 5) and tmap.num_keys_values == 15
    for k in (0, 7, 14):
        kernel, _, outside = tmap.cell_kernel(k)
        np.testing.assert_allclose(kernel, [[other, other], [other, corner]], atol=1e-6)
        assert outside < 1e-6


def test_layer_out_of_range_names_the_valid_range(tiny):
    _, probe = tiny
    with pytest.raises(ConfigError, match="between 0 and 3"):
        capture_layer(probe, 4)


def test_probe_for_a_bare_denoiser():
    from bigain.testing import tiny_dit

    model = tiny_dit()
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([250]),
              "class_labels": torch.tensor([3])}
    probe = Probe.for_denoiser(model, inputs)
    assert probe.timestep == 250 and probe.image.shape == (8, 8, 3)
    captured = capture_layer(probe, 0)
    assert captured.layer.grid == (4, 4) and captured.num_layers == 4
    assert captured.ctx.layer_index == 0 and float(captured.ctx.timesteps[0]) == 250.0


# -- the command -----------------------------------------------------------------------------------

def _fake_run(root, method, options, indices, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for i in indices:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i:06d}.png")
    meta = {"task": "generate", "status": "finished",
            "result_config": {"model": {"compressor": method, "compressor_options": options, "seed": 0}}}
    (root / "run.json").write_text(json.dumps(meta))
    return root


def test_command_writes_merge_maps_spectrum_and_samples(tiny, tmp_path):
    path, _ = tiny
    tome_run = _fake_run(tmp_path / "gen-tome", "tome", {"ratio": 0.5}, [0, 1, 2, 3], seed=1)
    none_run = _fake_run(tmp_path / "gen-none", "none", {}, [1, 2, 3, 5], seed=2)
    out = tmp_path / "vis"
    rc = main(["visualize", "--model_path", path, "--timestep", "300", "--index", "2", "--out", str(out),
               "--runs", str(tome_run), str(none_run), "--num_images", "1", "--timesteps", "300"])
    assert rc == 0
    names = ["none", "tome_ratio-0.5", "bigain_tm_ratio-0.5", "sito_ratio-0.5", "todo_factor-2", "bigain_td_factor-2"]
    figures = [out / "merge_maps" / f"{n}.png" for n in names + ["grid"]]
    figures += [out / "spectrum.png", out / "spectrum_layers.png", out / "samples.png", out / "edge_survival.png"]
    for fig in figures:
        assert fig.is_file(), fig
        assert fig.stat().st_size > 10_000, fig
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = pd.read_csv(out / "merge_maps" / "summary.csv")
    assert list(summary["method"]) == METHODS
    assert summary.set_index("method").loc["tome", "queries"] == 32
    df = pd.read_csv(out / "spectrum.csv")
    assert len(df) == len(METHODS) * 4 * len(BANDS)
    none = df[df["method"] == "none"]
    assert np.allclose(none["retained"], 1.0) and np.allclose(none["relative_error"], 0.0)
    assert (df[df["method"] == "tome"]["relative_error"] > 0).all()
    md = (out / "spectrum.md").read_text()
    assert md == spectrum_markdown(df) and "| none | 4 | 1 | 1 | 1 | 0 | 0 | 0 |" in md


def test_samples_put_the_uncompressed_run_first_on_shared_indices(tmp_path):
    tome_run = _fake_run(tmp_path / "a", "tome", {"ratio": 0.7}, [0, 1, 2, 3], seed=1)
    none_run = _fake_run(tmp_path / "b", "none", {}, [1, 2, 3, 5], seed=2)
    result = write_samples([tome_run, none_run], tmp_path / "out", max_images=2)
    assert result["runs"] == [none_run, tome_run]
    assert result["indices"] == [1, 2]
    with pytest.raises(ConfigError, match="missing"):
        write_samples([tome_run, none_run], tmp_path / "out", indices=[0, 1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="run.json"):
        write_samples([tmp_path / "empty"], tmp_path / "out")


def test_command_errors_say_what_to_do(tiny, capsys):
    path, _ = tiny
    assert main(["visualize", "--what", "samples"]) == 2
    assert "--runs" in capsys.readouterr().err
    assert main(["visualize", "--what", "merge-maps", "--model_path", path, "--layer", "7"]) == 2
    assert "between 0 and 3" in capsys.readouterr().err
    assert main(["visualize", "--what", "spectrum", "--model_path", path, "--timestep", "1000"]) == 2
    assert "[0, 999]" in capsys.readouterr().err


# -- edge survival -------------------------------------------------------------------------------

def _brute_laplacian(metric: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """4-neighbour Laplacian, zero outside the grid, L1 over channels, by loops."""
    h, w = grid
    m = metric[0].double().numpy().reshape(h, w, -1)
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            acc = -4.0 * m[i, j]
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                if 0 <= i + di < h and 0 <= j + dj < w:
                    acc = acc + m[i + di, j + dj]
            out[i, j] = np.abs(acc).sum()
    return out.reshape(-1)


def _brute_survivors(comp, x: torch.Tensor, ctx) -> np.ndarray:
    """Which tokens still attend as themselves, from the compressor's own output: its restore says
    which query row each token reads; a SiTo token survives when that row is the token itself; a
    cell merge's token when it is alone in its cluster or its cell's destination."""
    from bigain.plugins._tokens import cell_counts, dst_mask

    out = comp.compress(x, ctx)
    nq = out.queries.shape[1]
    reads = out.restore(torch.eye(nq)[None])[0].argmax(dim=1).numpy()
    if comp.name == "sito":
        return np.array([torch.equal(out.queries[0, reads[i]], x[0, i]) for i in range(x.shape[1])])
    cells = cell_counts(ctx.grid, comp.sx, comp.sy)
    dst = dst_mask(comp.choose_destinations(x, ctx, cells), ctx.grid, comp.sx, comp.sy)[0].numpy()
    sizes = np.bincount(reads, minlength=nq)[reads]
    return (sizes == 1) | dst


EDGE_SPECS = ["tome", "bigain_tm", "bigain_tm:legacy_grouping=true", "sito"]


@pytest.mark.parametrize("spec", EDGE_SPECS)
@pytest.mark.parametrize("source", ["random", "tiny_dit"])
def test_edge_survival_share_equals_a_brute_force_count(tiny, spec, source):
    from bigain.analysis.edge_survival import edge_tokens, survival_share

    if source == "random":
        x = torch.randn(1, 48, 6, generator=torch.Generator().manual_seed(5))
        ctx = bigain.LayerContext.for_tokens(x, grid=(6, 8), timesteps=300.0)
    else:
        captured = capture_layer(tiny[1], 1)
        x, ctx = captured.x[:1].float(), captured.ctx
    comp = parse_methods([spec], ratio=0.5)[0].build()
    n = x.shape[1]
    for q in (0.1, 0.25, 1.0):
        k = math.ceil(q * n)
        edges = np.argsort(-_brute_laplacian(ctx.metric, ctx.grid), kind="stable")[:k]
        alive = _brute_survivors(comp, x, ctx)
        share = survival_share(token_map(comp, x, ctx), edge_tokens(ctx.metric, ctx.grid, q))
        assert sorted(edge_tokens(ctx.metric, ctx.grid, q)) == sorted(edges)
        assert share == pytest.approx(alive[edges].sum() / k, abs=1e-12)
        if q == 1.0:  # every token: exactly the N - int(N * ratio) that still attend
            assert share == pytest.approx(1 - int(n * 0.5) / n, abs=1e-12)


def test_edge_survival_at_the_largest_ratio_keeps_only_destinations():
    """At ratio 0.75 with 2x2 cells every source is merged, so only the cell destinations survive.
    bigain_tm's destination is its cell's lowest-Laplacian token, which is among the top-k only when
    the whole cell is; tome with top-left destinations keeps exactly the top-left edge tokens."""
    from bigain.analysis.edge_survival import edge_tokens, survival_share

    x = torch.randn(1, 64, 6, generator=torch.Generator().manual_seed(2))
    ctx = bigain.LayerContext.for_tokens(x, grid=(8, 8), timesteps=300.0)
    for q in (0.05, 0.5, 0.75):
        edges = edge_tokens(ctx.metric, ctx.grid, q)
        top = set(edges.tolist())
        whole_cells = sum(all(c in top for c in (8 * i + j, 8 * i + j + 1, 8 * i + j + 8, 8 * i + j + 9))
                          for i in range(0, 8, 2) for j in range(0, 8, 2))
        tm = parse_methods(["bigain_tm"], ratio=0.75)[0].build()
        assert survival_share(token_map(tm, x, ctx), edges) == pytest.approx(whole_cells / len(edges), abs=1e-12)
        topleft = parse_methods(["tome:dst=topleft"], ratio=0.75)[0].build()
        expected = np.mean([(e // 8) % 2 == 0 and (e % 8) % 2 == 0 for e in edges])
        assert survival_share(token_map(topleft, x, ctx), edges) == pytest.approx(expected, abs=1e-12)
    # fewer edge tokens than a cell holds: bigain_tm keeps none of them
    assert survival_share(token_map(tm, x, ctx), edge_tokens(ctx.metric, ctx.grid, 3 / 64)) == 0.0


def test_command_writes_the_edge_survival_table_and_plot(tiny, tmp_path, capsys):
    path, _ = tiny
    out = tmp_path / "edges"
    rc = main(["visualize", "--what", "edges", "--model_path", path, "--num_images", "2", "--timesteps", "100",
               "700", "--edge_fraction", "0.25", "--methods", "none", "tome", "bigain_tm",
               "bigain_tm:legacy_grouping=true", "sito", "todo", "--out", str(out)])
    assert rc == 0
    assert "left out todo" in capsys.readouterr().out
    table = pd.read_csv(out / "edge_survival.csv")
    assert len(table) == 5 * 2 and set(table["timestep"]) == {100, 700}
    assert (table["images"] == 2).all() and (table["edge_tokens"] == 16).all()
    none = table[table["method"] == "none"]
    assert (none["share"] == 1.0).all() and (none["all_kept"] == 1.0).all()
    merged = table[table["method"] != "none"]
    assert np.allclose(merged["all_kept"], 0.5) and ((merged["share"] >= 0) & (merged["share"] <= 1)).all()
    images = pd.read_csv(out / "edge_survival_images.csv")
    assert len(images) == 5 * 2 * 2
    assert np.allclose(images["share"], images["surviving"] / images["edge_tokens"])
    means = images.groupby(["label", "timestep"])["share"].mean()
    for _, row in table.iterrows():
        assert row["share"] == pytest.approx(means[(row["label"], row["timestep"])])
    md = (out / "edge_survival.md").read_text()
    assert "| none | 1.000 | 1.000 | 1.000 |" in md and "bigain_tm (legacy_grouping=True, ratio=0.5)" in md
    png = out / "edge_survival.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_edge_survival_errors_say_what_to_do(tiny, capsys):
    path, _ = tiny
    assert main(["visualize", "--what", "edges", "--model_path", path, "--edge_fraction", "0"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert main(["visualize", "--what", "edges", "--model_path", path, "--methods", "todo"]) == 2
    assert "merge or prune method" in capsys.readouterr().err
    assert main(["visualize", "--what", "edges", "--model_path", path, "--timesteps", "1000"]) == 2
    assert "[0, 999]" in capsys.readouterr().err


def test_a_toy_unet_folder_is_recognised_and_its_attention_level_is_probed(tmp_path, capsys):
    from bigain.analysis.probe import load_backbone
    from bigain.toy.train import train_toy_unet

    path = str(train_toy_unet(tmp_path / "m", steps=1, batch_size=2, train_images=2, bf16=False))
    assert type(load_backbone(path=path)).__name__ == "ToyUNet"  # unet/ + class_prompts.safetensors
    out = tmp_path / "edges"
    rc = main(["visualize", "--what", "edges", "--model_path", path, "--num_images", "1", "--timesteps", "500",
               "--methods", "none", "tome", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "edge_survival.csv")
    assert (table["edge_tokens"] == 26).all()  # 10% of the 16x16 = 256 tokens of the level compressed
    assert main(["visualize", "--what", "edges", "--model", "no-such-model"]) == 2
    assert "registered backbone" in capsys.readouterr().err
    assert main(["visualize", "--what", "edges", "--model", "dit"]) == 2
    assert "--model_path" in capsys.readouterr().err
