"""``bigain_td``: interpolate-extrapolate key/value downsampling (BiGain-TD, "IEKVD").

Keys and values come from a blend of the two classic downsamplers of the attention input::

    E' = alpha * nearest_exact(E) + (1 - alpha) * avg_pool(E) = avg_pool(E) + alpha * (NE(E) - AP(E))

``alpha = 1`` is ToDo, ``alpha = 0`` plain average pooling; ``alpha`` is not clamped, so
``alpha > 1`` extrapolates past nearest (sharpening the anchor by subtracting its neighbours) and
``alpha < 0`` past the average. For ``factor=2`` this is a fixed 2x2 kernel with weight
``(1 + 3 alpha)/4`` on the bottom-right token and ``(1 - alpha)/4`` on each of the other three.

``alpha_schedule=(start, end)`` makes alpha depend on each sample's own timestep:
``alpha(t) = start * t/(T-1) + end * (1 - t/(T-1))``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from bigain.compressor import LayerContext
from bigain.errors import ConfigError
from bigain.plugins._kv import KVDownsample
from bigain.plugins.todo import nearest_exact

__all__ = ["BiGainTD"]


class BiGainTD(KVDownsample):
    """Interpolate-extrapolate key/value downsampling.

    Args:
        factor: downsampling factor per axis (1 is no-op).
        alpha: blend weight of nearest-exact against average pooling; unclamped. 0.9 is the paper's
            classification setting.
        alpha_schedule: optional ``(alpha at t = T-1, alpha at t = 0)``; overrides ``alpha``.
    """

    name = "bigain_td"

    def __init__(self, *, factor: int = 2, alpha: float = 0.9,
                 alpha_schedule: tuple[float, float] | None = None) -> None:
        super().__init__(factor=factor)
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ConfigError(f"bigain_td: alpha must be a finite number, got {alpha!r}")
        if alpha_schedule is not None:
            if len(alpha_schedule) != 2 or not all(math.isfinite(float(a)) for a in alpha_schedule):
                raise ConfigError(
                    "bigain_td: alpha_schedule must be two finite numbers (alpha at t=T-1, alpha at t=0), "
                    f"for example [0.1, 0.9]; got {alpha_schedule!r}"
                )
            alpha_schedule = (float(alpha_schedule[0]), float(alpha_schedule[1]))
        self.alpha = float(alpha)
        self.alpha_schedule = alpha_schedule

    def alpha_for(self, ctx: LayerContext) -> Tensor | float:
        """The blend weight: a float, or ``[B, 1, 1, 1]`` when a schedule is set."""
        if self.alpha_schedule is None:
            return self.alpha
        start, end = self.alpha_schedule
        frac = (ctx.timesteps.float() / (ctx.num_train_timesteps - 1)).view(-1, 1, 1, 1)
        return start * frac + end * (1.0 - frac)

    def downsample(self, grid_tokens: Tensor, ctx: LayerContext) -> Tensor:
        f = self.factor
        h, w = grid_tokens.shape[-2:]
        ne = nearest_exact(grid_tokens, f)
        ap = F.avg_pool2d(grid_tokens[..., : (h // f) * f, : (w // f) * f], kernel_size=f, stride=f)
        alpha = self.alpha_for(ctx)
        if isinstance(alpha, Tensor):
            alpha = alpha.to(grid_tokens.dtype)
        return ap + alpha * (ne - ap)
