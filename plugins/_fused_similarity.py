"""Fused similarity search: each row's best cosine match without the ``[B, Na, Nb]`` similarity matrix.

The merging and pruning methods need, for every row of ``a`` (``[B, Na, C]`` unit vectors), its highest
similarity to a row of ``b`` (``[B, Nb, C]``) and that row's index. The eager path builds the matrix (in
bounded blocks, :func:`bigain.plugins._tokens.most_similar`) and reduces it; at SD 2.0's first level at
1024 px, batch 8, that is 1.6 GB of float32 written and read back per layer call. The Triton kernel here
tiles ``a`` by rows and walks ``b`` in tiles, accumulating each ``a_tile @ b_tile^T`` in float32 in registers
and keeping only a running row maximum and its index: the matrix never reaches memory.

It is registered as the custom operator ``bigain::most_similar_fused``, so ``torch.compile`` sees one opaque
node (no graph break, no host sync; it is captured by CUDA graphs). On a CUDA device the kernel is compiled
by Triton; on the CPU it runs only in Triton's interpreter (``TRITON_INTERPRET=1`` set before Python
starts), which is exact and slow: for testing the kernel against the eager reference without a GPU.

Results equal the eager path's up to float32 summation order (about 1e-6 on a similarity); ties go to the
lowest index, as ``torch.max`` gives them. float32 inputs are multiplied in IEEE float32 (never TF32);
float16/bfloat16 inputs on the tensor cores with float32 accumulation.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from bigain.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the blocked eager path serves
    triton = tl = None

__all__ = ["fused_available", "check_fused_available", "interpreting", "most_similar_fused",
           "BLOCK_M", "BLOCK_N", "BLOCK_K"]

#: Tile sizes: rows of ``a`` per program, rows of ``b`` per step, channels per step.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


def fused_available() -> bool:
    """Whether Triton can be imported (it comes with CUDA builds of torch)."""
    return triton is not None


def check_fused_available(method: str) -> None:
    if not fused_available():
        raise ConfigError(f"{method}: similarity='fused' needs Triton, which is not installed; install a CUDA build "
                          f"of torch (it brings Triton) or `pip install triton`, or use similarity='blocked'")


def _row_max_kernel(a_ptr, b_ptr, val_ptr, idx_ptr, na, nb, c,
                    s_ab, s_am, s_ak, s_bb, s_bn, s_bk, s_vb, s_vm, s_ib, s_im,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    batch = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_M], 0, tl.int32)
    a_base = a_ptr + batch * s_ab
    b_base = b_ptr + batch * s_bb
    for n0 in range(0, nb, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for k0 in range(0, c, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_base + rm[:, None] * s_am + rk[None, :] * s_ak,
                        mask=(rm[:, None] < na) & (rk[None, :] < c), other=0.0)
            b = tl.load(b_base + rn[None, :] * s_bn + rk[:, None] * s_bk,
                        mask=(rn[None, :] < nb) & (rk[:, None] < c), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        acc = tl.where(rn[None, :] < nb, acc, float("-inf"))
        tile_best = tl.max(acc, axis=1)
        tile_idx = tl.argmax(acc, axis=1, tie_break_left=True) + n0
        better = tile_best > best  # strict: an equal value in a later tile keeps the earlier, lower index
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    keep = rm < na
    tl.store(val_ptr + batch * s_vb + rm * s_vm, best, mask=keep)
    tl.store(idx_ptr + batch * s_ib + rm * s_im, best_idx.to(tl.int64), mask=keep)


@functools.cache
def _kernel():
    return triton.jit(_row_max_kernel)  # Triton's interpreter instead when TRITON_INTERPRET=1 was set at import


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` set before it was imported)."""
    try:
        from triton import knobs
    except ImportError:  # Triton before 3.2 read the variable directly
        import os

        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


_failed_on_cuda: list[str] = []


def _launch(a: Tensor, b: Tensor, values: Tensor, indices: Tensor) -> None:
    kernel = _kernel()
    precision = "ieee" if a.dtype is torch.float32 else "tf32"  # tf32 only names fp32 inputs; halves are exact
    grid = (triton.cdiv(a.shape[1], BLOCK_M), a.shape[0])
    kernel[grid](a, b, values, indices, a.shape[1], b.shape[1], a.shape[2],
                 *a.stride(), *b.stride(), *values.stride(), *indices.stride(),
                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=precision)


@torch.library.custom_op("bigain::most_similar_fused", mutates_args=())
def most_similar_fused(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Row maxima of ``a @ b^T`` and their indices (float32 ``[B, Na]``, long ``[B, Na]``), fused.

    ``a`` ``[B, Na, C]`` and ``b`` ``[B, Nb, C]`` of one dtype (float32, float16 or bfloat16), on a CUDA
    device (compiled kernel) or the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter). Should the
    kernel fail to compile on a GPU, one warning says why and the eager path answers from then on.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"most_similar_fused: a [B, Na, C] and b [B, Nb, C] expected, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"most_similar_fused: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if not (a.is_cuda or (a.device.type == "cpu" and triton is not None and interpreting())):
        raise ValueError(f"most_similar_fused runs on a CUDA device, or on the CPU in Triton's interpreter "
                         f"(TRITON_INTERPRET=1 in the environment before Python starts; slow, for testing), not on "
                         f"{a.device.type}; use similarity='blocked' there")
    values = torch.empty(a.shape[:2], dtype=torch.float32, device=a.device)
    indices = torch.empty(a.shape[:2], dtype=torch.long, device=a.device)
    if a.shape[1] == 0 or b.shape[1] == 0:
        return values.fill_(float("-inf")), indices.zero_()
    if a.is_cuda and _failed_on_cuda:
        return _eager(a, b)
    try:
        _launch(a, b, values, indices)
    except Exception as exc:  # a Triton or driver that cannot build the kernel: fall back, once, loudly
        if not a.is_cuda:
            raise
        _failed_on_cuda.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"bigain: the fused similarity kernel failed on this GPU ({_failed_on_cuda[0]}); the eager "
                      f"similarity search is used instead. Please report it.", RuntimeWarning, stacklevel=2)
        return _eager(a, b)
    return values, indices


def _eager(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    from bigain.plugins._tokens import most_similar

    return most_similar(a, b)


@most_similar_fused.register_fake
def _(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return (a.new_empty(a.shape[:2], dtype=torch.float32), a.new_empty(a.shape[:2], dtype=torch.long))
