"""The tasks' compile option: one batch shape per run, same results as eager, recorded in run.json
and left out of the result fingerprint."""

import json

import pandas as pd
import pytest
import torch

from bigain.cli import main
from bigain.errors import ConfigError
from bigain.tasks.adaptive import AdaptiveSchedule, classify_image, image_noise


def _classify(fixed_batch, sizes):
    schedule = AdaptiveSchedule((2, 4), (3, 1), 1000, 1)
    x0 = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = image_noise(0, 5, schedule, (3, 4, 4))

    def predict(x_t, t, classes):  # a per-sample function, like a batch-independent denoiser
        sizes.append(x_t.shape[0])
        return x_t * 0.5 + classes.view(-1, 1, 1, 1) * 0.01 + t.view(-1, 1, 1, 1) * 1e-4

    return classify_image(x0, noise, schedule=schedule, num_classes=7, alphas_cumprod=torch.linspace(0.99, 0.01, 1000),
                          predict=predict, batch_size=4, fixed_batch=fixed_batch)


def test_fixed_batches_keep_one_shape_and_the_same_result():
    eager_sizes, fixed_sizes = [], []
    eager, fixed = _classify(False, eager_sizes), _classify(True, fixed_sizes)
    assert set(eager_sizes) != {4}  # the protocol's chunks do not all fill a batch ...
    assert set(fixed_sizes) == {4}  # ... padded, every forward has the same shape
    assert len(fixed_sizes) == len(eager_sizes) and fixed.forward_calls == eager.forward_calls
    assert fixed.evaluations == eager.evaluations
    assert fixed.ranking == eager.ranking and fixed.mean_errors == eager.mean_errors


def test_an_unknown_compile_mode_is_refused():
    from bigain.tasks.classification import DiffusionClassifier

    with pytest.raises(ConfigError, match="compile must be one of"):
        DiffusionClassifier(compile="fastest")


@pytest.mark.slow
def test_compiled_classification_equals_eager_and_shares_the_fingerprint(tmp_path):
    from bigain.testing import save_tiny_dit

    ckpt = save_tiny_dit(tmp_path / "dit")
    torch._dynamo.reset()

    def run(name, *extra):
        args = ["classify", "--model.backbone", "dit", "--model.backbone_options", f"{{path: {ckpt}}}",
                "--model.compressor", "tome", "--model.compressor_options", "{ratio: 0.5}", "--model.blocks", "all",
                "--model.n_samples", "[2, 4]", "--model.to_keep", "[3, 1]", "--model.batch_size", "8",
                "--data", "toy", "--data.length", "3", "--data.image_size", "16", "--trainer.accelerator", "cpu",
                "--trainer.enable_progress_bar", "false", "--run_dir", str(tmp_path / name), *extra]
        assert main(args) == 0
        meta = json.loads((tmp_path / name / "run.json").read_text())
        return pd.read_parquet(tmp_path / name / "records.parquet").sort_values("index"), meta

    eager, eager_meta = run("eager")
    compiled, meta = run("compiled", "--model.compile", "default")
    torch._dynamo.reset()
    assert meta["model"]["compile"] == "default" and eager_meta["model"]["compile"] == "none"
    assert meta["fingerprint"] == eager_meta["fingerprint"]
    assert compiled["prediction"].tolist() == eager["prediction"].tolist()
    for a, b in zip(compiled["mean_errors"], eager["mean_errors"]):
        a, b = ({k: v for k, v in d.items() if v is not None} for d in (a, b))
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 for k in a)
    assert compiled["seconds"].iloc[1:].max() < 10 * eager["seconds"].max() + 5  # compiled once, not per image
    assert meta["compression"]["tokens_kept"]["1"]["queries"] == 0.5  # from the traced graph


def test_demo_passes_the_compile_mode_to_every_cell(tmp_path):
    from bigain.demo import demo_sweep
    from bigain.sweep import expand_sweep

    cells = expand_sweep(demo_sweep(out=tmp_path, quick=True, compile="reduce-overhead"))
    assert cells and all(c.config["model"]["compile"] == "reduce-overhead" for c in cells)
    assert {c.task for c in cells} == {"classify", "generate"}
    eager = expand_sweep(demo_sweep(out=tmp_path, quick=True))
    assert all(c.config["model"]["compile"] == "none" for c in eager)
