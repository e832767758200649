"""The paper protocol (configs/paper/): the released scripts' settings beside the definitions.

ToMe's released randomness against the ``tomesd`` package, the paper configurations against the
definitions (every difference on an allow-list the docs explain), and the paper classification
config run end to end on a tiny saved pipeline with each method's released settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bigain
from bigain import ConfigError, LayerContext

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
GUIDE = ROOT / "docs" / "guides" / "paper-protocol.md"


# -- ToMe's randomness as released -----------------------------------------------------------------

def _tomesd_calls(calls, ratio, seed):
    """The released sequence: one generator seeded once, advanced by every call that draws; odd
    batches use top-left destinations (``tomesd/patch.py:compute_merge``)."""
    from tomesd.merge import bipartite_soft_matching_random2d

    gen = torch.Generator().manual_seed(seed)
    out = []
    for x, (h, w) in calls:
        m, u = bipartite_soft_matching_random2d(x, w, h, 2, 2, int(h * w * ratio),
                                                no_rand=x.shape[0] % 2 == 1, generator=gen)
        out.append(u(m(x) * 2.0 + 1.0))
    return out


def _calls(seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = [(2, (8, 8)), (3, (8, 8)), (4, (6, 10)), (2, (8, 8)), (1, (7, 5)), (2, (7, 5))]
    return [(torch.randn(b, h * w, 16, generator=g), (h, w)) for b, (h, w) in spec]


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_tomesd_randomness_is_the_released_generator_sequence(ratio):
    pytest.importorskip("tomesd")
    calls = _calls()
    ref = _tomesd_calls(calls, ratio, seed=3)
    comp = bigain.create_compressor("tome", ratio=ratio, randomness="tomesd")
    for (x, grid), expected in zip(calls, ref):
        out = comp.compress(x, LayerContext.for_tokens(x, grid=grid, timesteps=500.0, seed=3))
        assert (out.restore(out.queries * 2.0 + 1.0) - expected).abs().max() <= 1e-5


def test_tomesd_randomness_advances_per_call_and_is_never_the_default():
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1))
    ctx = LayerContext.for_tokens(x, grid=(8, 8), timesteps=500.0)
    released = bigain.create_compressor("tome", ratio=0.5, randomness="tomesd")
    first, second = (released.choose_destinations(x, ctx, (4, 4)) for _ in range(2))
    assert not torch.equal(first, second)  # the generator advanced: same call, another pattern
    assert torch.equal(first[0], first[1])  # one pattern per call, shared by the batch
    odd = released.choose_destinations(x[:1], LayerContext.for_tokens(x[:1], grid=(8, 8)), (4, 4))
    assert not odd.any()  # an odd batch: top-left destinations
    keyed = bigain.create_compressor("tome", ratio=0.5)
    assert keyed.randomness == "keyed"
    assert torch.equal(keyed.choose_destinations(x, ctx, (4, 4)), keyed.choose_destinations(x, ctx, (4, 4)))
    with pytest.raises(ConfigError, match="'keyed'.*'tomesd'"):
        bigain.create_compressor("tome", randomness="global")


def test_tomesd_randomness_equals_the_tomesd_patch_on_a_tiny_unet(unet):
    tomesd = pytest.importorskip("tomesd")
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(b, 4, 16, 12, generator=g), torch.full((b,), t), torch.randn(b, 5, 32, generator=g))
              for b, t in ((2, 900), (3, 500), (2, 500), (4, 100))]
    tomesd.apply_patch(unet, ratio=0.5, use_rand=True, max_downsample=2)
    unet._tome_info["args"]["generator"] = torch.Generator().manual_seed(5)
    try:
        with torch.no_grad():
            ref = [unet(x, t, enc).sample for x, t, enc in inputs]
    finally:
        tomesd.remove_patch(unet)
    with bigain.apply(unet, "tome", ratio=0.5, randomness="tomesd", max_downsample=2, seed=5), torch.no_grad():
        mine = [unet(x, t, enc).sample for x, t, enc in inputs]
    with bigain.apply(unet, "tome", ratio=0.5, max_downsample=2, seed=5), torch.no_grad():
        keyed = [unet(x, t, enc).sample for x, t, enc in inputs]
    for a, b in zip(mine, ref):
        assert (a - b).abs().max() <= 1e-5
    assert max((a - b).abs().max() for a, b in zip(keyed, ref)) > 1e-3  # the keyed default differs
