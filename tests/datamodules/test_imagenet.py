"""ImageNet-1K and ImageNet-100 on fake ImageFolder layouts."""

from __future__ import annotations

import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from bigain.datamodules import ImageNet100DataModule, ImageNetDataModule
from bigain.datamodules.base import collate
from bigain.datamodules.prompts import imagenet100_wnids, imagenet_classes
from bigain.errors import DatasetError


def test_bundled_class_lists():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert (classes[0].classidx, classes[0].wnid, classes[0].classname) == (0, "n01440764", "tench")
    assert (classes[1].wnid, classes[1].classname) == ("n01443537", "goldfish")
    assert (classes[999].wnid, classes[999].classname) == ("n15075141", "toilet paper")
    assert [c.wnid for c in classes] == sorted(c.wnid for c in classes)
    assert len({c.wnid for c in classes}) == 1000
    wnids = imagenet100_wnids()
    assert len(wnids) == 100 and list(wnids) == sorted(wnids)
    assert {"n02869837", "n01749939", "n02090622"} <= set(wnids)  # first, second, last of the CMC file
    assert set(wnids) <= {c.wnid for c in classes}


def test_imagenet_split_labels_prompts_and_index(imagenet_root):
    root, files = imagenet_root
    dm = ImageNetDataModule(root=str(root), image_size=16)
    dm.prepare_data()
    assert dm.num_classes == 1000 and dm.classes[0] == "tench"
    assert dm.label_ids == list(range(1000))
    assert dm.prompts[0] == "a photo of a tench." and dm.prompts[999] == "a photo of a toilet paper."
    split = dm.split
    assert len(split) == len(files) == 1000 + 2 * 8
    # index = position in the full split, sorted (class, file name); label = the class id
    assert [str(p) for _, p in files] == list(split.refs)
    wnid_to_id = {c.wnid: c.classidx for c in imagenet_classes()}
    assert list(split.labels) == [wnid_to_id[w] for w, _ in files]
    assert Counter(split.labels)[0] == 3 and Counter(split.labels)[2] == 1
    dm.setup()
    item = dm.dataset[5]
    assert item["index"] == 5 and item["label"] == split.labels[5]
    assert item["prompt"] == dm.prompts[item["label"]]
    assert item["image"].shape == (3, 16, 16)
    assert dm.describe()["split_size"] == len(files)


def test_imagenet_subset_is_seeded_and_stratified(imagenet_root):
    root, _ = imagenet_root

    def pick(seed, n=2):
        return ImageNetDataModule(root=str(root), subset=n, subset_seed=seed).selected_indices()

    a, b, c = pick(0), pick(0), pick(1)
    assert a == b and a != c and a == sorted(a)
    dm = ImageNetDataModule(root=str(root))
    counts = Counter(dm.split.labels[i] for i in a)
    assert counts[0] == 2 and counts[2] == 1 and len(counts) == 1000  # min(n, class size) per class
    assert len(a) == 2 * 8 + 992


def test_imagenet100_on_a_full_imagenet_root(imagenet_root):
    root, files = imagenet_root
    dm = ImageNet100DataModule(root=str(root), image_size=8)
    wnids = list(imagenet100_wnids())
    assert dm.num_classes == 100 and dm.wnids == wnids
    by_wnid = {c.wnid: c for c in imagenet_classes()}
    assert dm.label_ids == [by_wnid[w].classidx for w in wnids]
    assert dm.classes == [by_wnid[w].classname for w in wnids]
    assert dm.prompts[0] == f"a photo of a {by_wnid[wnids[0]].classname}."
    expected = [(w, p) for w, p in files if w in set(wnids)]
    assert list(dm.split.refs) == [str(p) for _, p in expected]
    assert list(dm.split.labels) == [wnids.index(w) for w, _ in expected]
    assert len(dm.split) == 100 + 2 * 5


def test_imagenet100_folder_gives_the_same_indices(imagenet_root, tmp_path):
    full_root, _ = imagenet_root
    for wnid in imagenet100_wnids():  # an ImageNet-100 folder made of the same 100 class folders
        shutil.copytree(full_root / "val" / wnid, tmp_path / "val" / wnid)
    full = ImageNet100DataModule(root=str(full_root))
    own = ImageNet100DataModule(root=str(tmp_path))
    assert list(own.split.labels) == list(full.split.labels)
    assert [r.split("/val/")[1] for r in own.split.refs] == [r.split("/val/")[1] for r in full.split.refs]
    assert own.label_ids == full.label_ids and own.classes == full.classes


def test_imagenet100_prompts_csv_by_label_or_by_imagenet_id(imagenet100_root, tmp_path):
    root, _ = imagenet100_root
    dm = ImageNet100DataModule(root=str(root))
    by_label = tmp_path / "by_label.csv"
    by_label.write_text("classidx,classname,prompt\n" + "".join(
        f"{i},{n},a sketch of {n}\n" for i, n in enumerate(dm.classes)))
    by_id = tmp_path / "by_id.csv"
    by_id.write_text("prompt,classname,classidx\n" + "".join(
        f"an image of {n},{n},{i}\n" for i, n in zip(dm.label_ids, dm.classes)))
    assert ImageNet100DataModule(root=str(root), prompts_csv=str(by_label)).prompts[3] == f"a sketch of {dm.classes[3]}"
    assert ImageNet100DataModule(root=str(root), prompts_csv=str(by_id)).prompts[3] == f"an image of {dm.classes[3]}"
    bad = tmp_path / "bad.csv"
    bad.write_text("classidx,classname,prompt\n0,x,y\n")
    with pytest.raises(DatasetError, match="no prompt for class"):
        _ = ImageNet100DataModule(root=str(root), prompts_csv=str(bad)).prompts


def test_imagenet_prompts_csv_override(imagenet_root, tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("classidx,classname,prompt\n" + "".join(f"{i},c{i},prompt {i}\n" for i in range(1000)))
    dm = ImageNetDataModule(root=str(imagenet_root[0]), prompts_csv=str(csv), image_size=8)
    assert dm.prompts[7] == "prompt 7"
    dm.setup()
    assert dm.dataset[0]["prompt"] == "prompt 0"


def test_imagenet_dataloader_batches_and_preprocessing(imagenet100_root):
    root, _ = imagenet100_root
    dm = ImageNet100DataModule(root=str(root), image_size=24, batch_size=4, subset=1)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() < -0.5 and batch["image"].max() > 0.5  # really spans the range
    assert batch["index"].tolist() == dm.selected_indices()[:4]
    assert batch["label"] == [dm.split.labels[i] for i in batch["index"].tolist()]
    assert batch["prompt"] == [dm.prompts[label] for label in batch["label"]]
    assert batch["bad"] == []


def test_index_contract_under_subsets_and_skipping(imagenet100_root, tmp_path):
    root, _ = imagenet100_root
    full = ImageNet100DataModule(root=str(root))
    full.setup()
    ref_of = {full.dataset.indices[i]: full.split.refs[full.dataset.indices[i]] for i in range(len(full.dataset))}
    index_file = tmp_path / "idx.txt"
    index_file.write_text("7\n3\n50\n")
    dm = ImageNet100DataModule(root=str(root), subset=str(index_file))
    dm.skip_indices({3})
    dm.setup()
    assert dm.dataset.indices == [7, 50]
    for i in range(len(dm.dataset)):
        item = dm.dataset[i]
        assert dm.split.refs[item["index"]] == ref_of[item["index"]]
    npy = tmp_path / "idx.npy"
    np.save(npy, np.array([50, 1]))
    assert ImageNet100DataModule(root=str(root), subset=str(npy)).selected_indices() == [1, 50]


def test_index_file_outside_the_split(imagenet100_root, tmp_path):
    root, _ = imagenet100_root
    index_file = tmp_path / "idx.json"
    index_file.write_text("[0, 5, 100000]")
    dm = ImageNet100DataModule(root=str(root), subset=str(index_file))
    with pytest.raises(DatasetError, match=r"idx\.json points outside the split \(size 108\): \[100000\]"):
        dm.setup()


# -- bad input ---------------------------------------------------------------------------------
def test_missing_root_gives_numbered_instructions(tmp_path):
    for dm in (ImageNetDataModule(), ImageNetDataModule(root=str(tmp_path / "nowhere")), ImageNet100DataModule()):
        with pytest.raises(DatasetError) as err:
            dm.prepare_data()
        msg = str(err.value)
        assert re.search(r"^\s+1\. Register at https://image-net\.org.*ILSVRC2012_img_val\.tar", msg, re.M)
        assert re.search(r"^\s+2\. .*valprep", msg, re.M)
        assert re.search(r"^\s+3\. Pass root=", msg, re.M)
    with pytest.raises(DatasetError, match="nowhere does not exist"):
        ImageNetDataModule(root=str(tmp_path / "nowhere")).prepare_data()


def test_root_without_split_folder(tmp_path):
    from bigain.datamodules.prompts import imagenet_classes

    (tmp_path / "val_images" / imagenet_classes()[0].wnid).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"(?s)has no 'val' folder .*\n\s+1\. Register"):
        _ = ImageNetDataModule(root=str(tmp_path)).split
    # root pointing at the split folder itself: the error says to pass the parent
    with pytest.raises(DatasetError, match=r"itself holds class folders: pass its parent as root"):
        _ = ImageNetDataModule(root=str(tmp_path / "val_images")).split


def test_val_not_arranged_into_class_folders(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"(?s)no class folders: the images are not arranged by class.*\n\s+2\. "):
        _ = ImageNetDataModule(root=str(tmp_path)).split
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()
    with pytest.raises(DatasetError, match="holds no class \\(wnid\\) folders"):
        _ = ImageNetDataModule(root=str(tmp_path)).split


def test_class_folder_not_in_the_class_list(imagenet100_root):
    root, _ = imagenet100_root
    (root / "val" / "cats").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*val/cats is not an ImageNet-1K class"):
        _ = ImageNet100DataModule(root=str(root)).split


def test_missing_and_empty_class_folders(imagenet100_root):
    root, files = imagenet100_root
    wnid = files[-1][0]
    shutil.rmtree(root / "val" / wnid)
    with pytest.raises(DatasetError, match=rf"1 of the 100 imagenet100 class folders are missing .*{wnid}"):
        _ = ImageNet100DataModule(root=str(root)).split
    (root / "val" / wnid).mkdir()
    (root / "val" / wnid / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=rf"class folder .*{wnid} holds no images"):
        _ = ImageNet100DataModule(root=str(root)).split
    # ImageNet-1K on an ImageNet-100 folder: 900 classes missing
    with pytest.raises(DatasetError, match=r"900 of the 1000 imagenet class folders are missing"):
        _ = ImageNetDataModule(root=str(root)).split


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_unreadable_image_error_and_skip(imagenet100_root, how, fakes):
    root, files = imagenet100_root
    bad_path = files[2][1]
    fakes.corrupt(bad_path, how)
    dm = ImageNet100DataModule(root=str(root), image_size=8, batch_size=4, subset="all")
    with pytest.raises(DatasetError, match=re.escape(str(bad_path))):
        next(iter(dm.predict_dataloader()))
    dm = ImageNet100DataModule(root=str(root), image_size=8, batch_size=4, on_bad_image="skip")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["index"].tolist() == [0, 1, 3]
    assert len(batch["bad"]) == 1 and batch["bad"][0]["index"] == 2
    assert batch["bad"][0]["ref"] == str(bad_path) and "corrupt or truncated" in batch["bad"][0]["error"]


def test_unreadable_image_in_a_subset_is_not_read(imagenet100_root, tmp_path, fakes):
    root, files = imagenet100_root
    fakes.corrupt(files[2][1])
    index_file = tmp_path / "idx.txt"
    index_file.write_text("0\n1\n3\n")
    dm = ImageNet100DataModule(root=str(root), image_size=8, batch_size=8, subset=str(index_file))
    batch = next(iter(dm.predict_dataloader()))
    assert batch["index"].tolist() == [0, 1, 3] and batch["bad"] == []
    assert collate([])["index"].numel() == 0


def test_other_split_folder(tmp_path, fakes):
    wnids = list(imagenet100_wnids())
    fakes.make_imagenet(tmp_path, wnids, split="train")
    dm = ImageNet100DataModule(root=str(tmp_path), split="train")
    assert len(dm.split) == 100 and dm.describe()["split"] == "train"
