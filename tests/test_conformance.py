"""Every built-in compressor passes the conformance suite plugin authors run."""

import pytest

from bigain.testing import check_compressor

CASES = [
    ("none", {}),
    ("tome", {}),
    ("tome", {"ratio": 0.75, "dst": "topleft"}),
    ("bigain_tm", {"ratio": 0.7}),
    ("bigain_tm", {"legacy_grouping": True, "norm": "l2"}),
    ("todo", {}),
    ("bigain_td", {}),
    ("bigain_td", {"alpha": 1.5, "alpha_schedule": (0.1, 0.9)}),
    ("sito", {"ratio": 0.7}),
]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_builtin_passes_the_conformance_suite(name, params):
    passed = check_compressor(name, params=params)
    assert {"contract", "shapes", "deterministic", "unet", "dit", "exact-restore", "global-rng"} <= set(passed)
    assert "identity" in passed


def test_the_suite_catches_a_broken_compressor():
    from bigain.compressor import Compressed, TokenCompressor

    class Leaky(TokenCompressor):
        identity_params = {"ratio": 0.0}

        def __init__(self, *, ratio: float = 0.5) -> None:
            self.ratio = ratio

        def compress(self, x, ctx):
            import torch

            keep = x[:, : max(1, int(x.shape[1] * (1 - self.ratio)))]
            noise = torch.randn(1).item()  # global RNG: forbidden
            return Compressed(keep, keep, lambda y: y.new_full((y.shape[0], x.shape[1], y.shape[2]), noise))

    with pytest.raises(AssertionError, match=r"\[(identity|deterministic|global-rng)\]"):
        check_compressor(Leaky)
