"""The benchmark's measurements (not its timings): FLOP counts against the analytic count."""

import json

import pytest
import torch

import bigain
from bigain.bench import classifier_overhead, count_flops, format_table, parse_method, run_bench
from bigain.errors import ConfigError, UnknownNameError
from bigain.testing import tiny_unet


def unet_inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(batch, 4, 16, 16, generator=g), "timestep": torch.full((batch,), 500),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g)}


# The tiny UNet's full-resolution level: 3 self-attention layers, C = 32 channels, N = 16*16 tokens.
LAYERS, C, N = 3, 32, 256


def test_flops_of_kv_downsampling_match_the_analytic_count():
    unet, inputs = tiny_unet(), unet_inputs()
    base = count_flops(unet, inputs)
    with bigain.apply(unet, "todo", factor=2):
        todo = count_flops(unet, inputs)
    m = N // 4
    # attention QK^T and AV shrink from N x N to N x M; the K and V projections from N to M tokens
    per_layer = 4 * N * C * (N - m) + 2 * 2 * C * C * (N - m)
    assert base - todo == 2 * LAYERS * per_layer


def test_half_precision_similarity_products_are_counted_on_every_torch(monkeypatch):
    # On a GPU the similarity products run as bmm(fp16, fp16, out_dtype=float32): the ``bmm.dtype``
    # overload. torch 2.11's built-in formula takes that dtype for its ``out_shape`` and fails inside
    # the counter; install such a formula and check the bench still counts the product.
    from torch.utils import flop_counter

    def strict_bmm(a_shape, b_shape, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    monkeypatch.setitem(flop_counter.flop_registry, torch.ops.aten.bmm, flop_counter.shape_wrapper(strict_bmm))

    class Similarity(torch.nn.Module):
        def forward(self, a, b):
            return torch.bmm(a, b, out_dtype=torch.float32)

    a = torch.empty(2, 6, 8, dtype=torch.float16, device="meta")
    b = torch.empty(2, 8, 5, dtype=torch.float16, device="meta")
    assert count_flops(Similarity(), {"a": a, "b": b}) == 2 * 2 * 6 * 8 * 5


def test_flops_of_merging_match_the_analytic_count():
    unet, inputs = tiny_unet(), unet_inputs()
    base = count_flops(unet, inputs)
    with bigain.apply(unet, "tome", ratio=0.5, dst="topleft"):
        tome = count_flops(unet, inputs)
    kept = N - int(N * 0.5)
    dst = N // 4
    saved = 4 * C * (N * N - kept * kept) + 4 * 2 * C * C * (N - kept)  # attention + q, k, v, out projections
    matching = 2 * (N - dst) * dst * C  # the source x destination similarity matmul
    assert base - tome == 2 * LAYERS * (saved - matching)


def test_run_bench_reports_every_method_against_none():
    df, info = run_bench(model="toy", methods=["tome:ratio=0.5", "todo:factor=2"], repeats=1, warmup=0)
    assert df["method"].tolist() == ["none", "tome:ratio=0.5", "todo:factor=2"]
    assert df.loc[0, "speedup"] == 1.0 and (df["median_ms"] > 0).all()
    assert df.loc[2, "gflops"] < df.loc[0, "gflops"]
    assert json.loads(df.loc[1, "tokens_kept"]) == {"1": {"queries": 0.5, "keys_values": 0.5}}
    assert "random weights" in info["source"] and "| todo:factor=2 |" in format_table(df, info)


def test_run_bench_times_eager_and_compiled_side_by_side():
    """Each method stays applied on its own weight-sharing copy: one trace per method and mode,
    compile time reported apart."""
    torch._dynamo.reset()
    df, info = run_bench(model="toy", methods=["tome:ratio=0.5", "todo:factor=2"], repeats=2, warmup=0, flops=False,
                         compile_modes=["none", "default"], compile_backend="eager")
    assert list(zip(df["method"], df["compile"])) == [
        ("none", "none"), ("tome:ratio=0.5", "none"), ("todo:factor=2", "none"),
        ("none", "default"), ("tome:ratio=0.5", "default"), ("todo:factor=2", "default")]
    compiled = df[df["compile"] == "default"]
    assert (compiled["compile_s"] > 0).all() and df[df["compile"] == "none"]["compile_s"].isna().all()
    assert (compiled["vs_eager"] > 0).all() and info["compile_backend"] == "eager"
    assert info["freeze"] is False and "weights frozen" not in format_table(df, info)  # not frozen by default
    assert json.loads(compiled.iloc[1]["tokens_kept"]) == {"1": {"queries": 0.5, "keys_values": 0.5}}
    table = format_table(df, info)
    assert "| tome:ratio=0.5 | default |" in table and "vs eager" in table
    with pytest.raises(ConfigError, match="compile mode"):
        run_bench(model="toy", methods=["none"], repeats=1, warmup=0, flops=False, compile_modes=["fast"])
    torch._dynamo.reset()


def test_freeze_compiles_with_the_weights_as_constants():
    """``--freeze`` is inductor's ``freezing`` setting while each method is compiled (read by a recording backend;
    the side-by-side test above compiles unfrozen)."""
    from torch._inductor import config as inductor_config

    seen = []

    def recording(gm, example_inputs):
        seen.append(inductor_config.freezing)
        return gm.forward

    torch._dynamo.reset()
    df, info = run_bench(model="toy", methods=["none", "tome:ratio=0.5"], repeats=1, warmup=0, flops=False,
                         compile_modes=["none", "default"], compile_backend=recording, freeze=True)
    torch._dynamo.reset()
    assert seen and set(seen) == {True} and info["freeze"] is True
    assert "weights frozen" in format_table(df, info)
    assert not inductor_config.freezing  # the setting does not outlive the compile


def test_weight_sharing_clone_keeps_one_copy_of_the_weights():
    from bigain.bench import _clone_sharing_weights

    unet = tiny_unet()
    clone = _clone_sharing_weights(unet)
    assert all(a is b for a, b in zip(unet.parameters(), clone.parameters()))
    with bigain.apply(clone, "tome", ratio=0.5):
        assert not any(type(m.processor).__name__ == "CompressingProcessor"
                       for m in unet.modules() if hasattr(m, "processor"))


def test_method_specs_are_validated():
    assert parse_method("bigain_td:factor=2,alpha=0.5").options == {"factor": 2, "alpha": 0.5}
    with pytest.raises(ConfigError, match="key=value"):
        parse_method("tome:0.5")
    with pytest.raises(UnknownNameError, match="Did you mean"):
        parse_method("tomee:ratio=0.5")
    with pytest.raises(UnknownNameError, match="sd2-unet"):
        run_bench(model="sd3", repeats=1)


def test_classifier_overhead_reports_wall_against_denoiser_time(tmp_path):
    from bigain.testing import save_tiny_dit

    path = save_tiny_dit(tmp_path / "dit")
    result = classifier_overhead(backbone="dit", backbone_options={"path": path}, images=2, n_samples=(2, 4),
                                 to_keep=(3, 1), image_size=16)
    assert result["images"] == 2 and result["calls"] == 2 * 2  # two calls per image at batch 32
    assert result["wall_s"] > 0 and result["denoiser_s"] > 0


def test_compare_tomesd_on_a_local_checkpoint(tmp_path):
    pytest.importorskip("tomesd")
    from bigain.testing import save_tiny_stable_diffusion

    path = save_tiny_stable_diffusion(tmp_path / "sd")
    df, info = run_bench(model_path=path, methods=["tome:ratio=0.5"], resolution=128, compare_tomesd=True,
                         repeats=1, warmup=0)
    rows = df.set_index("method")
    assert list(rows.index) == ["none", "tome:ratio=0.5", "tomesd:ratio=0.5"]
    # the same merge on the same layers costs the same FLOPs, whichever implementation does it
    assert rows.loc["tomesd:ratio=0.5", "gflops"] == pytest.approx(rows.loc["tome:ratio=0.5", "gflops"], rel=1e-6)
    assert rows.loc["tome:ratio=0.5", "gflops"] < rows.loc["none", "gflops"]
    assert info["model"] == path


def test_denoiser_gflops_counts_the_attached_compressor():
    from bigain.backbones.dit import ToyDiT
    from bigain.bench import denoiser_gflops

    backbone = ToyDiT()  # no set_classes yet: the count falls back to the null class
    full = denoiser_gflops(backbone, 32)
    with bigain.apply(backbone, "todo", factor=2, blocks=[1, 2, 3, 4]):
        reduced = denoiser_gflops(backbone, 32)
    assert full > 0 and reduced < full
    assert denoiser_gflops(backbone, 32) == pytest.approx(full)  # removed again


# Depth and width overrides that keep each bundled architecture's structure (its block types, text
# and pooled dimensions, rotary axes) at a size that builds and runs in a second on a CPU.
TINY_BENCH = {
    "sd2-unet": "sd2-unet:block_out_channels=[32,32,64,64],attention_head_dim=[1,1,2,2],layers_per_block=1",
    "sdxl-unet": "sdxl-unet:block_out_channels=[32,64,128],attention_head_dim=[1,2,4],layers_per_block=1,"
                 "transformer_layers_per_block=1",
    "dit-xl-2": "dit-xl-2:num_layers=2,num_attention_heads=1",
    "pixart-xl-2": "pixart-xl-2:num_layers=2,num_attention_heads=1,cross_attention_dim=72",
    "sd3-medium": "sd3-medium:num_layers=2,num_attention_heads=1,caption_projection_dim=64",
    "flux-dev": "flux-dev:num_layers=1,num_single_layers=1,num_attention_heads=1",
}


@pytest.mark.parametrize("name", sorted(TINY_BENCH))
def test_every_bundled_config_builds_reduced_and_compresses(name):
    from bigain.adapters import find_adapter
    from bigain.bench import BENCH_MODELS, build_bench_model

    assert name in BENCH_MODELS
    model, inputs, info = build_bench_model(TINY_BENCH[name], resolution=64, batch_size=1)
    assert info["source"].startswith(f"bundled config {name}, overrides {{") and info["parameters"] < 5e7
    with torch.no_grad():
        before = model(**inputs).sample
        selection = find_adapter(model).selection(max_downsample=2, blocks="all")  # SDXL: no level-1 attention
        with bigain.apply(model, "todo", **selection) as handle:
            out = model(**inputs).sample
    assert out.shape == before.shape and not torch.allclose(out, before)
    assert handle.stats() and all(s["compressed_calls"] == 1 for s in handle.stats()), handle.stats()


def test_bench_runs_a_reduced_flux_dev_and_rejects_unknown_overrides():
    df, info = run_bench(model=TINY_BENCH["flux-dev"], methods=["none", "tome:ratio=0.5", "bigain_td:factor=2"],
                         resolution=64, repeats=1, warmup=0, blocks="all", compile_modes=["none"])
    kept = df.set_index("method")["tokens_kept"]
    assert json.loads(kept["tome:ratio=0.5"]) == {"1": {"queries": 0.5, "keys_values": 0.5}}
    assert json.loads(kept["bigain_td:factor=2"]) == {"1": {"queries": 1.0, "keys_values": 0.25}}
    assert info["model"].startswith("flux-dev:")
    with pytest.raises(ConfigError, match=r"no config entries \['depth'\]"):
        run_bench(model="flux-dev:depth=2", repeats=1)
    with pytest.raises(ConfigError, match="key=value"):
        run_bench(model="flux-dev:2", repeats=1)
