"""Packaging: the light install (PyTorch + diffusers) is enough for ``bigain.apply``.

The evaluation stack is the ``eval`` extra. These tests run in fresh interpreters where the stack's
modules are blocked (``sys.modules[name] = None`` makes importing them fail as if they were not
installed), so a module-level import of any of them on the ``bigain.apply`` path fails here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Top-level modules of the ``eval`` extra that the light install must not need.
EVAL_MODULES = ("lightning", "pytorch_lightning", "jsonargparse", "pandas", "pyarrow", "matplotlib", "timm",
                "torchmetrics", "torch_fidelity")

BLOCK = f"import sys\nfor _m in {EVAL_MODULES!r}:\n    sys.modules[_m] = None\n"


def _run(code: str, *, block: bool) -> subprocess.CompletedProcess:
    script = (BLOCK if block else "") + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)


APPLY = """
    import sys
    import torch
    import bigain
    from bigain.testing import tiny_dit, tiny_unet

    unet, dit = tiny_unet(), tiny_dit()
    with torch.no_grad():
        with bigain.apply(unet, "none") as handle:
            unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 4, 32))
        assert handle.stats() and handle.stats()[0]["calls"] > 0, handle.stats()
        for name in bigain.list_compressors():
            with bigain.apply(dit, name):
                dit(torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]), class_labels=torch.tensor([1]))
    print(sorted(m for m in {modules!r} if m in sys.modules))
"""


def test_import_and_apply_do_not_import_the_evaluation_stack():
    proc = _run(APPLY.format(modules=EVAL_MODULES), block=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"imported by bigain.apply: {proc.stdout}"


def test_apply_works_without_the_evaluation_stack_installed():
    proc = _run(APPLY.format(modules=EVAL_MODULES), block=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tasks_package_is_lazy():
    proc = _run("""
        import bigain.tasks
        import bigain.tasks.adaptive
        print(sorted(bigain.tasks.__all__))
        try:
            bigain.tasks.DiffusionClassifier
        except ModuleNotFoundError as exc:
            print("needs", exc.name.split(".")[0])
    """, block=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["['DiffusionClassifier',", "'DiffusionGenerator',", "'DiffusionTask']",
                                   "needs", "lightning"]


def test_an_evaluation_command_without_the_stack_says_which_extra_to_install():
    proc = _run("""
        from bigain.cli import main
        sys.exit(main(["classify", "--help"]))
    """, block=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "pip install 'bigain[eval]'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_the_extras_split_light_and_evaluation_dependencies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("[")[0].split("<")[0].split("=")[0].strip() for dep in project["dependencies"]}
    assert names == {"torch", "diffusers"}, project["dependencies"]
    extras = project["optional-dependencies"]
    evaluation = " ".join(extras["eval"])
    for needed in ("lightning", "jsonargparse", "pandas", "matplotlib", "torchmetrics", "transformers", "timm"):
        assert needed in evaluation, needed
    # `make test` / `make demo` install ".[test,docs]": the test extra must pull the evaluation stack
    assert "bigain[eval]" in extras["test"]
    assert '".[test,docs]"' in (ROOT / "Makefile").read_text()
