"""Generation evaluation: tiny SD / DiT end to end, metrics, two gloo processes, kill and resume,
rescoring, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from bigain.cli import main
from bigain.errors import ConfigError, DatasetError
from bigain.metrics import build_extractor, load_png, score_images, score_run
from bigain.tasks.generation import DiffusionGenerator, initial_noise

EXTRACTOR = "timm:test_vit@random"  # a timm model with random weights: runs offline, 64 features


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from bigain.testing import save_tiny_dit, save_tiny_stable_diffusion

    root = tmp_path_factory.mktemp("ckpt")
    out = {"dit": save_tiny_dit(root / "dit"), "sd": save_tiny_stable_diffusion(root / "sd")}
    torch.manual_seed(0)
    text = dict(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=20, bos_token_id=86, eos_token_id=87, pad_token_id=87)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=CLIPTokenizer.from_pretrained(root / "sd" / "tokenizer")).save_pretrained(root / "clip")
    out["clip"] = str(root / "clip")
    import timm

    save_file(timm.create_model("test_vit").state_dict(), root / "test_vit.safetensors")
    out["weights"] = str(root / "test_vit.safetensors")
    return out


def gen_args(ckpts, run_dir, *extra, backbone="dit", length=4, batch_size=1,
             metrics="[fid, kid, is, class_fidelity]"):
    model = (["--model.backbone", "dit", "--model.backbone_options", f"{{path: {ckpts['dit']}}}",
              "--data.image_size", "16"] if backbone == "dit" else
             ["--model.backbone", "stable-diffusion", "--model.backbone_options", f"{{path: {ckpts['sd']}}}"])
    return ["generate", *model, "--model.steps", "3", "--model.metrics", metrics,
            "--model.feature_extractor", EXTRACTOR, "--model.fidelity_classifier", EXTRACTOR,
            "--data", "toy", "--data.length", str(length), "--data.batch_size", str(batch_size),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--run_dir", str(run_dir),
            *extra]


def pixels(run_dir):
    return {p.name: np.asarray(load_png(p)) for p in sorted((run_dir / "images").glob("*.png"))}


def meta(run_dir):
    return json.loads((run_dir / "run.json").read_text())


def run_cli(args, env=None):
    env = dict(env or os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bigain.cli", *args], capture_output=True, text=True, env=env)


# -- the pieces --------------------------------------------------------------------------------

def test_initial_noise_depends_only_on_seed_and_index():
    a = initial_noise(0, 5, (4, 8, 8))
    assert a.dtype == torch.float32 and torch.equal(a, initial_noise(0, 5, (4, 8, 8)))
    assert not torch.equal(a, initial_noise(0, 6, (4, 8, 8))) and not torch.equal(a, initial_noise(1, 5, (4, 8, 8)))


def test_fid_and_kid_compare_the_right_sets(ckpts):
    g = torch.Generator().manual_seed(0)
    real = [torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8) for _ in range(8)]
    flat = [torch.full((3, 16, 16), 128, dtype=torch.uint8) + (i % 2) for i in range(8)]
    same = score_images(real, iter(real[::-1]), metrics=["fid", "kid"], feature_extractor=EXTRACTOR)
    other = score_images(flat, iter(real), metrics=["fid", "kid"], feature_extractor=EXTRACTOR)
    assert same["fid"]["extractor"] == EXTRACTOR and same["fid"]["real_images"] == 8
    assert abs(same["fid"]["value"]) < 1e-3 * other["fid"]["value"] and other["fid"]["value"] > 1e-3
    assert other["kid"]["value"] > abs(same["kid"]["value"]) and other["kid"]["subset_size"] == 8  # adapts to n
    few = score_images(real[:1], iter(real), metrics=["fid"], feature_extractor=EXTRACTOR)
    assert "at least 2" in few["fid"]["unavailable"]


def test_a_local_timm_weights_file_is_loaded(ckpts):
    from safetensors.torch import load_file

    extractor = build_extractor(f"timm:test_vit@{ckpts['weights']}")
    saved = load_file(ckpts["weights"])
    assert all(torch.equal(saved[k], v) for k, v in extractor.net.state_dict().items())


# -- end to end --------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,compressor", [("dit", "bigain_tm"), ("sd", "tome")])
def test_end_to_end_with_none_and_a_compressor(ckpts, tmp_path, backbone, compressor):
    extra = ["--model.clip_model", ckpts["clip"]] if backbone == "sd" else []
    metrics = "[fid, kid, is, clip_score, class_fidelity]" if backbone == "sd" else "[fid, kid, is, class_fidelity]"
    runs = {}
    for comp in ("none", compressor):
        run = tmp_path / comp
        assert main(gen_args(ckpts, run, "--model.compressor", comp, *extra, backbone=backbone, batch_size=2,
                             metrics=metrics)) == 0
        runs[comp] = pixels(run)
        size = 16 if backbone == "dit" else 32
        assert sorted(runs[comp]) == [f"{i:06d}.png" for i in range(4)]
        assert all(p.shape == (3, size, size) and p.dtype == np.uint8 for p in runs[comp].values())
        df = pd.read_parquet(run / "records.parquet")
        assert df["index"].tolist() == [0, 1, 2, 3] and df["label"].tolist() == [0, 1, 2, 3]
        assert df["path"].tolist() == [f"images/{i:06d}.png" for i in range(4)] and (df["seconds"] > 0).all()
        if backbone == "sd":
            from bigain.toy.data import toy_prompts

            assert df["prompt"].tolist() == toy_prompts()[:4]
        m = meta(run)
        assert m["status"] == "complete" and m["result_config"]["model"]["compressor"] == comp
        assert m["result_config"]["model"]["sampler"] == ("ddim" if backbone == "dit" else "euler")
        for name in ("fid", "kid", "is"):
            assert m["metrics"][name]["extractor"] == EXTRACTOR and np.isfinite(m["metrics"][name]["value"])
        assert 0 <= m["metrics"]["class_fidelity"]["value"] <= 1 and m["metrics"]["class_fidelity"]["images"] == 4
        if backbone == "sd":
            assert m["metrics"]["clip_score"]["images"] == 4 and np.isfinite(m["metrics"]["clip_score"]["value"])
        summary = pd.read_csv(run / "summary.csv")
        assert summary.loc[0, "images"] == 4 and summary.loc[0, "feature_extractor"] == EXTRACTOR
        assert (run / "contact_sheet.png").is_file()
    assert m["compression"]["layers"]  # the compressor was attached ...
    assert any(not np.array_equal(runs["none"][k], runs[compressor][k]) for k in runs["none"])  # ... and sampled with


@pytest.mark.ddp
def test_two_gloo_processes_give_the_same_images_one_per_index(ckpts, tmp_path):
    args = dict(length=5, metrics="[]")
    assert main(gen_args(ckpts, tmp_path / "one", "--model.compressor", "tome", **args)) == 0
    out = run_cli(gen_args(ckpts, tmp_path / "two", "--model.compressor", "tome", "--trainer.devices", "2",
                           "--trainer.strategy", "ddp", **args))
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = pixels(tmp_path / "one"), pixels(tmp_path / "two")
    assert sorted(two) == [f"{i:06d}.png" for i in range(5)] and sorted(one) == sorted(two)
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert all((tmp_path / "one" / "images" / k).read_bytes() == (tmp_path / "two" / "images" / k).read_bytes()
               for k in one)
    shards = [pd.read_json(p, lines=True) for p in sorted((tmp_path / "two" / "shards").glob("records-rank*.jsonl"))]
    assert len(shards) == 2 and sorted(pd.concat(shards)["index"]) == [0, 1, 2, 3, 4]  # each index once
    assert meta(tmp_path / "two")["world_size"] == 2


def test_a_killed_run_resumes_without_regenerating_finished_images(ckpts, tmp_path, kill_after):
    kill, env = kill_after(batches=3)  # the third image is saved, its record is not
    run = tmp_path / "run"
    killed = run_cli(gen_args(ckpts, run, "--model.compressor", "sito", "--config", kill,
                              length=5, metrics="[]"), env=env)
    assert killed.returncode == 3, killed.stderr[-3000:]
    shard = run / "shards" / "records-rank0.jsonl"
    assert sum(1 for _ in open(shard)) == 2 and sorted(pixels(run)) == [f"{i:06d}.png" for i in range(3)]
    before = {i: os.stat(run / "images" / f"{i:06d}.png") for i in range(3)}
    assert main(gen_args(ckpts, run, "--model.compressor", "sito", length=5, metrics="[]")) == 0
    after = {i: os.stat(run / "images" / f"{i:06d}.png") for i in range(3)}
    for i in (0, 1):  # finished images untouched
        assert (after[i].st_ino, after[i].st_mtime_ns) == (before[i].st_ino, before[i].st_mtime_ns)
    assert after[2].st_ino != before[2].st_ino  # an image without a record is generated again
    assert sum(1 for _ in open(shard)) == 5 and not list((run / "images").glob(".*"))  # no temp files left
    assert main(gen_args(ckpts, tmp_path / "clean", "--model.compressor", "sito", length=5, metrics="[]")) == 0
    clean, resumed = pixels(tmp_path / "clean"), pixels(run)
    assert sorted(clean) == sorted(resumed) and all(np.array_equal(clean[k], resumed[k]) for k in clean)


def test_rescoring_a_finished_run_recomputes_metrics_without_generating(ckpts, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(gen_args(ckpts, run, metrics="[fid]")) == 0
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "images").glob("*.png")}
    first = meta(run)["metrics"]
    assert set(first) == {"fid"}
    other = f"timm:test_vit@{ckpts['weights']}"
    assert main(gen_args(ckpts, run, "--model.feature_extractor", other, metrics="[fid, kid]")) == 0
    second = meta(run)["metrics"]
    assert set(second) == {"fid", "kid"} and second["fid"]["extractor"] == other
    assert second["fid"]["value"] != first["fid"]["value"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "images").glob("*.png")} == stats
    assert sum(1 for _ in open(run / "shards" / "records-rank0.jsonl")) == 4
    own = score_run(run, [load_png(run / "images" / k) for k in sorted(stats)], metrics=["fid"],
                    feature_extractor=EXTRACTOR)  # the saved images against themselves: nothing to tell apart
    assert own["fid"]["images"] == 4 and abs(own["fid"]["value"]) < 1e-3 * first["fid"]["value"]
    assert main(gen_args(ckpts, run, "--model.steps", "4", metrics="[fid]")) == 2  # steps do change the images
    assert "model.steps" in capsys.readouterr().err


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    ({"steps": 0}, "steps must be an integer from 1 to 1000"),
    ({"steps": 1001}, "steps must be an integer from 1 to 1000"),
    ({"guidance_scale": 0.5}, "guidance_scale must be >= 1"),
    ({"metrics": ["fid", "fdi"]}, r"unknown metric\(s\) \['fdi'\]"),
    ({"feature_extractor": "vgg16"}, "unknown feature extractor 'vgg16'; use one of"),
    ({"feature_extractor": "timm:resnet51"}, "timm has no model 'resnet51'. Did you mean"),
    ({"feature_extractor": "inception:/nowhere/w.pth"}, "weights file /nowhere/w.pth does not exist"),
    ({"fidelity_classifier": "timm:"}, "names no timm model"),
])
def test_bad_options_give_clear_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        DiffusionGenerator(backbone="dit", **options)


def test_bad_input_from_the_command_line(ckpts, tmp_path, capsys):
    assert main(gen_args(ckpts, tmp_path / "a", "--model.guidance_scale", "0.2")) == 2
    assert "guidance_scale must be >= 1" in capsys.readouterr().err
    assert main(gen_args(ckpts, tmp_path / "b", "--model.feature_extractor", "timm:no_such_net")) == 2
    assert "timm has no model 'no_such_net'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work


def test_a_missing_real_image_set_is_an_error_and_missing_weights_are_recorded(ckpts):
    fake = [torch.zeros(3, 16, 16, dtype=torch.uint8)] * 3
    with pytest.raises(DatasetError, match="need the datamodule's real images, but it yielded none"):
        score_images(fake, iter([]), metrics=["fid"], feature_extractor=EXTRACTOR)
    with pytest.raises(DatasetError, match="yielded none"):
        score_images(fake, None, metrics=["kid"], feature_extractor=EXTRACTOR)
    out = score_images(fake, iter(fake), metrics=["fid", "is", "class_fidelity"], feature_extractor="inception",
                       labels=[0, 1, 2], fidelity_classifier=EXTRACTOR)
    if "value" in out["fid"]:
        pytest.skip("the Inception weights are available on this machine")
    for name in ("fid", "is"):
        assert out[name]["extractor"] == "inception"
        assert "inception:/path/to/weights.pth" in out[name]["unavailable"]
    assert out["class_fidelity"]["images"] == 3  # the other metrics still ran


def test_a_local_inception_weights_file(tmp_path, monkeypatch):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as patch:  # random weights, saved as a local file (nothing is downloaded)
        patch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.save(fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), tmp_path / "w.pth")
    spec = f"inception:{tmp_path / 'w.pth'}"
    g = torch.Generator().manual_seed(0)
    real = [torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(4)]
    out = score_images(real, iter(real), metrics=["fid", "is"], feature_extractor=spec)
    assert out["fid"]["extractor"] == spec and np.isfinite(out["fid"]["value"]) and np.isfinite(out["is"]["value"])


# -- example configs ---------------------------------------------------------------------------

CONFIGS = ["generate-sd2-coco.yaml", "generate-sd2-imagenet.yaml", "generate-sd2-pets.yaml",
           "generate-dit-xl2-imagenet.yaml", "generate-toy.yaml"]
CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


@pytest.mark.parametrize("name", CONFIGS)
def test_example_configs_parse_and_their_options_are_valid(name, capsys):
    import importlib

    import yaml

    from bigain.datamodules.registry import datamodule_class_path
    from bigain.errors import UnknownNameError

    path = os.path.join(CONFIG_DIR, name)
    cfg = yaml.safe_load(open(path))
    try:
        class_path = datamodule_class_path(cfg["data"]["class_path"])
    except UnknownNameError:
        pytest.skip(f"datamodule {cfg['data']['class_path']!r} is not registered here")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone_options"] == cfg["model"].get("backbone_options")
    assert printed["data"]["class_path"] == class_path
    module = DiffusionGenerator(**cfg["model"])  # option validation, nothing loaded
    assert module.result_config()["steps"] == 50
    module_name, cls = class_path.rsplit(".", 1)
    getattr(importlib.import_module(module_name), cls)(**cfg["data"]["init_args"])


def test_the_toy_config_runs(tmp_path, monkeypatch):
    import bigain.commands.generate as generate_command

    drawn = {}
    real_sheet = generate_command.write_contact_sheet

    def sheet(path, images, captions, **kw):
        drawn["captions"] = list(captions)
        return real_sheet(path, images, captions, **kw)

    monkeypatch.setattr(generate_command, "write_contact_sheet", sheet)
    run = tmp_path / "run"
    assert main(["generate", "--config", os.path.join(CONFIG_DIR, "generate-toy.yaml"),  # the bundled toy DiT
                 "--model.steps", "2", "--data.length", "3",
                 "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--run_dir", str(run)]) == 0
    m = meta(run)
    assert m["status"] == "complete" and len(pixels(run)) == 3 and m["metric_options"]["feature_extractor"] == "toy"
    fid = m["metrics"]["fid"]
    assert fid["extractor"] == "toy" and "value" in fid
    # the contact sheet keeps the class: the words every class prompt shares are dropped, not the class
    assert drawn["captions"] == ["0: horizontal stripes (2 px)", "1: horizontal stripes (3 px)",
                                 "2: vertical stripes (2 px)"]
    assert (run / "contact_sheet.png").is_file()
