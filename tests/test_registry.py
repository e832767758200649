"""Plugin discovery, built from entry-point objects directly: nothing needs installing."""

import subprocess
import sys
import types

import pytest

import bigain
from bigain.compressor import Compressed, TokenCompressor
from bigain.errors import PluginConflictError, PluginLoadError, UnknownNameError
from bigain.registry import DISABLE_AUTOLOAD_ENV, PluginRegistry


class Dummy(TokenCompressor):
    def __init__(self, *, k: int = 1) -> None:
        self.k = k

    def compress(self, x, ctx):
        return Compressed.identity(x)


class FakeEntryPoint:
    def __init__(self, name, value, dist, version="1.0", obj=None, error=None):
        self.name, self.value = name, value
        self.dist = types.SimpleNamespace(metadata={"Name": dist}, version=version)
        self._obj, self._error = obj, error
        self.loads = 0

    def load(self):
        self.loads += 1
        if self._error:
            raise self._error
        return self._obj


def registry(*eps):
    return PluginRegistry("bigain.compressors", kind="compressor", base=TokenCompressor, entry_points=eps)


def test_listing_does_not_import_and_loading_is_lazy():
    ep = FakeEntryPoint("dummy", "pkg:Dummy", "pkg", obj=Dummy)
    reg = registry(ep)
    assert reg.names() == ["dummy"]
    assert ep.loads == 0
    assert reg.get("dummy") is Dummy and reg.get("dummy") is Dummy
    assert ep.loads == 1


def test_a_broken_plugin_is_reported_and_does_not_break_the_others():
    good = FakeEntryPoint("good", "pkg:Dummy", "good-dist", obj=Dummy)
    bad = FakeEntryPoint("bad", "broken.mod:X", "broken-dist", "2.3", error=ImportError("No module named 'torch_x'"))
    reg = registry(good, bad)
    rows = {r.name: r for r in reg.report()}
    assert rows["good"].status == "ok"
    assert rows["bad"].status.startswith("failed:")
    assert "broken-dist" in rows["bad"].status and "torch_x" in rows["bad"].status
    with pytest.raises(PluginLoadError, match="broken-dist 2.3"):
        reg.get("bad")
    assert reg.get("good") is Dummy


def test_not_a_compressor_is_a_load_error():
    reg = registry(FakeEntryPoint("odd", "pkg:func", "odd-dist", obj=len))
    with pytest.raises(PluginLoadError, match="not a subclass"):
        reg.get("odd")


def test_unknown_name_suggests_and_lists():
    reg = registry(FakeEntryPoint("bigain_tm", "a:B", "bigain", obj=Dummy),
                   FakeEntryPoint("tome", "a:T", "bigain", obj=Dummy))
    with pytest.raises(UnknownNameError) as err:
        reg.get("bigain_mt")
    msg = str(err.value)
    assert "Did you mean 'bigain_tm'" in msg and "Available: bigain_tm, tome" in msg


def test_name_clash_names_both_distributions():
    reg = registry(FakeEntryPoint("fast", "a:A", "dist-a", obj=Dummy),
                   FakeEntryPoint("fast", "b:B", "dist-b", obj=Dummy))
    with pytest.raises(PluginConflictError, match="dist-a.*dist-b"):
        reg.get("fast")
    assert {r.distribution for r in reg.report()} == {"dist-a", "dist-b"}
    reg.register("fast", Dummy, override=True)
    assert reg.get("fast") is Dummy


def test_disable_autoload_keeps_only_bigain(monkeypatch):
    eps = (FakeEntryPoint("tome", "a:T", "bigain", obj=Dummy), FakeEntryPoint("third", "c:C", "other", obj=Dummy))
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert registry(*eps).names() == ["tome"]
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")
    assert registry(*eps).names() == ["third", "tome"]


def test_register_in_process_and_clash_with_discovered():
    reg = registry(FakeEntryPoint("tome", "a:T", "bigain", obj=Dummy))
    reg.register("mine")(Dummy)
    assert "mine" in reg.names()
    with pytest.raises(PluginConflictError, match="already provided by bigain"):
        reg.register("tome", Dummy)


def test_public_registry_has_the_six_builtins_from_entry_points():
    assert set(bigain.list_compressors()) >= {"none", "tome", "bigain_tm", "todo", "bigain_td", "sito"}
    rows = {r.name: r for r in bigain.plugin_report()}
    for name in ("none", "tome", "bigain_tm", "todo", "bigain_td", "sito"):
        assert rows[name].distribution == "bigain" and rows[name].ok


def test_create_compressor_validates_options():
    with pytest.raises(bigain.ConfigError, match="no option.*ratoi.*options are: ratio"):
        bigain.create_compressor("tome", ratoi=0.5)
    comp = bigain.create_compressor("tome", ratio=0.7)
    assert bigain.create_compressor(comp) is comp
    assert repr(comp) == "ToMe(ratio=0.7, sx=2, sy=2, dst='random', randomness='keyed', similarity='blocked')"


def test_register_compressor_public(monkeypatch):
    bigain.register_compressor("dummy_public", Dummy)
    try:
        assert bigain.create_compressor("dummy_public", k=3).k == 3
    finally:
        bigain.registry.COMPRESSORS.unregister("dummy_public")


def test_cli_plugins_lists_all_six():
    out = subprocess.run([sys.executable, "-m", "bigain.cli", "plugins"], capture_output=True, text=True, check=True)
    for name in ("none", "tome", "bigain_tm", "todo", "bigain_td", "sito"):
        assert any(line.split()[0] == name and line.rstrip().endswith("ok") for line in out.stdout.splitlines())
    assert "distribution" in out.stdout.splitlines()[0]
