"""The built-in conformance checks (registered in :data:`bigain.conformance.CHECKS` on import).

Each check judges one property of the contract and nothing else, so a compressor broken in one way
fails exactly one check: checks other than ``global_rng`` run every call from the same global RNG
state, checks other than ``inputs_unchanged`` give each call fresh inputs, and ``batch_independent``
is not judged for a compressor that is not deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bigain.compressor import TokenCompressor
from bigain.conformance import (
    CHECKS,
    TINY_MODELS,
    Subject,
    _processors,
    _RngStates,
    call,
    check,
    fixed_global_rng,
    forward,
    hyperparameter_problems,
    rows_for,
    same,
)
from bigain.patching import apply

__all__ = ["check_contract", "check_shapes", "check_dtype", "check_finite", "check_compresses",
           "check_restores_constant", "check_identity", "check_global_rng", "check_inputs_unchanged",
           "check_batch_independent", "check_deterministic", "check_remove_restores", "check_compiles"]

_FAMILIES = tuple(TINY_MODELS)  # the tiny models every model check runs on


def _compressed_forward(s: Subject, family: str, comp: TokenCompressor | None = None
                        ) -> tuple[Tensor, Tensor, list[dict]]:
    """``(uncompressed output, compressed output, handle.stats())`` of one tiny model."""
    model, args, kwargs, options = s.model(family)
    with apply(model, comp or s.compressor, seed=s.seed, **options) as handle, fixed_global_rng():
        out = forward(model, args, kwargs)
        stats = handle.stats()
    return s.uncompressed(family), out, stats


@check("contract", "keyword-only hyperparameters with defaults, stored under their own names; "
                   "rebuilding from hyperparameters() gives an equal compressor")
def check_contract(s: Subject) -> None:
    from bigain.registry import create_compressor

    if not (isinstance(s.cls, type) and issubclass(s.cls, TokenCompressor)):
        s.fail(f"{s.cls!r} is not a TokenCompressor subclass")
    problems = hyperparameter_problems(s.cls)
    if problems:
        s.fail("; ".join(problems))
    comp = s.build()
    try:
        hp = comp.hyperparameters()
    except AttributeError as exc:
        s.fail(f"every hyperparameter must be stored as an attribute of the same name: {exc}")
    if create_compressor(s.cls, **hp) != comp:
        s.fail("rebuilding from hyperparameters() gives a different compressor; store each hyperparameter "
               "unchanged under its own name")
    names = set(s.cls.hyperparameter_names())
    unknown = sorted(set(s.cls.identity_params or {}) - names)
    if unknown:
        s.fail(f"identity_params names {unknown}, which are not hyperparameters ({sorted(names)})")
    bad = sorted(set(s.declared_not_applicable) - set(CHECKS))
    if bad:
        s.fail(f"not_applicable_checks names unknown check(s) {bad}; the checks are {list(CHECKS)}")


@check("shapes", "direct calls on square, non-square and non-divisible grids: queries and context are "
                 "[B, M, C], restore gives [B, N, C'] for any C'")
def check_shapes(s: Subject) -> None:
    for where, _, x, ctx in s.cases():
        b, n, c = x.shape
        out, restored = call(s.compressor, x, ctx)
        for what, t in (("queries", out.queries), ("context", out.context)):
            if t.ndim != 3 or t.shape[0] != b or t.shape[2] != c or t.shape[1] < 1:
                s.fail(f"{where}: {what} have shape {tuple(t.shape)}, expected [{b}, >=1, {c}]")
        expected = (b, n, rows_for(out, x.dtype).shape[2])
        if tuple(restored.shape) != expected:
            s.fail(f"{where}: restore of {tuple(rows_for(out, x.dtype).shape)} gave {tuple(restored.shape)}, "
                   f"expected {expected}: restore must give back one row per input token")


@check("dtype", "float32 and bfloat16 inputs give queries, context and restored tokens of the input dtype")
def check_dtype(s: Subject) -> None:
    for where, _, x, ctx in s.cases():
        out, restored = call(s.compressor, x, ctx)
        for what, t in (("queries", out.queries), ("context", out.context), ("restore output", restored)):
            if t.dtype != x.dtype:
                s.fail(f"{where}: {what} are {t.dtype}; keep the input dtype (compute in float32 if needed, "
                       f"then cast back)")


@check("finite", "compressed tokens, restored tokens and compressed model outputs are finite")
def check_finite(s: Subject) -> None:
    for where, _, x, ctx in s.cases(required=False):
        out, restored = call(s.compressor, x, ctx)
        for what, t in (("queries", out.queries), ("context", out.context), ("restore output", restored)):
            if not torch.isfinite(t.float()).all():
                s.fail(f"{where}: non-finite values in the {what}")
    for family in _FAMILIES:
        _, out, _ = _compressed_forward(s, family)
        if not torch.isfinite(out).all():
            s.fail(f"the compressed tiny {family} gives non-finite outputs")


@check("compresses", "on the tiny UNet and DiT, attention layers are actually compressed "
                     "(handle.stats() compressed_calls > 0) and outputs keep their shape")
def check_compresses(s: Subject) -> None:
    if s.is_identity_setting():
        s.not_applicable("these hyperparameters are the compressor's identity_params: nothing is compressed")
    for family in _FAMILIES:
        before, out, stats = _compressed_forward(s, family)
        if out.shape != before.shape:
            s.fail(f"the compressed tiny {family} gives outputs of shape {tuple(out.shape)}, "
                   f"not {tuple(before.shape)}")
        if not any(st["compressed_calls"] > 0 for st in stats):
            reasons = sorted({st["skipped"] or "compress returned Compressed.identity" for st in stats})
            s.fail(f"no attention layer of the tiny {family} was compressed (compressed_calls is 0 on all "
                   f"{len(stats)} layers: {'; '.join(reasons)}). If it does not apply to such models by design, "
                   f"say why on the class: not_applicable_checks = {{'compresses': '<reason>'}}")


@check("restores_constant", "on a constant field (every token of a sample equal), restore(queries) "
                            "gives back the input")
def check_restores_constant(s: Subject) -> None:
    for where, _, x, ctx in s.cases((torch.float32,), constant=True):
        expected = x.clone()
        out = s.compressor.compress(x, ctx)
        restored = out.restore(out.queries)
        if restored.shape != expected.shape:
            s.not_applicable(f"{where}: restore(queries) has shape {tuple(restored.shape)}, not "
                             f"{tuple(expected.shape)} (see the shapes check)")
        if not torch.allclose(restored.float(), expected.float(), rtol=1e-4, atol=1e-5):
            err = float((restored.float() - expected.float()).abs().max())
            s.fail(f"{where}: restore(queries) differs from the constant input by up to {err:.3g}; merged or "
                   f"pruned tokens must be restored to the tokens they stand for")


@check("identity", "identity_params leave the tiny UNet and DiT bitwise unchanged")
def check_identity(s: Subject) -> None:
    ident = s.cls.identity_params
    if ident is None:
        s.not_applicable("the class declares identity_params = None (set it to the hyperparameters that leave a "
                         "model unchanged)")
    comp = s.build(**dict(ident))
    for family in _FAMILIES:
        before, out, _ = _compressed_forward(s, family, comp)
        if not same(out, before):
            s.fail(f"{comp!r} changed the tiny {family}'s output; identity_params must leave it bitwise "
                   f"identical (return Compressed.identity(x))")


@check("global_rng", "the global torch, Python and NumPy RNGs are neither consumed nor reseeded")
def check_global_rng(s: Subject) -> None:
    cases = s.cases(required=False)
    models = [s.model(family) for family in _FAMILIES]
    states = _RngStates()
    for _, _, x, ctx in cases:
        call(s.compressor, x, ctx)
    compressed = 0
    for model, args, kwargs, options in models:
        with apply(model, s.compressor, seed=s.seed, **options) as handle:
            forward(model, args, kwargs)
            compressed += sum(st["calls"] for st in handle.stats())
    changed = states.changed()
    if changed:
        s.fail(f"the {' and '.join(changed)} global RNG was consumed or reseeded; draw randomness from "
               f"ctx.sample_randint, ctx.sample_randn or ctx.generator")
    if not cases and not compressed:
        s.not_applicable("compress was never called")


@check("inputs_unchanged", "compress and restore leave their inputs (tokens, metric, timesteps, attention "
                           "output) unchanged")
def check_inputs_unchanged(s: Subject) -> None:
    for where, _, x, ctx in s.cases():
        originals = {"x": x.clone(), "ctx.metric": ctx.metric.clone(), "ctx.timesteps": ctx.timesteps.clone()}
        out = s.compressor.compress(x, ctx)
        y = rows_for(out, x.dtype)
        y0 = y.clone()
        out.restore(y)
        now = {"x": x, "ctx.metric": ctx.metric, "ctx.timesteps": ctx.timesteps}
        changed = [k for k, v in originals.items() if not same(v, now[k])]
        if not same(y, y0):
            changed.append("the attention output given to restore")
        if changed:
            s.fail(f"{where}: {', '.join(changed)} changed in place; work on copies (x.clone(), out-of-place ops)")


@check("batch_independent", "a sample's result does not depend on the other samples of its batch "
                            "(alone vs in a batch, at the same timestep)")
def check_batch_independent(s: Subject) -> None:
    t = (500.0,)
    for where, grid, x, _ in s.cases((torch.float32,)):
        def run(tokens: Tensor, y: Tensor | None = None, grid=grid):
            tokens = tokens.clone()
            ctx = s.context(tokens, grid, timesteps=t)
            if not s.compressor.applies_to(ctx):
                return None
            with fixed_global_rng():
                return call(s.compressor, tokens, ctx, y)

        whole = run(x)
        if whole is None:
            continue
        again = run(x)
        if not all(same(a, b) for a, b in ((whole[0].queries, again[0].queries),
                                            (whole[0].context, again[0].context), (whole[1], again[1]))):
            s.not_applicable("two identical calls give different results (see the deterministic check), so "
                             "batch independence cannot be judged")
        y = rows_for(whole[0], x.dtype)
        whole = run(x, y)
        for i in range(x.shape[0]):
            alone = run(x[i:i + 1], y[i:i + 1])
            if alone is None:
                continue
            pairs = (("queries", alone[0].queries, whole[0].queries[i:i + 1]),
                     ("context", alone[0].context, whole[0].context[i:i + 1]),
                     ("restore output", alone[1], whole[1][i:i + 1]))
            for what, a, b in pairs:
                if a.shape != b.shape:
                    s.fail(f"{where}: sample {i} alone gives {what} of shape {tuple(a.shape)}, in a batch of "
                           f"{x.shape[0]} {tuple(b.shape)}")
                if not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
                    s.fail(f"{where}: sample {i}'s {what} differ alone and in a batch of {x.shape[0]} (by up to "
                           f"{float((a.float() - b.float()).abs().max()):.3g}); compute per sample, and draw "
                           f"randomness with ctx.sample_randint / ctx.sample_randn (ctx.generator depends on "
                           f"the whole batch)")


@check("deterministic", "the same inputs and seed give identical results, call after call, directly and "
                        "on the tiny models")
def check_deterministic(s: Subject) -> None:
    fresh = s.build()
    for where, grid, x, _ in s.cases(required=False):
        results = []
        for comp in (s.compressor, s.compressor, fresh):
            with fixed_global_rng():
                ctx = s.context(x.clone(), grid)
                out, restored = call(comp, x.clone(), ctx)
            results.append((out.queries, out.context, restored))
        for other in results[1:]:
            if not all(same(a, b) for a, b in zip(results[0], other)):
                s.fail(f"{where}: two calls with the same inputs and seed differ; derive randomness from "
                       f"ctx.sample_randint / ctx.sample_randn and keep no state between calls")
    for family in _FAMILIES:
        outs = []
        for comp in (s.compressor, fresh):
            model, args, kwargs, options = s.model(family, fresh=comp is fresh)
            with apply(model, comp, seed=s.seed, **options):
                for _ in range(2):
                    with fixed_global_rng():
                        outs.append(forward(model, args, kwargs))
        if not all(same(outs[0], o) for o in outs[1:]):
            s.fail(f"the compressed tiny {family} gives different outputs for the same inputs and seed")


@check("remove_restores", "after handle.remove() the tiny UNet and DiT give bitwise their output from "
                          "before apply(), with the very same processor objects back")
def check_remove_restores(s: Subject) -> None:
    for family in _FAMILIES:
        model, args, kwargs, options = s.model(family, fresh=True)
        before = s.uncompressed(family)
        processors = _processors(model)
        handle = apply(model, s.compressor, seed=s.seed, **options)
        with fixed_global_rng():
            forward(model, args, kwargs)
        handle.remove()
        after = forward(model, args, kwargs)
        now = _processors(model)
        if now.keys() != processors.keys() or any(now[k] is not processors[k] for k in processors):
            s.fail(f"tiny {family}: remove() did not put back the original processor objects")
        if not same(after, before):
            s.fail(f"tiny {family}: the output after remove() differs from the output before apply()")


class _GraphCounter:
    """A ``torch.compile`` backend that runs the captured graphs eagerly and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _new_values(family: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The same shapes with other values: another sample and other timesteps."""
    return TINY_MODELS[family].new_values(args, kwargs)


@check("compiles", "torch.compile(fullgraph=True) traces the compressed tiny UNet and DiT as one graph (no "
                   "graph break, no device-to-host sync), equal to eager, with no recompile for new input values")
def check_compiles(s: Subject) -> None:
    rules = ("keep shapes static, never read a tensor back to the host (.item(), .tolist(), float(t)), draw "
             "randomness with ctx.sample_randint / ctx.sample_randn, and keep no state between calls")
    for family in _FAMILIES:
        model, args, kwargs, options = s.model(family, fresh=True)
        counter = _GraphCounter()
        torch._dynamo.reset()
        try:
            with apply(model, s.compressor, seed=s.seed, **options), fixed_global_rng():
                eager = forward(model, args, kwargs)
                compiled = torch.compile(model, fullgraph=True, backend=counter)
                try:
                    out = forward(compiled, args, kwargs)
                except Exception as exc:  # a graph break under fullgraph, or a trace-time failure
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    s.fail(f"tiny {family}: torch.compile(fullgraph=True) failed: {type(exc).__name__}: {first}. "
                           f"To trace as one graph, {rules}")
                if counter.graphs != 1:
                    s.fail(f"tiny {family}: traced as {counter.graphs} graphs, expected one; {rules}")
                if not torch.allclose(out, eager, rtol=0, atol=1e-4):
                    err = float((out - eager).abs().max())
                    s.fail(f"tiny {family}: the compiled output differs from eager by {err:.2e} (> 1e-4)")
                args2, kwargs2 = _new_values(family, args, kwargs)
                forward(compiled, args2, kwargs2)
                if counter.graphs != 1:
                    s.fail(f"tiny {family}: a second call with new input values of the same shapes recompiled, so "
                           f"a Python value the compressor reads changes from call to call; {rules}")
        finally:
            torch._dynamo.reset()
