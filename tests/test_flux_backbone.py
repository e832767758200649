"""The ``flux`` backbone: a tiny saved FLUX.1 pipeline (transformer with double- and single-stream blocks,
a VAE with a shift factor, a CLIP encoder pooled, a T5 encoder, offline tokenizers, a resolution-shifted
flow-matching scheduler) and a schnell-like variant (no guidance embedding, a fixed shift), checked
against closed forms and diffusers' own ``FluxPipeline``, and ``bigain classify`` / ``bigain generate``
end to end: compressed, resumable after a kill."""

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_pipelines import clip_tokenizer, kill_and_resume, meta, pixels, records
from torch import nn

from bigain.cli import main
from bigain.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
T5_TOKENS = 12  # max_sequence_length of the tiny runs (the real default, 512, only costs time here)
BASE_SEQ, MAX_SEQ, BASE_SHIFT, MAX_SHIFT = 16, 256, 0.5, 1.15  # the tiny scheduler's resolution shift

pytestmark = pytest.mark.usefixtures("one_thread")


def _transformer(guidance_embeds: bool):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                   pooled_projection_dim=8, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    for p in model.parameters():  # diffusers zero-initialises the output layers
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.05)
    return model


def save_tiny_flux(path, seed: int = 0) -> str:
    """A tiny FLUX.1-dev-like pipeline folder built from configs: 32 px images -> 16x16x4 latents (VAE
    factor 2, ``shift_factor``) -> 8x8 tokens of 16 channels; 2 double- and 2 single-stream blocks of 2
    heads of 8 (rotary axes 2 + 2 + 4), a guidance embedding; a CLIP encoder pooling to 8; a 1-layer T5
    of width 24; a scheduler shifting by resolution (mu from 0.5 at 16 tokens to 1.15 at 256)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    root = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _transformer(True).save_pretrained(root / "transformer")
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                      sample_size=32, scaling_factor=1.5, shift_factor=0.1).save_pretrained(root / "vae")
        CLIPTextModel(CLIPTextConfig(vocab_size=90, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=20, bos_token_id=86,
                                     eos_token_id=87, pad_token_id=87)).save_pretrained(root / "text_encoder")
        T5EncoderModel(T5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder_2")
    clip_tokenizer(root / "tokenizer")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,()'-"]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(root / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=BASE_SEQ,
                                    max_image_seq_len=MAX_SEQ, base_shift=BASE_SHIFT,
                                    max_shift=MAX_SHIFT).save_pretrained(root / "scheduler")
    return str(root)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``dev``: the tiny pipeline; ``schnell``: the same parts with a transformer without guidance
    embedding and a fixed-shift (1.0) scheduler, as FLUX.1-schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("flux")
    dev = save_tiny_flux(root / "dev")
    schnell = root / "schnell"
    shutil.copytree(dev, schnell, ignore=shutil.ignore_patterns("transformer", "scheduler"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        _transformer(False).save_pretrained(schnell / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(schnell / "scheduler")
    return {"dev": dev, "schnell": str(schnell)}


@pytest.fixture(scope="module")
def dev(ckpts):
    return backbone(ckpts["dev"])


def backbone(path, **options):
    from bigain.backbones.flux import Flux

    return Flux(path=path, **{"max_sequence_length": T5_TOKENS, **options})


def pipeline(bb):
    """diffusers' own Flux pipeline around the backbone's parts (the reference)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(bb.path, subfolder="scheduler")
    return FluxPipeline(transformer=bb.transformer, vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                        text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2, scheduler=scheduler)


def closed_form_pack(latents):
    """Token ``r * (w / 2) + c``, channel ``4 k + 2 dy + dx`` = latent channel ``k`` at ``(2r + dy, 2c + dx)``."""
    b, ch, h, w = latents.shape
    out = torch.empty(b, (h // 2) * (w // 2), 4 * ch)
    for r in range(h // 2):
        for c in range(w // 2):
            for k in range(ch):
                for dy in range(2):
                    for dx in range(2):
                        out[:, r * (w // 2) + c, 4 * k + 2 * dy + dx] = latents[:, k, 2 * r + dy, 2 * c + dx]
    return out


def closed_form_sigma(t, tokens):
    """FLUX.1-dev's shifted sigma of schedule index ``t`` for ``tokens`` image tokens: ``u = (t + 1) / 1000``,
    ``mu`` linear in the token count, ``s = e^mu / (e^mu + 1 / u - 1)``."""
    mu = BASE_SHIFT + (MAX_SHIFT - BASE_SHIFT) * (tokens - BASE_SEQ) / (MAX_SEQ - BASE_SEQ)
    u = (t.double() + 1) / 1000
    return math.exp(mu) / (math.exp(mu) + 1 / u - 1)


def by_hand(bb, x_t, s, cond, guidance):
    """The transformer called as the pipeline calls it, on closed-form packed latents; unpacked by hand."""
    b, ch, h, w = x_t.shape
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros(rows.numel()), rows.flatten().float(), cols.flatten().float()], dim=1)
    g = None if guidance is None else torch.full((b,), guidance)
    with torch.no_grad():
        out = bb.transformer(hidden_states=closed_form_pack(x_t), encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, timestep=s.float(), guidance=g, img_ids=ids,
                             txt_ids=torch.zeros(cond.embeds.shape[1], 3)).sample
    v = torch.empty_like(x_t)
    for n in range(out.shape[1]):
        r, c = divmod(n, w // 2)
        v[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = out[:, n].reshape(b, ch, 2, 2)
    return v


# -- the backbone's maths ----------------------------------------------------------------------

def test_latents_pack_into_row_major_2x2_patches_with_their_img_ids():
    from diffusers import FluxPipeline

    from bigain.backbones.flux import image_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(0))  # h != w
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 15, 12)
    assert torch.equal(tokens, closed_form_pack(latents))
    assert torch.equal(unpack_latents(tokens, 6, 10), latents)
    ids = image_ids(6, 10)
    assert ids.shape == (15, 3) and torch.equal(ids[7], torch.tensor([0.0, 1.0, 2.0]))  # token 7: row 1, column 2
    assert torch.equal(ids, torch.tensor([[0.0, n // 5, n % 5] for n in range(15)]))
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 3, 6, 10))  # diffusers' own, for the record
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ConfigError, match="2x2 patches.*7 x 10.*multiples of"):
        pack_latents(torch.zeros(1, 3, 7, 10))


def test_resolution_shifted_noising_timesteps_and_targets_are_the_closed_form(dev):
    bb = dev
    assert bb.family == "flux" and bb.num_train_timesteps == 1000 and bb.prediction_type == "flow_prediction"
    assert bb.classification_target == "native" and bb.samplers == ("euler",) and bb.shifts_by_resolution
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 25, 500, 999])
    cond = bb.prompt_conditions(["a cat"] * 4)
    for h, w in ((16, 16), (16, 24)):  # 64 and 96 image tokens: different noise levels
        x0, eps = torch.randn(1, 4, h, w, generator=g), torch.randn(4, 4, h, w, generator=g)
        s = closed_form_sigma(t, h * w // 4).float().view(-1, 1, 1, 1)
        assert s.flatten()[-1] == 1.0
        x_t = bb.add_noise(x0, eps, t)
        torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
        torch.testing.assert_close(bb.timestep_input(t), 1000 * s.flatten())  # at the token count just noised
        torch.testing.assert_close(bb.native_target(x0.expand_as(eps), eps, t), eps - x0)  # the velocity
        steps = bb.timestep_input(t)
        v = bb.predict_output(x_t, steps, cond)
        assert v.shape == x_t.shape
        # the transformer receives s (= timestep / 1000) and the guidance embedding 3.5
        torch.testing.assert_close(v, by_hand(bb, x_t, s.flatten(), cond, 3.5), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bb.predict_noise(x_t, steps, cond), x_t + (1 - s) * v)
        torch.testing.assert_close(bb.predict_sample(x_t, steps, cond), x_t - s * v)
    assert not torch.allclose(closed_form_sigma(t[:3], 64), closed_form_sigma(t[:3], 96))
    bb.guidance = 1.0
    try:
        assert not torch.allclose(bb.predict_output(x_t, steps, cond), v)  # the embedding is used
    finally:
        bb.guidance = 3.5
    image = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1  # the VAE's shift factor: (mean - 0.1) * 1.5
    with torch.no_grad():
        torch.testing.assert_close(bb.encode(image), (bb.vae.encode(image).latent_dist.mean - 0.1) * 1.5)
    assert bb.latent_shape(32) == (4, 16, 16)


def test_a_fixed_shift_checkpoint_without_guidance_embedding(ckpts):
    bb = backbone(ckpts["schnell"])
    assert not bb.shifts_by_resolution and not bb.guidance_embeds
    assert bb.describe()["shift"] == 1.0 and bb.describe()["guidance"] is None
    t = torch.tensor([0, 300, 999])
    torch.testing.assert_close(bb.timestep_input(t), (t + 1).float())  # shift 1: s = u, at any size
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 4, 16, 8, generator=g)
    cond = bb.prompt_conditions(["a dog"] * 3)
    v = bb.predict_output(x_t, bb.timestep_input(t), cond)
    torch.testing.assert_close(v, by_hand(bb, x_t, (t + 1).double() / 1000, cond, None), atol=1e-5, rtol=1e-5)
    assert len(bb.null_conditions(2)) == 2  # the empty prompt, for true classifier-free guidance


def test_prompt_conditions_are_the_diffusers_pipeline_embeddings(dev):
    bb = dev
    prompts = ["a photo of a cat", "a dog"]
    embeds, pooled, text_ids = pipeline(bb).encode_prompt(prompts, None, device=torch.device("cpu"),
                                                          max_sequence_length=T5_TOKENS)
    cond = bb.prompt_conditions(prompts)
    assert cond.embeds.shape == (2, T5_TOKENS, 24) and cond.pooled.shape == (2, 8)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    assert not text_ids.any()
    bb.set_classes(prompts=["a cat", "a dog", "a bird"])
    picked = bb.class_conditions(torch.tensor([2, 0]))
    assert torch.equal(picked.embeds, bb.prompt_conditions(["a bird", "a cat"]).embeds)
    with pytest.raises(ConfigError, match="guidance-distilled.*guidance_scale at 1.*backbone_options.guidance"):
        bb.null_conditions(1)  # FLUX.1-dev has no classifier-free guidance


def test_the_classifier_noises_a_non_square_image_at_its_own_shift(dev):
    from bigain.tasks.adaptive import image_noise
    from bigain.tasks.classification import DiffusionClassifier

    module = DiffusionClassifier(backbone="flux", backbone_options={"path": dev.path,
                                                                    "max_sequence_length": T5_TOKENS},
                                 n_samples=[2], to_keep=[1], batch_size=4)
    assert module.target == "native"
    module.backbone = dev
    module.check_backbone(dev)
    module.num_classes, module.multilabel = 2, False
    dev.set_classes(prompts=["a cat", "a dog"])
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1  # 16 x 24 latents: 96 tokens
    record = module.classify(image, 7, 0)
    x0 = dev.encode(image[None])[0]
    noise = image_noise(0, 7, module.schedule, tuple(x0.shape))
    expected = {}
    for c in range(2):
        cond = dev.class_conditions(torch.tensor([c]))
        errs = []
        for row, t in enumerate(module.schedule.grid):
            s = closed_form_sigma(torch.tensor([t]), 96)
            x_t = ((1 - s.float()) * x0 + s.float() * noise[row])[None]
            v = by_hand(dev, x_t, s, cond, 3.5)[0]
            errs.append(float((v - (noise[row] - x0)).pow(2).mean()))
        expected[c] = sum(errs) / 2
    best = min(expected, key=lambda c: (expected[c], c))
    assert record["prediction"] == best
    for c in range(2):
        assert record["mean_errors"][str(c)] == pytest.approx(expected[c], rel=1e-4)


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_generation_is_the_diffusers_pipeline(ckpts, dev, kind):
    from bigain.tasks.generation import DiffusionGenerator, initial_noise

    # dev: the guidance embedding, no classifier-free guidance batch, non-square; schnell: true CFG
    scale = None if kind == "dev" else 2.0
    module = DiffusionGenerator(backbone="flux", backbone_options={"path": ckpts[kind],
                                                                   "max_sequence_length": T5_TOKENS},
                                steps=3, guidance_scale=scale, metrics=[])
    assert module.sampler_name == "euler" and module.guidance == (1.0 if kind == "dev" else 2.0)
    module.backbone = bb = dev if kind == "dev" else backbone(ckpts[kind])
    height, width = (32, 48) if kind == "dev" else (32, 32)
    prompts = ["a photo of a cat", "a dog"]
    noise = torch.stack([initial_noise(0, i, (4, height // 2, width // 2)) for i in range(2)])
    batches = []
    original = bb.transformer.forward

    def spy(*args, **kwargs):
        batches.append(kwargs["hidden_states"].shape[0])
        return original(*args, **kwargs)

    bb.transformer.forward = spy
    try:
        ours = module.sample(bb.prompt_conditions(prompts), noise)
    finally:
        del bb.transformer.forward
    assert batches == [2 if kind == "dev" else 4] * 3  # no null-prompt batch for the guidance-distilled model
    extra = {"true_cfg_scale": 2.0, "negative_prompt": ""} if kind == "schnell" else {}
    reference = pipeline(bb)(prompts, height=height, width=width, num_inference_steps=3, guidance_scale=3.5,
                             latents=closed_form_pack(noise), output_type="pt", max_sequence_length=T5_TOKENS,
                             **extra).images
    assert ours.shape == (2, 3, height, width)
    torch.testing.assert_close((ours + 1) / 2, reference, atol=1e-4, rtol=1e-4)


def test_bad_checkpoints_and_options_give_clear_errors(ckpts, dev, tmp_path):
    from bigain.backbones.base import RectifiedFlow
    from bigain.backbones.sd3 import StableDiffusion3
    from bigain.tasks.generation import DiffusionGenerator

    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"missing \['vae', 'text_encoder', 'text_encoder_2', 'tokenizer'"):
        backbone(str(tmp_path / "half"))
    with pytest.raises(ConfigError, match="max_sequence_length is at most 512"):
        backbone(ckpts["dev"], max_sequence_length=1024)
    with pytest.raises(ConfigError, match="guidance must be a non-negative number"):
        backbone(ckpts["dev"], guidance="strong")
    with pytest.raises(ConfigError, match="image_size 42 is not a multiple of 4.*use e.g. 40"):
        dev.latent_shape(42)
    with pytest.raises(ConfigError, match="flow-matching model.*not 'ddim'"):
        dev.sampling_scheduler("ddim")
    with pytest.raises(ConfigError, match=r"backbone 'flux' samples with euler \(or auto\), not 'ddim'"):
        DiffusionGenerator(backbone="flux", sampler="ddim")

    class FixedShift(RectifiedFlow, nn.Module):  # as StableDiffusion3: no resolution shifting
        pass

    assert not StableDiffusion3.dynamic_shifting
    with pytest.raises(CheckpointError, match="use_dynamic_shifting.*FixedShift does not support"):
        FixedShift().use_flow_schedule(ckpts["dev"])


# -- end to end --------------------------------------------------------------------------------

def _options(ckpts):
    return f"{{path: {ckpts['dev']}, max_sequence_length: {T5_TOKENS}}}"


def classify_args(ckpts, run_dir, *extra, length=3):
    return ["classify", "--model.backbone", "flux", "--model.backbone_options", _options(ckpts),
            "--model.n_samples", "[2]", "--model.to_keep", "[1]", "--data", "toy", "--data.length", str(length),
            "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--run_dir", str(run_dir), *extra]


def generate_args(ckpts, run_dir, *extra, length=3):
    return ["generate", "--model.backbone", "flux", "--model.backbone_options", _options(ckpts),
            "--model.steps", "2", "--model.metrics", "[]", "--data", "toy", "--data.length", str(length),
            "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--run_dir", str(run_dir), *extra]


def test_classify_end_to_end_compressed_and_resumed_after_a_kill(ckpts, tmp_path, kill_after):
    run = kill_and_resume(lambda run_dir, *extra: classify_args(ckpts, run_dir, "--model.compressor", "tome",
                                                                *extra, length=4), tmp_path, kill_after, total=4)
    errors = {}
    for comp in ("tome", "bigain_td"):
        clean = tmp_path / comp
        assert main(classify_args(ckpts, clean, "--model.compressor", comp, length=4)) == 0
        df = records(clean)
        assert df["index"].tolist() == [0, 1, 2, 3] and (df["evaluations"] == 10 * 2).all()
        m = meta(clean)
        assert m["status"] == "complete" and m["result_config"]["model"]["compressor"] == comp
        assert m["result_config"]["model"]["target"] == "native"  # the velocity error
        assert m["model"]["family"] == "flux" and m["model"]["dynamic_shift"] and m["model"]["guidance"] == 3.5
        assert m["compression"]["layers"]
        errors[comp] = df["mean_errors"].tolist()
    pd.testing.assert_frame_equal(records(run), records(tmp_path / "tome"))
    assert errors["tome"] != errors["bigain_td"]


def test_generate_end_to_end_compressed_and_resumed_after_a_kill(ckpts, tmp_path, kill_after, capsys):
    from bigain.toy.data import toy_prompts

    run = kill_and_resume(lambda run_dir, *extra: generate_args(ckpts, run_dir, "--model.compressor", "bigain_td",
                                                                 *extra), tmp_path, kill_after, total=3)
    runs = {}
    for comp in ("none", "bigain_td"):
        clean = tmp_path / comp
        assert main(generate_args(ckpts, clean, "--model.compressor", comp)) == 0
        runs[comp] = pixels(clean)
        assert sorted(runs[comp]) == [f"{i:06d}.png" for i in range(3)]
        assert all(p.shape == (3, 32, 32) and p.dtype == np.uint8 for p in runs[comp].values())
        df = records(clean)
        assert df["index"].tolist() == [0, 1, 2] and df["prompt"].tolist() == toy_prompts()[:3]
        m = meta(clean)
        assert m["status"] == "complete" and m["result_config"]["model"]["guidance_scale"] == 1.0
        assert m["model"]["family"] == "flux"
    resumed = pixels(run)
    assert all(np.array_equal(runs["bigain_td"][k], resumed[k]) for k in resumed)
    pd.testing.assert_frame_equal(records(run), records(tmp_path / "bigain_td"))
    assert m["compression"]["layers"]
    assert any(not np.array_equal(runs["none"][k], runs["bigain_td"][k]) for k in runs["none"])
    # guidance_scale > 1 on the guidance-distilled checkpoint is refused before any image is made
    capsys.readouterr()
    assert main(generate_args(ckpts, tmp_path / "cfg", "--model.guidance_scale", "2.0")) == 2
    assert "is guidance-distilled (guidance_embeds): it has no classifier-free guidance" in capsys.readouterr().err
    assert not list((tmp_path / "cfg").glob("images/*.png"))


# -- under torch.compile ---------------------------------------------------------------------

def test_the_tasks_declare_the_packed_token_grid_so_a_compiled_denoiser_still_compresses(ckpts, monkeypatch):
    from bigain.tasks.classification import DiffusionClassifier

    module = DiffusionClassifier(backbone="flux", backbone_options={"path": ckpts["dev"]}, compressor="tome",
                                 compressor_options={"ratio": 0.5})
    module.configure_model()
    adapter = module.handle.adapter
    assert adapter.grids == {}
    module.declare_image_size(48)  # 48 px -> 24 x 24 latent (VAE factor 2) -> 12 x 12 packed tokens
    assert adapter.grids == {144: (12, 12)}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inside a graph nothing is read back
    ids = torch.zeros(144, 3)
    assert adapter.token_size((), {"img_ids": ids}) == (12, 12)
    assert adapter.token_size((), {"img_ids": torch.zeros(100, 3)}) is None  # undeclared: passed through
