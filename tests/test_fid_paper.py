"""FID as the paper computed it: pytorch-fid's Inception network from a local weights file, the
reference = every image of a folder, whole, and images saved as the released scripts saved them.

pytorch-fid's weights cannot be downloaded here, so the loading path is tested with a stand-in: a
state dict of the same architecture with random weights. That checks the architecture's key set and
shapes (those of torchvision's ``Inception3`` with 1008 classes and no auxiliary head, which is what
pytorch-fid's file holds), the FID-specific pooling branches, the preprocessing and the error paths;
it cannot check that the numbers equal pytorch-fid's on its real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bigain.errors import ConfigError, DatasetError
from bigain.fid_inception import (
    PYTORCH_FID_WEIGHTS,
    FIDInceptionV3,
    load_pytorch_fid_inception,
)
from bigain.metrics import MetricUnavailable, build_extractor, parse_extractor, reference_files, score_images


@pytest.fixture(scope="module")
def cheap(tmp_path_factory):
    """The folder logic does not need Inception: a tiny timm model with fixed random weights, offline."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "test_vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), path)
    return f"timm:test_vit@{path}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A stand-in for pt_inception-2015-12-05-6726825d.pth: the architecture's state dict, random weights
    (BatchNorm statistics randomised too, so a file that is not loaded would show)."""
    torch.manual_seed(0)
    net = FIDInceptionV3().net
    state = net.state_dict()
    for k, v in state.items():
        if k.endswith("running_var"):
            state[k] = v.uniform_(0.5, 2.0)
        elif k.endswith("running_mean"):
            state[k] = v.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("w") / PYTORCH_FID_WEIGHTS
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


def test_the_architecture_has_pytorch_fids_key_set():
    from torchvision.models.inception import Inception3

    ours = FIDInceptionV3().net.state_dict()
    plain = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert list(ours) == list(plain)
    assert all(ours[k].shape == plain[k].shape for k in ours)
    assert ours["fc.weight"].shape == (1008, 2048)


@pytest.mark.parametrize("name,pool", [
    ("Mixed_5b", lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
    ("Mixed_6b", lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
    ("Mixed_7b", lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
    ("Mixed_7c", lambda x: F.max_pool2d(x, 3, 1, 1)),
])
def test_fid_blocks_change_only_the_pooling_branch(name, pool):
    torch.manual_seed(1)
    block = getattr(FIDInceptionV3().net, name).eval()
    channels = block.branch1x1.conv.in_channels
    x = torch.randn(1, channels, 9, 9)
    with torch.no_grad():
        ours = block._forward(x)
        stock = type(block).__mro__[1]._forward(block, x)  # torchvision's block, same weights
        expected = block.branch_pool(pool(x))
    for a, b in zip(ours[:-1], stock[:-1]):
        assert torch.equal(a, b)
    torch.testing.assert_close(ours[-1], expected)
    assert not torch.allclose(ours[-1], stock[-1])  # the edge rows differ from torchvision's pooling


def test_preprocessing_is_a_bilinear_resize_to_299_then_minus_one_to_one():
    x = torch.rand(2, 3, 40, 56)
    ref = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(FIDInceptionV3.prepare(x), ref)


def test_a_local_weights_file_loads_into_the_extractor(weights):
    extractor = build_extractor(f"pytorch-fid:{weights}")
    saved = torch.load(weights)
    loaded = extractor.net.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())  # every tensor of the file is in the network
    assert any(not torch.equal(loaded[k], v) for k, v in FIDInceptionV3().net.state_dict().items()
               if k in saved)  # ... and not what a fresh network holds
    images = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8)
    feats, logits = extractor(images)
    assert feats.shape == (2, 2048) and logits is None
    with torch.no_grad():
        torch.testing.assert_close(feats, extractor.net(images.float() / 255.0))  # uint8 / 255, then the network


def test_a_missing_or_wrong_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=rf"does not exist.*download {PYTORCH_FID_WEIGHTS}.*https://"):
        parse_extractor(f"pytorch-fid:{tmp_path / 'nowhere.pth'}")
    with pytest.raises(ConfigError, match="no weights file is given"):
        parse_extractor("pytorch-fid")
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), other)
    with pytest.raises(ConfigError, match="is not pytorch-fid's Inception.*keys missing"):
        load_pytorch_fid_inception(other)
    with pytest.raises(MetricUnavailable, match="is not pytorch-fid's Inception"):
        build_extractor(f"pytorch-fid:{other}")
    from bigain.tasks.generation import DiffusionGenerator

    with pytest.raises(ConfigError, match="pytorch-fid's Inception weights are read from a local file"):
        DiffusionGenerator(feature_extractor=f"pytorch-fid:{tmp_path / 'nowhere.pth'}")


# -- the reference folder --------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    sizes = {"a.jpg": (40, 52), "b.png": (40, 52), "c.JPEG": (33, 47), "d.jpeg": (40, 52), "e.webp": (21, 30)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).convert("L").save(root / "f.png")  # grey
    (root / "labels.mat").write_bytes(b"not an image")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "sub" / "g.png")
    return root


def test_reference_files_are_every_image_directly_in_the_folder(folder, tmp_path):
    assert [p.name for p in reference_files(folder)] == ["a.jpg", "b.png", "c.JPEG", "d.jpeg", "e.webp", "f.png"]
    with pytest.raises(DatasetError, match="is not a folder"):
        reference_files(tmp_path / "missing")
    with pytest.raises(DatasetError, match="holds no image file"):
        reference_files(_empty(tmp_path))


def _empty(tmp_path):
    (tmp_path / "empty").mkdir(exist_ok=True)
    return tmp_path / "empty"


def _never():
    raise AssertionError("the datamodule's split must not be read when fid_reference is given")
    yield


def test_fid_against_a_folder_uses_every_image_whole(folder, cheap):
    from bigain.metrics import load_png

    fakes = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    whole = [load_png(p) for p in reference_files(folder)]
    assert {tuple(im.shape[1:]) for im in whole} == {(40, 52), (33, 47), (21, 30), (20, 20)}  # not cropped
    by_folder = score_images(fakes, _never(), metrics=["fid", "kid"], feature_extractor=cheap, fid_reference=folder)
    assert by_folder["fid"]["real_images"] == 6 and by_folder["fid"]["reference"] == str(folder.resolve())
    assert by_folder["kid"]["real_images"] == 6
    by_list = score_images(fakes, whole, metrics=["fid"], feature_extractor=cheap)
    one_at_a_time = score_images(fakes, whole, metrics=["fid"], feature_extractor=cheap, batch_size=1)
    assert by_folder["fid"]["value"] == pytest.approx(by_list["fid"]["value"], rel=1e-6)
    assert by_list["fid"]["value"] == pytest.approx(one_at_a_time["fid"]["value"], rel=1e-4)  # pytorch-fid's bs 1


def test_an_unreadable_reference_image_is_an_error(folder, cheap):
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match="broken.jpg cannot be read"):
        score_images([torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2, None, metrics=["fid"],
                     feature_extractor=cheap, fid_reference=folder)


# -- images saved as the paper saved them ----------------------------------------------------------

def test_paper_jpeg_truncates_and_saves_jpeg_quality_100(tmp_path):
    from bigain.tasks.generation import save_image, to_uint8

    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(x, truncate=True)[0, 0, 0].tolist() == [0, 0, 127, 191, 254, 255]  # floor(255 (x+1)/2)
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_image(img, tmp_path / "a.jpg", "paper-jpeg")
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG"
        ref = tmp_path / "ref.jpg"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(ref, "JPEG", quality=100)
    assert (tmp_path / "a.jpg").read_bytes() == ref.read_bytes()  # what the released scripts' PIL call writes


def test_a_generation_run_saves_paper_jpegs_and_keeps_png_runs_identity(tmp_path):
    from bigain.cli import main
    from bigain.testing import save_tiny_dit

    dit = save_tiny_dit(tmp_path / "dit")
    base = ["generate", "--model.backbone", "dit", "--model.backbone_options", f"{{path: {dit}}}",
            "--data.image_size", "16", "--model.steps", "2", "--model.metrics", "[]", "--data", "toy",
            "--data.length", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    assert main([*base, "--model.image_format", "paper-jpeg", "--run_dir", str(tmp_path / "jpg")]) == 0
    assert main([*base, "--run_dir", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "jpg" / "images").iterdir()) == ["000000.jpg", "000001.jpg"]
    jpg, png = (json.loads((tmp_path / d / "run.json").read_text())["result_config"]["model"] for d in ("jpg", "png"))
    assert jpg["image_format"] == "paper-jpeg" and "image_format" not in png
    with pytest.raises(ConfigError, match="image_format must be one of"):
        from bigain.tasks.generation import DiffusionGenerator

        DiffusionGenerator(image_format="jpg")


def test_the_generate_command_scores_against_the_fid_reference(tmp_path, folder, weights):
    from bigain.cli import main
    from bigain.testing import save_tiny_dit

    dit = save_tiny_dit(tmp_path / "dit")
    assert main(["generate", "--model.backbone", "dit", "--model.backbone_options", f"{{path: {dit}}}",
                 "--data.image_size", "16", "--model.steps", "2", "--model.metrics", "[fid]",
                 "--model.feature_extractor", f"pytorch-fid:{weights}", "--model.fid_reference", str(folder),
                 "--data", "toy", "--data.length", "2", "--trainer.accelerator", "cpu",
                 "--trainer.enable_progress_bar", "false", "--run_dir", str(tmp_path / "run")]) == 0
    fid = json.loads((tmp_path / "run" / "run.json").read_text())["metrics"]["fid"]
    assert fid["real_images"] == 6 and fid["reference"] == str(folder.resolve())


def test_reference_folder_paths_expand_the_home(tmp_path, monkeypatch, folder):
    monkeypatch.setenv("HOME", str(folder.parent))
    assert reference_files(Path("~") / "images") == reference_files(folder)
