"""Small fake on-disk layouts of the real datasets, in the real formats (nothing is downloaded)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Oxford-IIIT Pets: raw breed ids as in the image file names (cats capitalised), in class-id order.
PETS_BREEDS = [
    ("Abyssinian", 1), ("american_bulldog", 2), ("american_pit_bull_terrier", 2), ("basset_hound", 2),
    ("beagle", 2), ("Bengal", 1), ("Birman", 1), ("Bombay", 1), ("boxer", 2), ("British_Shorthair", 1),
    ("chihuahua", 2), ("Egyptian_Mau", 1), ("english_cocker_spaniel", 2), ("english_setter", 2),
    ("german_shorthaired", 2), ("great_pyrenees", 2), ("havanese", 2), ("japanese_chin", 2), ("keeshond", 2),
    ("leonberger", 2), ("Maine_Coon", 1), ("miniature_pinscher", 2), ("newfoundland", 2), ("Persian", 1),
    ("pomeranian", 2), ("pug", 2), ("Ragdoll", 1), ("Russian_Blue", 1), ("saint_bernard", 2), ("samoyed", 2),
    ("scottish_terrier", 2), ("shiba_inu", 2), ("Siamese", 1), ("Sphynx", 1), ("staffordshire_bull_terrier", 2),
    ("wheaten_terrier", 2), ("yorkshire_terrier", 2),
]

SIZES = [(40, 24), (24, 40), (33, 33), (50, 20)]


def image_bytes(size=(16, 12), seed: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    im = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def corrupt(path: Path, how: str = "truncate") -> None:
    """Make an image unreadable: cut it in half, or replace it with garbage."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"this is not an image")


def make_imagenet(root: Path, wnids, *, split: str = "val", many: set[str] = frozenset()) -> list[tuple[str, Path]]:
    """``<root>/<split>/<wnid>/ILSVRC2012_val_*.JPEG``: one image per class, three for wnids in ``many``
    (varied sizes, one grayscale PNG). Returns the files in (wnid, file name) order."""
    small = image_bytes((16, 12))
    files: list[tuple[str, Path]] = []
    k = 0
    for wnid in wnids:
        folder = root / split / wnid
        folder.mkdir(parents=True)
        n = 3 if wnid in many else 1
        for j in range(n):
            k += 1
            if n == 1:
                data, name = small, f"ILSVRC2012_val_{k:08d}.JPEG"
            elif j == 2:
                data, name = image_bytes(SIZES[k % 4], k, "PNG", "L"), f"ILSVRC2012_val_{k:08d}.png"
            else:
                data, name = image_bytes(SIZES[k % 4], k), f"ILSVRC2012_val_{k:08d}.JPEG"
            (folder / name).write_bytes(data)
    for wnid in wnids:
        for path in sorted((root / split / wnid).iterdir()):
            files.append((wnid, path))
    return files


def make_pets(root: Path, *, per_class=(2, 1), split: str = "test") -> list[tuple[str, int]]:
    """``<root>/oxford-iiit-pet/{images,annotations}`` with the split list in the real format. Classes get
    ``per_class[label % len(per_class)]`` images. Returns (image id, label) in list order."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int]] = []
    lines: list[str] = []
    breed_ids = {1: 0, 2: 0}
    for label, (raw, species) in enumerate(PETS_BREEDS):
        breed_ids[species] += 1
        for j in range(per_class[label % len(per_class)]):
            image_id = f"{raw}_{100 + j}"
            (base / "images" / f"{image_id}.jpg").write_bytes(image_bytes(SIZES[(label + j) % 4], label * 10 + j))
            lines.append(f"{image_id} {label + 1} {species} {breed_ids[species]}")
            rows.append((image_id, label))
    (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return rows


COCO_CATEGORIES = [  # in file order (not sorted by id), as in the real file's schema
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "indoor", "id": 90, "name": "toothbrush"},
    {"supercategory": "vehicle", "id": 2, "name": "bicycle"},
]
# image id -> category ids of its instance annotations (776 has none)
COCO_IMAGES = {397133: [1, 1, 18], 139: [1, 90, 3], 632: [2], 285: [18, 18], 776: [], 724: [3, 1]}
COCO_CAPTIONS = {
    139: ["A woman stands in the dining area at the table.", "A room with chairs, a table, and a woman in it."],
    285: ["A big burly grizzly bear is show with grass in the background.", "The large brown bear has a black nose.",
          "Closeup of a brown bear sitting in a grassy area."],
    632: ["Bedroom scene with a bookcase, blue comforter and window."],
    724: ["A stop sign is mounted upside-down on it's post. ", "A stop sign that is hanging upside down."],
    776: ["Three teddy bears, each a different color, snuggling together.", "Three stuffed animals are sitting."],
    397133: ["A man is in a kitchen making pizzas.", "Man in apron standing on front of oven with pans and bakeware",
             "A baker is working in the kitchen rolling dough."],
}


def make_coco(root: Path, *, split: str = "val") -> dict:
    """``<root>/{split}2017/*.jpg`` and ``<root>/annotations/{instances,captions}_{split}2017.json``."""
    (root / f"{split}2017").mkdir(parents=True)
    (root / "annotations").mkdir(parents=True)
    images, anns = [], []
    for k, (image_id, cats) in enumerate(COCO_IMAGES.items()):
        w, h = SIZES[k % 4]
        name = f"{image_id:012d}.jpg"
        (root / f"{split}2017" / name).write_bytes(image_bytes((w, h), k))
        images.append({"license": 1, "file_name": name, "coco_url": "", "height": h, "width": w,
                       "date_captured": "2013-11-14 17:02:52", "flickr_url": "", "id": image_id})
        for cid in cats:
            anns.append({"segmentation": [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]], "area": 8.0, "iscrowd": 0,
                         "image_id": image_id, "bbox": [1.0, 1.0, 4.0, 4.0], "category_id": cid,
                         "id": 1000 + len(anns)})
    instances = {"info": {"description": "fake COCO 2017"}, "licenses": [], "images": images,
                 "annotations": anns, "categories": COCO_CATEGORIES}
    # captions interleaved across images, as in the real file
    caps, n = [], max(len(c) for c in COCO_CAPTIONS.values())
    for j in range(n):
        for image_id, texts in COCO_CAPTIONS.items():
            if j < len(texts):
                caps.append({"image_id": image_id, "id": 5000 + len(caps), "caption": texts[j]})
    captions = {"info": {}, "licenses": [], "images": images, "annotations": caps}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(instances))
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(captions))
    return instances


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory):
    """A full fake ImageNet-1K val (1,000 class folders), read-only by convention."""
    from bigain.datamodules.prompts import imagenet100_wnids, imagenet_classes

    root = tmp_path_factory.mktemp("imagenet")
    wnids = [c.wnid for c in imagenet_classes()]
    many = {wnids[0], wnids[1], wnids[999], *list(imagenet100_wnids())[:5]}
    files = make_imagenet(root, wnids, many=many)
    return root, files


@pytest.fixture
def imagenet100_root(tmp_path):
    """A fake ImageNet-100 folder (100 class folders), private to the test."""
    from bigain.datamodules.prompts import imagenet100_wnids

    wnids = list(imagenet100_wnids())
    files = make_imagenet(tmp_path / "in100", wnids, many=set(wnids[:4]))
    return tmp_path / "in100", files


@pytest.fixture(scope="session")
def fakes():
    """The helpers above, for the test modules (which cannot import this conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(image_bytes=image_bytes, corrupt=corrupt, make_imagenet=make_imagenet,
                           make_pets=make_pets, make_coco=make_coco, PETS_BREEDS=PETS_BREEDS,
                           COCO_IMAGES=COCO_IMAGES, COCO_CAPTIONS=COCO_CAPTIONS, COCO_CATEGORIES=COCO_CATEGORIES)
