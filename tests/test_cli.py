"""One command-line dialect: every command takes --config FILE / --config=FILE and --print_config,
underscore flags (hyphenated ones still work, with a note), both dtype spellings, and registered
datamodule names where class paths are taken."""

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def bigain(*argv: str) -> tuple[int, str, str]:
    """``bigain ARGV`` in this process: (exit status, stdout, stderr)."""
    from bigain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return int(code or 0), out.getvalue(), err.getvalue()


def printed_config(*argv: str) -> dict:
    code, out, err = bigain(*argv, "--print_config")
    assert code == 0, err
    return yaml.safe_load(out)


# every command but classify / generate (their LightningCLI parser is slower to build: tested below)
COMMANDS = {
    "sweep": ["sweep", "--config", str(ROOT / "configs" / "sweep-toy.yaml")],
    "report": ["report", "runs/a", "runs/b", "--baseline", "tome"],
    "bench": ["bench", "--model", "toy", "--methods", "none", "tome:ratio=0.5", "--compile", "none", "default"],
    "visualize": ["visualize", "--what", "spectrum", "--layers", "1,2"],
    "demo": ["demo", "--quick", "--tasks", "classify"],
    "plugins": ["plugins", "--json"],
    "toy train": ["toy", "train", "--steps", "10"],
    "toy evaluate": ["toy", "evaluate", "--images", "20"],
}


@pytest.mark.parametrize("name", COMMANDS)
def test_print_config_is_a_config_file_both_spellings_of_config_read(name, tmp_path):
    argv = COMMANDS[name]
    prefix = argv[:2] if name.startswith("toy") else argv[:1]
    first = printed_config(*argv)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(first))
    assert printed_config(*prefix, f"--config={path}") == first
    assert printed_config(*prefix, "--config", str(path)) == first
    assert printed_config(*prefix, "-c", str(path)) == first


def test_options_given_after_the_config_override_it_dotted_ones_too(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "a"), "compressors": ["none", "tome"],
                                    "classify": {"model": {"backbone": "toy"}}}))
    cfg = printed_config("sweep", f"--config={path}", "--out", str(tmp_path / "b"),
                         "--classify.trainer", "{accelerator: cpu}")
    assert cfg["out"] == str(tmp_path / "b") and cfg["compressors"] == ["none", "tome"]
    assert cfg["classify"] == {"model": {"backbone": "toy"}, "trainer": {"accelerator": "cpu"}, "data": None,
                               "seed_everything": None}
    code, out, err = bigain("sweep", f"--config={path}", "--dry_run", "--tasks", "[classify, generate]")
    assert code == 0, err
    assert sorted(line.split()[0] for line in out.splitlines()) == ["classify"] * 2 + ["generate"] * 2


def test_the_sweep_file_is_the_sweep_commands_config():
    from bigain.commands import sweep as command
    from bigain.commands._parser import parse
    from bigain.sweep import load_sweep

    for path in ROOT.glob("**/sweep-*.yaml"):
        if ".venv" in path.parts or "runs" in path.parts:
            continue
        cfg = parse(command.build_parser(), ["--config", str(path)])
        assert command.sweep_spec(cfg) == load_sweep(path), path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_print_with_both_spellings_of_config(path):
    task = path.name.split("-")[0]
    for flag in ([f"--config={path}"], ["--config", str(path)]):
        cfg = printed_config(task, *flag)
        if task == "sweep":
            assert cfg["compressors"] == yaml.safe_load(path.read_text())["compressors"]
            continue
        assert task in ("classify", "generate")
        assert cfg["model"]["compressor"] == yaml.safe_load(path.read_text())["model"]["compressor"]
        assert cfg["data"]["class_path"].startswith(("bigain.datamodules.", "datamodules.")), cfg["data"]


def test_a_tiny_classify_config_names_its_datamodule_by_registered_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {backbone: toy, compressor: tome, compressor_options: {ratio: 0.5}}\n"
                    "data: {class_path: toy, init_args: {length: 3}}\n")
    cfg = printed_config("classify", f"--config={path}", "--data.image_size", "16")
    assert cfg["data"]["class_path"] == "bigain.datamodules.toy.ToyDataModule"
    assert cfg["data"]["init_args"]["length"] == 3 and cfg["data"]["init_args"]["image_size"] == 16
    path.write_text("model: {backbone: toy}\ndata: toy\n")
    cfg = printed_config("generate", "--config", str(path))
    assert cfg["data"]["class_path"] == "bigain.datamodules.toy.ToyDataModule"


@pytest.mark.parametrize("argv", [["--data.help", "toy"], ["--data.help=toy"],
                                  ["--data.help", "bigain.datamodules.toy.ToyDataModule"]])
def test_data_help_takes_a_registered_name(argv):
    code, out, err = bigain("classify", *argv)
    assert code == 0, err
    assert "--data.length" in out and "--data.split" in out


@pytest.mark.parametrize("short, canonical", [("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"),
                                              ("float16", "float16"), ("BFloat16", "bfloat16")])
@pytest.mark.parametrize("command", [["bench"], ["visualize"], ["demo"], ["toy", "train"], ["toy", "evaluate"]])
def test_every_dtype_option_takes_both_spellings_and_keeps_one(command, short, canonical):
    assert printed_config(*command, "--dtype", short)["dtype"] == canonical


def test_a_bad_dtype_says_which_spellings_there_are():
    code, _, err = bigain("bench", "--dtype", "half", "--print_config")
    assert code == 2
    assert "float16 (fp16)" in err and "'half'" in err
    assert printed_config("demo", "--dtype", "auto")["dtype"] == "auto"
    assert bigain("visualize", "--dtype", "auto", "--print_config")[0] == 2  # auto only where a command picks


def test_backbone_dtype_of_classify_and_generate_in_either_spelling(tmp_path):
    cfg = printed_config("classify", "--model.backbone_options", "{dtype: bf16}", "--data", "toy")
    assert cfg["model"]["backbone_options"] == {"dtype": "bfloat16"}
    path = tmp_path / "gen.yaml"
    path.write_text("model: {backbone: toy, backbone_options: {dtype: fp16}}\ndata: toy\n")
    assert printed_config("generate", f"--config={path}")["model"]["backbone_options"] == {"dtype": "float16"}
    code, _, err = bigain("classify", "--model.backbone_options", "{dtype: int8}", "--data", "toy")
    assert code == 2 and "bfloat16 (bf16)" in err


def test_canonical_dtype():
    import torch

    from bigain.errors import ConfigError
    from bigain.precision import canonical_dtype

    assert [canonical_dtype(n) for n in ("fp32", "float32", "FP16", "torch.bfloat16", torch.float16)] == \
        ["float32", "float32", "float16", "bfloat16", "float16"]
    assert canonical_dtype("auto", allow_auto=True) == "auto"
    with pytest.raises(ConfigError, match="got 'auto'"):
        canonical_dtype("auto")


def test_hyphenated_flags_still_work_with_a_one_line_note(tmp_path):
    code, out, err = bigain("sweep", "--config", str(ROOT / "configs" / "sweep-toy.yaml"), "--dry-run",
                            "--out", str(tmp_path))
    assert code == 0
    assert len(out.splitlines()) == 2 * 8 and str(tmp_path) in out
    assert err.strip() == "bigain sweep: --dry-run is deprecated, use --dry_run"
    code, out, err = bigain("bench", "--model-path=some/ckpt", "--batch-size", "4", "--compare-tomesd",
                            "--print_config")
    cfg = yaml.safe_load(out)
    assert code == 0 and (cfg["model_path"], cfg["batch_size"], cfg["compare_tomesd"]) == ("some/ckpt", 4, True)
    assert err.count("is deprecated") == 3
    cfg = printed_config("toy", "train", "--classifier-steps", "0", "--no-eval")
    assert (cfg["classifier_steps"], cfg["no_eval"]) == (0, True)


def test_an_unknown_flag_is_still_an_error():
    code, _, err = bigain("sweep", "--dry-runs", "--print_config")
    assert code == 2 and "--dry-runs" in err


def test_classify_help_leads_with_evaluation_options_and_help_all_lists_every_trainer_option():
    code, short, _ = bigain("classify", "--help")
    assert code == 0
    assert len(short.splitlines()) < 220
    options = short.split("\noptions:", 1)[1]
    order = [options.index(flag) for flag in ("--run_dir", "--model.compressor", "--data.help", "--trainer.devices")]
    assert order == sorted(order)
    assert "--trainer.precision" in options and "--help_all" in options
    assert "--trainer.max_epochs" not in short and "--trainer.gradient_clip_val" not in short
    code, full, _ = bigain("generate", "--help_all")
    assert code == 0 and "--trainer.max_epochs" in full and "--model.steps" in full
    assert len(full.splitlines()) > len(short.splitlines()) + 150


def test_toy_train_writes_under_runs_by_default_never_into_the_package(tmp_path, monkeypatch):
    from bigain.toy.evaluate import ASSETS

    assert printed_config("toy", "train")["out"] == "runs/toy-train"
    before = sorted(p.name for p in ASSETS.iterdir())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "toy-train").mkdir(parents=True)
    shutil.copy(ASSETS / "classifier.safetensors", tmp_path / "runs" / "toy-train")
    code, _, err = bigain("toy", "train", "--steps", "1", "--unet_steps", "1", "--batch_size", "2",
                          "--classifier_steps", "0", "--no_eval")
    assert code == 0, err
    assert (tmp_path / "runs" / "toy-train" / "toy-dit" / "transformer" / "config.json").is_file()
    assert (tmp_path / "runs" / "toy-train" / "toy-unet" / "unet" / "config.json").is_file()
    assert sorted(p.name for p in ASSETS.iterdir()) == before


def test_the_model_cards_reproduce_command_is_in_todays_spelling():
    import json

    from bigain.commands import toy
    from bigain.commands._parser import parse, undeprecate
    from bigain.toy.evaluate import ASSETS

    recorded = json.loads((ASSETS / "metrics.json").read_text())["command"]  # what `toy evaluate` puts in the card
    lines = [" ".join(undeprecate(line.split(), toy.build_parser(), note=False)) for line in recorded.splitlines()]
    card = (ASSETS / "MODEL_CARD.md").read_text()
    assert "```bash\n" + "\n".join(lines) + "\n```" in card
    for line in lines:  # every step of the recipe parses as a `bigain toy train` command
        cfg = parse(toy.build_parser(), line.split()[2:])
        assert cfg.action == "train" and cfg.train.out == "runs/toy-train"
        assert cfg.train.train_dtype == "bfloat16"  # how the bundled models were trained; auto may pick float32


TASK_CONFIGS = [p for p in CONFIGS if p.name.startswith(("classify-", "generate-"))]


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: p.name)
def test_shipped_task_configs_name_real_backbone_task_and_data_options(path):
    """Every option a shipped config sets exists: the backbone's keyword options, the task's
    constructor (nothing is loaded), the datamodule's init_args."""
    import importlib
    import inspect

    from bigain.backbones import BACKBONES
    from bigain.datamodules.registry import datamodule_class_path
    from bigain.errors import ConfigError
    from bigain.tasks import DiffusionClassifier, DiffusionGenerator

    cfg = yaml.safe_load(path.read_text())
    model = cfg["model"]
    accepted = {p.name for p in inspect.signature(BACKBONES.get(model.get("backbone", "toy")).__init__).parameters
                .values() if p.kind is p.KEYWORD_ONLY}
    assert set(model.get("backbone_options") or {}) <= accepted, (path.name, accepted)
    try:
        (DiffusionClassifier if path.name.startswith("classify-") else DiffusionGenerator)(**model)
    except ConfigError as exc:  # a machine-specific local file (offline weights) is not here: the option is real
        assert "does not exist" in str(exc), exc
    data = cfg.get("data")
    if isinstance(data, dict) and "class_path" in data:
        module_name, cls = datamodule_class_path(data["class_path"]).rsplit(".", 1)
        getattr(importlib.import_module(module_name), cls)(**(data.get("init_args") or {}))
