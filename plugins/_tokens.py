"""Tensor helpers shared by the built-in compressors: grids, stride cells, bipartite merging.

Pure functions on tensors, no module state. Tokens are ``[B, N, C]`` laid out row-major on an
``h x w`` grid (token ``n = row * w + col``); grids need be neither square nor divisible by the
stride. Edge rows and columns that do not fill a whole ``sy x sx`` cell never hold a destination.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bigain.errors import ConfigError

__all__ = [
    "check_stride",
    "check_ratio",
    "check_factor",
    "to_grid",
    "from_grid",
    "gather_tokens",
    "cell_counts",
    "cell_values",
    "dst_mask",
    "split_by_mask",
    "unit_vectors",
    "similarities",
    "most_similar",
    "check_similarity",
    "SIMILARITY_SEARCHES",
    "BipartiteMerge",
    "bipartite_soft_matching",
]


def check_stride(sx: int, sy: int) -> None:
    for name, value in (("sx", sx), ("sy", sy)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer (the stride cell size), got {value!r}")


def check_ratio(ratio: float, sx: int, sy: int, *, method: str) -> None:
    """A merge/prune ratio must leave one destination per ``sy x sx`` cell."""
    check_stride(sx, sy)
    limit = 1.0 - 1.0 / (sx * sy)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        raise ConfigError(f"{method}: ratio must be a number in [0, {limit:g}] (the fraction of tokens merged "
                          f"or pruned), got {ratio!r}")
    if not 0.0 <= ratio <= limit + 1e-12:
        raise ConfigError(
            f"{method}: ratio={ratio!r} is out of range: with a {sy}x{sx} stride cell one token in "
            f"{sx * sy} must stay a destination, so the ratio must lie in [0, {limit:g}]. "
            f"Lower the ratio, or enlarge the cell (sx, sy) to remove more tokens."
        )


def check_factor(factor: int, *, method: str) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ConfigError(
            f"{method}: factor must be a positive integer (keys/values are downsampled by it along "
            f"each axis; 1 means no downsampling), got {factor!r}"
        )


def to_grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, N, C]`` -> ``[B, C, h, w]``."""
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, grid[0], grid[1])


def from_grid(g: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h*w, C]``."""
    return g.flatten(2).transpose(1, 2)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, i], :]`` for ``x`` ``[B, N, C]`` and ``idx`` ``[B, M]``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def cell_counts(grid: tuple[int, int], sx: int, sy: int) -> tuple[int, int]:
    """Number of whole ``sy x sx`` cells along each axis: ``(h // sy, w // sx)``."""
    return grid[0] // sy, grid[1] // sx


def cell_values(values: Tensor, sx: int, sy: int, *, legacy_grouping: bool = False) -> Tensor:
    """Group per-token values ``[B, h, w]`` into cells: ``[B, h//sy, w//sx, sy*sx]``.

    Entry ``k`` of a cell is the token at in-cell offset ``(k // sx, k % sx)``.

    With ``legacy_grouping=True`` the values are grouped as the released BiGain code does
    (``merge.py:969``): without the transpose, so each "cell" is ``sy*sx`` consecutive values of a
    ``sy x w`` slab (1x4 horizontal strips for a 2x2 cell), whose argmin is then written into the
    true cell with the same index. Kept only to reproduce the released numbers.
    """
    b, h, w = values.shape
    hs, ws = h // sy, w // sx
    cropped = values[:, : hs * sy, : ws * sx]
    if legacy_grouping:
        return cropped.reshape(b, hs, sy, ws, sx).reshape(b, hs, ws, sy * sx)
    return cropped.reshape(b, hs, sy, ws, sx).permute(0, 1, 3, 2, 4).reshape(b, hs, ws, sy * sx)


def dst_mask(choice: Tensor, grid: tuple[int, int], sx: int, sy: int) -> Tensor:
    """Boolean ``[B, N]`` mask of destinations, one per cell at in-cell offset ``choice``.

    Args:
        choice: ``[B, h//sy, w//sx]`` integers in ``[0, sy*sx)``.
    """
    h, w = grid
    b, hs, ws = choice.shape
    dev = choice.device
    rows = torch.arange(hs, device=dev).view(1, hs, 1) * sy + torch.div(choice, sx, rounding_mode="floor")
    cols = torch.arange(ws, device=dev).view(1, 1, ws) * sx + choice % sx
    flat = (rows * w + cols).reshape(b, hs * ws)
    mask = torch.zeros(b, h * w, dtype=torch.bool, device=dev)
    return mask.scatter_(1, flat, True)


def split_by_mask(is_dst: Tensor, d: int | None = None) -> tuple[Tensor, Tensor]:
    """Indices of sources ``a_idx [B, N-D]`` and destinations ``b_idx [B, D]``, each in raster order.

    Every row of ``is_dst`` must hold the same number ``D`` of destinations. Pass ``d`` when it is
    known (one per whole cell): counting it reads the mask back to the host, a device sync per call.
    """
    if d is None:
        d = int(is_dst[0].sum())
    order = torch.argsort((~is_dst).to(torch.uint8), dim=1, stable=True)
    return order[:, d:], order[:, :d]


@dataclass(frozen=True)
class BipartiteMerge:
    """The result of matching sources to destinations: ``merge`` and its inverse ``unmerge``.

    ``merge`` returns ``[unmerged sources | destinations]`` where each destination is the plain mean
    of itself and the sources merged into it (every token counts once, as in ToMe-SD, which is exact
    because merging is recomputed from scratch at every layer). ``unmerge`` copies each output back
    to every token it stands for.
    """

    a_idx: Tensor  # [B, Ns] sources
    b_idx: Tensor  # [B, D] destinations
    unm_idx: Tensor  # [B, Ns - r] positions in a_idx kept as they are
    src_idx: Tensor  # [B, r] positions in a_idx merged away
    dst_idx: Tensor  # [B, r] positions in b_idx they merge into

    @property
    def num_tokens(self) -> int:
        return self.a_idx.shape[1] + self.b_idx.shape[1]

    @property
    def num_kept(self) -> int:
        return self.unm_idx.shape[1] + self.b_idx.shape[1]

    def merge(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        src = gather_tokens(x, self.a_idx)
        dst = gather_tokens(x, self.b_idx)
        unm = gather_tokens(src, self.unm_idx)
        moved = gather_tokens(src, self.src_idx)
        dst = dst.scatter_reduce(1, self.dst_idx.unsqueeze(-1).expand(-1, -1, c), moved,
                                 reduce="mean", include_self=True)
        return torch.cat([unm, dst], dim=1)

    def unmerge(self, y: Tensor) -> Tensor:
        b, _, c = y.shape
        n_unm = self.unm_idx.shape[1]
        unm, dst = y[:, :n_unm], y[:, n_unm:]
        out = y.new_empty(b, self.num_tokens, c)
        out.scatter_(1, self.b_idx.unsqueeze(-1).expand(-1, -1, c), dst)
        unm_pos = self.a_idx.gather(1, self.unm_idx)
        out.scatter_(1, unm_pos.unsqueeze(-1).expand(-1, -1, c), unm)
        src_pos = self.a_idx.gather(1, self.src_idx)
        out.scatter_(1, src_pos.unsqueeze(-1).expand(-1, -1, c), gather_tokens(dst, self.dst_idx))
        return out


_HALF = (torch.float16, torch.bfloat16)
# decided once, at import: a try/except around the call would be re-evaluated inside compiled graphs
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


def unit_vectors(metric: Tensor) -> Tensor:
    """``metric`` normalised to unit length along channels, for cosine similarities.

    Normalised in float32. On a GPU, when the model runs in half precision (the metric is fp16 or
    bf16), the unit vectors are returned in fp16 so that :func:`similarities` can run on the tensor
    cores; everywhere else they stay float32.
    """
    m = F.normalize(metric.float(), dim=-1)
    if metric.is_cuda and metric.dtype in _HALF:
        return m.half()
    return m


def similarities(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities ``a @ b^T`` (``[B, Na, Nb]``, float32) of unit vectors from :func:`unit_vectors`.

    fp16 unit vectors (a half-precision model on a GPU) are multiplied on the tensor cores with
    float32 accumulation and a float32 result, so near-equal similarities are not rounded into ties
    (``tomesd`` rounds them to fp16); the inputs carry fp16's 11-bit precision, about 1e-4 on a
    similarity. float32 unit vectors are multiplied in float32.
    """
    bt = b.transpose(1, 2)
    if a.dtype is torch.float16:
        if _BMM_OUT_DTYPE:
            return torch.bmm(a, bt, out_dtype=torch.float32)
        return torch.bmm(a.float(), bt.float())  # a torch without bmm(out_dtype=)
    return a @ bt


#: Largest float32 similarity block :func:`most_similar` materialises at once (bytes).
SIMILARITY_CHUNK_BYTES = 256 * 2**20


SIMILARITY_SEARCHES = ("blocked", "fused")


def check_similarity(similarity: str, *, method: str) -> None:
    """Validate a compressor's ``similarity`` option (see :func:`most_similar`)."""
    if similarity not in SIMILARITY_SEARCHES:
        raise ConfigError(f"{method}: similarity must be 'blocked' (the eager search, the default) or 'fused' (a "
                          f"Triton kernel for CUDA GPUs), got {similarity!r}")
    if similarity == "fused":
        from bigain.plugins._fused_similarity import check_fused_available

        check_fused_available(method)


def most_similar(a: Tensor, b: Tensor, *, similarity: str = "blocked") -> tuple[Tensor, Tensor]:
    """For each row of ``a`` (``[B, Na, C]``), its highest similarity to a row of ``b`` (``[B, Nb, C]``)
    and that row's index: float32 ``[B, Na]`` and long ``[B, Na]``; ties go to the lowest index.

    ``similarity="blocked"``: the ``[B, Na, Nb]`` similarity matrix is built in blocks of rows of at
    most :data:`SIMILARITY_CHUNK_BYTES`, so its memory stays bounded at high resolution and batch size
    (SD 2.0 at 1024 px, batch 8: 1.6 GB in one piece); small problems take one block.
    ``similarity="fused"``: a Triton kernel that keeps only each row's running maximum, so the matrix
    is never written (:mod:`bigain.plugins._fused_similarity`); equal to the blocked search up to
    float32 summation order.
    """
    if similarity == "fused":
        from bigain.plugins._fused_similarity import most_similar_fused

        return most_similar_fused(a, b)
    rows = max(1, SIMILARITY_CHUNK_BYTES // max(1, 4 * a.shape[0] * b.shape[1]))
    if rows >= a.shape[1]:
        return similarities(a, b).max(dim=-1)
    parts = [similarities(chunk, b).max(dim=-1) for chunk in a.split(rows, dim=1)]
    return torch.cat([p.values for p in parts], dim=1), torch.cat([p.indices for p in parts], dim=1)


def bipartite_soft_matching(metric: Tensor, a_idx: Tensor, b_idx: Tensor, r: int, *,
                            similarity: str = "blocked") -> BipartiteMerge:
    """ToMe's matching: each source picks its most cosine-similar destination (global search); the
    ``r`` sources with the highest such similarity are merged, the others kept.

    Similarities are float32 (see :func:`similarities` for a half-precision model on a GPU);
    ``similarity`` picks the search (see :func:`most_similar`).
    """
    m = unit_vectors(metric)
    node_max, node_idx = most_similar(gather_tokens(m, a_idx), gather_tokens(m, b_idx), similarity=similarity)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_idx = edge_idx[:, :r]
    return BipartiteMerge(
        a_idx=a_idx,
        b_idx=b_idx,
        unm_idx=edge_idx[:, r:],
        src_idx=src_idx,
        dst_idx=node_idx.gather(1, src_idx),
    )
