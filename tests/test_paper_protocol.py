"""The paper protocol (configs/paper/): the released scripts' settings beside the definitions.

ToMe's released randomness against the ``tomesd`` package, the paper configurations against the
definitions (every difference on an allow-list the docs explain), and the paper classification
config run end to end on a tiny saved pipeline with each method's released settings.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import bigain
from bigain import ConfigError, LayerContext

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
GUIDE = ROOT / "docs" / "guides" / "paper-protocol.md"


# -- ToMe's randomness as released -----------------------------------------------------------------

def _tomesd_calls(calls, ratio, seed):
    """The released sequence: one generator seeded once, advanced by every call that draws; odd
    batches use top-left destinations (``tomesd/patch.py:compute_merge``)."""
    from tomesd.merge import bipartite_soft_matching_random2d

    gen = torch.Generator().manual_seed(seed)
    out = []
    for x, (h, w) in calls:
        m, u = bipartite_soft_matching_random2d(x, w, h, 2, 2, int(h * w * ratio),
                                                no_rand=x.shape[0] % 2 == 1, generator=gen)
        out.append(u(m(x) * 2.0 + 1.0))
    return out


def _calls(seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = [(2, (8, 8)), (3, (8, 8)), (4, (6, 10)), (2, (8, 8)), (1, (7, 5)), (2, (7, 5))]
    return [(torch.randn(b, h * w, 16, generator=g), (h, w)) for b, (h, w) in spec]


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_tomesd_randomness_is_the_released_generator_sequence(ratio):
    pytest.importorskip("tomesd")
    calls = _calls()
    ref = _tomesd_calls(calls, ratio, seed=3)
    comp = bigain.create_compressor("tome", ratio=ratio, randomness="tomesd")
    for (x, grid), expected in zip(calls, ref):
        out = comp.compress(x, LayerContext.for_tokens(x, grid=grid, timesteps=500.0, seed=3))
        assert (out.restore(out.queries * 2.0 + 1.0) - expected).abs().max() <= 1e-5


def test_tomesd_randomness_advances_per_call_and_is_never_the_default():
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1))
    ctx = LayerContext.for_tokens(x, grid=(8, 8), timesteps=500.0)
    released = bigain.create_compressor("tome", ratio=0.5, randomness="tomesd")
    first, second = (released.choose_destinations(x, ctx, (4, 4)) for _ in range(2))
    assert not torch.equal(first, second)  # the generator advanced: same call, another pattern
    assert torch.equal(first[0], first[1])  # one pattern per call, shared by the batch
    odd = released.choose_destinations(x[:1], LayerContext.for_tokens(x[:1], grid=(8, 8)), (4, 4))
    assert not odd.any()  # an odd batch: top-left destinations
    keyed = bigain.create_compressor("tome", ratio=0.5)
    assert keyed.randomness == "keyed"
    assert torch.equal(keyed.choose_destinations(x, ctx, (4, 4)), keyed.choose_destinations(x, ctx, (4, 4)))
    with pytest.raises(ConfigError, match="'keyed'.*'tomesd'"):
        bigain.create_compressor("tome", randomness="global")


def test_tomesd_randomness_equals_the_tomesd_patch_on_a_tiny_unet(unet):
    tomesd = pytest.importorskip("tomesd")
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(b, 4, 16, 12, generator=g), torch.full((b,), t), torch.randn(b, 5, 32, generator=g))
              for b, t in ((2, 900), (3, 500), (2, 500), (4, 100))]
    tomesd.apply_patch(unet, ratio=0.5, use_rand=True, max_downsample=2)
    unet._tome_info["args"]["generator"] = torch.Generator().manual_seed(5)
    try:
        with torch.no_grad():
            ref = [unet(x, t, enc).sample for x, t, enc in inputs]
    finally:
        tomesd.remove_patch(unet)
    with bigain.apply(unet, "tome", ratio=0.5, randomness="tomesd", max_downsample=2, seed=5), torch.no_grad():
        mine = [unet(x, t, enc).sample for x, t, enc in inputs]
    with bigain.apply(unet, "tome", ratio=0.5, max_downsample=2, seed=5), torch.no_grad():
        keyed = [unet(x, t, enc).sample for x, t, enc in inputs]
    for a, b in zip(mine, ref):
        assert (a - b).abs().max() <= 1e-5
    assert max((a - b).abs().max() for a, b in zip(keyed, ref)) > 1e-3  # the keyed default differs


# -- the paper configurations against the definitions --------------------------------------------------

#: paper config -> (its definitions counterpart in configs/, {dotted key: why it differs}). Every key
#: here is explained in docs/guides/paper-protocol.md; a difference missing here fails the test.
DIFFERENCES = {
    "classify-sd2-pets.yaml": ("classify-sd2-pets.yaml", {
        "model.compressor_options.legacy_grouping": "the released 1x4-strip destination grouping",
        "run_dir": "the paper runs go under runs/paper/",
    }),
    "generate-sd2-pets.yaml": ("generate-sd2-pets.yaml", {
        "model.compressor_options.legacy_grouping": "the released 1x4-strip destination grouping",
        "model.metrics": "the paper reports FID only",
        "model.feature_extractor": "pytorch-fid's Inception weights",
        "model.fid_reference": "the whole images/ folder, uncropped",
        "model.image_format": "JPEG quality 100, truncated values, as the scripts saved",
        "model.clip_model": "no CLIP score in the paper",
        "data.init_args.batch_size": "the scripts' 16 prompts a batch",
    }),
    "classify-dit-xl2-imagenet100.yaml": ("classify-dit-xl2-imagenet100.yaml", {
        "run_dir": "the paper runs go under runs/paper/",
    }),
    "generate-dit-xl2-imagenet.yaml": ("generate-dit-xl2-imagenet.yaml", {
        "model.backbone_options.path": "DiT-XL/2 at 512 px, as the scripts",
        "data.init_args.image_size": "512 px, as the scripts",
        "model.compressor_options.legacy_grouping": "the released 1x4-strip destination grouping",
        "model.metrics": "the paper reports FID only",
        "model.feature_extractor": "pytorch-fid's Inception weights",
        "model.fid_reference": "every val image in one flat folder",
        "model.image_format": "JPEG quality 100, truncated values, as the scripts saved",
        "model.fidelity_classifier": "no class fidelity in the paper",
    }),
}

#: the released settings of each method (configs/paper/methods/), and the definition's defaults they replace
RELEASED = {
    "tome": {"ratio": 0.7, "randomness": "tomesd"},
    "bigain_tm": {"ratio": 0.7, "legacy_grouping": True},
    "todo": {"factor": 2},
    "bigain_td": {"factor": 2, "alpha": 0.5},
    "sito": {"ratio": 0.7, "noise_alpha": 0.1, "sim_beta": 1.0},
}


def _flat(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _load(path):
    return _flat(yaml.safe_load(path.read_text()))


def test_every_paper_config_has_its_differences_listed():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(DIFFERENCES)
    sections = _guide_sections()
    for name, (definition, allowed) in DIFFERENCES.items():
        paper, plain = _load(PAPER / name), _load(ROOT / "configs" / definition)
        differ = {k for k in paper.keys() | plain.keys() if paper.get(k, "<absent>") != plain.get(k, "<absent>")}
        assert differ == set(allowed), (name, sorted(differ ^ set(allowed)))
        assert f"`configs/{definition}`" in sections[name].splitlines()[0]
        for key in allowed:
            assert f"| `{key}` |" in sections[name], f"{GUIDE.name} does not explain {key} of {name}"


def _guide_sections():
    """The guide's per-config difference tables: ``{paper config name: its paragraph and table}``."""
    text = GUIDE.read_text().split("## Every difference between the two config sets", 1)[1].split("\n## ", 1)[0]
    out = {}
    for part in text.split("\n`configs/paper/")[1:]:
        out[part.split("`", 1)[0]] = "`configs/paper/" + part
    return out


def test_the_method_snippets_hold_the_released_settings():
    assert sorted(p.stem for p in (PAPER / "methods").glob("*.yaml")) == sorted(RELEASED)
    for name, options in RELEASED.items():
        model = yaml.safe_load((PAPER / "methods" / f"{name}.yaml").read_text())["model"]
        assert model["compressor"] == name and model["compressor_options"] == options
        bigain.create_compressor(name, **options)  # valid options
        assert f"configs/paper/methods/{name}.yaml" in GUIDE.read_text()


def _cli(argv):
    from bigain.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from bigain.testing import save_tiny_stable_diffusion

    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "sd")


def _classify(config, tiny_sd, run_dir, *extra):
    """``config`` run on the tiny pipeline: only the model path, precision (fp16 is a GPU setting), data
    and the stages' length are overridden."""
    argv = ["classify", "--config", str(config), *extra,
            "--model.backbone_options", f"{{path: {tiny_sd}, dtype: float32}}",
            "--model.n_samples", "[2]", "--model.to_keep", "[1]",
            "--data", "toy", "--data.length", "1", "--data.image_size", "32",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--run_dir", str(run_dir)]
    assert _cli(argv) == 0
    import json

    meta = json.loads((run_dir / "run.json").read_text())
    records = pd.read_parquet(run_dir / "records.parquet").sort_values("index")
    return meta["result_config"]["model"], records


def test_the_paper_classify_config_runs_with_the_released_settings(tiny_sd, tmp_path):
    paper, paper_records = _classify(PAPER / "classify-sd2-pets.yaml", tiny_sd, tmp_path / "paper")
    assert paper["compressor"] == "bigain_tm" and paper["compressor_options"]["legacy_grouping"] is True
    assert paper["backbone"] == "stable-diffusion" and paper["loss"] == "l2" and paper["max_downsample"] == 1
    plain, plain_records = _classify(ROOT / "configs" / "classify-sd2-pets.yaml", tiny_sd, tmp_path / "plain")
    assert plain["compressor_options"]["legacy_grouping"] is False
    assert paper_records["mean_errors"].tolist() != plain_records["mean_errors"].tolist()  # the grouping acted
    model, records = _classify(PAPER / "classify-sd2-pets.yaml", tiny_sd, tmp_path / "td",
                               "--config", str(PAPER / "methods" / "bigain_td.yaml"))
    assert model["compressor"] == "bigain_td" and model["compressor_options"]["alpha"] == 0.5 and len(records) == 1
