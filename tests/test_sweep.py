"""Sweeps: expansion, validation, skipping finished cells, recording a failing cell and going on."""

import json

import pytest

from bigain.errors import ConfigError
from bigain.sweep import expand_sweep, run_sweep


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory):
    from bigain.testing import save_tiny_dit

    return save_tiny_dit(tmp_path_factory.mktemp("ckpt") / "dit")


def spec(dit_path, compressors):
    return {"tasks": ["classify"], "datasets": [{"class_path": "toy", "init_args": {"length": 3, "image_size": 16}}],
            "compressors": compressors,
            "classify": {"model": {"backbone": "dit", "backbone_options": {"path": dit_path},
                                   "n_samples": [2], "to_keep": [1]},
                         "trainer": {"accelerator": "cpu", "enable_progress_bar": False}}}


def test_expansion_and_validation(tmp_path):
    cells = expand_sweep({"tasks": ["classify", "generate"], "datasets": ["toy"],
                          "compressors": ["none", {"name": "tome", "grid": {"ratio": [0.5, 0.7]}},
                                          {"name": "bigain_td", "options": {"factor": 2}, "grid": {"alpha": [0.5]}}]},
                         tmp_path)
    assert len(cells) == 2 * 1 * 4
    assert [c.method for c in cells[:4]] == ["none", "tome-ratio0.5", "tome-ratio0.7", "bigain_td-alpha0.5-factor2"]
    assert cells[1].config["model"]["compressor_options"] == {"ratio": 0.5}
    assert cells[1].folder == tmp_path / "classify" / "toy" / "tome-ratio0.5"
    with pytest.raises(ConfigError, match=r"\[0, 0.75\]"):
        expand_sweep({"compressors": [{"name": "tome", "grid": {"ratio": [0.9]}}]}, tmp_path)
    with pytest.raises(ConfigError, match="unknown sweep task"):
        expand_sweep({"tasks": ["train"]}, tmp_path)


def test_finished_cells_are_skipped_and_a_failing_cell_does_not_stop_the_others(dit_path, tmp_path):
    s = spec(dit_path, ["none", {"name": "tome", "grid": {"ratio": [0.5]}}])
    first = run_sweep(s, out=tmp_path, in_process=True)
    assert [c["status"] for c in first["cells"]] == ["complete", "complete"]
    again = run_sweep(s, out=tmp_path, in_process=True)
    assert [c["status"] for c in again["cells"]] == ["skipped (finished)"] * 2
    broken = spec(dit_path, ["none", "todo", "tome"])
    broken["classify"]["model"]["backbone_options"] = {"path": str(tmp_path / "missing")}
    result = run_sweep(broken, out=tmp_path / "b", in_process=True)
    assert [c["status"] for c in result["cells"]] == ["failed"] * 3  # each tried, each recorded
    assert "does not exist" in result["cells"][0]["error"]
    saved = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert saved["total"] == 3 and len(saved["cells"]) == 3


def test_sweep_command_writes_the_report(dit_path, tmp_path):
    import yaml

    from bigain.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**spec(dit_path, ["none", "todo"]), "out": str(tmp_path / "sw")}))
    assert main(["sweep", "--config", str(path), "--in_process"]) == 0
    assert (tmp_path / "sw" / "report" / "summary.md").is_file()
    assert "todo" in (tmp_path / "sw" / "report" / "summary.md").read_text()


def test_a_backbones_axis_runs_every_cell_on_each_model_in_its_own_folder(tmp_path):
    spec = {"tasks": ["classify"], "datasets": ["toy"], "compressors": ["none", "tome"],
            "classify": {"model": {"backbone": "toy", "backbone_options": {"dtype": "bfloat16"}, "n_samples": [2]}},
            "backbones": [{"label": "a", "model": {"backbone": "toy", "blocks": [1]}},
                          {"model": {"backbone": "toy-unet"}}]}
    cells = expand_sweep(spec, tmp_path)
    assert [c.folder.relative_to(tmp_path).as_posix() for c in cells] == [
        "classify/toy/a/none", "classify/toy/a/tome", "classify/toy/toy-unet/none", "classify/toy/toy-unet/tome"]
    assert cells[0].config["model"] == {"backbone": "toy", "backbone_options": {"dtype": "bfloat16"}, "n_samples": [2],
                                        "blocks": [1], "compressor": "none", "compressor_options": {}}
    assert cells[2].config["model"]["backbone"] == "toy-unet" and "blocks" not in cells[2].config["model"]
    assert [c.backbone for c in cells] == ["a", "a", "toy-unet", "toy-unet"]
    assert [c.folder.name for c in expand_sweep({**spec, "backbones": None}, tmp_path)] == ["none", "tome"]
    for bad, why in (([], "non-empty list"), ([{"model": "toy"}], "label:, model:"),
                     ([{"label": "x", "model": {}, "extra": 1}], "label:, model:"), ([{"model": {}}], "needs a label"),
                     ([{"label": "x", "model": {"backbone": "toy"}}] * 2, "must differ")):
        with pytest.raises(ConfigError, match=why):
            expand_sweep({**spec, "backbones": bad}, tmp_path)


def test_a_cell_on_retrained_toy_weights_is_not_taken_as_finished(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from bigain.backbones.dit import TOY_DIT_PATH

    toy = tmp_path / "toy-dit"
    shutil.copytree(TOY_DIT_PATH, toy)
    s = {"tasks": ["classify"], "datasets": [{"class_path": "toy", "init_args": {"length": 2}}],
         "compressors": ["none"],
         "classify": {"model": {"backbone": "toy", "backbone_options": {"path": str(toy)}, "n_samples": [2],
                                "to_keep": [1]}, "trainer": {"accelerator": "cpu", "enable_progress_bar": False}}}
    assert run_sweep(s, out=tmp_path / "sweep", in_process=True)["cells"][0]["status"] == "complete"
    assert run_sweep(s, out=tmp_path / "sweep", in_process=True)["cells"][0]["status"] == "skipped (finished)"
    weights = next((toy / "transformer").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1e-3}, weights)  # rebuilt in place, cell.yaml unchanged
    cell = run_sweep(s, out=tmp_path / "sweep", in_process=True)["cells"][0]
    assert cell["status"] == "failed" and "results of other weights" in cell["error"], cell
    assert "delete that folder" in cell["error"] and "seconds" not in cell  # refused without running
