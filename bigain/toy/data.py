"""The procedural "shapes & textures" toy dataset.

Every image is a pure function of ``(seed, index)``: nothing is stored on disk, and the same index
gives the same image on every machine. Half of the ten classes differ only in a fine texture
(stripe period and direction, checker size, dot grid) painted at low contrast inside a random disk
or rectangle; the other half differ only in a coarse solid shape. Position, scale, colours and a
faint background clutter are random, so neither kind of class can be told apart from one cue alone.

Labels cycle with the index (``label = index % 10``), so every prefix of the split is balanced.
Train and test use disjoint seeds (:data:`TRAIN_SEED`, :data:`TEST_SEED`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "TOY_CLASSES",
    "TEXTURE_CLASSES",
    "SHAPE_CLASSES",
    "TRAIN_SEED",
    "TEST_SEED",
    "IMAGE_SIZE",
    "render",
    "ToyShapes",
    "toy_prompts",
]

IMAGE_SIZE = 32
TRAIN_SEED = 1_000
TEST_SEED = 2_000

#: Class names, in label order.
TOY_CLASSES: tuple[str, ...] = (
    "horizontal stripes (2 px)",
    "horizontal stripes (3 px)",
    "vertical stripes (2 px)",
    "checkerboard (1 px)",
    "dot grid (3 px)",
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
)
TEXTURE_CLASSES = (0, 1, 2, 3, 4)
SHAPE_CLASSES = (5, 6, 7, 8, 9)


def toy_prompts() -> list[str]:
    """One prompt per class, for CLIP-style metrics and records."""
    return [f"a toy image of a {name}" for name in TOY_CLASSES]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys + 0.5, xs + 0.5


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour at least moderately apart."""
    bg = rng.uniform(0.0, 1.0, 3)
    for _ in range(64):
        fg = rng.uniform(0.0, 1.0, 3)
        if np.abs(fg - bg).sum() > 0.9:
            return bg, fg
    return bg, 1.0 - bg


def _texture(label: int, ys: np.ndarray, xs: np.ndarray, phase: tuple[int, int]) -> np.ndarray:
    yi = np.floor(ys).astype(np.int64) + phase[0]
    xi = np.floor(xs).astype(np.int64) + phase[1]
    if label == 0:
        return ((yi // 1) % 2 == 0).astype(np.float32)
    if label == 1:
        return ((yi % 3) == 0).astype(np.float32)
    if label == 2:
        return ((xi % 2) == 0).astype(np.float32)
    if label == 3:
        return ((yi + xi) % 2 == 0).astype(np.float32)
    if label == 4:
        return (((yi % 3) == 0) & ((xi % 3) == 0)).astype(np.float32)
    raise ValueError(label)


def _shape_mask(label: int, ys, xs, cy, cx, radius, rng) -> np.ndarray:
    dy, dx = ys - cy, xs - cx
    if label == 5:  # circle
        return (dy**2 + dx**2) <= radius**2
    if label == 6:  # square
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if label == 7:  # upward triangle
        top, base = cy - radius, cy + radius * 0.8
        frac = (ys - top) / max(base - top, 1e-6)
        return (ys >= top) & (ys <= base) & (np.abs(dx) <= frac * radius)
    if label == 8:  # cross
        arm = radius * 0.33
        inside = (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
        return inside & ((np.abs(dy) <= arm) | (np.abs(dx) <= arm))
    if label == 9:  # ring
        r2 = dy**2 + dx**2
        return (r2 <= radius**2) & (r2 >= (radius * 0.55) ** 2)
    raise ValueError(label)


def render(seed: int, index: int, *, size: int = IMAGE_SIZE) -> tuple[np.ndarray, int]:
    """Render image ``index`` of the split seeded by ``seed``.

    Returns:
        ``(image, label)`` with ``image`` a ``float32`` array ``[size, size, 3]`` in ``[0, 1]``.
    """
    if index < 0:
        raise IndexError(f"toy index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed), int(index)])
    label = int(index % len(TOY_CLASSES))
    ys, xs = _grid(size)
    bg, fg = _colour_pair(rng)
    img = np.broadcast_to(bg, (size, size, 3)).copy()

    # Faint background clutter: a few translucent bars and blobs in random colours.
    for _ in range(int(rng.integers(2, 5))):
        colour = rng.uniform(0.0, 1.0, 3)
        alpha = rng.uniform(0.10, 0.25)
        y0, x0 = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            h, w = rng.uniform(1, 4), rng.uniform(4, 14)
            if rng.random() < 0.5:
                h, w = w, h
            mask = (np.abs(ys - y0) <= h / 2) & (np.abs(xs - x0) <= w / 2)
        else:
            mask = (ys - y0) ** 2 + (xs - x0) ** 2 <= rng.uniform(1.5, 4.0) ** 2
        img[mask] = (1 - alpha) * img[mask] + alpha * colour

    radius = rng.uniform(0.22, 0.36) * size
    margin = radius + 1
    cy, cx = rng.uniform(margin, size - margin, 2)
    if label in TEXTURE_CLASSES:
        if rng.random() < 0.5:
            region = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
        else:
            hy, hx = radius * rng.uniform(0.7, 1.0), radius * rng.uniform(0.7, 1.0)
            region = (np.abs(ys - cy) <= hy) & (np.abs(xs - cx) <= hx)
        phase = (int(rng.integers(0, 6)), int(rng.integers(0, 6)))
        pattern = _texture(label, ys, xs, phase)
        contrast = rng.uniform(0.35, 0.7)
        second = fg + contrast * (bg - fg)  # the texture's other colour, pulled toward the background
        tex = pattern[..., None] * fg + (1 - pattern[..., None]) * second
        img[region] = tex[region]
    else:
        mask = _shape_mask(label, ys, xs, cy, cx, radius, rng)
        img[mask] = fg

    img = img + rng.normal(0.0, 0.03, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), label


class ToyShapes(Dataset):
    """A deterministic, file-free split of the toy dataset.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint seeds).
        length: number of images in the split.
        seed: overrides the split's seed (for experiments).

    Items are ``{"index", "image" (float32 [3, 32, 32] in [-1, 1]), "label", "prompt"}``.
    """

    def __init__(self, split: str = "test", *, length: int = 1_000, seed: int | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"toy split must be 'train' or 'test', got {split!r}")
        if length < 1:
            raise ValueError(f"toy length must be >= 1, got {length}")
        self.split = split
        self.length = int(length)
        self.seed = int(seed) if seed is not None else (TRAIN_SEED if split == "train" else TEST_SEED)
        self._prompts = toy_prompts()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"toy index {index} is outside the split of {self.length} images")
        img, label = render(self.seed, index)
        image = torch.from_numpy(img).permute(2, 0, 1) * 2.0 - 1.0
        return {"index": index, "image": image, "label": label, "prompt": self._prompts[label]}

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, 32, 32]`` in ``[-1, 1]`` and labels ``[B]`` for a list of indices."""
        items = [self[int(i)] for i in indices]
        return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
