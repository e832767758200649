"""Counter-based random numbers: a pure function of integer keys, computed with tensor arithmetic.

A draw is ``hash(key words..., position)``: no generator state, no host round trip, nothing that
``torch.compile`` cannot trace or a CUDA graph cannot replay. The hash is MurmurHash3's 32-bit mixing
written with int64 tensor operations that never overflow (products stay below 2**49), so the same key
gives bit-identical integers on every device and in every process. Normal draws go through a float64
Box-Muller transform and are rounded to float32 once, so they agree across devices to the last bit in
all but rare rounding cases (at most one float32 ulp).

Keys are per sample: a ``[B]`` tensor word (for example each sample's quantised timestep) beside
Python-int words shared by the batch (seed, layer, stream). A sample's draw therefore depends on its
own key only, never on the batch it sits in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["MASK32", "hash_words", "keyed_randint", "keyed_randn", "split_seed", "quantize_timesteps"]

MASK32 = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593
_F1, _F2 = 0x85EBCA6B, 0xC2B2AE35
_SEED0 = 0x9747B28C


# The mixing steps below take int64 tensors or Python ints alike (the operators are the same), so the
# words shared by the batch are hashed on the host, with no kernel, before the first tensor word.

def _mul32(a, c: int):
    """``(a * c) mod 2**32`` for ``a`` in ``[0, 2**32)`` (int64 tensor or int) and a 32-bit constant ``c``."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & MASK32


def _rotl32(a, k: int):
    return ((a << k) | (a >> (32 - k))) & MASK32


def _absorb(h, word):
    """One MurmurHash3 block step: mix ``word`` into the running hash ``h``."""
    k = _rotl32(_mul32(word & MASK32, _C1), 15)
    h = _rotl32(h ^ _mul32(k, _C2), 13)
    return (_mul32(h, 5) + 0xE6546B64) & MASK32


def _finalize(h, length: int):
    h = h ^ length
    h = _mul32(h ^ (h >> 16), _F1)
    h = _mul32(h ^ (h >> 13), _F2)
    return h ^ (h >> 16)


def hash_words(words: Sequence[Tensor | int], *, device: torch.device | None = None) -> Tensor:
    """The 32-bit hash (int64 values in ``[0, 2**32)``) of a sequence of words, broadcast together.

    Each word is an int64 tensor or a Python int; only its low 32 bits count. Python-int words are
    mixed in on the host, so a key whose batch-wide words come first costs the GPU only the steps
    from its first tensor word on.
    """
    h: Tensor | int = _SEED0
    for word in words:
        h = _absorb(h, word.to(torch.int64) if isinstance(word, Tensor) else int(word))
    h = _finalize(h, 4 * len(words))
    return h if isinstance(h, Tensor) else torch.tensor(h, dtype=torch.int64, device=device)


def split_seed(seed: int) -> tuple[int, int]:
    """A non-negative seed of up to 64 bits as two 32-bit words."""
    seed = int(seed) & ((1 << 64) - 1)
    return seed & MASK32, seed >> 32


def quantize_timesteps(timesteps: Tensor) -> Tensor:
    """``[B]`` timesteps as int64 key words: ``round(t * 1024)``, so float noise in a timestep
    (``500.0`` vs ``500.00003``) does not change a draw, while timesteps 1e-3 apart get their own."""
    return torch.round(timesteps.to(torch.float64) * 1024).to(torch.int64) & MASK32


def _positions(key: Tensor, size: Sequence[int], salt: int) -> Tensor:
    """``[B, *size]`` hashes of ``(key[b], salt, position)`` for every position of ``size``."""
    count = math.prod(size)
    pos = torch.arange(count, dtype=torch.int64, device=key.device)
    h = _absorb(_absorb(key.reshape(-1, 1), salt), pos)
    return _finalize(h, 4 * 3).reshape(key.shape[0], *size)


def keyed_randint(key: Tensor, high: int, size: Sequence[int]) -> Tensor:
    """``[B, *size]`` int64 integers in ``[0, high)``, one independent draw per row of ``key`` (``[B]``,
    from :func:`hash_words`). Uniform to within ``high / 2**32``."""
    if not 1 <= int(high) <= 2**31:
        raise ValueError(f"high must lie in [1, 2**31], got {high}")
    return (_positions(key, size, 0x52414E44) * int(high)) >> 32


def keyed_randn(key: Tensor, size: Sequence[int]) -> Tensor:
    """``[B, *size]`` float32 standard normals, one independent draw per row of ``key`` (``[B]``)."""
    wide = torch.float32 if key.device.type == "mps" else torch.float64  # MPS has no float64
    u1 = (_positions(key, size, 0x4E4F5231).to(wide) + 0.5) * 2.0**-32
    u2 = (_positions(key, size, 0x4E4F5232).to(wide) + 0.5) * 2.0**-32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).to(torch.float32)
