"""Compressed denoisers trace as one torch.compile graph, never read tensors back to the host, and
compiled equals eager; keyed random draws are a pure function of their key."""

import subprocess
import sys

import pytest
import torch

import bigain
from bigain.compressor import LayerContext
from bigain.keyed_random import hash_words, keyed_randint, keyed_randn
from bigain.testing import tiny_dit, tiny_unet

RATIO = {"tome": 0.5, "bigain_tm": 0.5, "sito": 0.5}
OPTIONS = {"unet": {"max_downsample": 2}, "dit": {"blocks": "all"}}


class CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def inputs(family, batch, seed=0, timesteps=None):
    g = torch.Generator().manual_seed(seed)
    if timesteps is None:
        timesteps = torch.tensor([10.0, 500.0, 800.0, 999.0][:batch])
    if family == "unet":  # non-square latent, text conditioning
        return (torch.randn(batch, 4, 16, 12, generator=g), timesteps, torch.randn(batch, 5, 32, generator=g)), {}
    labels = torch.arange(batch) % 10
    return (torch.randn(batch, 4, 8, 8, generator=g),), {"timestep": timesteps, "class_labels": labels}


def build(family, name, seed=0):
    model = tiny_unet(seed) if family == "unet" else tiny_dit(seed)
    handle = bigain.apply(model, name, seed=3, **OPTIONS[family], **({"ratio": RATIO[name]} if name in RATIO else {}))
    return model, handle


def run(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).sample


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_explain_finds_one_graph_and_no_break(family):
    """As a user would check it (every built-in is also compiled with fullgraph=True below)."""
    model, _ = build(family, "none")
    args, kwargs = inputs(family, 3)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("family,name", [("unet", "tome"), ("dit", "bigain_td"), ("dit", "sito")])
def test_fullgraph_compile_equals_eager_and_does_not_recompile(family, name):
    """Every built-in on both families is also checked by the conformance suite's `compiles` check;
    here an odd batch, and the token counts a compiled graph records."""
    model, handle = build(family, name)
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    args, kwargs = inputs(family, 3)  # odd batch, one timestep per sample
    eager = run(model, args, kwargs)
    assert torch.allclose(run(compiled, args, kwargs), eager, atol=1e-4, rtol=0)
    assert backend.graphs == 1
    # new values of the same shapes, other timesteps: the same graph serves them
    args2, kwargs2 = inputs(family, 3, seed=1, timesteps=torch.tensor([999.0, 3.0, 640.0]))
    assert torch.allclose(run(compiled, args2, kwargs2), run(model, args2, kwargs2), atol=1e-4, rtol=0)
    assert backend.graphs == 1, "a second call with new values recompiled: a Python value is guarded on"
    if name != "none":
        traced = [s["traced"] for s in handle.stats()]
        assert all(t is not None and t["compressed"] for t in traced)
        assert handle.tokens_kept()  # taken from the traced counts


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_guidance_batches_and_shared_timesteps_compile(family):
    """A classifier-free-guidance batch: one 0-d timestep for cond + uncond, as pipelines pass it,
    then the same batch with the timestep repeated per sample."""
    model, _ = build(family, "tome")
    compiled = torch.compile(model, fullgraph=True, backend=CountingBackend())
    scalar = (torch.tensor(421.0),) if family == "unet" else ()  # diffusers' DiT wants one per sample
    for t in (*scalar, torch.tensor(421.0).repeat(4)):
        args, kwargs = inputs(family, 4, timesteps=t)
        assert torch.allclose(run(compiled, args, kwargs), run(model, args, kwargs), atol=1e-4, rtol=0)


def test_outputs_do_not_depend_on_batch_composition_when_compiled():
    model, _ = build("dit", "tome")
    compiled = torch.compile(model, fullgraph=True, backend=CountingBackend())
    args, kwargs = inputs("dit", 3)
    full = run(compiled, args, kwargs)
    one = {key: value[1:2] for key, value in kwargs.items()}
    alone = run(compiled, (args[0][1:2],), one)
    assert torch.allclose(full[1:2], alone, atol=1e-5, rtol=0)


def test_a_host_sync_in_a_compressor_is_caught_by_fullgraph():
    """The check above can fail: a compressor that reads a tensor back to the host breaks the graph."""

    class Syncing(bigain.TokenCompressor):
        name = "syncing"

        def __init__(self) -> None:
            pass

        def compress(self, x, ctx):
            if float(ctx.timesteps.max().item()) > 100:  # a device-to-host read
                return bigain.Compressed(x, x[:, ::2])
            return bigain.Compressed.identity(x)

    model = tiny_dit(0)
    bigain.apply(model, Syncing(), blocks="all")
    args, kwargs = inputs("dit", 2)
    with torch.no_grad():
        assert torch._dynamo.explain(model)(*args, **kwargs).graph_break_count > 0
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)graph break|item|unsupported"):
        run(torch.compile(model, fullgraph=True, backend=CountingBackend()), args, kwargs)


@pytest.mark.slow
def test_inductor_compile_equals_eager():
    """A real inductor compile of a compressed tiny DiT (C++ codegen on the CPU)."""
    for name in ("tome", "bigain_td"):
        model, _ = build("dit", name)
        args, kwargs = inputs("dit", 3)
        compiled = torch.compile(model, fullgraph=True)
        assert (run(compiled, args, kwargs) - run(model, args, kwargs)).abs().max() <= 1e-4
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_device_sync_in_a_compressed_forward_on_cuda():
    for name in bigain.list_compressors():
        model, _ = build("unet", name)
        model = model.cuda()
        args, kwargs = inputs("unet", 3)
        args = tuple(a.cuda() for a in args)
        run(model, args, kwargs)  # warm-up: lazy initialisation may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(model, args, kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_replay_a_compressed_denoiser():
    """mode="reduce-overhead" records a CUDA graph and replays it for new inputs of the same shape."""
    for name in ("tome", "bigain_td"):
        model, _ = build("unet", name)
        model = model.cuda()
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for seed in range(4):  # recording, then replays with new values
            args, kwargs = inputs("unet", 3, seed=seed, timesteps=torch.tensor([10.0, 500.0, 999.0 - seed]))
            args = tuple(a.cuda() for a in args)
            got = run(compiled, args, kwargs).clone()
            assert (got - run(model, args, kwargs)).abs().max() <= 1e-4
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_keyed_draws_are_identical_on_cpu_and_cuda():
    t = torch.tensor([5.0, 999.0, 420.25])
    for device in ("cpu", "cuda"):
        x = torch.zeros(3, 24, 4, device=device)
        ctx = LayerContext.for_tokens(x, grid=(4, 6), timesteps=t.to(device), seed=2**40 + 11, layer_index=3)
        draws = (ctx.sample_randint(4, (2, 3)).cpu(), ctx.sample_randn((24,)).cpu())
        if device == "cpu":
            on_cpu = draws
    assert torch.equal(on_cpu[0], draws[0])
    assert (on_cpu[1] - draws[1]).abs().max() <= 1.2e-7 * on_cpu[1].abs().max()


# -- keyed random numbers -------------------------------------------------------------------

def murmur3_32(words, seed=0x9747B28C):
    """MurmurHash3 x86 32-bit of little-endian 32-bit words, in plain Python integers."""
    mask = 0xFFFFFFFF
    h = seed
    for w in words:
        k = ((w & mask) * 0xCC9E2D51) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * 0x1B873593) & mask
        h ^= k
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    h ^= 4 * len(words)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def test_hash_is_murmur3_of_the_words():
    words = torch.tensor([0, 1, 0xFFFFFFFF, 123456789, 2**31 + 5])
    got = hash_words([words, 7, 2**32 + 9]).tolist()  # the high bits of a word do not count
    assert got == [murmur3_32([w, 7, 9]) for w in words.tolist()]
    with pytest.raises(AssertionError):  # the reference is not trivially satisfied
        assert got == [murmur3_32([w, 7, 10]) for w in words.tolist()]


def test_batch_wide_words_are_hashed_on_the_host():
    # (seed, layer, stream) words before the per-sample timestep word launch no kernel: a key of five
    # words costs the device as many operations as a key of one tensor word.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    words = torch.tensor([3, 11, 2**31 + 7])
    with CountOps() as one:
        hash_words([words])
    with CountOps() as five:
        got = hash_words([2**32 + 5, 0, 17, 1, words])
    assert five.ops == one.ops
    assert got.tolist() == [murmur3_32([5, 0, 17, 1, w]) for w in words.tolist()]
    assert hash_words([5, 0, 17]).tolist() == murmur3_32([5, 0, 17])  # no tensor word at all


def test_keyed_draws_are_uniform_and_normal():
    key = hash_words([torch.arange(400)])
    ints = keyed_randint(key, 4, (250,))
    counts = torch.bincount(ints.flatten(), minlength=4).float() / ints.numel()
    assert ints.min() >= 0 and ints.max() <= 3 and (counts - 0.25).abs().max() < 0.01
    z = keyed_randn(key, (250,))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert z.dtype == torch.float32


_DRAW = """
import torch
from bigain.compressor import LayerContext
x = torch.zeros(3, 24, 4)
t = torch.tensor([5.0, 999.0, 420.25])
ctx = LayerContext.for_tokens(x, grid=(4, 6), timesteps=t, seed=2**40 + 11, layer_index=3)
torch.save({"int": ctx.sample_randint(4, (2, 3)), "normal": ctx.sample_randn((24,))}, PATH)
"""


def test_draws_are_identical_across_processes(tmp_path):
    path = tmp_path / "draws.pt"
    subprocess.run([sys.executable, "-c", _DRAW.replace("PATH", repr(str(path)))], check=True)
    theirs = torch.load(path)
    x = torch.zeros(3, 24, 4)
    ctx = LayerContext.for_tokens(x, grid=(4, 6), timesteps=torch.tensor([5.0, 999.0, 420.25]),
                                  seed=2**40 + 11, layer_index=3)
    assert torch.equal(theirs["int"], ctx.sample_randint(4, (2, 3)))
    assert torch.equal(theirs["normal"], ctx.sample_randn((24,)))
    other = LayerContext.for_tokens(x, grid=(4, 6), timesteps=ctx.timesteps, seed=2**40 + 12, layer_index=3)
    assert not torch.equal(theirs["normal"], other.sample_randn((24,)))


def test_streams_are_independent_and_timesteps_key_the_draw():
    x = torch.zeros(2, 16, 4)
    ctx = LayerContext.for_tokens(x, grid=(4, 4), timesteps=torch.tensor([7.0, 7.0004]))
    a, b = ctx.sample_randn((64,)), ctx.sample_randn((64,), stream=1)
    assert torch.equal(a[0], a[1])  # both round to 7 * 1024: float noise does not change a key
    assert abs(float(torch.corrcoef(torch.stack([a[0], b[0]]))[0, 1])) < 0.4
