"""The fused similarity kernel against the eager search, run in Triton's interpreter.

Not collected on its own (the name does not start with ``test_``): ``test_fused_similarity.py`` runs it in a
fresh process with ``TRITON_INTERPRET=1``, which Triton reads when it is imported.
"""

import pytest
import torch

import bigain
from bigain.plugins._fused_similarity import BLOCK_N, interpreting, most_similar_fused
from bigain.plugins._tokens import most_similar, unit_vectors
from bigain.testing import check_compressor, tiny_dit, tiny_unet

assert interpreting(), "run with TRITON_INTERPRET=1 in the environment"


def reference(a, b):
    """Every similarity, then the row maxima: the definition, without blocks."""
    sims = torch.einsum("bic,bjc->bij", a.double(), b.double())
    return sims, sims.max(dim=-1)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 70, 33, 40), (3, 130, 129, 96), (1, 64, 64, 32),
                                   (2, 65, 200, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_values_and_indices_match_the_definition(shape, dtype):
    b, na, nb, c = shape
    g = torch.Generator().manual_seed(sum(shape))
    a = unit_vectors(torch.randn(b, na, c, generator=g)).to(dtype)
    bb = unit_vectors(torch.randn(b, nb, c, generator=g)).to(dtype)
    values, indices = most_similar_fused(a, bb)
    sims, best = reference(a, bb)
    assert values.dtype is torch.float32 and indices.dtype is torch.long
    assert torch.allclose(values.double(), best.values, atol=1e-5, rtol=0)
    # the chosen row is a maximum (an index may differ from the reference only on a near-tie)
    chosen = sims.gather(2, indices.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, best.values, atol=1e-5, rtol=0)
    blocked = most_similar(a.float(), bb.float())  # float16 reaches the blocked search on GPUs only
    assert torch.equal(indices, blocked[1]) or torch.allclose(
        sims.gather(2, blocked[1].unsqueeze(-1)).squeeze(-1), chosen, atol=1e-5)


def test_ties_go_to_the_lowest_index_within_and_across_tiles():
    a = torch.ones(1, 3, 16)
    b = torch.ones(1, 3 * BLOCK_N + 5, 16)
    assert most_similar_fused(a, b)[1].tolist() == [[0, 0, 0]]
    b = torch.zeros(1, 3 * BLOCK_N, 16)
    b[0, [BLOCK_N + 3, 2 * BLOCK_N + 1], 0] = 1.0  # the same best value in two tiles
    assert most_similar_fused(torch.eye(16)[:1].unsqueeze(0), b)[1].tolist() == [[BLOCK_N + 3]]
    assert most_similar(torch.eye(16)[:1].unsqueeze(0), b)[1].tolist() == [[BLOCK_N + 3]]


def test_strided_inputs_need_no_copy():
    g = torch.Generator().manual_seed(0)
    a = unit_vectors(torch.randn(2, 40, 24, generator=g))[:, ::2]
    b = unit_vectors(torch.randn(2, 30, 24, generator=g)).transpose(0, 1).contiguous().transpose(0, 1)
    assert not a.is_contiguous() and not b.is_contiguous()
    values, indices = most_similar_fused(a, b)
    ref = most_similar(a, b)
    assert torch.allclose(values, ref[0], atol=1e-6) and torch.equal(indices, ref[1])


@pytest.mark.parametrize("name", ["tome", "bigain_tm", "sito"])
@pytest.mark.parametrize("family", ["unet", "dit"])
def test_a_fused_compressor_gives_the_blocked_result(name, family):
    g = torch.Generator().manual_seed(1)
    if family == "unet":
        model, options = tiny_unet(0), {"max_downsample": 2}
        args = (torch.randn(3, 4, 16, 12, generator=g), torch.tensor([10.0, 500.0, 999.0]),
                torch.randn(3, 5, 32, generator=g))
        kwargs = {}
    else:
        model, options = tiny_dit(0), {"blocks": "all"}
        args = (torch.randn(3, 4, 8, 8, generator=g),)
        kwargs = {"timestep": torch.tensor([10.0, 500.0, 999.0]), "class_labels": torch.arange(3)}
    outs = {}
    for similarity in ("blocked", "fused"):
        with bigain.apply(model, name, ratio=0.5, similarity=similarity, seed=3, **options) as handle, torch.no_grad():
            outs[similarity] = model(*args, **kwargs).sample
            assert sum(layer["compressed_calls"] for layer in handle.stats()) > 0
    assert torch.allclose(outs["fused"], outs["blocked"], atol=1e-5, rtol=0)


def test_a_fused_compressor_compiles_as_one_graph_and_stays_batch_independent():
    """The conformance checks the custom operator could break: one fullgraph trace on the tiny UNet and DiT equal
    to eager, no recompile; the dtypes it takes; a sample's result alone and in a batch."""
    checks = ["compiles", "batch_independent", "dtype", "deterministic"]
    assert set(check_compressor("tome", params={"ratio": 0.5, "similarity": "fused"}, checks=checks)) == set(checks)
