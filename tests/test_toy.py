"""The embedded default: the toy dataset, the shipped toy models, and the demo."""

import numpy as np
import pytest
import torch

from bigain.errors import ConfigError
from bigain.toy.data import SHAPE_CLASSES, TEST_SEED, TEXTURE_CLASSES, TOY_CLASSES, TRAIN_SEED, ToyShapes, render
from bigain.toy.evaluate import ASSETS


def test_images_are_a_pure_function_of_seed_and_index():
    a, la = render(TEST_SEED, 17)
    b, lb = render(TEST_SEED, 17)
    assert np.array_equal(a, b) and la == lb == 7
    assert a.shape == (32, 32, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert not np.array_equal(render(TRAIN_SEED, 17)[0], a)  # train and test come from disjoint seeds
    assert TRAIN_SEED != TEST_SEED


def test_classes_are_balanced_and_split_into_texture_and_shape():
    data = ToyShapes("test", length=200)
    labels = [data[i]["label"] for i in range(200)]
    assert np.bincount(labels).tolist() == [20] * 10
    assert len(TOY_CLASSES) >= 10 and set(TEXTURE_CLASSES) | set(SHAPE_CLASSES) == set(range(10))
    item = data[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].min() >= -1 and item["image"].max() <= 1
    with pytest.raises(IndexError):
        data[200]


def test_the_shipped_models_load_and_stay_small():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file() and p.suffix == ".safetensors")
    assert total <= 20 * 2**20
    assert (ASSETS / "MODEL_CARD.md").is_file()
    from bigain.backbones.dit import ToyDiT

    model = ToyDiT()
    assert model.num_model_classes == 10 and model.null_class == 10 and model.vae is None
    assert model.latent_shape(32) == (3, 32, 32)


def test_the_toy_classifier_is_accurate_on_real_images():
    from bigain.toy.evaluate import classifier_accuracy

    assert classifier_accuracy(images=200) >= 0.98


def test_the_toy_dit_classifies_a_small_sample_at_its_stated_accuracy():
    from bigain.toy.evaluate import diffusion_classifier_accuracy

    torch.manual_seed(0)
    result = diffusion_classifier_accuracy(images=20, dtype="bfloat16")  # the default 5/20 protocol
    assert result["accuracy"] >= 0.85


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    from bigain.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--methods", "tome", "bigain_tm", "--images", "10",
                 "--gen_per_class", "1", "--dtype", "auto"]) == 0  # emulated bfloat16 is ~16x slower
    report = (out / "report.md").read_text()
    assert "## What the numbers show" in report and "## Settings" in report
    assert "Classification at merge ratio 0.7: tome" in report
    assert "bigain_tm beats tome" in report or "bigain_tm does not beat tome" in report or "ties" in report
    for name in ("summary.csv", "summary.md", "summary.html", "accuracy_vs_speedup.png", "fid_vs_speedup.png"):
        assert (out / "report" / name).is_file(), name
    assert len(list(out.glob("generate/toy/*/*/contact_sheet.png"))) == 10  # 5 methods x 2 toy backbones
    assert "Toy UNet: Classification at merge ratio 0.7" in report


def test_training_can_continue_from_a_saved_toy_dit(tmp_path):
    from safetensors.torch import load_file

    from bigain.toy.train import train_toy_dit

    out = train_toy_dit(tmp_path, steps=1, batch_size=2, lr=0.0, warmup=1, init_from=ASSETS / "toy-dit",
                        train_images=2, bf16=False)
    name = "diffusion_pytorch_model.safetensors"
    saved = load_file(str(out / "transformer" / name))
    shipped = load_file(str(ASSETS / "toy-dit" / "transformer" / name))
    assert saved.keys() == shipped.keys() and all(torch.equal(saved[k], shipped[k]) for k in saved)
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "training_log.csv").is_file()


def test_loss_weightings_follow_their_formulas():
    from bigain.toy.train import loss_weights, train_toy_dit

    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 1e-4], dtype=torch.float64)
    snr = abar / (1 - abar)  # 999, 9, 1, 1/9, ~1e-4
    expected_min_snr = torch.tensor([5 / 999, 5 / 9, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(loss_weights(abar, "min_snr", min_snr_gamma=5.0), expected_min_snr)
    assert torch.allclose(loss_weights(abar, "p2"), 1 / (1 + snr))
    assert torch.allclose(loss_weights(abar, "p2")[2], torch.tensor(0.5, dtype=torch.float64))
    assert torch.equal(loss_weights(abar, "none"), torch.ones_like(abar))
    assert torch.equal(loss_weights(abar, "min_snr", min_snr_gamma=None), torch.ones_like(abar))
    with pytest.raises(ValueError, match="min_snr"):
        train_toy_dit("unused", steps=1, loss_weighting="snr")


def test_toy_train_can_keep_the_shipped_classifier(tmp_path, capsys):
    import shutil

    from bigain.cli import main

    args = ["toy", "train", "--out", str(tmp_path), "--steps", "1", "--batch_size", "2", "--denoisers", "dit",
            "--classifier_steps", "0", "--no_eval"]
    assert main(args) != 0  # no classifier to keep in an empty folder: a clear error, nothing trained
    assert "no classifier.safetensors" in capsys.readouterr().err and not (tmp_path / "toy-dit").exists()
    shutil.copy(ASSETS / "classifier.safetensors", tmp_path)
    assert main(args) == 0
    assert (tmp_path / "toy-dit" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "toy-unet").exists()  # --denoisers dit: the UNet is left alone
    kept = (tmp_path / "classifier.safetensors").read_bytes()
    assert kept == (ASSETS / "classifier.safetensors").read_bytes()


def test_demo_findings_name_the_fastest_method_of_each_task():
    import pandas as pd

    from bigain.demo import findings

    rows = [("classify", "none", 1.0), ("classify", "todo", 1.14), ("generate", "none", 1.0),
            ("generate", "bigain_td", 1.55)]
    summary = pd.DataFrame([{"task": t, "method": m, "speedup": x, "hyperparameters": "{}"} for t, m, x in rows])
    speed = [line for line in findings(summary) if line.startswith("Measured speed-ups")]
    assert len(speed) == 1 and "1.14x in classification (todo)" in speed[0]
    assert "1.55x in generation (bigain_td)" in speed[0]


@pytest.fixture(scope="module")
def trained_toy_unet(tmp_path_factory):
    """A toy UNet folder as `bigain toy train` writes it (two training steps)."""
    from bigain.toy.train import train_toy_unet

    return train_toy_unet(tmp_path_factory.mktemp("toy-unet"), steps=2, batch_size=2, train_images=4, bf16=False)


def test_a_trained_toy_unet_loads_conditions_on_its_prompts_and_is_compressed_at_its_one_level(trained_toy_unet):
    import bigain
    from bigain.backbones import create_backbone
    from bigain.toy.train import TOY_PROMPT_TOKENS

    backbone = create_backbone("toy-unet", path=str(trained_toy_unet))
    assert backbone.family == "unet" and backbone.num_model_classes == 10 and backbone.null_class == 10
    assert backbone.latent_shape(32) == (12, 16, 16) and backbone.prompts.shape == (11, TOY_PROMPT_TOKENS, 64)
    assert backbone.unet.dtype == torch.float32  # stored in float16, run in the dtype asked for
    backbone.set_classes(prompts=list(TOY_CLASSES))
    cond = backbone.class_conditions(torch.tensor([0, 7]))
    assert cond.tolist() == [0, 7] and backbone.null_conditions(2).tolist() == [10, 10]
    x, t = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 900])
    with torch.no_grad():
        # the prediction is the UNet's on the class prompt (checked against a direct call)
        direct = backbone.unet(x, t, encoder_hidden_states=backbone.prompts[cond]).sample
        assert torch.equal(backbone.predict_noise(x, t, cond), direct)
        other = backbone.predict_noise(x, t, torch.tensor([1, 7]))
        assert not torch.equal(other[0], direct[0]) and torch.equal(other[1], direct[1])
        handle = bigain.apply(backbone.denoiser, "tome", ratio=0.5)
        compressed = backbone.predict_noise(x, t, cond)
    stats = handle.stats()
    handle.remove()
    assert not torch.equal(compressed, direct)
    assert len(stats) == 4  # down, middle and up blocks' transformers: all at the one level
    assert all(s["level"] == 1 and s["grid"] == [16, 16] and s["compressed_calls"] == 1 for s in stats)
    assert {s["tokens_in"] for s in stats} == {256.0} and {s["queries"] for s in stats} == {128.0}


def test_the_toy_unet_sees_an_image_as_2x2_pixel_patches_and_gives_it_back_whole(trained_toy_unet):
    from bigain.backbones import create_backbone

    backbone = create_backbone("toy-unet", path=str(trained_toy_unet))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = backbone.encode(image)
    assert x0.shape == (1, 12, 16, 16)
    for c, i, j, y, x in [(0, 0, 0, 0, 0), (1, 1, 0, 3, 5), (2, 1, 1, 15, 15), (2, 0, 1, 7, 2)]:
        assert x0[0, 4 * c + 2 * i + j, y, x] == image[0, c, 2 * y + i, 2 * x + j]  # pixel (2y+i, 2x+j) of colour c
    assert torch.equal(backbone.decode(x0), image)
    with pytest.raises(ConfigError, match="multiple of 2"):
        backbone.latent_shape(33)


def _toy_unet_folder(trained, root, *, in_channels, out_channels, **config):
    """A copy of the toy UNet folder ``trained`` whose UNet is a tiny one of the given channels."""
    import shutil

    from diffusers import UNet2DConditionModel

    shutil.copytree(trained, root)
    shutil.rmtree(root / "unet")
    UNet2DConditionModel(in_channels=in_channels, out_channels=out_channels, layers_per_block=1,
                         block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                         up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=64, attention_head_dim=1,
                         norm_num_groups=32, **config).save_pretrained(root / "unet")
    return str(root)


def test_a_toy_unet_on_pixels_still_loads_and_one_with_odd_channels_is_refused(trained_toy_unet, tmp_path):
    from bigain.backbones.toy_unet import ToyUNet
    from bigain.errors import CheckpointError

    pixels = ToyUNet(path=_toy_unet_folder(trained_toy_unet, tmp_path / "pixels", in_channels=3, out_channels=3,
                                           sample_size=32))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert pixels.latent_shape(32) == (3, 32, 32) and torch.equal(pixels.encode(image), image)
    with pytest.raises(CheckpointError, match=r"3 \* p\*\*2 channels"):
        ToyUNet(path=_toy_unet_folder(trained_toy_unet, tmp_path / "four", in_channels=4, out_channels=4))


def test_position_channels_are_sin_and_cos_of_each_tokens_row_and_column_at_doubling_frequencies():
    from bigain.errors import ConfigError
    from bigain.toy.train import position_channels

    r = 0.5**0.5  # sin and cos of pi/4 and 3pi/4, the half-period frequency on a 2-token axis
    expected = torch.tensor([
        [[r, r], [r, r]], [[1, 1], [-1, -1]],  # rows: sin at frequency 1, 2 (angle pi * f * (i + 0.5) / 2)
        [[r, r], [-r, -r]], [[0, 0], [0, 0]],  # rows: cos at frequency 1, 2
        [[r, r], [r, r]], [[1, -1], [1, -1]],  # columns: sin
        [[r, -r], [r, -r]], [[0, 0], [0, 0]],  # columns: cos
    ])
    assert torch.allclose(position_channels(2, 2, 8), expected, atol=1e-6)
    assert position_channels(16, 8, 16).shape == (16, 16, 8)
    for bad in (0, 6):
        with pytest.raises(ConfigError, match="multiple of 4"):
            position_channels(4, 4, bad)


def test_a_toy_unet_with_position_channels_reads_them_after_the_latent(trained_toy_unet, tmp_path):
    import math

    from bigain.backbones.toy_unet import ToyUNet
    from bigain.errors import CheckpointError

    def folder(name, in_channels):
        return _toy_unet_folder(trained_toy_unet, tmp_path / name, in_channels=in_channels, out_channels=12,
                                sample_size=16, conv_in_kernel=1)

    backbone = ToyUNet(path=folder("positions", 12 + 4))
    assert backbone.latent_shape(32) == (12, 16, 16) and backbone.patch == 2
    x, t, cond = torch.randn(2, 12, 16, 16), torch.tensor([10, 500]), torch.tensor([3, 10])
    angle = [[math.pi * (i + 0.5) / 16 for i in range(16)]]  # one frequency: 4 channels
    row = torch.tensor(angle).T.expand(16, 16)
    pos = torch.stack([row.sin(), row.cos(), row.T.sin(), row.T.cos()])
    with torch.no_grad():
        direct = backbone.unet(torch.cat([x, pos.expand(2, -1, -1, -1)], 1), t,
                               encoder_hidden_states=backbone.prompts[cond]).sample
        assert torch.allclose(backbone.predict_output(x, t, cond), direct, atol=1e-5)
    with pytest.raises(CheckpointError, match="multiple of 4 position channels"):
        ToyUNet(path=folder("odd", 12 + 3))


def test_training_the_toy_unet_on_from_a_folder_of_another_architecture_is_refused(trained_toy_unet, tmp_path):
    import json
    import shutil

    from bigain.toy.train import train_toy_unet

    other = tmp_path / "old"
    shutil.copytree(trained_toy_unet, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    config["block_out_channels"] = [64]
    (other / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="another architecture.*block_out_channels"):
        train_toy_unet(tmp_path / "new", steps=1, batch_size=2, train_images=2, bf16=False, init_from=other)


def test_a_toy_unet_folder_without_its_prompt_table_is_refused(trained_toy_unet, tmp_path):
    import shutil

    from bigain.backbones.toy_unet import ToyUNet
    from bigain.errors import CheckpointError

    broken = tmp_path / "toy-unet"
    shutil.copytree(trained_toy_unet, broken)
    (broken / "class_prompts.safetensors").unlink()
    with pytest.raises(CheckpointError, match="class_prompts.safetensors"):
        ToyUNet(path=str(broken))
    from safetensors.torch import save_file

    save_file({"prompts": torch.zeros(11, 4, 32)}, str(broken / "class_prompts.safetensors"))  # wrong width
    with pytest.raises(CheckpointError, match=r"\[classes \+ 1, tokens, 64\]"):
        ToyUNet(path=str(broken))


def test_the_demo_runs_every_method_on_each_toy_backbone_in_its_own_folder(tmp_path):
    from bigain.demo import demo_sweep
    from bigain.errors import ConfigError
    from bigain.sweep import expand_sweep

    cells = expand_sweep(demo_sweep(out=tmp_path, quick=True, methods=["tome"]))
    by_folder = {c.folder.relative_to(tmp_path).as_posix(): c for c in cells}
    assert sorted(by_folder) == [f"{task}/toy/{b}/{m}" for task in ("classify", "generate") for b in ("dit", "unet")
                                 for m in ("none", "tome-ratio0.5", "tome-ratio0.7")]
    dit, unet = by_folder["classify/toy/dit/tome-ratio0.7"], by_folder["classify/toy/unet/tome-ratio0.7"]
    assert dit.config["model"]["backbone"] == "toy" and dit.config["model"]["blocks"] == [1, 2, 3, 4]
    assert unet.config["model"]["backbone"] == "toy-unet" and unet.config["model"]["blocks"] == "paper"
    assert unet.config["model"]["backbone_options"] == dit.config["model"]["backbone_options"]  # the task's, kept
    assert unet.backbone == "unet" and unet.config["model"]["n_samples"] == [3, 8]
    only = expand_sweep(demo_sweep(out=tmp_path, quick=True, methods=["tome"], backbones=("unet",)))
    assert {c.backbone for c in only} == {"unet"}
    with pytest.raises(ConfigError, match="dit, unet"):
        demo_sweep(out=tmp_path, quick=True, backbones=("sd3",))


def test_findings_are_said_per_backbone_when_there_are_several():
    import pandas as pd

    from bigain.demo import findings

    rows = [("toy", "none", 0.9), ("toy", "tome", 0.8), ("toy", "bigain_tm", 0.85),
            ("toy-unet", "none", 0.95), ("toy-unet", "tome", 0.7), ("toy-unet", "bigain_tm", 0.6)]
    summary = pd.DataFrame([{"task": "classify", "backbone": b, "method": m, "accuracy": a,
                             "hyperparameters": "{}" if m == "none" else '{"ratio": 0.7}'} for b, m, a in rows])
    lines = findings(summary)
    assert any(line.startswith("Toy DiT: Classification at merge ratio 0.7") and "bigain_tm beats tome" in line
               for line in lines)
    assert any(line.startswith("Toy UNet: Classification at merge ratio 0.7") and "does not beat" in line
               for line in lines)
    assert findings(summary[summary["backbone"] == "toy"])[0].startswith("Classification")  # one model: unprefixed


# (config over TOY_UNET_CONFIG, ResNet blocks, transformer blocks, middle block) by diffusers' layout: a
# down block has `layers_per_block` (ResNet, transformer) pairs, an up block one more, the cross-attention
# middle block two ResNets around one transformer; each transformer holds `transformer_layers_per_block`.
_LAYOUTS = [({}, 5, 4, True),
            ({"transformer_layers_per_block": 1, "mid_block_type": "UNetMidBlock2DCrossAttn"}, 5, 4, True),
            ({"layers_per_block": 2, "transformer_layers_per_block": 3}, 7, 18, True),
            ({"transformer_layers_per_block": 2, "mid_block_type": None}, 3, 6, False)]


@pytest.mark.parametrize(("config", "resnets", "attentions", "mid"), _LAYOUTS)
def test_the_model_cards_toy_unet_layout_counts_the_blocks_of_the_saved_unet(config, resnets, attentions, mid,
                                                                             tmp_path):
    from diffusers import UNet2DConditionModel

    from bigain.toy import evaluate, train

    UNet2DConditionModel(**{**train.TOY_UNET_CONFIG, **config}).save_config(tmp_path)
    text = evaluate._toy_unet_layout(tmp_path)
    assert f"{resnets} ResNet blocks and {attentions} transformer blocks" in text
    assert ("the middle block" in text) == mid
    if not config:  # no saved config: today's TOY_UNET_CONFIG
        assert evaluate._toy_unet_layout(tmp_path / "absent") == text


def test_the_toy_unets_weight_average_leaves_out_its_starting_weights(tmp_path):
    """After one step the bias-corrected average is the trained weights themselves: (d * w0 + (1 - d) * w1 -
    d * w0) / (1 - d) = w1, which an average of decay 0 keeps directly. (The first step moves only the
    zero-initialised output convolution: nothing upstream gets a gradient through it yet.)"""
    from safetensors.torch import load_file

    from bigain.toy.train import train_toy_unet

    def trained(name, decay):
        out = train_toy_unet(tmp_path / name, steps=1, batch_size=2, train_images=2, bf16=False, ema_decay=decay,
                             warmup=1)
        return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))["conv_out.weight"].float()

    latest, corrected = trained("latest", 0.0), trained("corrected", 0.9)
    assert latest.abs().max() > 1e-4  # the step moved it away from its zero start
    torch.testing.assert_close(corrected, latest, atol=1e-6, rtol=2e-3)  # stored in float16


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "training_log.csv"}


@pytest.mark.parametrize("denoiser", ["dit", "unet"])
def test_a_stopped_toy_training_run_resumes_bit_for_bit_and_a_finished_one_is_kept(tmp_path, denoiser):
    """Ctrl-C mid-training saves the whole state at the end of the step it lands in; the same call resumes
    and writes the same bytes as a run that was never stopped (the DiT's label dropout draws from the global
    RNG, the UNet's from the trainer's generator: both are restored)."""
    import csv
    import os
    import signal

    from bigain.interrupts import Interrupted, handle_signals
    from bigain.toy import train

    fn = train.train_toy_dit if denoiser == "dit" else train.train_toy_unet
    folder = "toy-dit" if denoiser == "dit" else "toy-unet"
    kwargs = dict(steps=5, batch_size=2, train_images=4, bf16=False, log_every=1, checkpoint_every=2, warmup=1)
    whole = fn(tmp_path / "whole", **kwargs)

    def stop_in_step_2(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the handler defers it to the end of the step

    messages = []
    with handle_signals(), pytest.raises(Interrupted):
        fn(tmp_path / "split", progress=stop_in_step_2, log=messages.append, **kwargs)
    split = tmp_path / "split" / folder
    state = torch.load(split / train.TRAINING_STATE_FILE, weights_only=True)
    assert state["step"] == 3 and "the same command resumes it" in messages[-1]
    assert not (split / train.TRAINING_DONE_FILE).exists()
    with pytest.raises(ConfigError, match="other settings.*'lr'"):
        fn(tmp_path / "split", **{**kwargs, "lr": 5e-4})
    fn(tmp_path / "split", log=messages.append, **kwargs)
    assert "resuming the stopped run at step 3 of 5" in messages[-1]
    assert not (split / train.TRAINING_STATE_FILE).exists()
    assert _files(split) == _files(whole)  # weights, prompt table, scheduler, finished-run record

    def log_rows(folder):
        with open(folder / "training_log.csv") as fh:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]

    assert log_rows(split) == log_rows(whole) and len(log_rows(whole)) == 5
    fn(tmp_path / "split", log=messages.append, **kwargs)  # finished with these settings: kept, not trained again
    assert "already trained with these settings, kept" in messages[-1]
    assert _files(split) == _files(whole)


def test_toy_training_precision_follows_the_cpu_and_the_recipe_names_it(tmp_path, monkeypatch, capsys):
    import json
    import shutil

    from bigain import precision
    from bigain.cli import main
    from bigain.toy.train import TRAINING_DONE_FILE

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=None: [])  # an AVX2-only CPU
    shutil.copy(ASSETS / "classifier.safetensors", tmp_path)
    args = ["toy", "train", "--out", str(tmp_path), "--steps", "1", "--batch_size", "2", "--denoisers", "dit",
            "--classifier_steps", "0", "--no_eval"]
    assert main(args) == 0
    assert json.loads((tmp_path / "toy-dit" / TRAINING_DONE_FILE).read_text())["bf16"] is False
    assert main(args + ["--train_dtype", "float16"]) == 2
    assert "train in float32 or bfloat16" in capsys.readouterr().err
    from bigain.commands import toy
    from bigain.commands._parser import parse

    cfg = parse(toy.build_parser(), ["train", "--train_dtype", "bf16"])
    assert "--train_dtype bfloat16" in toy._train_command(cfg.train)
