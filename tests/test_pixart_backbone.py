"""The ``pixart`` backbone: a tiny saved PixArt pipeline (transformer, VAE, T5 encoder, an offline T5
tokenizer, scheduler) through the backbone's own maths and ``bigain classify`` / ``bigain generate``
end to end: compressed, resumable after a kill. (Two gloo processes take ~26 s here, so DDP is left to
the shared task code's tests in test_classification.py / test_generation.py: the backbone adds no
collective and no rank-dependent state.)"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_pipelines import assert_same_images, kill_and_resume, meta, pixels, records
from torch import nn

from bigain.backbones.base import to_epsilon, to_sample
from bigain.cli import main
from bigain.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_pixart(path, seed: int = 0, *, additional_conditions: bool = True, learned_sigma: bool = True,
                     prediction_type: str = "epsilon") -> str:
    """A tiny PixArt pipeline folder built from configs: 32x32 images -> 16x16 latents -> an 8x8 patch
    grid, 4 blocks, a 1-layer T5 encoder and a character-level T5 tokenizer (a ``tokenizers`` Unigram
    model saved as tokenizer.json: no sentencepiece file, nothing downloaded)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    root = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # inner dim 24: the resolution / aspect-ratio embedding splits it in three
        model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                         out_channels=8 if learned_sigma else 4, num_layers=4, cross_attention_dim=24,
                                         sample_size=16, patch_size=2, caption_channels=16,
                                         use_additional_conditions=additional_conditions)
        for p in model.parameters():  # diffusers zero-initialises some output layers
            if p.abs().sum() == 0:
                nn.init.normal_(p, std=0.02)
        model.save_pretrained(root / "transformer")
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                      sample_size=32).save_pretrained(root / "vae")
        T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,()'-"]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=120).save_pretrained(root / "tokenizer")
    DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                prediction_type=prediction_type).save_pretrained(root / "scheduler")
    return str(root)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart")
    return {"pixart": save_tiny_pixart(root / "pixart"),
            "plain": save_tiny_pixart(root / "plain", 1, additional_conditions=False, learned_sigma=False,
                                      prediction_type="v_prediction")}


def backbone(path, **options):
    from bigain.backbones.pixart import PixArt

    return PixArt(path=path, **options)


# -- the backbone's maths ----------------------------------------------------------------------

def test_learned_sigma_channels_are_dropped_and_the_conditions_reach_the_transformer(ckpts):
    bb = backbone(ckpts["pixart"])
    assert bb.learned_sigma and bb.additional_conditions and bb.family == "pixart"
    cond = bb.prompt_conditions(["a photo of a cat", "a dog"])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 600])
    added = bb.added_conditions(x)
    assert added["resolution"].tolist() == [[32.0, 32.0]] * 2 and added["aspect_ratio"].tolist() == [[1.0]] * 2
    full = bb.transformer(x, timestep=t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                          added_cond_kwargs=added).sample
    assert full.shape[1] == 8
    out = bb.predict_output(x, t, cond)
    assert out.shape == (2, 4, 16, 16) and out.dtype == torch.float32
    assert torch.equal(out, full[:, :4]) and not torch.equal(out, full[:, 4:])
    assert torch.equal(bb.predict_noise(x, t, cond), out)  # epsilon checkpoint: no conversion
    other = {"resolution": added["resolution"] * 2, "aspect_ratio": added["aspect_ratio"]}
    assert not torch.allclose(full, bb.transformer(x, timestep=t, encoder_hidden_states=cond.embeds,
                                                   encoder_attention_mask=cond.mask, added_cond_kwargs=other).sample)
    plain = backbone(ckpts["plain"])
    assert not plain.learned_sigma and not plain.additional_conditions
    assert plain.added_conditions(x) == {"resolution": None, "aspect_ratio": None}
    pc = plain.prompt_conditions(["a cat", "a dog"])
    assert torch.equal(plain.predict_output(x, t, pc),
                       plain.transformer(x, timestep=t, encoder_hidden_states=pc.embeds,
                                         encoder_attention_mask=pc.mask).sample)


def test_the_scheduler_prediction_type_is_converted(ckpts):
    bb = backbone(ckpts["plain"])
    assert bb.prediction_type == "v_prediction" and bb.describe()["prediction_type"] == "v_prediction"
    cond = bb.prompt_conditions(["a cat", "a dog"])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 600])
    v = bb.predict_output(x, t, cond)
    a = bb.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    eps = bb.predict_noise(x, t, cond)
    torch.testing.assert_close(eps, a.sqrt() * v + (1 - a).sqrt() * x)
    torch.testing.assert_close(eps, to_epsilon(v, x, t, bb.alphas_cumprod, "v_prediction"))
    torch.testing.assert_close(bb.predict_sample(x, t, cond), to_sample(v, x, t, bb.alphas_cumprod, "v_prediction"))
    assert not torch.allclose(eps, v)


def test_prompts_are_t5_tokens_with_a_mask_and_padding_is_never_attended(ckpts):
    long, short = backbone(ckpts["pixart"]), backbone(ckpts["pixart"], max_sequence_length=40)
    a, b = long.prompt_conditions(["a photo of a cat"]), short.prompt_conditions(["a photo of a cat"])
    n = int(a.mask.sum())
    assert a.embeds.shape[1] == 120 and b.embeds.shape[1] == 40 and n == int(b.mask.sum()) > 1
    assert a.mask[0, :n].all() and not a.mask[0, n:].any()
    torch.testing.assert_close(a.embeds[:, :n], b.embeds[:, :n])
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    torch.testing.assert_close(long.predict_output(x, t, a), short.predict_output(x, t, b))  # the mask hides padding
    null = long.null_conditions(3)
    assert null.embeds.shape == (3, 120, 16) and null.mask.sum(1).tolist() == [1, 1, 1]  # "" is just </s>
    torch.testing.assert_close(null.embeds[:1], long.prompt_conditions([""]).embeds)
    long.set_classes(prompts=["a cat", "a dog", "a bird"])
    picked = long.class_conditions(torch.tensor([2, 0]))
    torch.testing.assert_close(picked.embeds, long.prompt_conditions(["a bird", "a cat"]).embeds)
    both = long.concat_conditions([picked, long.null_conditions(2)])
    assert len(both) == 4 and both.mask.shape == (4, 120)
    assert long.describe()["max_sequence_length"] == 120 and short.describe()["max_sequence_length"] == 40


def test_bad_checkpoints_and_options_give_clear_errors(ckpts, tmp_path):
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"missing \['vae', 'text_encoder', 'tokenizer', 'scheduler'\]"):
        backbone(str(tmp_path / "half"))
    with pytest.raises(ConfigError, match="max_sequence_length must be a positive integer.*120.*300"):
        backbone(ckpts["pixart"], max_sequence_length=0)
    with pytest.raises(ConfigError, match="image_size 34 is not a multiple of 4"):
        backbone(ckpts["pixart"]).latent_shape(34)


# -- end to end --------------------------------------------------------------------------------

def classify_args(ckpts, run_dir, *extra, length=3):
    return ["classify", "--model.backbone", "pixart", "--model.backbone_options", f"{{path: {ckpts['pixart']}}}",
            "--model.n_samples", "[2]", "--model.to_keep", "[1]", "--data", "toy", "--data.length", str(length),
            "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--run_dir", str(run_dir), *extra]


def generate_args(ckpts, run_dir, *extra, length=3):
    return ["generate", "--model.backbone", "pixart", "--model.backbone_options", f"{{path: {ckpts['pixart']}}}",
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
        assert m["model"]["family"] == "pixart" and m["model"]["max_sequence_length"] == 120
        errors[comp] = df["mean_errors"].tolist()
    # attached through the pixart adapter with its default (the paper's DiT blocks scaled to 4: block 1)
    assert m["compression"]["layers"] == ["transformer_blocks.1.attn1"]
    assert m["compression"]["tokens_kept"]["1"]["queries"] == 0.5
    assert errors["none"] != errors["tome"]


def test_generate_end_to_end_with_none_and_todo(ckpts, tmp_path):
    runs = {}
    for comp in ("none", "todo"):
        run = tmp_path / comp
        assert main(generate_args(ckpts, run, "--model.compressor", comp)) == 0
        runs[comp] = pixels(run)
        assert sorted(runs[comp]) == [f"{i:06d}.png" for i in range(3)]
        assert all(p.shape == (3, 32, 32) and p.dtype == np.uint8 for p in runs[comp].values())
        df = records(run)
        from bigain.toy.data import toy_prompts

        assert df["index"].tolist() == [0, 1, 2] and df["prompt"].tolist() == toy_prompts()[:3]
        m = meta(run)
        assert m["status"] == "complete" and m["result_config"]["model"]["sampler"] == "euler"
        assert m["model"]["family"] == "pixart" and m["model"]["learned_sigma"]
    assert m["compression"]["layers"] == ["transformer_blocks.1.attn1"]
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
