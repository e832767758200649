"""bigain.apply on diffusers models: selection, contexts, signatures, exact restore, RNG hygiene."""

import inspect

import pytest
import torch

import bigain
from bigain import ConfigError, UnsupportedModelError
from bigain.compressor import Compressed, TokenCompressor


def _inputs(family, seed):
    g = torch.Generator().manual_seed(seed)
    if family == "unet":
        x = torch.randn(2, 4, 16, 12, generator=g)
        return (x, torch.tensor([100, 800]), torch.randn(2, 5, 32, generator=g)), {}
    x = torch.randn(2, 4, 8, 8, generator=g)
    return (x,), {"timestep": torch.tensor([100, 800]), "class_labels": torch.tensor([1, 7])}


def _run(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).sample


class Recorder(TokenCompressor):
    """Records every context it is given; compresses nothing."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen = []

    def compress(self, x, ctx):
        self.seen.append(ctx)
        return Compressed.identity(x)


def unet_call(unet, x, t):
    enc = torch.zeros(x.shape[0], 5, 32)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=enc).sample


def test_tome_equals_the_tomesd_package_on_a_tiny_unet(unet):
    tomesd = pytest.importorskip("tomesd")
    g = torch.Generator().manual_seed(0)
    cases = [((16, 16), 1, 0.3, 1), ((16, 12), 3, 0.5, 1), ((14, 10), 1, 0.7, 1),
             ((16, 16), 3, 0.7, 2), ((14, 10), 3, 0.5, 2), ((12, 16), 1, 0.5, 2)]
    for shape, batch, ratio, max_ds in cases:
        x = torch.randn(batch, 4, *shape, generator=g)
        t = torch.full((batch,), 321)
        enc = torch.randn(batch, 5, 32, generator=g)
        with torch.no_grad():
            plain = unet(x, t, enc).sample
        tomesd.apply_patch(unet, ratio=ratio, use_rand=False, max_downsample=max_ds)
        try:
            with torch.no_grad():
                ref = unet(x, t, enc).sample
        finally:
            tomesd.remove_patch(unet)
        with bigain.apply(unet, "tome", ratio=ratio, dst="topleft", max_downsample=max_ds):
            with torch.no_grad():
                mine = unet(x, t, enc).sample
        assert (ref - plain).abs().max() > 1e-3  # the comparison is not vacuous
        assert (mine - ref).abs().max() <= 1e-5, (shape, batch, ratio, max_ds)


def test_unet_levels_and_skips(unet):
    handle = bigain.apply(unet, "tome", ratio=0.5)
    assert all(name.startswith(("down_blocks.0", "up_blocks.1")) for name in handle.layers)
    assert len(handle.layers) == 3  # down0 x1, up1 (the last up block) x2
    reasons = dict(handle.skipped)
    assert any("level 2 > max_downsample=1" in r for r in reasons.values())
    handle.remove()
    assert len(bigain.apply(unet, "tome", max_downsample=2).layers) == 7  # + down1, mid, up0


def test_contexts_carry_grid_level_timesteps_and_block_input(unet):
    rec = Recorder()
    with bigain.apply(unet, rec, max_downsample=2, seed=7):
        unet_call(unet, torch.randn(2, 4, 14, 10), torch.tensor([3, 900]))
    grids = {(c.level, c.grid) for c in rec.seen}
    assert grids == {(1, (14, 10)), (2, (7, 5))}
    for c in rec.seen:
        assert c.timesteps.tolist() == [3.0, 900.0]
        assert c.timestep_values is None  # never read back to the host
        assert c.seed == 7
        assert c.metric.shape[1] == c.grid[0] * c.grid[1]


def test_unet_metric_is_the_block_input_not_the_normed_attention_input(unet):
    rec = Recorder()
    block_inputs = []
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    hook = block.register_forward_pre_hook(lambda m, a, k: block_inputs.append(a[0] if a else k["hidden_states"]),
                                           with_kwargs=True)
    with bigain.apply(unet, rec):
        unet_call(unet, torch.randn(1, 4, 16, 16), torch.tensor([5]))
    hook.remove()
    assert torch.equal(rec.seen[0].metric, block_inputs[0])


def test_dit_blocks_default_to_the_papers_scaled(dit):
    assert bigain.default_dit_blocks(28) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    assert bigain.default_dit_blocks(6) == [1, 2]
    assert bigain.default_dit_blocks(12) == [1, 2, 3, 4, 5]
    handle = bigain.apply(dit, "todo")
    assert handle.layers == ["transformer_blocks.1.attn1"]  # 4 blocks -> block 1
    handle.remove()
    handle = bigain.apply(dit, "todo", blocks=[0, 3])
    assert handle.layers == ["transformer_blocks.0.attn1", "transformer_blocks.3.attn1"]
    handle.remove()
    with pytest.raises(ConfigError, match="blocks 0..3"):
        bigain.apply(dit, "todo", blocks=[9])
    with pytest.raises(ConfigError, match="max_downsample"):
        bigain.apply(bigain.testing.tiny_unet(), "todo", blocks=[1])


def test_dit_contexts_use_the_patch_grid(dit):
    rec = Recorder()
    with bigain.apply(dit, rec, blocks="all"):
        args, kwargs = _inputs("dit", 0)
        _run(dit, args, kwargs)
    assert {c.grid for c in rec.seen} == {(4, 4)}
    assert rec.seen[0].timesteps.tolist() == [100.0, 800.0]


def test_measured_stats(unet):
    with bigain.apply(unet, "tome", ratio=0.5) as h:
        unet_call(unet, torch.randn(1, 4, 16, 16), torch.tensor([5]))
        row = h.stats()[0]
        assert (row["tokens_in"], row["queries"], row["keys_values"]) == (256, 128, 128)
        assert h.tokens_kept() == {1: {"queries": 0.5, "keys_values": 0.5}}
    with bigain.apply(unet, "todo", factor=2) as h:
        unet_call(unet, torch.randn(1, 4, 16, 16), torch.tensor([5]))
        row = h.stats()[0]
        assert (row["queries"], row["keys_values"], row["compressed_calls"]) == (256, 64, 1)


def test_wrapper_keeps_the_inner_signature_so_processor_kwargs_arrive(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    received = []

    class ScaledProcessor(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     gain: float = 1.0):
            received.append(gain)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    unet.set_attn_processor(ScaledProcessor())
    with bigain.apply(unet, "tome", ratio=0.5) as handle:
        attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        wrapper, inner = attn.processor, handle._originals[0]
        assert inspect.signature(wrapper.__call__) == inspect.signature(inner.__call__)
        enc = torch.zeros(1, 5, 32)
        with torch.no_grad():
            unet(torch.randn(1, 4, 16, 16), 5, encoder_hidden_states=enc, cross_attention_kwargs={"gain": 0.25})
    assert received and set(received) == {0.25}


def test_remove_restores_the_exact_objects_and_leaves_foreign_replacements(unet):
    from diffusers.models.attention_processor import AttnProcessor

    before = dict(unet.attn_processors)
    handle = bigain.apply(unet, "sito", ratio=0.5)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    foreign = AttnProcessor()
    attn.set_processor(foreign)  # someone else replaces one processor while compressed
    handle.remove()
    after = unet.attn_processors
    for name, proc in before.items():
        if name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor":
            assert after[name] is foreign
        else:
            assert after[name] is proc


def test_global_rng_untouched_by_random_methods(unet, dit):
    state = torch.get_rng_state()
    for name, kw in (("tome", {"ratio": 0.5}), ("sito", {"ratio": 0.5})):
        with bigain.apply(unet, name, **kw):
            unet_call(unet, torch.ones(2, 4, 16, 16), torch.tensor([1, 2]))
        with bigain.apply(dit, name, blocks="all", **kw):
            _run(dit, *_inputs("dit", 0))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name,kw", [("tome", {"ratio": 0.7}), ("sito", {"ratio": 0.5}),
                                     ("bigain_td", {"alpha_schedule": (0.1, 0.9)}), ("bigain_tm", {"ratio": 0.7})])
def test_results_do_not_depend_on_batching(unet, name, kw):
    """Per-sample randomness is keyed by (seed, layer, timestep): a sample compresses the same way
    alone or in any batch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500, 500])
    with bigain.apply(unet, name, max_downsample=2, **kw):
        batched = unet_call(unet, x, t)
        singles = torch.cat([unet_call(unet, x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)


def test_compression_changes_the_output(unet):
    x = torch.randn(1, 4, 16, 16)
    plain = unet_call(unet, x, torch.tensor([5]))
    for name in ("tome", "bigain_tm", "todo", "bigain_td", "sito"):
        with bigain.apply(unet, name) as handle:
            assert (unet_call(unet, x, torch.tensor([5])) - plain).abs().max() > 1e-4, name
            handle.enabled = False  # paused: the original processors run unchanged
            assert torch.equal(unet_call(unet, x, torch.tensor([5])), plain)
            assert handle.stats()[0]["skipped"] == "disabled"


def test_pipelines_and_wrappers_are_accepted(dit):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler())
    with bigain.apply(pipe, "todo") as handle:
        assert handle.denoiser is dit

    class Holder:
        unet = bigain.testing.tiny_unet()

    with bigain.apply(Holder(), "none") as handle:
        assert handle.family == "unet"


def test_unsupported_model_and_double_apply(unet):
    with pytest.raises(UnsupportedModelError, match="Linear"):
        bigain.apply(torch.nn.Linear(2, 2), "tome")
    with bigain.apply(unet, "tome"):
        with pytest.raises(ConfigError, match="already has a bigain compressor"):
            bigain.apply(unet, "todo")
    bigain.apply(unet, "todo").remove()  # fine once removed


class Failing(TokenCompressor):
    """Fails the way a buggy plugin does: an exception inside compress, or shapes off the contract."""

    name = "failing"

    def __init__(self, *, how: str = "raise") -> None:
        self.how = how

    def compress(self, x, ctx):
        if self.how == "raise":
            raise IndexError("index 99 is out of bounds")
        if self.how == "shape":
            return Compressed(x[:, :, :-1], x[:, :, :-1])
        return Compressed(x[:, ::2], x[:, ::2], restore=lambda y: y)  # restore forgets the dropped tokens


@pytest.mark.parametrize("how,what", [("raise", r"failed in compress\(\)"), ("shape", "broke the contract"),
                                      ("restore", "broke the contract")])
def test_a_failing_compressor_is_named_with_its_layer(dit, how, what):
    from bigain.errors import CompressorError

    with bigain.apply(dit, Failing(how=how), blocks=[1]):
        with pytest.raises(CompressorError, match=what) as info:
            _run(dit, *_inputs("dit", 0))
    message = str(info.value)
    assert "'failing'" in message and "test_patching.Failing" in message
    assert "transformer_blocks.1.attn1" in message and "check_compressor" in message
    if how == "raise":
        assert "IndexError: index 99 is out of bounds" in message
