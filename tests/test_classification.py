"""Diffusion-classification evaluation: protocol, pairing, end to end, DDP, resume, bad input."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from bigain.cli import main
from bigain.errors import CheckpointError, ConfigError, UnknownNameError
from bigain.tasks.adaptive import AdaptiveSchedule, average_precision, classify_image, image_noise


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from bigain.testing import save_tiny_dit, save_tiny_stable_diffusion

    root = tmp_path_factory.mktemp("ckpt")
    return {"dit": save_tiny_dit(root / "dit"), "sd": save_tiny_stable_diffusion(root / "sd")}


def dit_args(ckpts, run_dir, *extra, length=6):
    return ["classify", "--model.backbone", "dit", "--model.backbone_options", f"{{path: {ckpts['dit']}}}",
            "--model.n_samples", "[2, 4]", "--model.to_keep", "[3, 1]", "--data", "toy",
            "--data.length", str(length), "--data.image_size", "16", "--data.batch_size", "2",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--run_dir", str(run_dir), *extra]


def records(run_dir):
    df = pd.read_parquet(f"{run_dir}/records.parquet")
    return df.drop(columns=["seconds", "denoiser_seconds"], errors="ignore").sort_values("index").reset_index(drop=True)


# -- the protocol ------------------------------------------------------------------------------

def test_schedule_is_the_reference_grid_and_stages():
    s = AdaptiveSchedule((5, 20), (5, 1), 1000)
    assert s.grid == list(range(25, 1000, 50))
    stage1, stage2 = s.stage_timesteps()
    assert stage1 == [125, 325, 525, 725, 925]
    assert stage2 == [25, 75, 175, 225, 275, 375, 425, 475, 575, 625, 675, 775, 825, 875, 975]
    assert s.evaluations(10) == 5 * 10 + 75 and s.evaluations(1000) == 5 * 1000 + 75


@pytest.mark.parametrize("n_samples,to_keep,match", [
    ((5, 20), (5,), "same length"), ((5, 20), (5, 2), "end at 1"), ((5, 20), (1, 5), "non-increasing"),
    ((20, 5), (5, 1), "increasing order"), ((), (), "non-empty")])
def test_schedule_rejects_bad_stages(n_samples, to_keep, match):
    with pytest.raises(ConfigError, match=match):
        AdaptiveSchedule(n_samples, to_keep, 1000)


def test_classifier_picks_the_lowest_error_class_and_shares_noise_across_classes():
    schedule = AdaptiveSchedule((2, 4), (2, 1), 1000)
    x0 = torch.randn(3, 4, 4)
    noise = image_noise(0, 17, schedule, x0.shape)
    seen = {}

    def predict(x_t, t, classes):
        for xi, ti, ci in zip(x_t, t.tolist(), classes.tolist()):
            seen[(ci, ti)] = xi.clone()
        eps = (x_t - torch.sqrt(ab[t]).view(-1, 1, 1, 1) * x0) / torch.sqrt(1 - ab[t]).view(-1, 1, 1, 1)
        return eps + 0.05 * (classes.view(-1, 1, 1, 1) - 3).float()

    ab = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64).float()
    result = classify_image(x0, noise, schedule=schedule, num_classes=6, alphas_cumprod=ab, predict=predict,
                            batch_size=5)
    assert result.prediction == 3 and result.ranking[0] == 3
    assert result.evaluations == 6 * 2 + 2 * 2 and result.forward_calls == 3 + 1
    by_t = {}
    for (_, t), x_t in seen.items():
        by_t.setdefault(t, []).append(x_t)
    for t, xs in by_t.items():
        assert all(torch.equal(xs[0], x) for x in xs[1:]), t  # same noise for every class


def test_noise_depends_only_on_seed_and_index():
    s = AdaptiveSchedule((5, 20), (5, 1), 1000)
    a = image_noise(0, 5, s, (4, 8, 8))
    assert a.shape == (20, 4, 8, 8) and torch.equal(a, image_noise(0, 5, s, (4, 8, 8)))
    assert not torch.equal(a, image_noise(0, 6, s, (4, 8, 8))) and not torch.equal(a, image_noise(1, 5, s, (4, 8, 8)))


def test_average_precision():
    assert average_precision([3, 1, 2, 0], [3]) == 1.0
    assert average_precision([0, 3, 1, 2], [3, 2]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision([0, 1], []) == 0.0


def test_noise_is_the_same_for_every_compressor(ckpts):
    """x_t fed to the denoiser for (class, timestep) is identical under any compressor."""
    from bigain.datamodules.toy import ToyDataModule
    from bigain.tasks.classification import DiffusionClassifier

    dm = ToyDataModule(length=2, image_size=16)
    dm.setup()
    fed = {}
    for comp in ("none", "tome", "bigain_td"):
        module = DiffusionClassifier(backbone="dit", backbone_options={"path": ckpts["dit"]}, compressor=comp,
                                     n_samples=[2, 4], to_keep=[3, 1])
        module.configure_model()
        module.num_classes, module.multilabel = 10, False
        module.backbone.set_classes(prompts=dm.prompts)
        original = module.backbone.predict_noise

        def spy(x_t, t, cond, _orig=original, _comp=comp):
            for xi, ti, ci in zip(x_t, t.tolist(), cond.tolist()):
                fed.setdefault((ti, ci), {})[_comp] = xi.clone()
            return _orig(x_t, t, cond)

        module.backbone.predict_noise = spy
        item = dm.dataset[1]
        module.classify(item["image"], item["index"], item["label"])
    assert fed
    for per_comp in fed.values():
        values = list(per_comp.values())
        assert all(torch.equal(values[0], v) for v in values[1:])
    per_t = {}
    for (t, _), per_comp in fed.items():
        per_t.setdefault(t, []).append(per_comp["none"])
    assert all(all(torch.equal(v[0], x) for x in v[1:]) for v in per_t.values())


# -- end to end --------------------------------------------------------------------------------

@pytest.mark.parametrize("compressor", ["none", "tome", "bigain_td"])
def test_end_to_end_on_a_tiny_dit(ckpts, tmp_path, compressor):
    assert main(dit_args(ckpts, tmp_path / "run", "--model.compressor", compressor, "--model.blocks", "all")) == 0
    df = records(tmp_path / "run")
    assert df["index"].tolist() == list(range(6))
    assert set(df.columns) >= {"label", "prediction", "correct", "top5", "mean_errors", "evaluations", "forward_calls"}
    assert (df["evaluations"] == 10 * 2 + 3 * 2).all()
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"] == "complete" and meta["world_size"] == 1
    assert meta["versions"]["torch"] and meta["result_config"]["model"]["compressor"] == compressor
    if compressor == "tome":
        assert meta["compression"]["tokens_kept"]["1"]["queries"] == 0.5
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert summary.loc[0, "images"] == 6 and 0 <= summary.loc[0, "accuracy"] <= 1


@pytest.mark.parametrize("compressor", ["none", "tome", "bigain_td"])
def test_end_to_end_on_a_tiny_stable_diffusion(ckpts, tmp_path, compressor):
    args = ["classify", "--model.backbone", "stable-diffusion", "--model.backbone_options", f"{{path: {ckpts['sd']}}}",
            "--model.compressor", compressor, "--model.n_samples", "[2]", "--model.to_keep", "[1]",
            "--data", "toy", "--data.length", "3", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--run_dir", str(tmp_path / "run")]
    assert main(args) == 0
    df = records(tmp_path / "run")
    assert len(df) == 3 and (df["evaluations"] == 20).all()


def run_cli(args, env=None, check=True):
    return subprocess.run([sys.executable, "-m", "bigain.cli", *args], capture_output=True, text=True,
                          env=env, check=check)


@pytest.mark.ddp
def test_two_gloo_processes_give_one_record_per_image_and_the_same_predictions(ckpts, tmp_path):
    main(dit_args(ckpts, tmp_path / "one", "--model.compressor", "tome", length=7))
    out = run_cli(dit_args(ckpts, tmp_path / "two", "--model.compressor", "tome", "--trainer.devices", "2",
                           "--trainer.strategy", "ddp", length=7), check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    two = records(tmp_path / "two")
    assert two["index"].tolist() == list(range(7))
    assert len(list((tmp_path / "two" / "shards").glob("records-rank*.jsonl"))) == 2
    pd.testing.assert_frame_equal(records(tmp_path / "one")[["index", "prediction", "top5"]],
                                  two[["index", "prediction", "top5"]])
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


def test_a_killed_run_resumes_to_the_uninterrupted_result(ckpts, tmp_path, kill_after):
    kill, env = kill_after(batches=3)
    killed = run_cli(dit_args(ckpts, tmp_path / "run", "--model.compressor", "sito", "--config",
                              kill, length=9), env=env, check=False)
    assert killed.returncode == 3
    done = sum(1 for _ in open(tmp_path / "run" / "shards" / "records-rank0.jsonl"))
    assert 0 < done < 9 and not (tmp_path / "run" / "records.parquet").exists()
    assert main(dit_args(ckpts, tmp_path / "run", "--model.compressor", "sito", length=9)) == 0
    assert sum(1 for _ in open(tmp_path / "run" / "shards" / "records-rank0.jsonl")) == 9  # nothing redone
    assert main(dit_args(ckpts, tmp_path / "clean", "--model.compressor", "sito", length=9)) == 0
    pd.testing.assert_frame_equal(records(tmp_path / "run"), records(tmp_path / "clean"))


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(ckpts, tmp_path, capsys):
    from bigain.tasks.classification import DiffusionClassifier

    with pytest.raises(UnknownNameError, match="Did you mean 'tome'"):
        DiffusionClassifier(compressor="tmoe")
    with pytest.raises(UnknownNameError, match="unknown backbone 'sd2'.*stable-diffusion"):
        DiffusionClassifier(backbone="sd2")
    with pytest.raises(ConfigError, match="same length"):
        DiffusionClassifier(n_samples=[5, 20], to_keep=[1])
    from bigain.backbones.dit import DiT
    from bigain.backbones.stable_diffusion import StableDiffusion

    with pytest.raises(CheckpointError, match="does not exist"):
        DiT(path=str(tmp_path / "nowhere"))
    (tmp_path / "half" / "unet").mkdir(parents=True)
    missing = r"incomplete: missing \['vae', 'text_encoder', 'tokenizer', 'scheduler'\]"
    with pytest.raises(CheckpointError, match=missing):
        StableDiffusion(path=str(tmp_path / "half"))


def test_a_run_folder_with_another_config_is_refused(ckpts, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(dit_args(ckpts, run, "--model.compressor", "tome", length=2)) == 0
    assert main(dit_args(ckpts, run, "--model.compressor", "todo", length=2)) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "model.compressor" in err and "--overwrite" in err
    assert main(dit_args(ckpts, run, "--model.compressor", "todo", "--overwrite", "true", length=2)) == 0
    meta = json.loads((run / "run.json").read_text())
    assert meta["result_config"]["model"]["compressor"] == "todo" and meta["status"] == "complete"
    # batch size does not change results: the same folder is accepted
    assert main(dit_args(ckpts, run, "--model.compressor", "todo", "--model.batch_size", "7", length=2)) == 0
