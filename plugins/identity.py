"""``none``: the identity compressor, the uncompressed baseline of every comparison."""

from __future__ import annotations

from torch import Tensor

from bigain.compressor import Compressed, LayerContext, TokenCompressor

__all__ = ["Identity"]


class Identity(TokenCompressor):
    """No compression. Applying it installs the wrappers (so token counts are still measured) but
    every attention call goes to the original processor with its original arguments."""

    name = "none"
    identity_params = {}

    def __init__(self) -> None:
        pass

    def compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        return Compressed.identity(x)
