"""What the model predicts (epsilon, v, x0): backbones read the scheduler's ``prediction_type``,
classification ranks on the epsilon error whatever it is, generation steps the model's own output
with a scheduler of the same type. Checked on tiny v-prediction / sample pipelines built from
configs against the closed-form conversions."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bigain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _scheduler(root: Path, prediction_type: str, **kw) -> None:
    from diffusers import DDPMScheduler

    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  prediction_type=prediction_type, clip_sample=False, **kw).save_pretrained(root / "scheduler")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Tiny SD pipelines that differ only in their scheduler's prediction_type (same weights)."""
    from bigain.testing import save_tiny_stable_diffusion

    out = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        root = Path(save_tiny_stable_diffusion(tmp_path_factory.mktemp(kind) / "sd"))
        _scheduler(root, kind)
        out[kind] = str(root)
    return out


def _sd(path):
    from bigain.backbones.stable_diffusion import StableDiffusion

    return StableDiffusion(path=path)


def _inputs(bb, batch=3):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([25, 500, 975])[:batch]
    bb.set_classes(prompts=["a cat", "a dog", "a bird"])
    return x_t, t, bb.class_conditions(torch.arange(batch))


def _a(bb, t):
    a = bb.alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt().float(), (1 - a).sqrt().float()


def test_v_prediction_converts_to_epsilon_and_x0_in_closed_form(pipes):
    bb = _sd(pipes["v_prediction"])
    assert bb.prediction_type == "v_prediction" and bb.describe()["prediction_type"] == "v_prediction"
    x_t, t, cond = _inputs(bb)
    with torch.no_grad():
        v = bb.unet(x_t, t, encoder_hidden_states=cond).sample
    sa, s1 = _a(bb, t)
    torch.testing.assert_close(bb.predict_output(x_t, t, cond), v)
    torch.testing.assert_close(bb.predict_noise(x_t, t, cond), sa * v + s1 * x_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bb.predict_sample(x_t, t, cond), sa * x_t - s1 * v, rtol=1e-5, atol=1e-6)


def test_sample_prediction_converts_to_epsilon(pipes):
    bb = _sd(pipes["sample"])
    x_t, t, cond = _inputs(bb)
    with torch.no_grad():
        x0 = bb.unet(x_t, t, encoder_hidden_states=cond).sample
    sa, s1 = _a(bb, t)
    torch.testing.assert_close(bb.predict_noise(x_t, t, cond), (x_t - sa * x0) / s1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.predict_sample(x_t, t, cond), x0)


def test_epsilon_models_are_unchanged(pipes):
    bb = _sd(pipes["epsilon"])
    x_t, t, cond = _inputs(bb)
    with torch.no_grad():
        eps = bb.unet(x_t, t, encoder_hidden_states=cond).sample
    assert bb.prediction_type == "epsilon"
    assert torch.equal(bb.predict_noise(x_t, t, cond), eps)


def test_the_dit_backbone_reads_its_prediction_type_too(tmp_path):
    from bigain.backbones.dit import DiT
    from bigain.testing import save_tiny_dit

    root = Path(save_tiny_dit(tmp_path / "dit"))
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction") \
        .save_pretrained(root / "scheduler")
    bb = DiT(path=str(root))
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 700])
    bb.set_classes(prompts=[str(i) for i in range(10)])
    cond = bb.class_conditions(torch.tensor([1, 2]))
    v = bb.predict_output(x_t, t, cond)
    sa, s1 = _a(bb, t)
    assert v.shape == x_t.shape  # learned-sigma channels dropped
    torch.testing.assert_close(bb.predict_noise(x_t, t, cond), sa * v + s1 * x_t, rtol=1e-5, atol=1e-6)


def test_an_unknown_prediction_type_is_an_error_naming_the_accepted_ones(tmp_path):
    from bigain.testing import save_tiny_stable_diffusion

    root = Path(save_tiny_stable_diffusion(tmp_path / "sd"))
    config = root / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"epsilon"', '"flow"'))
    with pytest.raises(ConfigError, match=r"prediction_type='flow'.*'epsilon', 'v_prediction', 'sample'"):
        _sd(str(root))


def _generator(path, sampler, steps=3):
    from bigain.tasks.generation import DiffusionGenerator

    module = DiffusionGenerator(backbone="stable-diffusion", backbone_options={"path": path}, sampler=sampler,
                                steps=steps, guidance_scale=1.0, metrics=[])
    module.configure_model()
    module.backbone.decode = lambda x0: x0  # compare latents
    return module


def test_ddim_generation_with_a_v_model_follows_the_closed_form(pipes):
    module = _generator(pipes["v_prediction"], "ddim")
    bb = module.backbone
    scheduler = module.make_scheduler()
    assert scheduler.config.prediction_type == "v_prediction"
    cond = bb.prompt_conditions(["a cat", "a dog"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    got = module.sample(cond, noise)
    x = noise.clone()
    ts = scheduler.timesteps.tolist()
    for i, t in enumerate(ts):  # DDIM, eta 0: x_prev = sqrt(a') x0 + sqrt(1 - a') eps
        with torch.no_grad():
            v = bb.unet(x, torch.tensor([t, t]), encoder_hidden_states=cond).sample
        a = bb.alphas_cumprod[t].float()
        x0 = a.sqrt() * x - (1 - a).sqrt() * v
        eps = a.sqrt() * v + (1 - a).sqrt() * x
        a_prev = bb.alphas_cumprod[ts[i + 1]].float() if i + 1 < len(ts) else torch.tensor(1.0)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


def test_euler_generation_is_configured_with_the_models_prediction_type(pipes):
    for kind, path in pipes.items():
        assert _generator(path, "euler").make_scheduler().config.prediction_type == kind


def _cli(argv):
    from bigain.cli import main

    with redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return int(code or 0), out.getvalue()


def test_classification_of_a_v_model_ranks_on_the_epsilon_error(pipes, tmp_path, monkeypatch):
    from bigain.tasks.classification import DiffusionClassifier

    seen = []
    original = DiffusionClassifier._predict

    def spy(self, x_t, t, classes):
        eps = original(self, x_t, t, classes)
        bb = self.backbone
        with torch.no_grad():
            v = bb.unet(x_t, t, encoder_hidden_states=bb.class_conditions(classes)).sample
        sa, s1 = _a(bb, t)
        seen.append((eps - (sa * v + s1 * x_t)).abs().max().item())
        return eps

    monkeypatch.setattr(DiffusionClassifier, "_predict", spy)
    code, _ = _cli(["classify", "--model.backbone", "stable-diffusion", "--model.backbone_options",
                    f"{{path: {pipes['v_prediction']}}}", "--model.n_samples", "[2]", "--model.to_keep", "[1]",
                    "--data", "toy", "--data.length", "2", "--trainer.accelerator", "cpu",
                    "--trainer.enable_progress_bar", "false", "--run_dir", str(tmp_path / "run")])
    assert code == 0
    assert seen and max(seen) < 1e-5
    assert len(pd.read_parquet(tmp_path / "run" / "records.parquet")) == 2


@pytest.mark.parametrize("name", ["classify-sd2-768-pets.yaml", "generate-sd2-768-pets.yaml"])
def test_sd2_768_configs_parse_and_name_the_v_prediction_model(name):
    path = ROOT / "configs" / name
    code, out = _cli([name.split("-")[0], "--config", str(path), "--print_config"])
    assert code == 0, out
    config = yaml.safe_load(out)
    assert config["model"]["backbone_options"]["path"] == "stabilityai/stable-diffusion-2"
    assert config["data"]["init_args"]["image_size"] == 768


def _classifier(path, target, **kw):
    from bigain.tasks.classification import DiffusionClassifier

    module = DiffusionClassifier(backbone="stable-diffusion", backbone_options={"path": path}, n_samples=[2],
                                 to_keep=[1], target=target, batch_size=4, **kw)
    module.configure_model()
    module.num_classes, module.multilabel = 3, False
    module.backbone.set_classes(prompts=["a cat", "a dog", "a bird"])
    return module


def _image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_native_target_measures_the_v_error_of_a_v_model(pipes):
    from bigain.tasks.adaptive import image_noise

    module = _classifier(pipes["v_prediction"], "native")
    bb = module.backbone
    image = _image()
    record = module.classify(image, 7, 0)
    x0 = bb.encode(image[None])[0]
    noise = image_noise(0, 7, module.schedule, tuple(x0.shape))
    expected = {}
    for c in range(3):  # by hand: x_t from (x0, eps, t), v target in closed form, error of the raw output
        errs = []
        for row, t in enumerate(module.schedule.grid):
            a = bb.alphas_cumprod[t]
            eps = noise[row]
            x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()[None]
            with torch.no_grad():
                v = bb.unet(x_t, torch.tensor([t]), encoder_hidden_states=bb.class_conditions(torch.tensor([c]))).sample
            v_target = (a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()).float()
            errs.append(float((v[0] - v_target).pow(2).mean()))
        expected[c] = sum(errs) / len(errs)
    best = min(expected, key=lambda c: (expected[c], c))
    assert record["prediction"] == best
    assert record["mean_errors"][str(best)] == pytest.approx(expected[best], rel=1e-4)
    eps_record = _classifier(pipes["v_prediction"], "epsilon").classify(image, 7, 0)
    assert eps_record["mean_errors"][str(best)] != pytest.approx(expected[best], rel=1e-3)  # not the same error


def test_native_target_of_an_epsilon_model_is_the_epsilon_error(pipes):
    image = _image()
    native = _classifier(pipes["epsilon"], "native").classify(image, 2, 1)
    epsilon = _classifier(pipes["epsilon"], "epsilon").classify(image, 2, 1)
    assert native["top5"] == epsilon["top5"]
    assert native["mean_errors"] == pytest.approx(epsilon["mean_errors"], rel=1e-6)


def test_the_target_is_part_of_the_result_fingerprint_and_unknown_ones_are_errors(pipes):
    from bigain.tasks.classification import DiffusionClassifier

    assert "target" not in DiffusionClassifier().result_config()  # the default: earlier runs keep their identity
    assert DiffusionClassifier(target="native").result_config()["target"] == "native"
    with pytest.raises(ConfigError, match=r"target must be 'epsilon'.*'native'.*got 'v'"):
        DiffusionClassifier(target="v")
    assert _cli(["classify", "--model.target", "native", "--print_config"])[0] == 0
    assert _cli(["classify", "--model.target", "v", "--print_config"])[0] != 0
