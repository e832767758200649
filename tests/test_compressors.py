"""The built-in compressors against their published definitions, written out independently here."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bigain
from bigain import ConfigError, LayerContext
from bigain.plugins.bigain_tm import laplacian_scores


def ctx_for(x, grid, t=500.0, **kw):
    return LayerContext.for_tokens(x, grid=grid, timesteps=t, **kw)


# -- ToDo / BiGain-TD ----------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_todo_keeps_bottom_right_token_of_each_cell(grid):
    h, w = grid
    x = torch.randn(2, h * w, 5)
    out = bigain.create_compressor("todo", factor=2).compress(x, ctx_for(x, grid))
    assert out.queries is x
    g = x.view(2, h, w, 5)
    expected = g[:, 1::2, 1::2].reshape(2, -1, 5)
    assert torch.equal(out.context, expected)
    assert torch.equal(out.restore(x), x)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0, 1.5, -0.5])
def test_bigain_td_is_the_closed_form_2x2_kernel(alpha):
    h, w = 8, 6
    x = torch.randn(3, h * w, 4, dtype=torch.float64)
    out = bigain.create_compressor("bigain_td", factor=2, alpha=alpha).compress(x, ctx_for(x, (h, w)))
    g = x.view(3, h, w, 4)
    w_br, w_o = (1 + 3 * alpha) / 4, (1 - alpha) / 4
    expected = w_br * g[:, 1::2, 1::2] + w_o * (g[:, 0::2, 0::2] + g[:, 0::2, 1::2] + g[:, 1::2, 0::2])
    torch.testing.assert_close(out.context, expected.reshape(3, -1, 4), rtol=0, atol=1e-12)
    assert out.queries is x


def test_bigain_td_alpha_schedule_is_per_sample():
    x = torch.randn(3, 16, 4, dtype=torch.float64)
    t = torch.tensor([999.0, 0.0, 499.5])
    comp = bigain.create_compressor("bigain_td", factor=2, alpha_schedule=(0.1, 0.9))
    out = comp.compress(x, ctx_for(x, (4, 4), t=t))
    for b, alpha in enumerate([0.1, 0.9, 0.5]):
        single = bigain.create_compressor("bigain_td", factor=2, alpha=alpha)
        ref = single.compress(x[b:b + 1], ctx_for(x[b:b + 1], (4, 4)))
        torch.testing.assert_close(out.context[b:b + 1], ref.context, rtol=0, atol=1e-7)


def test_factor_one_is_identity_and_bad_factor_is_an_error():
    x = torch.randn(1, 16, 4)
    assert bigain.create_compressor("todo", factor=1).compress(x, ctx_for(x, (4, 4))).is_identity
    with pytest.raises(ConfigError, match="positive integer"):
        bigain.create_compressor("bigain_td", factor=0)


# -- Laplacian gating --------------------------------------------------------------------------

def reference_laplacian(x, h, w, norm="l1"):
    """Explicit 4-neighbour loop, zero outside the grid (the Laplacian score's definition)."""
    b, n, c = x.shape
    g = x.double().view(b, h, w, c)
    out = torch.zeros(b, h, w, dtype=torch.float64)
    for i, j in itertools.product(range(h), range(w)):
        acc = -4 * g[:, i, j]
        for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            if 0 <= i + di < h and 0 <= j + dj < w:
                acc = acc + g[:, i + di, j + dj]
        out[:, i, j] = acc.abs().sum(-1) if norm == "l1" else acc.norm(dim=-1)
    return out


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_laplacian_score_matches_the_formula(norm):
    x = torch.randn(2, 6 * 7, 3)
    torch.testing.assert_close(laplacian_scores(x, (6, 7), norm=norm).double(),
                               reference_laplacian(x, 6, 7, norm), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(8, 8), (7, 9)])
def test_bigain_tm_destination_is_the_per_cell_argmin(grid):
    h, w = grid
    torch.manual_seed(0)
    x = torch.randn(2, h * w, 4)
    comp = bigain.create_compressor("bigain_tm", ratio=0.5)
    scores = reference_laplacian(x, h, w)
    choice = comp.choose_destinations(x, ctx_for(x, grid), (h // 2, w // 2))
    for b, ci, cj in itertools.product(range(2), range(h // 2), range(w // 2)):
        cell = scores[b, 2 * ci:2 * ci + 2, 2 * cj:2 * cj + 2].reshape(-1)
        assert int(choice[b, ci, cj]) == int(cell.argmin())


def test_bigain_tm_legacy_grouping_reproduces_the_strip_argmin():
    """Released code: `.view(B,hs,sy,ws,sx).view(B,hs,ws,sy*sx)` on a contiguous score map (numpy
    C-order reshape is the same thing)."""
    h, w = 8, 8
    x = torch.randn(1, h * w, 4)
    comp = bigain.create_compressor("bigain_tm", ratio=0.5, legacy_grouping=True)
    choice = comp.choose_destinations(x, ctx_for(x, (h, w)), (4, 4))
    s = reference_laplacian(x, h, w).numpy()
    legacy = s.reshape(1, 4, 2, 4, 2).reshape(1, 4, 4, 4).argmin(-1)
    assert np.array_equal(choice.numpy(), legacy)
    true = bigain.create_compressor("bigain_tm", ratio=0.5).choose_destinations(x, ctx_for(x, (h, w)), (4, 4))
    assert not torch.equal(choice, true)  # the two groupings differ on a random 8x8 map


def test_merging_keeps_one_destination_per_cell_and_merges_r_tokens():
    x = torch.randn(2, 64, 8)
    for name in ("tome", "bigain_tm", "sito"):
        out = bigain.create_compressor(name, ratio=0.7).compress(x, ctx_for(x, (8, 8)))
        assert out.queries.shape[1] == 64 - int(64 * 0.7)
        assert out.restore(out.queries).shape == x.shape


def test_tome_merge_is_mean_and_unmerge_copies_back():
    """Every output token equals the mean of the tokens mapped to the same representative."""
    torch.manual_seed(1)
    x = torch.randn(1, 36, 6, dtype=torch.float64)
    out = bigain.create_compressor("tome", ratio=0.5, dst="topleft").compress(x, ctx_for(x, (6, 6)))
    rep = out.restore(out.queries)  # each token -> its cluster's merged value
    groups = {}
    for n in range(36):
        groups.setdefault(tuple(rep[0, n].tolist()), []).append(n)
    assert len(groups) == out.queries.shape[1]
    for value, members in groups.items():
        torch.testing.assert_close(x[0, members].mean(0), torch.tensor(value, dtype=torch.float64))
        # top-left destinations: each cluster holds exactly one token at an even (row, col)
        assert sum(1 for m in members if (m // 6) % 2 == 0 and (m % 6) % 2 == 0) <= 1


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_tome_matches_tomesd_merge_functions(ratio):
    pytest.importorskip("tomesd")
    from tomesd.merge import bipartite_soft_matching_random2d

    for h, w in [(8, 8), (6, 10), (7, 5)]:
        x = torch.randn(3, h * w, 16)
        m, u = bipartite_soft_matching_random2d(x, w, h, 2, 2, int(h * w * ratio), no_rand=True)
        ref = u(m(x) * 2.0 + 1.0)
        out = bigain.create_compressor("tome", ratio=ratio, dst="topleft").compress(x, ctx_for(x, (h, w)))
        mine = out.restore(out.queries * 2.0 + 1.0)
        assert (mine - ref).abs().max() <= 1e-5


def test_ratio_beyond_the_stride_is_an_error_that_says_so():
    for name in ("tome", "bigain_tm", "sito"):
        with pytest.raises(ConfigError, match=r"\[0, 0.75\]"):
            bigain.create_compressor(name, ratio=0.8)
    bigain.create_compressor("tome", ratio=0.8, sx=3, sy=2)  # 1 - 1/6 allows it


def test_low_precision_inputs_score_in_float32():
    torch.manual_seed(2)
    x = torch.randn(2, 64, 8).to(torch.bfloat16)
    for name in ("tome", "bigain_tm", "sito"):
        comp = bigain.create_compressor(name, ratio=0.5)
        low = comp.compress(x, ctx_for(x, (8, 8)))
        high = comp.compress(x, ctx_for(x, (8, 8), metric=x.float()))
        assert low.queries.dtype == torch.bfloat16
        assert torch.equal(low.queries, high.queries)


def test_host_timesteps_give_the_same_draws_as_reading_the_device():
    x = torch.randn(4, 16, 8)
    t = torch.tensor([10.0, 900.0, 10.0, 250.5])
    read = ctx_for(x, (4, 4), t=t)
    given = dataclasses.replace(read, timestep_values=tuple(t.tolist()))
    for ctx in (read, given):
        draws = ctx.sample_randint(4, (2, 2))
        assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    assert torch.equal(read.sample_randint(4, (2, 2)), given.sample_randint(4, (2, 2)))
    assert torch.equal(read.sample_randn((16,)), given.sample_randn((16,)))
    alone = ctx_for(x[1:2], (4, 4), t=t[1:2]).sample_randint(4, (2, 2))
    assert torch.equal(alone[0], read.sample_randint(4, (2, 2))[1])  # no dependence on batching


def test_split_by_mask_with_a_known_count_equals_counting():
    from bigain.plugins._tokens import dst_mask, split_by_mask

    choice = torch.randint(0, 4, (3, 2, 3), generator=torch.Generator().manual_seed(0))
    mask = dst_mask(choice, (5, 7), 2, 2)
    counted, given = split_by_mask(mask), split_by_mask(mask, 6)
    assert all(torch.equal(a, b) for a, b in zip(counted, given))


@pytest.mark.parametrize("name", ["tome", "sito"])
def test_similarities_in_blocks_give_the_same_merges(name, monkeypatch):
    import bigain.plugins._tokens as tokens

    x = torch.randn(2, 12 * 10, 8, generator=torch.Generator().manual_seed(4))
    comp = bigain.create_compressor(name, ratio=0.6)
    whole = comp.compress(x, ctx_for(x, (12, 10)))
    monkeypatch.setattr(tokens, "SIMILARITY_CHUNK_BYTES", 4 * 2 * 30 * 7)  # blocks of 7 rows
    blocks = comp.compress(x, ctx_for(x, (12, 10)))
    assert torch.equal(whole.queries, blocks.queries)
    assert torch.equal(whole.restore(whole.queries), blocks.restore(blocks.queries))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gpu_similarities_are_float32_and_close(dtype):
    from bigain.plugins._tokens import similarities, unit_vectors

    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 1024, 320, generator=g).cuda().to(dtype)
    m = unit_vectors(metric)
    assert m.dtype == torch.float16
    sims = similarities(m[:, :768], m[:, 768:])
    ref = F.normalize(metric.double(), dim=-1)
    ref = ref[:, :768] @ ref[:, 768:].transpose(1, 2)
    assert sims.dtype == torch.float32
    assert (sims.double() - ref).abs().max() < 2e-3
    # the same merges as float32 on the CPU, but for near-ties (no randomness: CPU and CUDA
    # generators draw differently)
    for name, kw in (("tome", {"dst": "topleft"}), ("bigain_tm", {}), ("sito", {"noise_alpha": 0.0})):
        comp = bigain.create_compressor(name, ratio=0.5, **kw)
        gpu = comp.compress(metric, ctx_for(metric, (32, 32)))
        gpu = gpu.restore(gpu.queries).float().cpu()
        x = metric.cpu().float()
        cpu = comp.compress(x, ctx_for(x, (32, 32)))
        cpu = cpu.restore(cpu.queries)
        same = (gpu - cpu).abs().amax(dim=-1) < 5e-2
        assert same.float().mean() > 0.95, name


# -- SiTo --------------------------------------------------------------------------------------

def reference_sito(x, h, w, ratio):
    """SiTo's definition with noise_alpha=0, by explicit loops on one sample."""
    n = h * w
    m = F.normalize(x.double(), dim=-1)
    G = m @ m.T
    g = G.sum(-1)
    dst = []
    for ci in range(h // 2):
        for cj in range(w // 2):
            cell = [(2 * ci + a) * w + 2 * cj + b for a in range(2) for b in range(2)]
            dst.append(max(cell, key=lambda k: g[k]))
    src = [k for k in range(n) if k not in dst]
    sim = {k: max(G[k, d] for d in dst) for k in src}
    order = sorted(src, key=lambda k: -sim[k])
    pruned, kept_src = order[: int(n * ratio)], order[int(n * ratio):]
    kept = kept_src + dst
    out = torch.empty(n, dtype=torch.long)  # index of the kept token each token takes its output from
    for k in kept:
        out[k] = k
    for p in pruned:
        out[p] = max(kept, key=lambda k: G[p, k])
    return out


def test_sito_prunes_and_recovers_as_defined():
    torch.manual_seed(3)
    h, w = 6, 8
    x = torch.randn(1, h * w, 5)
    comp = bigain.create_compressor("sito", ratio=0.5, noise_alpha=0.0)
    out = comp.compress(x, ctx_for(x, (h, w)))
    source = reference_sito(x[0], h, w, 0.5)
    torch.testing.assert_close(out.restore(out.queries)[0], x[0, source])
