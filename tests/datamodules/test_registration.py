"""The datamodules are registered, importable by name, and have CLI-friendly signatures."""

from __future__ import annotations

import inspect
import json
from importlib.metadata import entry_points

import pytest

from bigain.datamodules import (
    BigainDataModule,
    COCODataModule,
    ImageNet100DataModule,
    ImageNetDataModule,
    PetsDataModule,
)

ALL = {"imagenet": ImageNetDataModule, "imagenet100": ImageNet100DataModule, "pets": PetsDataModule,
       "coco": COCODataModule}
BASE_OPTIONS = ["image_size", "batch_size", "num_workers", "pin_memory", "subset", "subset_seed", "prompts_csv",
                "on_bad_image"]


def test_entry_points():
    found = {ep.name: ep for ep in entry_points(group="bigain.datamodules")}
    for name, cls in ALL.items():
        assert name in found, f"{name} is not registered; run pip install -e ."
        assert found[name].load() is cls and cls.name == name and issubclass(cls, BigainDataModule)


@pytest.mark.parametrize("cls", list(ALL.values()), ids=list(ALL))
def test_options_are_keyword_only_typed_defaulted_and_documented(cls):
    params = inspect.signature(cls.__init__).parameters
    options = [p for p in params.values() if p.name != "self"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in options)
    assert all(p.default is not inspect.Parameter.empty and p.annotation is not inspect.Parameter.empty
               for p in options)
    names = [p.name for p in options]
    assert set(BASE_OPTIONS) <= set(names) and {"root", "split"} <= set(names)
    doc = inspect.getdoc(cls)
    for name in names:
        assert f"\n    {name}:" in doc or f"\n        {name}:" in doc or f"{name}: " in doc, f"{name} undocumented"


@pytest.mark.parametrize("cls", list(ALL.values()), ids=list(ALL))
def test_cli_parses_options(cls):
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(["--data.root", "/data/x", "--data.subset", "2", "--data.on_bad_image", "skip"])
    assert cfg.data.root == "/data/x" and cfg.data.on_bad_image == "skip" and int(cfg.data.subset) == 2
    dm = cls(**cfg.data.as_dict())
    assert dm.root == "/data/x"


def test_describe_is_json(tmp_path, fakes):
    fakes.make_coco(tmp_path)
    json.dumps(COCODataModule(root=str(tmp_path)).describe())
