"""The ``sdxl`` backbone: a tiny saved Stable Diffusion XL pipeline (a UNet with text-time
conditioning and no attention at level 1, a VAE, two CLIP encoders, offline tokenizers) against
diffusers' own ``StableDiffusionXLPipeline``, and ``bigain classify`` / ``bigain generate`` end to
end, compressed at the level SDXL has attention."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_pipelines import clip_tokenizer

from bigain.cli import main
from bigain.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_sdxl(path, seed: int = 0) -> str:
    """32x32 images -> 16x16 latents; down blocks: no attention (16x16), then cross-attention (8x8), as
    SDXL's first level has none; CLIP widths 8 + 12 = the UNet's 20 cross-attention channels; pooled
    projection 6 + 6 size ids x 4 = 30 added channels."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=20,
                             attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time",
                             addition_time_embed_dim=4, projection_class_embeddings_input_dim=30,
                             transformer_layers_per_block=1).save_pretrained(root / "unet")
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                      sample_size=32, scaling_factor=0.13025).save_pretrained(root / "vae")
        common = dict(vocab_size=90, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=20, bos_token_id=86, eos_token_id=87, pad_token_id=87)
        CLIPTextModel(CLIPTextConfig(hidden_size=8, **common)).save_pretrained(root / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=12, projection_dim=6, **common)).save_pretrained(
            root / "text_encoder_2")
    clip_tokenizer(root / "tokenizer")
    clip_tokenizer(root / "tokenizer_2")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           timestep_spacing="leading", steps_offset=1).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": True}))
    return str(root)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl")


def pipeline(bb):
    """diffusers' own SDXL pipeline around the backbone's parts (the reference)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=bb.vae, text_encoder=bb.text_encoder, text_encoder_2=bb.text_encoder_2,
                                     tokenizer=bb.tokenizer, tokenizer_2=bb.tokenizer_2, unet=bb.unet,
                                     scheduler=EulerDiscreteScheduler.from_pretrained(bb.path, subfolder="scheduler"))


def test_prompts_and_the_null_condition_are_the_diffusers_pipeline_embeddings(ckpt):
    from bigain.backbones.sdxl import StableDiffusionXL

    bb = StableDiffusionXL(path=ckpt)
    assert bb.zeros_for_empty_prompt and bb.family == "unet" and bb.prediction_type == "epsilon"
    prompts = ["a photo of a cat", "a dog"]
    cond = bb.prompt_conditions(prompts)
    embeds, negative, pooled, negative_pooled = pipeline(bb).encode_prompt(prompts, device="cpu",
                                                                             do_classifier_free_guidance=True)
    assert cond.embeds.shape == (2, 20, 20) and cond.pooled.shape == (2, 6)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    null = bb.null_conditions(2)  # force_zeros_for_empty_prompt: zeros, as the pipeline's negative
    assert torch.equal(null.embeds, negative) and torch.equal(null.pooled, negative_pooled)
    assert not null.embeds.any()
    empty = StableDiffusionXL(path=ckpt, zeros_for_empty_prompt=False).null_conditions(1)
    assert torch.equal(empty.embeds, bb.encode_prompts([""]).embeds) and empty.embeds.any()


def test_generation_is_the_diffusers_pipeline_with_guidance(ckpt):
    from bigain.tasks.generation import DiffusionGenerator, initial_noise

    module = DiffusionGenerator(backbone="sdxl", backbone_options={"path": ckpt}, steps=3, guidance_scale=5.0,
                                sampler="euler", metrics=[])
    module.configure_model()
    bb = module.backbone
    prompts = ["a photo of a cat", "a dog"]
    noise = torch.stack([initial_noise(0, i, bb.latent_shape(32)) for i in range(2)])
    ours = module.sample(bb.prompt_conditions(prompts), noise)
    # the pipeline scales its initial latents by the scheduler's init_noise_sigma; ours are the same noise
    reference = pipeline(bb)(prompts, height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                             latents=noise.clone(), output_type="pt").images
    torch.testing.assert_close((ours + 1) / 2, reference, atol=1e-4, rtol=1e-4)


def test_bad_folders_and_an_empty_selection_give_clear_errors(ckpt, tmp_path):
    import shutil

    from bigain.backbones.sdxl import StableDiffusionXL
    from bigain.tasks.classification import DiffusionClassifier

    sd = tmp_path / "sd2"
    shutil.copytree(ckpt, sd, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        StableDiffusionXL(path=str(sd))
    with pytest.raises(ConfigError, match="zeros_for_empty_prompt"):
        StableDiffusionXL(path=ckpt, zeros_for_empty_prompt="yes")
    module = DiffusionClassifier(backbone="sdxl", backbone_options={"path": ckpt}, compressor="tome")
    with pytest.raises(ConfigError, match="no attention at level 1: use 2"):
        module.configure_model()  # the default max_downsample 1 reaches no SDXL attention


def classify_args(ckpt, run_dir, *extra):
    return ["classify", "--model.backbone", "sdxl", "--model.backbone_options", f"{{path: {ckpt}}}",
            "--model.max_downsample", "2", "--model.n_samples", "[2]", "--model.to_keep", "[1]", "--data", "toy",
            "--data.length", "2", "--data.batch_size", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--run_dir", str(run_dir), *extra]


def test_classify_and_generate_end_to_end_compressed(ckpt, tmp_path):
    errors = {}
    for comp in ("none", "tome"):
        run = tmp_path / comp
        assert main(classify_args(ckpt, run, "--model.compressor", comp)) == 0
        meta = json.loads((run / "run.json").read_text())
        assert meta["status"] == "complete" and meta["model"]["family"] == "unet"
        errors[comp] = pd.read_parquet(run / "records.parquet").sort_values("index")["mean_errors"].tolist()
    assert sorted(meta["compression"]["layers"]) == [  # every attention at 8x8 (level 2), the mid block's too
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1", "up_blocks.0.attentions.1.transformer_blocks.0.attn1"]
    assert errors["none"] != errors["tome"]
    gen = tmp_path / "gen"
    args = ["generate", "--model.backbone", "sdxl", "--model.backbone_options", f"{{path: {ckpt}}}",
            "--model.max_downsample", "2", "--model.compressor", "todo", "--model.steps", "2", "--model.metrics",
            "[]", "--data", "toy", "--data.length", "2", "--data.batch_size", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--run_dir", str(gen)]
    assert main(args) == 0
    from bigain.metrics import load_png

    images = [np.asarray(load_png(p)) for p in sorted((gen / "images").glob("*.png"))]
    assert len(images) == 2 and all(im.shape == (3, 32, 32) for im in images)
