"""The ``sd3`` backbone: a tiny saved Stable Diffusion 3 pipeline (transformer, VAE with a shift factor,
two CLIP encoders with projections, a T5 encoder, offline tokenizers, a flow-matching scheduler) through
the flow-matching maths, against closed forms and diffusers' own ``StableDiffusion3Pipeline``, and
``bigain classify`` / ``bigain generate`` end to end: compressed, resumable after a kill."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_pipelines import assert_same_images, clip_tokenizer, kill_and_resume, meta, pixels, records
from torch import nn

from bigain.cli import main
from bigain.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIFT = 3.0
T5_TOKENS = 16  # max_sequence_length of the tiny runs (the real default, 256, only costs time here)

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_sd3(path, seed: int = 0) -> str:
    """A tiny SD3 pipeline folder built from configs: 32x32 images -> 16x16x4 latents (VAE with
    ``shift_factor``) -> an 8x8 patch grid, 3 joint blocks; CLIP encoders of widths 8 and 12 (20
    channels, zero-padded to the T5 width 24), projections 6 + 4 = the pooled 10; a 1-layer T5; a
    flow-matching scheduler with shift 3."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

    root = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                      caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8)
        for p in model.parameters():  # diffusers zero-initialises the modulation and output layers
            if p.abs().sum() == 0:
                nn.init.normal_(p, std=0.02)
        model.save_pretrained(root / "transformer")
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                      sample_size=32, scaling_factor=1.5, shift_factor=0.1).save_pretrained(root / "vae")
        for sub, hidden, projection in (("text_encoder", 8, 6), ("text_encoder_2", 12, 4)):
            CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=90, hidden_size=hidden, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=20, projection_dim=projection, bos_token_id=86, eos_token_id=87,
                pad_token_id=87)).save_pretrained(root / sub)
        T5EncoderModel(T5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder_3")
    clip_tokenizer(root / "tokenizer")
    clip_tokenizer(root / "tokenizer_2")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,()'-"]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=256).save_pretrained(root / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT).save_pretrained(root / "scheduler")
    return str(root)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    full = save_tiny_sd3(root / "sd3")
    no_t5 = root / "no-t5"
    shutil.copytree(full, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    return {"sd3": full, "no_t5": str(no_t5)}


def backbone(path, **options):
    from bigain.backbones.sd3 import StableDiffusion3

    return StableDiffusion3(path=path, **{"max_sequence_length": T5_TOKENS, **options})


def pipeline(bb):
    """diffusers' own SD3 pipeline around the backbone's parts (the reference)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(bb.path, subfolder="scheduler")
    return StableDiffusion3Pipeline(transformer=bb.transformer, vae=bb.vae, text_encoder=bb.text_encoder,
                                    tokenizer=bb.tokenizer, text_encoder_2=bb.text_encoder_2,
                                    tokenizer_2=bb.tokenizer_2, text_encoder_3=bb.text_encoder_3,
                                    tokenizer_3=bb.tokenizer_3, scheduler=scheduler)


def closed_form_sigma(t):
    """The shifted training sigma of schedule index ``t``: ``u = (t + 1) / 1000``, ``s = 3u / (1 + 2u)``."""
    u = (t.double() + 1) / 1000
    return SHIFT * u / (1 + (SHIFT - 1) * u)


# -- the backbone's maths ----------------------------------------------------------------------

def test_flow_noising_timesteps_and_targets_are_the_closed_form(ckpts):
    bb = backbone(ckpts["sd3"])
    assert bb.family == "sd3" and bb.num_train_timesteps == 1000 and bb.prediction_type == "flow_prediction"
    assert bb.classification_target == "native" and bb.samplers == ("euler",)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([0, 25, 500, 999])
    s = closed_form_sigma(t).float().view(-1, 1, 1, 1)
    assert s.flatten()[-1] == 1.0 and 0 < s.flatten()[0] < 0.004  # index 999 is pure noise
    x_t = bb.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(bb.timestep_input(t), 1000 * s.flatten())
    torch.testing.assert_close(bb.native_target(x0.expand_as(eps), eps, t), eps - x0)  # the velocity
    cond = bb.prompt_conditions(["a cat"] * 4)
    steps = bb.timestep_input(t)
    v = bb.predict_output(x_t, steps, cond)
    with torch.no_grad():
        raw = bb.transformer(hidden_states=x_t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                             timestep=steps).sample
    assert torch.equal(v, raw)
    torch.testing.assert_close(bb.predict_noise(x_t, steps, cond), x_t + (1 - s) * v)
    torch.testing.assert_close(bb.predict_sample(x_t, steps, cond), x_t - s * v)
    # the VAE's shift factor: latents are (mean - 0.1) * 1.5, and back
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        mean = bb.vae.encode(image).latent_dist.mean
        torch.testing.assert_close(bb.encode(image), (mean - 0.1) * 1.5)
        torch.testing.assert_close(bb.decode(x0), bb.vae.decode(x0 / 1.5 + 0.1).sample.clamp(-1, 1))


def test_prompt_conditions_are_the_diffusers_pipeline_embeddings(ckpts):
    for path, t5 in ((ckpts["sd3"], True), (ckpts["no_t5"], False)):
        bb = backbone(path)
        assert bb.uses_t5 is t5 and bb.describe()["t5"] is t5
        prompts = ["a photo of a cat", "a dog"]
        pe, npe, pooled, npooled = pipeline(bb).encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                                              do_classifier_free_guidance=True,
                                                              max_sequence_length=T5_TOKENS)
        cond = bb.prompt_conditions(prompts)
        assert cond.embeds.shape == (2, 20 + T5_TOKENS, 24) and cond.pooled.shape == (2, 10)
        torch.testing.assert_close(cond.embeds, pe)
        torch.testing.assert_close(cond.pooled, pooled)
        null = bb.null_conditions(2)
        torch.testing.assert_close(null.embeds, npe)
        torch.testing.assert_close(null.pooled, npooled)
        assert cond.embeds[:, :20, 20:].abs().sum() == 0  # the CLIP part is zero-padded to the T5 width
        assert bool(cond.embeds[:, 20:].abs().sum() > 0) is t5  # T5 tokens, or zeros without T5
    assert not backbone(ckpts["sd3"], use_t5=False).uses_t5
    bb.set_classes(prompts=["a cat", "a dog", "a bird"])
    picked = bb.class_conditions(torch.tensor([2, 0]))
    torch.testing.assert_close(picked.embeds, bb.prompt_conditions(["a bird", "a cat"]).embeds)
    both = bb.concat_conditions([picked, bb.null_conditions(2)])
    assert len(both) == 4 and both.pooled.shape == (4, 10)


def test_the_classifier_noises_by_the_flow_and_ranks_on_the_velocity_error(ckpts):
    from bigain.tasks.adaptive import AdaptiveSchedule, classify_image, image_noise
    from bigain.tasks.classification import DiffusionClassifier

    # an oracle: the exact velocity (x_t - x0) / s for class 2, offset for the others -> class 2, error 0
    bb = backbone(ckpts["sd3"])
    schedule = AdaptiveSchedule((2, 4), (2, 1), bb.num_train_timesteps)
    x0 = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = image_noise(0, 3, schedule, x0.shape)

    def oracle(x_t, t, classes):
        s = closed_form_sigma(t).float().view(-1, 1, 1, 1)
        return (x_t - x0) / s + 0.1 * (classes.view(-1, 1, 1, 1) - 2).float()

    result = classify_image(x0, noise, schedule=schedule, num_classes=5, add_noise=bb.add_noise, predict=oracle,
                            target=bb.native_target)
    assert result.prediction == 2 and result.mean_errors[2] < 1e-8 and result.mean_errors[1] > 1e-3

    # the task: the default target resolves to the velocity; every error is the velocity error by hand
    module = DiffusionClassifier(backbone="sd3", backbone_options={"path": ckpts["sd3"],
                                                                   "max_sequence_length": T5_TOKENS},
                                 n_samples=[2], to_keep=[1], batch_size=4)
    assert module.target == "native" and module.result_config()["target"] == "native"
    module.configure_model()
    module.num_classes, module.multilabel = 3, False
    bb = module.backbone
    bb.set_classes(prompts=["a cat", "a dog", "a bird"])
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    record = module.classify(image, 7, 0)
    x0 = bb.encode(image[None])[0]
    noise = image_noise(0, 7, module.schedule, tuple(x0.shape))
    expected, eps_expected = {}, {}
    for c in range(3):
        errs, eps_errs = [], []
        for row, t in enumerate(module.schedule.grid):
            s = float(closed_form_sigma(torch.tensor(t)))
            eps = noise[row]
            x_t = ((1 - s) * x0 + s * eps)[None]
            cond = bb.class_conditions(torch.tensor([c]))
            with torch.no_grad():
                v = bb.transformer(hidden_states=x_t, encoder_hidden_states=cond.embeds,
                                   pooled_projections=cond.pooled, timestep=torch.tensor([1000 * s])).sample[0]
            errs.append(float((v - (eps - x0)).pow(2).mean()))
            eps_errs.append(float((x_t[0] + (1 - s) * v - eps).pow(2).mean()))  # = (1 - s)^2 x the v error
        expected[c], eps_expected[c] = sum(errs) / 2, sum(eps_errs) / 2
    best = min(expected, key=lambda c: (expected[c], c))
    assert record["prediction"] == best
    assert record["mean_errors"][str(best)] == pytest.approx(expected[best], rel=1e-4)
    module.target = "epsilon"  # target: epsilon ranks the same model on the converted noise error
    eps_record = module.classify(image, 7, 0)
    eps_best = min(eps_expected, key=lambda c: (eps_expected[c], c))
    assert eps_record["mean_errors"][str(eps_best)] == pytest.approx(eps_expected[eps_best], rel=1e-4)
    assert eps_expected[eps_best] != pytest.approx(expected[eps_best], rel=1e-2)


def test_generation_is_the_diffusers_pipeline_with_guidance(ckpts):
    from bigain.tasks.generation import DiffusionGenerator, initial_noise

    module = DiffusionGenerator(backbone="sd3", backbone_options={"path": ckpts["sd3"],
                                                                  "max_sequence_length": T5_TOKENS},
                                steps=3, guidance_scale=5.0, metrics=[])
    assert module.sampler_name == "euler"
    module.configure_model()
    bb = module.backbone
    prompts = ["a photo of a cat", "a dog"]
    noise = torch.stack([initial_noise(0, i, bb.latent_shape(32)) for i in range(2)])
    ours = module.sample(bb.prompt_conditions(prompts), noise)
    reference = pipeline(bb)(prompts, height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                             latents=noise.clone(), output_type="pt", max_sequence_length=T5_TOKENS).images
    torch.testing.assert_close((ours + 1) / 2, reference, atol=1e-4, rtol=1e-4)


def test_ddpm_backbones_keep_their_maths():
    """The interface's defaults are the DDPM formulas, bit for bit (their own tests cover the rest)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from bigain.backbones import create_backbone
    from bigain.tasks.classification import DiffusionClassifier
    from bigain.tasks.generation import DiffusionGenerator

    bb = create_backbone("toy")
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(1, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 5, 999])
    a = bb.alphas_cumprod.double()[t].float().view(-1, 1, 1, 1)
    assert torch.equal(bb.add_noise(x0, eps, t), a.sqrt() * x0 + (1.0 - a).sqrt() * eps)
    assert bb.timestep_input(t) is t and torch.equal(bb.native_target(x0.expand_as(eps), eps, t), eps)
    assert isinstance(bb.sampling_scheduler("ddim"), DDIMScheduler)
    assert isinstance(bb.sampling_scheduler("euler"), EulerDiscreteScheduler)
    assert DiffusionClassifier(backbone="toy").target == "epsilon"
    assert "target" not in DiffusionClassifier(backbone="toy").result_config()  # earlier runs keep their identity
    assert DiffusionGenerator(backbone="toy").sampler_name == "ddim"


def test_bad_checkpoints_and_options_give_clear_errors(ckpts, tmp_path):
    from diffusers import DDPMScheduler

    from bigain.tasks.generation import DiffusionGenerator

    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"missing \['vae', 'text_encoder', 'text_encoder_2', 'tokenizer'"):
        backbone(str(tmp_path / "half"))
    ddpm = tmp_path / "ddpm"
    shutil.copytree(ckpts["no_t5"], ddpm, ignore=shutil.ignore_patterns("scheduler"))
    DDPMScheduler().save_pretrained(ddpm / "scheduler")
    with pytest.raises(CheckpointError, match="is a DDPMScheduler; a flow-matching model needs a FlowMatch"):
        backbone(str(ddpm))
    no_tok = tmp_path / "no-tokenizer-3"
    shutil.copytree(ckpts["sd3"], no_tok, ignore=shutil.ignore_patterns("tokenizer_3"))
    with pytest.raises(CheckpointError, match="text_encoder_3/ but no tokenizer_3/"):
        backbone(str(no_tok))
    with pytest.raises(ConfigError, match="max_sequence_length must be a positive integer.*256"):
        backbone(ckpts["no_t5"], max_sequence_length=0)
    with pytest.raises(ConfigError, match="use_t5 must be true or false"):
        backbone(ckpts["no_t5"], use_t5="yes")
    bb = backbone(ckpts["no_t5"])
    with pytest.raises(ConfigError, match="image_size 34 is not a multiple of 4"):
        bb.latent_shape(34)
    with pytest.raises(ConfigError, match="covers 8 patches a side.*at most 32"):
        bb.latent_shape(64)
    with pytest.raises(ConfigError, match="flow-matching model.*not 'ddim'"):
        bb.sampling_scheduler("ddim")
    with pytest.raises(ConfigError, match=r"backbone 'sd3' samples with euler \(or auto\), not 'ddim'"):
        DiffusionGenerator(backbone="sd3", sampler="ddim")


# -- end to end --------------------------------------------------------------------------------

def _options(ckpts):
    return f"{{path: {ckpts['sd3']}, max_sequence_length: {T5_TOKENS}}}"


def classify_args(ckpts, run_dir, *extra, length=3):
    return ["classify", "--model.backbone", "sd3", "--model.backbone_options", _options(ckpts),
            "--model.n_samples", "[2]", "--model.to_keep", "[1]", "--data", "toy", "--data.length", str(length),
            "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--run_dir", str(run_dir), *extra]


def generate_args(ckpts, run_dir, *extra, length=3):
    return ["generate", "--model.backbone", "sd3", "--model.backbone_options", _options(ckpts),
            "--model.steps", "2", "--model.metrics", "[]", "--data", "toy", "--data.length", str(length),
            "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--run_dir", str(run_dir), *extra]


def test_classify_end_to_end_with_none_and_tome(ckpts, tmp_path):
    errors = {}
    for comp in ("none", "tome"):
        run = tmp_path / comp
        assert main(classify_args(ckpts, run, "--model.compressor", comp)) == 0
        df = records(run)
        assert df["index"].tolist() == [0, 1, 2] and (df["evaluations"] == 10 * 2).all()
        m = meta(run)
        assert m["status"] == "complete" and m["result_config"]["model"]["compressor"] == comp
        assert m["result_config"]["model"]["target"] == "native"  # the velocity error
        assert m["model"]["family"] == "sd3" and m["model"]["prediction_type"] == "flow_prediction"
        assert m["model"]["shift"] == SHIFT and m["model"]["t5"]
        errors[comp] = df["mean_errors"].tolist()
    # attached through the sd3 adapter with its default (the paper's DiT blocks scaled to 3: block 1)
    assert m["compression"]["layers"] == ["transformer_blocks.1.attn"]
    assert errors["none"] != errors["tome"]


def test_generate_end_to_end_with_none_and_todo(ckpts, tmp_path):
    from bigain.toy.data import toy_prompts

    runs = {}
    for comp in ("none", "todo"):
        run = tmp_path / comp
        assert main(generate_args(ckpts, run, "--model.compressor", comp)) == 0
        runs[comp] = pixels(run)
        assert sorted(runs[comp]) == [f"{i:06d}.png" for i in range(3)]
        assert all(p.shape == (3, 32, 32) and p.dtype == np.uint8 for p in runs[comp].values())
        df = records(run)
        assert df["index"].tolist() == [0, 1, 2] and df["prompt"].tolist() == toy_prompts()[:3]
        m = meta(run)
        assert m["status"] == "complete" and m["result_config"]["model"]["sampler"] == "euler"
        assert m["model"]["family"] == "sd3"
    assert m["compression"]["layers"] == ["transformer_blocks.1.attn"]
    assert any(not np.array_equal(runs["none"][k], runs["todo"][k]) for k in runs["none"])


def test_a_killed_classify_run_resumes_to_the_uninterrupted_result(ckpts, tmp_path, kill_after):
    def args(run_dir, *extra):
        return classify_args(ckpts, run_dir, "--model.compressor", "tome", *extra, length=4)

    run = kill_and_resume(args, tmp_path, kill_after, total=4)
    assert main(args(tmp_path / "clean")) == 0
    pd.testing.assert_frame_equal(records(run), records(tmp_path / "clean"))


def test_a_killed_generate_run_resumes_to_the_uninterrupted_images(ckpts, tmp_path, kill_after):
    def args(run_dir, *extra):
        return generate_args(ckpts, run_dir, "--model.compressor", "todo", *extra)

    run = kill_and_resume(args, tmp_path, kill_after, total=3)
    assert main(args(tmp_path / "clean")) == 0
    assert_same_images(run, tmp_path / "clean", 3)
    pd.testing.assert_frame_equal(records(run), records(tmp_path / "clean"))


# -- bigain visualize ------------------------------------------------------------------------

def test_the_visualize_probe_noises_by_the_flow_and_feeds_the_model_its_own_timestep(ckpts):
    from bigain.analysis.probe import probe_backbone

    bb = backbone(ckpts["sd3"])
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    seen = {}
    original = bb.transformer.forward

    def spy(*args, **kwargs):
        seen["hidden"], seen["timestep"] = kwargs["hidden_states"].clone(), kwargs["timestep"].clone()
        return original(*args, **kwargs)

    bb.transformer.forward = spy
    probe = probe_backbone(bb, image, timestep=600, prompt="a cat", seed=5)
    probe.forward()
    x0 = bb.encode(image[None])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    s = float(closed_form_sigma(torch.tensor(600)))
    assert torch.allclose(seen["hidden"], (1 - s) * x0 + s * noise, atol=1e-5)
    assert seen["timestep"].tolist() == pytest.approx([1000 * s])
