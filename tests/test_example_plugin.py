"""The third-party example plugin, installed for real, is discovered and usable by name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bigain-example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True, text=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    return env


def run(env, *args):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=True).stdout


def test_discovered_by_bigain_plugins(installed):
    out = run(installed, "-m", "bigain.cli", "plugins")
    rows = [line.split() for line in out.splitlines()]
    assert ["avgpool_kv", "bigain_example_plugin:AvgPoolKV", "bigain-example-plugin", "0.1.0", "ok"] in rows
    assert {r[0] for r in rows[1:]} >= {"none", "tome", "bigain_tm", "todo", "bigain_td", "sito", "avgpool_kv"}


def test_usable_by_name_and_conformant(installed):
    code = (
        "import bigain, torch; from bigain.testing import check_compressor, tiny_unet;"
        "print(check_compressor('avgpool_kv'));"
        "u = tiny_unet(); h = bigain.apply(u, 'avgpool_kv', factor=2);"
        "u(torch.randn(1, 4, 16, 16), 3, torch.zeros(1, 5, 32)); print(h.stats()[0]['keys_values'])"
    )
    out = run(installed, "-c", code).splitlines()
    assert "remove_restores" in out[0] and "compresses" in out[0]
    assert float(out[1]) == 64.0


def test_its_own_tests_run_one_test_per_check(installed):
    """The plugin's test file (shown in the plugin guide) runs every named check on two settings."""
    from bigain.conformance import CHECKS

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                          str(EXAMPLE), str(EXAMPLE / "tests" / "test_avgpool_kv.py")],
                         env=installed, capture_output=True, text=True, cwd=EXAMPLE)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert f"{2 * len(CHECKS)} passed" in out.stdout


def test_disable_autoload_hides_it(installed):
    env = dict(installed, BIGAIN_DISABLE_PLUGIN_AUTOLOAD="1")
    out = run(env, "-c", "import bigain; print(bigain.list_compressors())")
    assert "avgpool_kv" not in out and "tome" in out
