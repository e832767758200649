"""Joint attention (SD3 / SD3.5 MMDiT, Flux double- and single-stream blocks): only the image tokens
are compressed, the text tokens keep attending and being attended to, rotary positions follow the
compressed tokens, and every compressed forward traces as one graph."""

import pytest
import torch

import bigain
from bigain.adapters import find_adapter
from bigain.compressor import Compressed, TokenCompressor
from bigain.errors import CompressorError, ConfigError
from bigain.plugins._tokens import gather_tokens
from bigain.testing import TINY_FLUX_CONFIG, TINY_SD3_CONFIG, tiny_flux, tiny_sd3

METHODS = ["none", "tome", "bigain_tm", "sito", "todo", "bigain_td"]
TEXT = 5


def build(family, batch=3, size=None, **config):
    """A tiny model (its config changed by ``config``) and its forward kwargs (non-square latent,
    per-sample timesteps)."""
    if config:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        cls, base = ((SD3Transformer2DModel, TINY_SD3_CONFIG) if family == "sd3"
                     else (FluxTransformer2DModel, TINY_FLUX_CONFIG))
        torch.manual_seed(0)
        model = cls(**{**base, **config}).eval()
    else:
        model = tiny_sd3() if family == "sd3" else tiny_flux()
    adapter = find_adapter(model)
    size = size or ((8, 6) if family == "sd3" else (8, 12))  # SD3: 4x3 patches; Flux: 4x6 packed tokens
    kwargs = adapter.example_inputs(batch, size, generator=torch.Generator().manual_seed(1), text_tokens=TEXT)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3][:batch])
    kwargs["timestep"] = t if family == "flux" else t * 1000
    return model, kwargs


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


FAMILIES = ["sd3", "flux"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_compresses_the_image_tokens_and_remove_restores_bitwise(family):
    model, kwargs = build(family)
    before = run(model, kwargs)
    n, n_kv = (12, 2) if family == "sd3" else (24, 6)  # 4x3 and 4x6 grids; key/value grids 2x1 and 2x3
    for name in METHODS:
        with bigain.apply(model, name, blocks="all") as handle:
            out = run(model, kwargs)
            stats = handle.stats()
        assert handle.family == family
        sites = {s["layer"] for s in stats}
        if family == "sd3":  # every joint attn, and SD3.5's dual attention (attn2) of block 0
            assert sites == {"transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn",
                             "transformer_blocks.2.attn"}
        else:  # two double-stream and two single-stream blocks
            assert sites == {"transformer_blocks.0.attn", "transformer_blocks.1.attn",
                             "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"}
        assert all(s["calls"] == 1 and s["tokens_in"] == n and s["skipped"] is None for s in stats), (name, stats)
        for s in stats:  # text tokens beside the image tokens, never counted among them nor compressed
            assert s["text_tokens"] == (0 if s["layer"].endswith("attn2") else TEXT), (name, s)
        assert torch.equal(run(model, kwargs), before), name  # remove() restores bitwise
        if name == "none":
            assert torch.equal(out, before) and all(s["compressed_calls"] == 0 for s in stats)
            continue
        assert all(s["compressed_calls"] == 1 for s in stats), (name, stats)
        kept = (stats[0]["queries"], stats[0]["keys_values"])
        assert kept == ((n, n_kv) if name in ("todo", "bigain_td") else (n // 2, n // 2)), (name, kept)
        assert handle.tokens_kept()[1]["queries"] == kept[0] / n
        assert not torch.allclose(out, before, atol=1e-4), name


class Reorder(TokenCompressor):
    """Permutes the image tokens (merge path: queries = context) or only the keys/values (key/value
    path), with or without their positions. Attention is permutation-equivariant, so with the
    positions moved along the output must equal the uncompressed one."""

    name = "reorder"

    def __init__(self, *, kv: bool = False, move_positions: bool = True) -> None:
        self.kv = kv
        self.move_positions = move_positions

    def compress(self, x, ctx):
        n = x.shape[1]
        perm = torch.arange(n - 1, -1, -1, device=x.device).expand(x.shape[0], n)
        moved = gather_tokens(x, perm)
        pos = None
        if ctx.positions is not None:
            pos = gather_tokens(ctx.positions, perm) if self.move_positions else ctx.positions.clone()
        if self.kv:
            return Compressed(x, moved, query_positions=ctx.positions, context_positions=pos)
        return Compressed(moved, moved, lambda y: gather_tokens(y, perm), query_positions=pos, context_positions=pos)


@pytest.mark.parametrize("kv", [False, True], ids=["merge-path", "kv-path"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_tokens_and_positions_are_carried_exactly(family, kv):
    """A compression that only reorders tokens changes nothing: the text tokens reach the processor
    untouched, keys/values arrive through the projections, and (Flux) every moved token is rotated
    by its own position."""
    model, kwargs = build(family)
    before = run(model, kwargs)
    with bigain.apply(model, Reorder(kv=kv), blocks="all") as handle:
        out = run(model, kwargs)
    assert all(s["compressed_calls"] == 1 for s in handle.stats())
    torch.testing.assert_close(out, before, atol=2e-5, rtol=1e-4)
    if family == "flux":  # tokens moved without their positions: the rotary embedding notices
        with bigain.apply(model, Reorder(kv=kv, move_positions=False), blocks="all"):
            assert not torch.allclose(run(model, kwargs), before, atol=1e-3)


def _first_block_text_output(model, kwargs):
    got = {}

    def keep(module, args, out):
        got["text"] = out[0]  # (text, image) outputs of a joint block

    handle = model.transformer_blocks[0].register_forward_hook(keep)
    try:
        run(model, kwargs)
    finally:
        handle.remove()
    return got["text"]


@pytest.mark.parametrize("name", ["tome", "bigain_tm", "bigain_td"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_tokens_still_attend_to_every_image_token(family, name):
    """The first joint block's text output keeps its length and depends on every image token: these
    methods mix every token into some query or key (on an even grid), and the text attends to them."""
    model, kwargs = build(family, batch=1, size=(8, 8))  # SD3: 4x4 patches; Flux: 4x4 tokens
    with bigain.apply(model, name, blocks=[0]):
        base = _first_block_text_output(model, kwargs)
        assert base.shape == (1, TEXT, base.shape[-1])
        for i in range(16):
            poked = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
            if family == "sd3":
                r, c = divmod(i, 4)
                poked["hidden_states"][:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 1.0
            else:
                poked["hidden_states"][:, i] += 1.0
            assert not torch.allclose(_first_block_text_output(model, poked), base, atol=1e-6), (name, i)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_one_graph_and_no_break(family, name):
    # two blocks keep tracing short: SD3 block 0 (joint + dual attention) and its last block
    # (context_pre_only); Flux one double-stream and one single-stream block
    depth = {"num_layers": 2} if family == "sd3" else {"num_layers": 1, "num_single_layers": 1}
    model, kwargs = build(family, **depth)
    with bigain.apply(model, name, blocks="all") as handle:
        eager = run(model, kwargs)  # Flux: reads the grid from img_ids once, before tracing
        explanation = torch._dynamo.explain(model)(**kwargs)
        traced = handle.stats()[0]["traced"]
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    assert traced["compressed"] == (name != "none") and traced["text_tokens"] == TEXT
    assert eager.shape == run(model, kwargs).shape


def test_flux_grid_is_read_once_or_declared_and_never_inside_a_graph():
    model, kwargs = build("flux")
    handle = bigain.apply(model, "todo", blocks=[0])
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            compiled(**kwargs)  # traced before any eager call: the grid is unknown, nothing is read
        assert not handle.stats()[0]["traced"]["compressed"]
        assert "grid of 24 tokens unknown" in handle.stats()[0]["traced"]["skipped"]
        handle.adapter.set_grid(4, 6)
        torch._dynamo.reset()
        with torch.no_grad():
            compiled(**kwargs)
        assert handle.stats()[0]["traced"]["compressed"]
    finally:
        handle.remove()
    with bigain.apply(model, "todo", blocks=[0]) as handle:  # eager: read from img_ids, remembered
        run(model, kwargs)
        assert handle.adapter.grids == {24: (4, 6)} and handle.stats()[0]["compressed_calls"] == 1
    shuffled = dict(kwargs, img_ids=kwargs["img_ids"].flip(0))  # not row-major: no grid, not compressed
    with bigain.apply(model, "todo", blocks=[0]) as handle:
        run(model, shuffled)
        assert handle.stats()[0]["compressed_calls"] == 0 and "unknown" in handle.stats()[0]["skipped"]
    with pytest.raises(ConfigError, match="two positive integers"):
        handle.adapter.set_grid(4, 0)


def test_flux_timesteps_reach_compressors_on_the_thousand_scale():
    seen = []

    class Record(TokenCompressor):
        def compress(self, x, ctx):
            seen.append((ctx.timesteps.clone(), ctx.text_tokens, ctx.grid, ctx.positions.shape))
            return Compressed.identity(x)

    model, kwargs = build("flux")
    with bigain.apply(model, Record(), blocks=[0, 2]):
        run(model, kwargs)
    assert [s[1:] for s in seen] == [(TEXT, (4, 6), (3, 24, 3))] * 2
    torch.testing.assert_close(seen[0][0], torch.tensor([100.0, 500.0, 900.0]))


class NoPositions(TokenCompressor):
    """Written to the contract before positions existed: it compresses, and says nothing of where."""

    name = "no_positions"

    def compress(self, x, ctx):
        return Compressed(x, x[:, ::2])


def test_a_compressor_without_positions_is_refused_on_flux_and_works_on_sd3():
    model, kwargs = build("flux")
    with bigain.apply(model, NoPositions(), blocks=[0]):
        with pytest.raises(CompressorError, match=r"no_positions.*gave no token positions.*rotary position "
                                                   r"embeddings.*context_positions"):
            run(model, kwargs)
    sd3, sd3_kwargs = build("sd3")
    with bigain.apply(sd3, NoPositions(), blocks="all") as handle:
        run(sd3, sd3_kwargs)
    assert all(s["compressed_calls"] == 1 and s["keys_values"] == 6 for s in handle.stats())


def test_fused_projections_refuse_key_value_methods_with_the_fix():
    model, kwargs = build("sd3", dual_attention_layers=())  # diffusers cannot fuse SD3.5's attn2 itself
    model.fuse_qkv_projections()
    with bigain.apply(model, "tome", blocks=[1]) as handle:  # merging needs no separate keys: fine
        run(model, kwargs)
    assert handle.stats()[0]["compressed_calls"] == 1
    with bigain.apply(model, "todo", blocks=[1]):
        with pytest.raises(ConfigError, match=r"fused QKV projections.*unfuse_qkv_projections\(\)"):
            run(model, kwargs)


def test_blocks_select_sd3_and_flux_layers_like_dit_blocks():
    sd3, _ = build("sd3")
    with bigain.apply(sd3, "tome") as handle:  # "paper": DiT-XL/2's blocks scaled to the depth
        assert handle.layers == ["transformer_blocks.1.attn"]
    with bigain.apply(sd3, "tome", blocks=[0]) as handle:  # a block's joint and dual attention
        assert handle.layers == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2"]
    flux, _ = build("flux")  # one numbering: double-stream blocks 0-1, then single-stream blocks 2-3
    with bigain.apply(flux, "tome") as handle:
        assert handle.layers == ["transformer_blocks.1.attn"]
    with bigain.apply(flux, "tome", blocks=[1, 2]) as handle:
        assert handle.layers == ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"]
    with pytest.raises(ConfigError, match=r"blocks \[4\] do not exist.*blocks 0..3"):
        bigain.apply(flux, "tome", blocks=[4])
