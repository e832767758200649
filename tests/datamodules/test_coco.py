"""COCO-2017 on a fake layout with annotation files in the real schema."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bigain.datamodules import COCODataModule
from bigain.errors import ConfigError, DatasetError

# fake ids sorted: 139, 285, 632, 724, 776 (no annotations), 397133
IDS = [139, 285, 632, 724, 776, 397133]
# categories sorted by id: person(1) bicycle(2) car(3) dog(18) toothbrush(90)
LABELS = [[0, 2, 4], [3], [1], [0, 2], [], [0, 3]]


@pytest.fixture
def coco(tmp_path, fakes):
    fakes.make_coco(tmp_path)
    return tmp_path


def test_split_multilabel_targets_and_order(coco, fakes):
    dm = COCODataModule(root=str(coco), image_size=16, unannotated="keep")
    dm.prepare_data()
    assert COCODataModule.multilabel
    assert dm.classes == ["person", "bicycle", "car", "dog", "toothbrush"]
    assert dm.category_ids == [1, 2, 3, 18, 90]
    assert dm.prompts == [f"a photo of a {c}." for c in dm.classes]
    assert dm.image_ids == IDS and list(dm.split.labels) == LABELS
    assert [r.rsplit("/", 1)[-1] for r in dm.split.refs] == [f"{i:012d}.jpg" for i in IDS]
    assert dm.captions == [fakes.COCO_CAPTIONS[i][0].strip() for i in IDS]  # the first caption of each image
    assert dm.selected_indices() == list(range(6))
    dm.setup()
    item = dm.dataset[4]
    assert item["index"] == 4 and item["label"] == [] and item["caption"] == fakes.COCO_CAPTIONS[776][0]
    assert item["image"].shape == (3, 16, 16) and "prompt" not in item


def test_unannotated_images_are_skipped_and_reported(coco):
    dm = COCODataModule(root=str(coco), image_size=8, batch_size=10)
    assert dm.unannotated == "skip"
    assert dm.selected_indices() == [0, 1, 2, 3, 5]  # indices do not move
    assert dm.unannotated_ids == [776]
    info = dm.describe()
    assert info["num_unannotated"] == 1 and info["unannotated_skipped"] == 1 and info["split_size"] == 6
    batch = next(iter(dm.predict_dataloader()))
    assert batch["index"].tolist() == [0, 1, 2, 3, 5]
    assert batch["label"] == [LABELS[i] for i in [0, 1, 2, 3, 5]]
    assert len(batch["caption"]) == 5 and batch["bad"] == []
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert COCODataModule(root=str(coco), unannotated="keep").describe()["unannotated_skipped"] == 0
    with pytest.raises(ConfigError):
        COCODataModule(root=str(coco), unannotated="drop")


def test_random_captions_are_seeded_per_image(coco, fakes):
    def captions(seed):
        return COCODataModule(root=str(coco), caption="random", caption_seed=seed).captions

    assert captions(0) == captions(0)
    for seed in range(3):
        got = captions(seed)
        for image_id, caption in zip(IDS, got):
            options = fakes.COCO_CAPTIONS[image_id]
            assert caption == options[int(np.random.default_rng([seed, image_id]).integers(len(options)))].strip()
    assert len({tuple(captions(s)) for s in range(6)}) > 1
    first = COCODataModule(root=str(coco)).captions
    assert any(captions(s) != first for s in range(6))


def test_caption_none_needs_no_captions_file(coco):
    (coco / "annotations" / "captions_val2017.json").unlink()
    with pytest.raises(DatasetError, match=r"(?s)captions file .*captions_val2017\.json does not exist.*\n\s+1\. "):
        _ = COCODataModule(root=str(coco)).split
    dm = COCODataModule(root=str(coco), caption="none", image_size=8)
    dm.setup()
    assert "caption" not in dm.dataset[0] and dm.captions == []


def test_subsets_are_seeded_and_stratified_by_first_label(coco, tmp_path):
    keep = COCODataModule(root=str(coco), subset=1, subset_seed=5, unannotated="keep").selected_indices()
    assert keep == COCODataModule(root=str(coco), subset=1, subset_seed=5, unannotated="keep").selected_indices()
    assert len(keep) == 4 and 4 in keep and {1, 2} <= set(keep)  # strata: first label 0, 3, 1 and "no label"
    skip = COCODataModule(root=str(coco), subset=1, subset_seed=5).selected_indices()
    assert skip == [i for i in keep if i != 4]
    index_file = tmp_path / "idx.json"
    index_file.write_text(json.dumps([5, 4, 0]))
    dm = COCODataModule(root=str(coco), subset=str(index_file))
    assert dm.selected_indices() == [0, 5] and dm.describe()["unannotated_skipped"] == 1
    dm.skip_indices({0})
    dm.setup()
    assert dm.dataset.indices == [5] and dm.dataset[0]["label"] == LABELS[5]


def test_prompts_csv_override(coco, tmp_path):
    csv = tmp_path / "coco.csv"
    csv.write_text("classidx,classname,prompt\n" + "".join(f"{i},c,picture {i}\n" for i in range(5)))
    assert COCODataModule(root=str(coco), prompts_csv=str(csv)).prompts[4] == "picture 4"


# -- bad input ---------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)no COCO root was given.*\n\s+1\. Download val2017\.zip"):
        COCODataModule().prepare_data()
    with pytest.raises(DatasetError, match=r"(?s)COCO root .*nowhere does not exist.*\n\s+3\. Pass root="):
        COCODataModule(root=str(tmp_path / "nowhere")).prepare_data()


def test_missing_annotation_file_or_image_folder(coco):
    instances = coco / "annotations" / "instances_val2017.json"
    data = instances.read_text()
    instances.unlink()
    with pytest.raises(DatasetError, match=rf"(?s)instances file {re.escape(str(instances))} does not exist.*2\. "):
        _ = COCODataModule(root=str(coco)).split
    instances.write_text(data)
    (coco / "val2017").rename(coco / "images")
    with pytest.raises(DatasetError, match=r"(?s)image folder .*val2017 does not exist.*\n\s+2\. Extract"):
        _ = COCODataModule(root=str(coco)).split


def test_damaged_annotation_files(coco):
    instances = coco / "annotations" / "instances_val2017.json"
    good = json.loads(instances.read_text())
    instances.write_text(instances.read_text()[:100])
    with pytest.raises(DatasetError, match=r"cannot read the COCO instances file .*damaged"):
        _ = COCODataModule(root=str(coco)).split
    instances.write_text(json.dumps({"images": good["images"], "annotations": []}))
    with pytest.raises(DatasetError, match=r"lacks \['categories'\]: it is not a COCO instances file"):
        _ = COCODataModule(root=str(coco)).split
    bad = dict(good, annotations=good["annotations"] + [dict(good["annotations"][0], category_id=77, id=9)])
    instances.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"annotation 9 names category 77"):
        _ = COCODataModule(root=str(coco)).split
    bad = dict(good, images=[{"id": 1}])
    instances.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"not in the COCO instances format \(KeyError"):
        _ = COCODataModule(root=str(coco)).split
    instances.write_text(json.dumps(good))
    captions = coco / "annotations" / "captions_val2017.json"
    caps = json.loads(captions.read_text())
    caps["annotations"] = [a for a in caps["annotations"] if a["image_id"] != 632]
    captions.write_text(json.dumps(caps))
    with pytest.raises(DatasetError, match=r"has no caption for 1 image\(s\) .*image id 632.*caption='none'"):
        _ = COCODataModule(root=str(coco)).split


def test_missing_image_file(coco):
    (coco / "val2017" / "000000000632.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 6 images listed in .* are missing .*000000000632\.jpg"):
        _ = COCODataModule(root=str(coco)).split


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_unreadable_image_error_and_skip(coco, fakes, how):
    bad = coco / "val2017" / "000000000285.jpg"
    fakes.corrupt(bad, how)
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        next(iter(COCODataModule(root=str(coco), image_size=8, batch_size=6).predict_dataloader()))
    dm = COCODataModule(root=str(coco), image_size=8, batch_size=6, on_bad_image="skip")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["index"].tolist() == [0, 2, 3, 5]
    assert batch["bad"][0]["index"] == 1 and batch["bad"][0]["ref"] == str(bad)
    assert batch["label"] == [LABELS[i] for i in [0, 2, 3, 5]]


def test_index_file_outside_the_split(coco, tmp_path):
    index_file = tmp_path / "idx.txt"
    index_file.write_text("-1\n2\n")
    with pytest.raises(DatasetError, match=r"points outside the split \(size 6\): \[-1\]"):
        COCODataModule(root=str(coco), subset=str(index_file)).setup()


def test_worker_processes_give_the_same_batches(coco):
    def batches(workers):
        dm = COCODataModule(root=str(coco), image_size=8, batch_size=2, num_workers=workers, unannotated="keep")
        return list(dm.predict_dataloader())

    for a, b in zip(batches(0), batches(2), strict=True):
        assert a["index"].tolist() == b["index"].tolist() and a["label"] == b["label"]
        assert a["caption"] == b["caption"] and bool((a["image"] == b["image"]).all())
