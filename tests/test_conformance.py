"""The conformance suite: every built-in passes it, and every check is proven to fail.

Each check has a compressor broken in exactly its way, built on a correct reference compressor
(``PairMerge``); running every check on it must fail that one check, with a message naming it, and
no other.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bigain
from bigain import Compressed, TokenCompressor
from bigain.conformance import CHECKS, CheckNotApplicable, Subject, check
from bigain.testing import check_compressor, iter_checks, parametrize_with_checks

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
def test_builtin_passes_every_check(name, params):
    checks = [c for c in CHECKS if c != "compiles"]  # the slow one runs once per built-in, below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        passed = check_compressor(name, params=params, checks=checks)
    skipped = {str(w.message).split("]")[0][1:] for w in caught if issubclass(w.category, CheckNotApplicable)}
    # only the identity compressor skips a check: "compresses", because it compresses nothing by design
    assert skipped == ({"compresses"} if name == "none" else set())
    assert set(passed) == set(checks) - skipped


@pytest.mark.parametrize("name", sorted({name for name, _ in CASES}))
def test_builtin_compiles(name):
    assert CHECKS["compiles"](name) is True


def test_every_listed_compressor_is_covered():
    assert {name for name, _ in CASES} == set(bigain.list_compressors())


# -- a correct reference compressor, and one broken variant per check ---------------------------

class PairMerge(TokenCompressor):
    """Merges the first ``ratio * N/2`` pairs of adjacent tokens (mean) and copies the result back."""

    identity_params = {"ratio": 0.0}

    def __init__(self, *, ratio: float = 0.5) -> None:
        self.ratio = ratio

    def pairs(self, n: int) -> int:
        return int(self.ratio * (n // 2))

    def compress(self, x, ctx):
        r = self.pairs(x.shape[1])
        if r == 0:
            return Compressed.identity(x)
        merged = (x[:, 0:2 * r:2] + x[:, 1:2 * r:2]) / 2
        queries = torch.cat([merged, x[:, 2 * r:]], dim=1)
        return Compressed(queries, queries, lambda y: self.unmerge(y, r))

    def unmerge(self, y, r):
        return torch.cat([y[:, :r].repeat_interleave(2, dim=1), y[:, r:]], dim=1)


class NeverApplies(PairMerge):
    def applies_to(self, ctx):
        return False


class StoresTheComplement(PairMerge):
    """Stores the fraction kept under the name ``ratio``: rebuilding from hyperparameters() differs."""

    def __init__(self, *, ratio: float = 0.25) -> None:
        self.ratio = 1 - ratio

    def pairs(self, n):
        return int((1 - self.ratio) * (n // 2))


class DropsOddToken(PairMerge):
    """Restores 2 * (N // 2) tokens: drops the last token on odd grids."""

    def unmerge(self, y, r):
        out = super().unmerge(y, r)
        return out[:, : 2 * (out.shape[1] // 2)]


class CastsToFloat32(PairMerge):
    def compress(self, x, ctx):
        return super().compress(x.float(), ctx)


class NaNKeys(PairMerge):
    def compress(self, x, ctx):
        out = super().compress(x, ctx)
        if out.is_identity:
            return out
        return Compressed(out.queries, out.queries * float("nan"), out.restore)


class ZeroOutput(PairMerge):
    def unmerge(self, y, r):
        return torch.zeros_like(super().unmerge(y, r))


class OffByOneIdentity(PairMerge):
    """Merges one pair more than asked for, so ratio=0 still merges."""

    def pairs(self, n):
        return super().pairs(n) + 1


class GlobalRNG(PairMerge):
    def compress(self, x, ctx):
        torch.rand(())  # forbidden: the global RNG
        return super().compress(x, ctx)


class MutatesMetric(PairMerge):
    def compress(self, x, ctx):
        if self.pairs(x.shape[1]):
            ctx.metric.div_(ctx.metric.norm(dim=-1, keepdim=True))  # normalised in place
        return super().compress(x, ctx)


class BatchMeanKeys(PairMerge):
    """Keys/values from the tokens with the largest norm on average over the batch."""

    def compress(self, x, ctx):
        r = self.pairs(x.shape[1])
        if r == 0:
            return Compressed.identity(x)
        keep = x.float().norm(dim=-1).mean(0).topk(x.shape[1] - r).indices.sort().values
        return Compressed(x, x[:, keep])


class CountsItsCalls(PairMerge):
    """Merges pairs starting at an offset that advances with every call: state kept between calls.

    Every call differs from the one before (a clock- or generator-seeded offset would repeat by chance and make
    the checks that call twice flaky), so the deterministic check must fail it and batch independence cannot be
    judged.
    """

    def __init__(self, *, ratio: float = 0.5) -> None:
        super().__init__(ratio=ratio)
        self.calls = 0

    def compress(self, x, ctx):
        r = self.pairs(x.shape[1])
        if r == 0:
            return Compressed.identity(x)
        start = self.calls % (x.shape[1] - 2 * r + 1)
        self.calls += 1
        order = torch.cat([torch.arange(start, x.shape[1]), torch.arange(start)])
        back = torch.argsort(order)
        out = super().compress(x[:, order], ctx)
        return Compressed(out.queries, out.context, lambda y: out.restore(y)[:, back])


class ReadsTimestepsOnTheHost(PairMerge):
    """Branches on a timestep read back to the host: correct eagerly, a graph break when compiled."""

    def compress(self, x, ctx):
        if float(ctx.timesteps.max()) < 0:  # never true; the read is the fault
            return Compressed.identity(x)
        return super().compress(x, ctx)


BROKEN = {
    "contract": StoresTheComplement,
    "shapes": DropsOddToken,
    "dtype": CastsToFloat32,
    "finite": NaNKeys,
    "compresses": NeverApplies,
    "restores_constant": ZeroOutput,
    "identity": OffByOneIdentity,
    "global_rng": GlobalRNG,
    "inputs_unchanged": MutatesMetric,
    "batch_independent": BatchMeanKeys,
    "deterministic": CountsItsCalls,
    "compiles": ReadsTimestepsOnTheHost,
}


def failures(compressor, checks=None) -> dict[str, str]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckNotApplicable)
        for name, run in iter_checks(compressor, checks=checks):
            try:
                run()
            except AssertionError as exc:
                out[name] = str(exc)
    return out


def test_the_reference_compressor_passes_every_check():
    assert set(check_compressor(PairMerge)) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_compressor_fails_exactly_its_check(name):
    # compiling is the slow check: it runs for the compressor broken for it, which must fail it only
    failed = failures(BROKEN[name], None if name == "compiles" else [c for c in CHECKS if c != "compiles"])
    assert set(failed) == {name}, failed
    assert failed[name].startswith(f"[{name}] {BROKEN[name].__name__}(")
    with pytest.raises(AssertionError, match=rf"^\[{name}\] "):
        CHECKS[name](BROKEN[name])


def test_remove_restores_fails_when_remove_leaves_the_wrappers(monkeypatch):
    from bigain.patching import CompressionHandle

    monkeypatch.setattr(CompressionHandle, "remove", lambda self: None)
    assert set(failures(PairMerge)) == {"remove_restores"}


def test_every_check_is_proven_to_fail():
    """A new check needs its broken compressor in BROKEN (or its own test, like remove_restores)."""
    assert set(BROKEN) | {"remove_restores"} == set(CHECKS)


def test_contract_catches_each_signature_mistake():
    class Positional(PairMerge):
        def __init__(self, ratio: float = 0.5) -> None:
            self.ratio = ratio

    class NoDefault(PairMerge):
        def __init__(self, *, ratio: float) -> None:
            self.ratio = ratio

    class NotStored(PairMerge):
        def __init__(self, *, ratio: float = 0.5) -> None:
            self.merge_ratio = ratio

    for cls, message in ((Positional, "'ratio' must be keyword-only"), (NoDefault, "'ratio' needs a default"),
                         (NotStored, "must be stored as an attribute of the same name")):
        with pytest.raises(AssertionError, match=rf"^\[contract\] {cls.__name__}\(\): .*{message}"):
            CHECKS["contract"](cls)


def test_a_check_that_does_not_apply_warns_and_is_not_passed():
    class NoIdentity(PairMerge):
        identity_params = None

    expected = r"\[identity\] not applicable to NoIdentity\(ratio=0.5\): .*identity_params"
    with pytest.warns(CheckNotApplicable, match=expected):
        passed = check_compressor(NoIdentity)
    assert "identity" not in passed and "shapes" in passed
    with pytest.warns(CheckNotApplicable, match=r"\[shapes\] not applicable .*applies_to is False on every"):
        assert CHECKS["shapes"](NeverApplies) is False


def test_a_compressor_may_declare_a_check_not_applicable_with_its_reason():
    class UNetOnly(NeverApplies):
        not_applicable_checks = {"compresses": "compresses UNet levels 4 and deeper only"}

    with pytest.warns(CheckNotApplicable, match="compresses UNet levels 4 and deeper only"):
        assert CHECKS["compresses"](UNetOnly) is False

    class Typo(PairMerge):
        not_applicable_checks = {"compress": "typo"}

    with pytest.raises(AssertionError, match=r"\[contract\] .*unknown check\(s\) \['compress'\]"):
        CHECKS["contract"](Typo)


def test_iter_checks_runs_checks_one_by_one_and_a_crash_fails_the_check():
    class Crashes(PairMerge):
        def compress(self, x, ctx):
            raise RuntimeError("boom")

    checks = dict(iter_checks(Crashes, checks=["contract", "shapes"]))
    assert list(checks) == ["contract", "shapes"] and checks["contract"]() is True
    with pytest.raises(AssertionError, match=r"^\[shapes\] Crashes\(ratio=0.5\): raised RuntimeError: boom"):
        checks["shapes"]()
    with pytest.raises(ValueError, match="unknown conformance check"):
        list(iter_checks(PairMerge, checks=["nope"]))


def test_instances_are_checked_with_their_hyperparameters():
    assert Subject.of(PairMerge(ratio=0.0)).is_identity_setting()
    with pytest.warns(CheckNotApplicable, match=r"\[compresses\] not applicable to PairMerge\(ratio=0.0\)"):
        assert CHECKS["compresses"](PairMerge(ratio=0.0)) is False


def test_a_check_is_added_with_one_function():
    @check("_always_fails", "a check registered by a test")
    def _always_fails(s: Subject) -> None:
        s.fail("on purpose")

    try:
        with pytest.raises(AssertionError, match=r"^\[_always_fails\] PairMerge\(ratio=0.5\): on purpose"):
            check_compressor(PairMerge)
        assert [n for n, _ in iter_checks(PairMerge)][-1] == "_always_fails"
    finally:
        del CHECKS["_always_fails"]


@parametrize_with_checks([PairMerge(), PairMerge(ratio=0.9)])
def test_parametrize_with_checks(compressor, check):
    check(compressor)


def test_parametrize_with_checks_ids():
    mark = parametrize_with_checks(["tome", PairMerge(ratio=0.9)], checks=["shapes"])
    assert mark.kwargs["ids"] == ["tome-shapes", "PairMerge(ratio=0.9)-shapes"]
