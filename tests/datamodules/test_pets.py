"""Oxford-IIIT Pets on a fake torchvision layout."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from bigain.datamodules import PetsDataModule
from bigain.errors import ConfigError, DatasetError

# The released pets_prompts.csv of the paper, class by class.
PAPER_PROMPT_NAMES = [
    "Abyssinian cat", "American Bulldog", "American Pit Bull Terrier dog", "Basset Hound dog", "Beagle dog",
    "Bengal cat", "Birman cat", "Bombay cat", "Boxer dog", "British Shorthair cat", "Chihuahua dog", "Egyptian Mau cat",
    "English Cocker Spaniel dog", "English Setter dog", "German Shorthaired dog", "Great Pyrenees dog", "Havanese dog",
    "Japanese Chin dog", "Keeshond dog", "Leonberger dog", "Maine Coon cat", "Miniature Pinscher dog",
    "Newfoundland dog", "Persian cat", "Pomeranian dog", "Pug dog", "Ragdoll cat", "Russian Blue cat",
    "Saint Bernard dog", "Samoyed dog", "Scottish Terrier dog", "Shiba Inu dog", "Siamese cat", "Sphynx cat",
    "Staffordshire Bull Terrier dog", "Wheaten Terrier dog", "Yorkshire Terrier dog",
]


@pytest.fixture
def pets(tmp_path, fakes):
    rows = fakes.make_pets(tmp_path)
    return tmp_path, rows


def test_split_classes_prompts_and_order(pets):
    root, rows = pets
    dm = PetsDataModule(root=str(root), image_size=16)
    dm.prepare_data()
    assert len(dm.split) == len(rows) == 19 * 2 + 18
    assert list(dm.split.labels) == [label for _, label in rows]
    assert [r.rsplit("/", 1)[-1] for r in dm.split.refs] == [f"{image_id}.jpg" for image_id, _ in rows]
    assert dm.num_classes == 37
    assert dm.classes[:3] == ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]
    assert dm.classes[-1] == "Yorkshire Terrier"
    assert dm.species.count("cat") == 12
    assert dm.prompts == [f"a photo of a {name}, a type of pet." for name in PAPER_PROMPT_NAMES]
    dm.setup()
    item = dm.dataset[1]
    assert item["index"] == 1 and item["label"] == 0 and item["prompt"] == "a photo of a Abyssinian cat, a type of pet."
    assert dm.describe()["split"] == "test" and dm.label_ids is None


def test_prompts_csv_override(pets, tmp_path):
    root, _ = pets
    csv = tmp_path / "pets.csv"
    csv.write_text("prompt,classname,classidx\n" + "".join(f'"a {i}, pet",c{i},{i}\n' for i in range(37)))
    dm = PetsDataModule(root=str(root), prompts_csv=str(csv), image_size=8)
    assert dm.prompts[36] == "a 36, pet"
    dm.setup()
    assert dm.dataset[0]["prompt"] == "a 0, pet"


def test_trainval_split(tmp_path, fakes):
    fakes.make_pets(tmp_path, per_class=(1,), split="trainval")
    dm = PetsDataModule(root=str(tmp_path), split="trainval")
    assert len(dm.split) == 37
    with pytest.raises(DatasetError, match=r"annotations/test\.txt does not exist"):
        _ = PetsDataModule(root=str(tmp_path)).split
    with pytest.raises(ConfigError):
        PetsDataModule(root=str(tmp_path), split="val")


def test_subset_and_dataloader(pets):
    root, _ = pets
    a = PetsDataModule(root=str(root), subset=1, subset_seed=3).selected_indices()
    b = PetsDataModule(root=str(root), subset=1, subset_seed=3).selected_indices()
    dm = PetsDataModule(root=str(root), subset=1, subset_seed=4, image_size=20, batch_size=37)
    assert a == b and len(a) == 37
    assert sorted(Counter(dm.split.labels[i] for i in a).values()) == [1] * 37
    assert {tuple(PetsDataModule(root=str(root), subset=1, subset_seed=s).selected_indices()) for s in range(4)} != {
        tuple(a)}
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (37, 3, 20, 20) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() < -0.5 < 0.5 < batch["image"].max() <= 1.0
    assert batch["label"] == list(range(37))
    assert batch["prompt"][1] == "a photo of a American Bulldog, a type of pet."


def test_download_only_when_asked(tmp_path, monkeypatch, fakes):
    import torchvision.datasets.oxford_iiit_pet as tv_pets

    calls = []

    def fake_download(url, download_root, md5=None, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            fakes.make_pets(tmp_path)

    monkeypatch.setattr(tv_pets, "download_and_extract_archive", fake_download)
    with pytest.raises(DatasetError) as err:
        PetsDataModule(root=str(tmp_path)).prepare_data()
    assert calls == []
    msg = str(err.value)
    assert "oxford-iiit-pet" in msg and re.search(r"^\s+1\. Pass download=True", msg, re.M)
    dm = PetsDataModule(root=str(tmp_path), download=True)
    dm.prepare_data()
    assert len(calls) == 2 and len(dm.split) == 56
    PetsDataModule(root=str(tmp_path), download=True).prepare_data()  # already there: no second download
    assert len(calls) == 2


# -- bad input ---------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)no Pets root was given.*\n\s+3\. pass root="):
        PetsDataModule().prepare_data()
    with pytest.raises(DatasetError, match=r"Oxford-IIIT Pets not found under .*nowhere"):
        PetsDataModule(root=str(tmp_path / "nowhere")).prepare_data()


def test_wrong_layout(tmp_path, fakes):
    (tmp_path / "images").mkdir()  # extracted without the oxford-iiit-pet folder
    with pytest.raises(DatasetError, match=r"missing .*oxford-iiit-pet/images"):
        _ = PetsDataModule(root=str(tmp_path)).split


def test_malformed_and_truncated_split_lists(pets):
    root, _ = pets
    ann = root / "oxford-iiit-pet" / "annotations" / "test.txt"
    lines = ann.read_text().splitlines()
    ann.write_text("\n".join(lines[:5] + ["Abyssinian_7 1"] + lines[5:]) + "\n")
    with pytest.raises(DatasetError, match=r"test\.txt is malformed"):
        _ = PetsDataModule(root=str(root)).split
    ann.write_text("\n".join(lines[:5] + ["Abyssinian_7 99 1 1"] + lines[5:]) + "\n")
    with pytest.raises(DatasetError, match=r"test\.txt:6 is malformed"):
        _ = PetsDataModule(root=str(root)).split
    ann.write_text("\n".join(lines[:20]) + "\n")
    with pytest.raises(DatasetError, match=r"test\.txt lists 13 of the 37 breeds"):
        _ = PetsDataModule(root=str(root)).split


def test_missing_image_file(pets):
    root, rows = pets
    (root / "oxford-iiit-pet" / "images" / f"{rows[3][0]}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"1 images of the Pets test split are missing .*{rows[3][0]}\.jpg"):
        _ = PetsDataModule(root=str(root)).split


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_unreadable_image_error_and_skip(pets, fakes, how):
    root, rows = pets
    bad = root / "oxford-iiit-pet" / "images" / f"{rows[1][0]}.jpg"
    fakes.corrupt(bad, how)
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        next(iter(PetsDataModule(root=str(root), image_size=8, batch_size=3).predict_dataloader()))
    dm = PetsDataModule(root=str(root), image_size=8, batch_size=3, on_bad_image="skip")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["index"].tolist() == [0, 2] and [b["index"] for b in batch["bad"]] == [1]
    assert batch["bad"][0]["ref"] == str(bad)


def test_index_file_outside_the_split(pets, tmp_path):
    root, _ = pets
    index_file = tmp_path / "idx.txt"
    index_file.write_text("3\n56\n")
    with pytest.raises(DatasetError, match=r"points outside the split \(size 56\): \[56\]"):
        PetsDataModule(root=str(root), subset=str(index_file)).setup()
