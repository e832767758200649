"""The adaptive Diffusion Classifier protocol (Li et al., 2023), as pure functions.

An image is classified by noising it at a grid of timesteps and asking the denoiser, once per class,
how well it predicts the noise: the class with the lowest mean error wins. The grid indexes the
model's training schedule (``0 .. T - 1``); how an index noises an image is the backbone's
(``alphas_cumprod`` for DDPM-trained models, the shifted sigmas of a flow-matching one, see
:meth:`bigain.backbones.DiffusionBackbone.add_noise`). Stages prune classes
early: stage ``k`` scores the surviving classes at ``n_samples[k]`` timesteps (reusing the ones
already scored) and keeps the ``to_keep[k]`` best.

Noise is drawn per image from a generator seeded by ``(seed, dataset index)``, on the CPU: the noise
for a given (image, timestep, trial) is the same for every class, every compressor, every batch size,
device count and run order - comparisons are paired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bigain.backbones.base import ddpm_noise
from bigain.compressor import derive_seed
from bigain.errors import ConfigError

__all__ = ["AdaptiveSchedule", "ClassificationResult", "image_noise", "classify_image", "average_precision"]

Loss = Literal["l2", "l1", "huber"]


@dataclass(frozen=True)
class AdaptiveSchedule:
    """Timesteps of each stage and how many classes survive it.

    Args:
        n_samples: timesteps scored per stage (cumulative), e.g. ``(5, 20)``.
        to_keep: classes kept after each stage, non-increasing and ending at 1, e.g. ``(5, 1)``.
        num_train_timesteps: ``T`` of the model's noise schedule.
        n_trials: noise draws per timestep.
    """

    n_samples: tuple[int, ...] = (5, 20)
    to_keep: tuple[int, ...] = (5, 1)
    num_train_timesteps: int = 1000
    n_trials: int = 1

    def __post_init__(self) -> None:
        ns, tk = tuple(self.n_samples), tuple(self.to_keep)
        object.__setattr__(self, "n_samples", ns)
        object.__setattr__(self, "to_keep", tk)
        if not ns or len(ns) != len(tk):
            raise ConfigError(
                f"n_samples {list(ns)} and to_keep {list(tk)} must be non-empty lists of the same length "
                f"(one entry per stage), for example n_samples=[5, 20] to_keep=[5, 1]"
            )
        if any(not isinstance(s, int) or s < 1 for s in ns) or list(ns) != sorted(ns):
            raise ConfigError(f"n_samples {list(ns)} must be positive integers in increasing order")
        if any(not isinstance(k, int) or k < 1 for k in tk) or list(tk) != sorted(tk, reverse=True) or tk[-1] != 1:
            raise ConfigError(
                f"to_keep {list(tk)} must be positive, non-increasing, and end at 1 (the prediction), "
                f"for example [5, 1]"
            )
        if max(ns) > self.num_train_timesteps:
            raise ConfigError(f"n_samples asks for {max(ns)} timesteps; the model has {self.num_train_timesteps}")
        if self.n_trials < 1:
            raise ConfigError(f"n_trials must be >= 1, got {self.n_trials}")

    @property
    def grid(self) -> list[int]:
        """``[D//2 + m*D for m in 0..M-1]`` with ``M = max(n_samples)``, ``D = T // M``."""
        m = max(self.n_samples)
        step = self.num_train_timesteps // m
        return [step // 2 + i * step for i in range(m)]

    def stage_timesteps(self) -> list[list[int]]:
        """The timesteps each stage adds (a stage never re-scores a timestep)."""
        grid, m = self.grid, max(self.n_samples)
        done: list[int] = []
        stages = []
        for s in self.n_samples:
            stride = m // s
            new = [t for t in grid[stride // 2 :: stride][:s] if t not in done]
            stages.append(new)
            done += new
        return stages

    def evaluations(self, num_classes: int) -> int:
        """Denoiser evaluations (samples) spent per image."""
        alive, total = num_classes, 0
        for ts, keep in zip(self.stage_timesteps(), self.to_keep):
            total += alive * len(ts) * self.n_trials
            alive = min(alive, keep)
        return total


def image_noise(seed: int, index: int, schedule: AdaptiveSchedule, shape: Sequence[int]) -> Tensor:
    """float32 noise ``[M * n_trials, *shape]`` for one image; row ``m * n_trials + k`` belongs to
    timestep ``grid[m]``, trial ``k``. Drawn on the CPU, so it is the same on every device."""
    gen = torch.Generator().manual_seed(derive_seed("classify-noise", int(seed), int(index)))
    return torch.randn((len(schedule.grid) * schedule.n_trials, *shape), generator=gen)


@dataclass
class ClassificationResult:
    prediction: int
    ranking: list[int]  # every class, best first: later stage survivors first, then by mean error
    mean_errors: dict[int, float]  # the classes scored in the last stage, best first
    evaluations: int = 0
    forward_calls: int = 0
    all_mean_errors: dict[int, float] = field(default_factory=dict)


def _loss(pred: Tensor, target: Tensor, kind: Loss) -> Tensor:
    if kind == "l2":
        per = (pred - target).pow(2)
    elif kind == "l1":
        per = (pred - target).abs()
    else:
        per = F.huber_loss(pred, target, reduction="none", delta=1.0)
    return per.flatten(1).mean(dim=1)


def classify_image(
    x0: Tensor,
    noise: Tensor,
    *,
    schedule: AdaptiveSchedule,
    num_classes: int,
    alphas_cumprod: Tensor | None = None,
    predict: Callable[[Tensor, Tensor, Tensor], Tensor],
    loss: Loss = "l2",
    batch_size: int = 32,
    fixed_batch: bool = False,
    target: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    add_noise: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> ClassificationResult:
    """Classify one image.

    Args:
        x0: float32 ``[C, h, w]`` clean sample in the model's space.
        noise: from :func:`image_noise`.
        predict: ``(x_t [b, C, h, w] float32, t [b] long, classes [b] long) -> float32``: the
            noise ``eps`` (or whatever ``target`` returns).
        batch_size: (class, timestep, trial) triples per ``predict`` call.
        fixed_batch: give every ``predict`` call exactly ``batch_size`` triples, padding a shorter
            last chunk with copies of its last triple whose outputs are dropped (a compiled
            denoiser then serves the whole run with one graph). Results are unchanged: each
            sample's prediction does not depend on its batch.
        target: ``(x0 [b, C, h, w], eps [b, C, h, w], t [b] long) -> float32 [b, C, h, w]``, what
            ``predict``'s output is compared to; ``None`` (the default): the noise ``eps`` itself.
        alphas_cumprod: the DDPM schedule: ``x_t = sqrt(a) * x0 + sqrt(1 - a) * eps``, ``a =
            alphas_cumprod[t]``. Needed unless ``add_noise`` is given.
        add_noise: ``(x0 [1, C, h, w], eps [b, C, h, w], t [b] long) -> x_t [b, C, h, w]``: how the
            model noises (e.g. :meth:`bigain.backbones.DiffusionBackbone.add_noise`); replaces
            ``alphas_cumprod``.
    """
    if add_noise is None:
        if alphas_cumprod is None:
            raise ValueError("classify_image needs alphas_cumprod (the DDPM schedule) or add_noise")
        ab = alphas_cumprod

        def add_noise(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
            return ddpm_noise(x0, eps, t, ab)

    device = x0.device
    grid = schedule.grid
    row_of = {t: i for i, t in enumerate(grid)}
    noise = noise.to(device)
    alive = list(range(num_classes))
    errors: dict[int, list[float]] = {c: [] for c in alive}
    reached = dict.fromkeys(alive, 0)
    evaluations = calls = 0
    finalists = alive
    for stage, (timesteps, keep) in enumerate(zip(schedule.stage_timesteps(), schedule.to_keep)):
        finalists = alive
        triples = [(c, t, k) for c in alive for t in timesteps for k in range(schedule.n_trials)]
        for start in range(0, len(triples), batch_size):
            chunk = triples[start:start + batch_size]
            padded = chunk + chunk[-1:] * (batch_size - len(chunk)) if fixed_batch else chunk
            classes = torch.tensor([c for c, _, _ in padded], device=device)
            ts = torch.tensor([t for _, t, _ in padded], device=device)
            rows = torch.tensor([row_of[t] * schedule.n_trials + k for _, t, k in padded], device=device)
            eps = noise[rows]
            x_t = add_noise(x0.unsqueeze(0), eps, ts)
            pred = predict(x_t, ts, classes)[: len(chunk)]
            n = len(chunk)
            goal = eps[:n] if target is None else target(x0.unsqueeze(0).expand_as(eps[:n]), eps[:n], ts[:n])
            for (c, _, _), e in zip(chunk, _loss(pred.float(), goal, loss).tolist()):
                errors[c].append(e)
            evaluations += len(chunk)
            calls += 1
        means = {c: sum(errors[c]) / len(errors[c]) for c in alive}
        alive = sorted(alive, key=lambda c: (means[c], c))[: min(keep, len(alive))]
        for c in alive:
            reached[c] = stage + 1
    all_means = {c: sum(v) / len(v) for c, v in errors.items() if v}
    ranking = sorted(range(num_classes), key=lambda c: (-reached[c], all_means.get(c, float("inf")), c))
    final = {c: all_means[c] for c in ranking if c in set(finalists)}
    return ClassificationResult(prediction=alive[0], ranking=ranking, mean_errors=final,
                                evaluations=evaluations, forward_calls=calls, all_mean_errors=all_means)


def average_precision(ranking: Sequence[int], positives: Sequence[int]) -> float:
    """AP of a full class ranking against a set of true labels (0 when there are none)."""
    pos = set(int(p) for p in positives)
    if not pos:
        return 0.0
    hits, total = 0, 0.0
    for k, c in enumerate(ranking, start=1):
        if c in pos:
            hits += 1
            total += hits / k
    return total / len(pos)
