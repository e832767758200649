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


@pytest.fixture(scope="module")
def site(generated, tmp_path_factory) -> Path:
    """The site, built strictly once (``mkdocs build --strict``, as ``make docs`` and CI build it)."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]' to build the documentation")
    out = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


#: Every public module and the API page it is documented on (docs/reference/api/<page>.md).
API_PAGES = {
    "bigain": "bigain", "bigain.patching": "patching", "bigain.compressor": "compressor",
    "bigain.adapters": "adapters", "bigain.registry": "registry", "bigain.keyed_random": "keyed_random",
    "bigain.errors": "errors", "bigain.testing": "testing", "bigain.conformance": "conformance",
    "bigain.checks": "conformance", "bigain.tasks": "tasks", "bigain.tasks.adaptive": "tasks",
    "bigain.tasks.classification": "tasks", "bigain.tasks.generation": "tasks", "bigain.backbones": "backbones",
    "bigain.backbones.sd3": "backbones", "bigain.backbones.flux": "backbones", "bigain.backbones.sdxl": "backbones",
    "bigain.backbones.toy_unet": "backbones", "bigain.analysis.study": "analysis",
    "bigain.datamodules": "datamodules", "bigain.datamodules.base": "datamodules", "bigain.metric": "metric",
    "bigain.metrics": "metrics", "bigain.runs": "runs", "bigain.sweep": "sweep", "bigain.reporting": "reporting",
    "bigain.plots": "plots", "bigain.bench": "bench", "bigain.analysis": "analysis",
}
#: reStructuredText that must not reach a page's prose: roles, and "::" literal-block markers.
RAW_MARKUP = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj|const):(?:<code>|`)|\w::</p>|Public API::")
CODE_LISTING = re.compile(r"<pre\b.*?</pre>", re.S)


def _html(site: Path) -> dict[str, str]:
    return {str(p.relative_to(site)): p.read_text() for p in sorted(site.rglob("*.html"))}


def _api(site: Path, page: str) -> str:
    return (site / "reference" / "api" / page / "index.html").read_text()


def test_site_builds_strictly(site):
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "--8&lt;--" not in cli and "usage: bigain classify" in cli  # nested snippets were expanded


def test_api_reference_has_a_page_per_public_module(site):
    for module, page in API_PAGES.items():
        assert f'id="{module}"' in _api(site, page), f"{module} is not documented on reference/api/{page}.md"
    for page, name in [("patching", "bigain.patching.apply"), ("compressor", "bigain.compressor.TokenCompressor"),
                       ("testing", "bigain.testing.check_compressor"), ("reporting", "bigain.reporting.mcnemar_exact"),
                       ("bench", "bigain.bench.run_bench"), ("conformance", "bigain.conformance.Subject.fail"),
                       ("datamodules", "bigain.datamodules.base.BigainDataModule")]:
        html = _api(site, page)
        assert f'id="{name}"' in html, name
        assert "Source code in" in html, f"reference/api/{page}: no source code shown"
    index = (site / "reference" / "api" / "index.html").read_text()
    for page in set(API_PAGES.values()):
        assert f'href="{page}/"' in index, f"the API index does not link reference/api/{page}.md"


def test_api_reference_shows_the_public_surface_once():
    import bigain

    text = (DOCS / "reference" / "api" / "bigain.md").read_text()
    listed = re.findall(r"^\| \[`(\w+)`\]\[bigain\.(\w+)\]", text, re.M)
    assert all(a == b for a, b in listed), listed
    shown, exported = {a for a, _ in listed}, set(bigain.__all__) - {"__version__"}
    assert shown == exported, (f"docs/reference/api/bigain.md lists {sorted(shown - exported)} that bigain does not "
                               f"export and misses {sorted(exported - shown)}: keep its table in step with __all__")


def test_api_pages_show_no_private_names_or_duplicates(site):
    seen: dict[str, str] = {}
    for page in set(API_PAGES.values()):
        for ident in re.findall(r'id="(bigain[\w.]*)"', _api(site, page)):
            assert not re.search(r"\._[a-z]", ident), f"reference/api/{page} documents the private {ident}"
            assert seen.setdefault(ident, page) == page, f"{ident} is documented on {seen[ident]} and {page}"
    # a re-export is documented at its home only
    assert 'id="bigain.patching.default_dit_blocks"' not in _api(site, "patching")
    assert 'id="bigain.adapters.dit.default_dit_blocks"' in _api(site, "adapters")


def test_no_page_shows_raw_restructuredtext(site):
    """Docstring roles (``:meth:`x```) and ``::`` literal blocks are rendered (docs/hooks.py), not shown."""
    for name, html in _html(site).items():
        prose = CODE_LISTING.sub("", html)
        found = [prose[max(0, m.start() - 80):m.end() + 80] for m in RAW_MARKUP.finditer(prose)]
        assert not found, f"{name} shows raw reStructuredText: {found[:3]}"


def test_docstring_cross_references_are_links(site):
    links = {
        "conformance": ["#bigain.conformance.Subject.fail", "#bigain.conformance.check",
                        "../testing/#bigain.testing.check_compressor"],
        "bigain": ["../patching/#bigain.patching.apply", "../compressor/#bigain.compressor.TokenCompressor"],
        "patching": ["../adapters/#bigain.adapters.base.DenoiserAdapter"],
    }
    for page, hrefs in links.items():
        html = _api(site, page)
        for href in hrefs:
            assert f'href="{href}"' in html, f"reference/api/{page} does not link {href}"
    # the module docstring's "Public API::" block is a highlighted code block
    assert '<span class="n">bigain</span><span class="o">.</span><span class="n">list_compressors</span>' in \
        _api(site, "bigain")


def test_method_pages_render_their_maths(site):
    assert (site / "javascripts" / "mathjax" / "tex-svg.js").stat().st_size > 1_000_000  # bundled: works offline
    for name in ("tome", "bigain_tm", "todo", "bigain_td", "sito"):
        html = (site / "methods" / name / "index.html").read_text()
        assert html.count('class="arithmatex"') >= 5, name
        assert 'src="../../javascripts/mathjax/tex-svg.js"' in html, name
        codes = re.findall(r"<code>([^<]*)</code>", CODE_LISTING.sub("", html))
        maths = [c for c in codes if re.search(r"sum_|argmax|max_j|sqrt\(|int\(N|1 - 1/|\bh x w\b|alpha \*", c)]
        assert not maths, f"methods/{name}: maths left as code: {maths}"


def test_pages_cite_no_file_outside_the_repository(site):
    for name, html in _html(site).items():
        for outside in ("ALGORITHMS.md", "../shared", "shared/notes"):
            assert outside not in html, f"{name} refers to {outside}, which is not in the repository"


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


def _builtin_backbones() -> list[str]:
    from bigain.backbones import BACKBONES

    return [n for n in BACKBONES.names() if BACKBONES.describe(n).get("distribution") in (None, "bigain")]


@pytest.mark.parametrize("name", _builtin_backbones())
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
