"""The documentation site: generated CLI reference, strict build, and the examples it shows.

Everything the pages show is checked against the code: the command-line reference is regenerated
from the real ``--help`` (``docs/gen_cli.py``) before a strict ``mkdocs build``; every file the pages
include exists; the example configurations parse with the real command line; every Python block
compiles and the included example script runs; every ``bigain`` command and flag shown in a shell
block exists; the hyperparameter and backbone-option tables match the constructors' signatures.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HELP = DOCS / "reference" / "cli-help"
EXAMPLES = ROOT / "configs"
SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$', re.M)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if HELP not in p.parents)


def blocks(path: Path, lang: str) -> list[str]:
    """The fenced blocks of one language, with snippet-only blocks replaced by the included file."""
    out = []
    for found_lang, body in FENCE.findall(path.read_text()):
        if found_lang != lang:
            continue
        included = SNIPPET.fullmatch(body.strip())
        out.append((ROOT / included.group(1)).read_text() if included else body)
    return out


def capture(argv: list[str]) -> tuple[int, str]:
    from bigain.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
    return int(code or 0), buf.getvalue()


@pytest.fixture(scope="module")
def generated():
    """Regenerate the help files the reference pages include (as `make docs` users would)."""
    proc = subprocess.run([sys.executable, str(DOCS / "gen_cli.py")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {p.name: p.read_text() for p in HELP.iterdir()}


# -- the build -------------------------------------------------------------------------------------

def test_cli_reference_covers_every_command(generated):
    from bigain.cli import COMMANDS

    for name in COMMANDS:
        assert f"{name}.txt" in generated and generated[f"{name}.txt"].startswith(f"usage: bigain {name}")
        assert f"## bigain {name}\n" in generated["index.md"]
    assert "usage: bigain" in generated["bigain.txt"]


def test_site_builds_strictly(generated, tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]' to build the documentation")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "--8&lt;--" not in cli and "usage: bigain classify" in cli  # nested snippets were expanded
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in ("bigain.apply", "bigain.TokenCompressor", "bigain.testing.check_compressor",
                 "bigain.reporting.mcnemar_exact", "bigain.bench.run_bench"):
        assert f'id="{name}"' in api, name


# -- what the pages show ---------------------------------------------------------------------------

def test_every_included_file_exists_and_every_config_shown_exists(generated):
    shown = set()
    for path in [*pages(), HELP / "index.md", HELP / "configs.md"]:
        text = path.read_text()
        for target in SNIPPET.findall(text):
            assert (ROOT / target).is_file(), f"{path.relative_to(ROOT)} includes missing {target}"
        shown |= set(re.findall(r"(?<![\w/.-])((?:configs|docs/examples)/[\w.-]+\.ya?ml)", text))
    assert shown, "the pages show no configuration file"
    for rel in sorted(shown):
        assert (ROOT / rel).is_file(), f"the docs show {rel}, which does not exist"
        assert isinstance(yaml.safe_load((ROOT / rel).read_text()), dict), rel


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse_with_the_real_command_line(path):
    from bigain.registry import create_compressor

    task = path.name.split("-")[0]
    if task == "sweep":
        from bigain.sweep import expand_sweep, load_sweep

        cells = expand_sweep(load_sweep(path))  # validates every compressor setting
        assert cells and all(c.task in ("classify", "generate") for c in cells)
        return
    assert task in ("classify", "generate"), f"name example configs <task>-...yaml, not {path.name}"
    code, out = capture([task, "--config", str(path), "--print_config"])
    assert code == 0 and "model:" in out, out
    model = yaml.safe_load(path.read_text())["model"]
    create_compressor(model.get("compressor", "none"), **(model.get("compressor_options") or {}))


@pytest.mark.parametrize("path", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_compile(path):
    for i, code in enumerate(blocks(path, "python")):
        compile(code, f"{path.relative_to(ROOT)} (python block {i + 1})", "exec")


def _shell_commands(path: Path) -> list[list[str]]:
    commands = []
    for body in blocks(path, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            tokens = line.split()
            for i, tok in enumerate(tokens[:-1]):
                if tok.endswith("/bigain") or tok in ("bigain", "bigain.cli"):
                    commands.append(tokens[i + 1:])
                    break
    return commands


def test_shell_examples_use_commands_and_flags_that_exist(generated):
    from bigain.cli import COMMANDS

    data_help = "".join(text for name, text in generated.items() if name.startswith("data-"))
    seen = 0
    for path in pages():
        for tokens in _shell_commands(path):
            if not tokens or tokens[0].startswith("-"):
                continue
            name = tokens[0]
            assert name in COMMANDS, f"{path.relative_to(DOCS)}: `bigain {name}` is not a command"
            known = generated[f"{name}.txt"] + (data_help if name in ("classify", "generate") else "")
            for tok in tokens[1:]:
                if tok.startswith("--"):
                    flag = tok.split("=", 1)[0]
                    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", known), \
                        f"{path.relative_to(DOCS)}: `bigain {name}` has no option {flag}"
            seen += 1
    assert seen > 10


def _table(text: str, heading: str) -> dict[str, str]:
    """``{name: default}`` from the first table after ``heading``."""
    section = text.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*`([^`]*)`\s*\|", line)
        if m:
            rows[m.group(1)] = m.group(2)
        elif rows and not line.startswith("|"):
            break
    return rows


def _defaults(cls: type) -> dict[str, object]:
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is p.KEYWORD_ONLY}


@pytest.mark.parametrize("name", ["tome", "bigain_tm", "todo", "bigain_td", "sito"])
def test_method_pages_list_the_real_hyperparameters(name):
    from bigain import get_compressor

    table = _table((DOCS / "methods" / f"{name}.md").read_text(), "## Hyperparameters")
    expected = _defaults(get_compressor(name))
    assert list(table) == list(expected)
    for key, shown in table.items():
        assert ast.literal_eval(shown) == expected[key], (name, key, shown)


@pytest.mark.parametrize("name", ["stable-diffusion", "dit", "toy"])
def test_backbone_option_tables_match_the_backbones(name):
    from bigain.backbones import BACKBONES

    table = _table((DOCS / "reference" / "config.md").read_text(), f"#### `{name}`\n")
    expected = _defaults(BACKBONES.get(name))
    assert list(table) == list(expected)
    for key, shown in table.items():
        assert ast.literal_eval(shown) == expected[key], (name, key, shown)


def test_the_plugin_guide_lists_every_conformance_check_with_its_purpose():
    from bigain.conformance import CHECKS

    text = (DOCS / "guides" / "plugin.md").read_text()
    table = text.split("| check | what it verifies |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", table, re.M)
    assert rows == [(c.name, c.purpose) for c in CHECKS.values()]


# -- the included example code runs ----------------------------------------------------------------

def test_example_plugin_test_shown_in_the_guide_imports():
    """The guide shows the plugin's own test file; importing it resolves the plugin and the suite.
    Its tests (one per named check) run in tests/test_example_plugin.py, on the installed package."""
    src = ROOT / "examples" / "bigain-example-plugin" / "src"
    test_file = ROOT / "examples" / "bigain-example-plugin" / "tests" / "test_avgpool_kv.py"
    sys.path.insert(0, str(src))
    try:
        spec = importlib.util.spec_from_file_location("_docs_example_plugin_test", test_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        from bigain.testing import parametrize_with_checks

        assert module.parametrize_with_checks is parametrize_with_checks
        marks = module.test_conformance.pytestmark
        assert [m.args[0] for m in marks] == ["compressor, check"] and len(marks[0].args[1]) > 0
        assert module.AvgPoolKV.name == "avgpool_kv"
    finally:
        sys.path.remove(str(src))
        sys.modules.pop("bigain_example_plugin", None)


@pytest.mark.slow
def test_quickstart_script_runs_on_a_local_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from bigain.testing import save_tiny_stable_diffusion

    parts = Path(save_tiny_stable_diffusion(tmp_path / "parts"))
    StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(parts / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(parts / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(parts / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(parts / "unet"),
        scheduler=DDPMScheduler.from_pretrained(parts / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp_path / "pipe")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(DOCS / "examples" / "apply_pipeline.py"), str(tmp_path / "pipe")],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert stats["compressed_calls"] > 0 and stats["queries"] < stats["tokens_in"]
    assert (tmp_path / "corgi.png").is_file()
