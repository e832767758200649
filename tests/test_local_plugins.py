"""Local plugins: a compressor (or a datamodule) named by import path ``package.module:ClassName``,
used without packaging it, and recorded with its module file's sha256."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from bigain.errors import PluginLoadError, UnknownNameError
from bigain.registry import create_compressor, is_import_path, load_object, source_info

LOCAL = textwrap.dedent('''
    """A compressor and a datamodule that live in one loose file."""
    from bigain import Compressed, TokenCompressor
    from bigain.datamodules.toy import ToyDataModule


    class StridedKV(TokenCompressor):
        identity_params = {"stride": 1}

        def __init__(self, *, stride: int = 2) -> None:
            self.stride = stride

        def compress(self, x, ctx):
            if self.stride == 1:
                return Compressed.identity(x)
            return Compressed(x, x[:, :: self.stride])


    class FirstImages(ToyDataModule):
        name = "first_images"


    class NotACompressor:
        pass
''')


@pytest.fixture
def local_module(tmp_path, monkeypatch):
    (tmp_path / "my_local_plugins.py").write_text(LOCAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "my_local_plugins.py"
    sys.modules.pop("my_local_plugins", None)


def test_a_local_compressor_is_used_by_import_path(local_module):
    import bigain
    from bigain.testing import check_compressor, tiny_dit

    comp = create_compressor("my_local_plugins:StridedKV", stride=4)
    assert type(comp).__name__ == "StridedKV" and comp.stride == 4
    assert "remove_restores" in check_compressor("my_local_plugins:StridedKV")
    model = tiny_dit()
    with bigain.apply(model, "my_local_plugins:StridedKV", stride=4, blocks="all") as handle:
        import torch

        model(torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]), class_labels=torch.tensor([1]))
    assert handle.stats()[0]["keys_values"] == 4.0  # 16 tokens, every 4th
    info = bigain.registry.COMPRESSORS.describe("my_local_plugins:StridedKV")
    assert info["file"] == str(local_module)
    assert info["sha256"] == hashlib.sha256(local_module.read_bytes()).hexdigest()


def test_load_object_resolves_import_paths_and_registered_names(local_module):
    from bigain.plugins.tome import ToMe

    assert load_object("tome", group="bigain.compressors") is ToMe
    assert load_object("bigain.plugins.tome:ToMe", group="bigain.compressors") is ToMe
    assert load_object("my_local_plugins:StridedKV", group="bigain.adapters").__name__ == "StridedKV"
    assert is_import_path("a.b:C") and not is_import_path("tome")
    assert source_info(ToMe)["import_path"] == "bigain.plugins.tome:ToMe"


@pytest.mark.parametrize("spec,match", [
    ("my_local_plugins:StridedKv", r"has no attribute 'StridedKv'.*Did you mean 'StridedKV'"),
    ("no_such_module_here:X", r"cannot import module 'no_such_module_here'.*PYTHONPATH"),
    ("my_local_plugins:", r"not a valid import path.*package.module:ClassName"),
    ("my local:X", r"not a valid import path"),
])
def test_bad_import_paths_say_what_to_do(local_module, spec, match):
    with pytest.raises(PluginLoadError, match=match):
        load_object(spec, group="bigain.compressors")


def test_an_import_path_to_the_wrong_kind_of_class_is_refused(local_module):
    with pytest.raises(PluginLoadError, match=r"not a subclass of bigain.compressor.TokenCompressor"):
        create_compressor("my_local_plugins:NotACompressor")
    from bigain.datamodules.registry import datamodule_class_path

    assert datamodule_class_path("my_local_plugins:FirstImages") == "my_local_plugins.FirstImages"
    with pytest.raises(PluginLoadError, match="not a subclass of bigain.datamodules.base.BigainDataModule"):
        datamodule_class_path("my_local_plugins:StridedKV")
    with pytest.raises(UnknownNameError, match="no registry serves the group"):
        load_object("unet", group="bigain.nothing")


def test_bigain_classify_runs_a_local_compressor_and_datamodule_named_by_import_path(local_module, tmp_path):
    config = tmp_path / "classify.yaml"
    config.write_text(textwrap.dedent(f"""
        model:
          backbone: toy
          compressor: my_local_plugins:StridedKV
          compressor_options: {{stride: 2}}
          blocks: all
          n_samples: [2, 3]
          to_keep: [2, 1]
        data:
          class_path: my_local_plugins:FirstImages
          init_args: {{length: 3, batch_size: 3}}
        trainer:
          accelerator: cpu
          enable_progress_bar: false
        run_dir: {tmp_path / "run"}
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "bigain.cli", "classify", "--config", str(config)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    digest = hashlib.sha256(local_module.read_bytes()).hexdigest()
    assert meta["result_config"]["model"]["compressor"] == "my_local_plugins:StridedKV"
    assert meta["plugin"]["target"] == "my_local_plugins:StridedKV"
    assert (meta["plugin"]["file"], meta["plugin"]["sha256"]) == (str(local_module), digest)
    assert meta["datamodule_plugin"]["target"] == "my_local_plugins:FirstImages"
    assert meta["datamodule_plugin"]["sha256"] == digest
    assert meta["summary"]["images"] == 3
    kept = meta["compression"]["tokens_kept"]
    assert kept and all(v["keys_values"] == pytest.approx(0.5) for v in kept.values())
