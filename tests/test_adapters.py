"""Denoiser adapters: the built-ins are found through entry points, a third party adds a family with
one class, and nothing else needs to know the family."""

import pytest
import torch
from torch import nn

import bigain
from bigain.adapters import ADAPTERS, AttentionSite, DenoiserAdapter, argument, find_adapter, register_adapter
from bigain.errors import UnsupportedModelError
from bigain.testing import tiny_dit, tiny_unet


def test_builtin_adapters_come_from_entry_points():
    assert {"unet", "dit"} <= set(ADAPTERS.names())
    assert find_adapter(tiny_unet()).family == "unet"

    class Pipeline:  # anything holding a denoiser as .transformer / .unet / .denoiser
        transformer = tiny_dit()

    adapter = find_adapter(Pipeline())
    assert adapter.family == "dit" and adapter.denoiser is Pipeline.transformer
    assert [s.block_index for s in adapter.sites()] == [0, 1, 2, 3]


def test_an_unsupported_model_names_the_families():
    with pytest.raises(UnsupportedModelError, match=r"no denoiser adapter handles it") as info:
        find_adapter(nn.Linear(2, 2))
    for text in ("unet: UNet2DConditionModel", "dit: DiTTransformer2DModel", "'bigain.adapters'"):
        assert text in str(info.value)


class FlatDenoiser(nn.Module):
    """A made-up family: transformer blocks over the pixels of a ``[B, C, H, W]`` input."""

    def __init__(self, channels=16, depth=2):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.blocks = nn.ModuleList(BasicTransformerBlock(channels, 2, channels // 2) for _ in range(depth))
        self.time = nn.Linear(1, channels)

    def forward(self, hidden_states, timestep):
        b, c, h, w = hidden_states.shape
        x = hidden_states.flatten(2).transpose(1, 2) + self.time(timestep.float().view(-1, 1, 1))
        for block in self.blocks:
            x = block(x)
        return x.transpose(1, 2).reshape(b, c, h, w)


class FlatAdapter(DenoiserAdapter):
    family = "flat"
    handles = "FlatDenoiser (a test family)"

    @classmethod
    def matches(cls, module):
        return isinstance(module, FlatDenoiser)

    def sites(self):
        return [AttentionSite(f"blocks.{i}.attn1", block, block.attn1, 1, i)
                for i, block in enumerate(self.denoiser.blocks)]

    def select(self, sites, *, max_downsample, blocks):
        chosen = range(len(sites)) if blocks in ("paper", "all") else blocks
        return [s for s in sites if s.block_index in chosen], []

    def token_size(self, args, kwargs):
        x = argument(args, kwargs, 0, ("hidden_states",))
        return tuple(x.shape[-2:])


@pytest.fixture
def flat_family():
    register_adapter("flat", FlatAdapter)
    yield
    ADAPTERS.unregister("flat")


def test_a_third_party_family_is_one_adapter_class(flat_family):
    torch.manual_seed(0)
    model = FlatDenoiser().eval()
    x, t = torch.randn(3, 16, 6, 10), torch.tensor([5.0, 500.0, 900.0])
    with torch.no_grad():
        before = model(x, t)
        with bigain.apply(model, "tome", ratio=0.5) as handle:
            assert handle.family == "flat" and handle.layers == ["blocks.0.attn1", "blocks.1.attn1"]
            compressed = model(x, t)
            stats = handle.stats()
            compiled = torch.compile(model, fullgraph=True, backend="eager")(x, t)
        assert torch.equal(model(x, t), before)
    assert all(s["compressed_calls"] == 1 and s["grid"] == [6, 10] and s["queries"] == 30 for s in stats)
    assert not torch.allclose(compressed, before)
    assert torch.allclose(compiled, compressed, atol=1e-5)
    assert any(r.name == "flat" and r.ok for r in ADAPTERS.report())
    torch._dynamo.reset()


def test_a_broken_adapter_does_not_hide_the_others(flat_family):
    class Broken(FlatAdapter):
        @classmethod
        def matches(cls, module):
            raise RuntimeError("boom")

    ADAPTERS.register("aaa_broken", Broken)  # sorts first
    try:
        assert find_adapter(tiny_unet()).family == "unet"
        with pytest.raises(UnsupportedModelError, match=r"'aaa_broken' .* failed in matches\(\): RuntimeError: boom"):
            find_adapter(nn.Linear(2, 2))
    finally:
        ADAPTERS.unregister("aaa_broken")


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=3, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=12, use_additional_conditions=False).eval()
    for p in model.parameters():  # diffusers zero-initialises some output layers
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.02)
    x = torch.randn(3, 4, 8, 6)  # non-square latent: a 4 x 3 patch grid
    return model, (x,), {"encoder_hidden_states": torch.randn(3, 5, 12), "timestep": torch.tensor([1, 500, 999])}


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8).eval()
    cond = {"text_embeds": torch.randn(2, 16), "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2)}
    return model, (torch.randn(2, 4, 16, 12), torch.tensor([10, 700]), torch.randn(2, 5, 32)), {
        "added_cond_kwargs": cond}


FAMILIES = {"pixart": (tiny_pixart, {"blocks": "all"}), "sdxl": (tiny_sdxl_unet, {"max_downsample": 2})}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_method_compresses_pixart_and_sdxl(family):
    build, options = FAMILIES[family]
    model, args, kwargs = build()
    with torch.no_grad():
        before = model(*args, **kwargs).sample
        for name in bigain.list_compressors():
            with bigain.apply(model, name, **options) as handle:
                out = model(*args, **kwargs).sample
                stats = handle.stats()
            assert handle.family == ("pixart" if family == "pixart" else "unet")
            assert stats and all(s["calls"] == 1 for s in stats), (name, stats)
            if name == "none":
                assert torch.equal(out, before)
                continue
            assert all(s["compressed_calls"] == 1 for s in stats), (name, stats)
            assert 0 < stats[0]["queries"] * stats[0]["keys_values"] < stats[0]["tokens_in"] ** 2
            assert not torch.allclose(out, before), name
            assert torch.equal(model(*args, **kwargs).sample, before)  # remove() restores bitwise
        with bigain.apply(model, "tome", **options):
            compiled = torch.compile(model, fullgraph=True, backend="eager")(*args, **kwargs).sample
            assert torch.allclose(compiled, model(*args, **kwargs).sample, atol=1e-5)
    torch._dynamo.reset()


def test_pixart_example_inputs_carry_the_conditions_diffusers_turns_on():
    from diffusers import PixArtTransformer2DModel

    # use_additional_conditions left to diffusers (None in the config): on for sample_size 128, the 1024 px model
    model = PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=1, cross_attention_dim=24, sample_size=128, patch_size=2,
                                     caption_channels=12).eval()
    assert model.config.use_additional_conditions is None and model.use_additional_conditions
    inputs = find_adapter(model).example_inputs(2, (8, 6), text_tokens=4)
    assert inputs["added_cond_kwargs"]["resolution"].tolist() == [[64.0, 48.0]] * 2
    with torch.no_grad():
        assert model(**inputs).sample.shape == (2, 8, 8, 6)


def test_sdxl_at_level_one_warns_that_nothing_is_compressed():
    model, _, _ = tiny_sdxl_unet()
    with pytest.warns(UserWarning, match=r"selected no self-attention layer.*levels \[2\].*use 2"):
        handle = bigain.apply(model, "tome")
    assert handle.layers == [] and all("max_downsample=1" in reason for _, reason in handle.skipped)
    handle.remove()


def test_an_adapter_must_say_which_denoisers_it_handles():
    with pytest.raises(TypeError, match="must set model_class"):
        class Vague(DenoiserAdapter):  # neither model_class nor matches()
            family = "vague"


def test_the_adapter_guide_runs():
    """docs/guides/adapter.md: its Python blocks, run in order in one namespace (they assert what
    they show: every method compresses the guide's family, remove() restores it, one graph)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "adapter.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert len(blocks) >= 4
    namespace = {"__name__": "adapter_guide"}
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"docs/guides/adapter.md (python block {i + 1})", "exec"), namespace)
    finally:
        if "pixel" in ADAPTERS.names():
            ADAPTERS.unregister("pixel")
        torch._dynamo.reset()
    assert "pixel" not in ADAPTERS.names()
    assert namespace["explanation"].graph_count == 1
