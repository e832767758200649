"""An example third-party bigain compressor: average-pooled keys and values."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bigain import Compressed, ConfigError, LayerContext, TokenCompressor

__all__ = ["AvgPoolKV"]


class AvgPoolKV(TokenCompressor):
    """Keys/values from the ``factor x factor`` average pooling of the attention input.

    Args:
        factor: pooling factor per axis; 1 leaves the layer unchanged.
    """

    name = "avgpool_kv"
    identity_params = {"factor": 1}

    def __init__(self, *, factor: int = 2) -> None:
        if not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"avgpool_kv: factor must be an integer >= 1, got {factor!r}")
        self.factor = factor

    def applies_to(self, ctx: LayerContext) -> bool:
        h, w = ctx.grid
        return h >= self.factor and w >= self.factor

    def compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        if self.factor == 1:
            return Compressed.identity(x)
        b, n, c = x.shape
        h, w = ctx.grid
        grid = x.transpose(1, 2).reshape(b, c, h, w)
        pooled = F.avg_pool2d(grid, kernel_size=self.factor, stride=self.factor)
        return Compressed(x, pooled.flatten(2).transpose(1, 2))
