"""Time spent inside the denoiser's own forwards, for speed-ups a loaded machine cannot distort.

The wall clock of an image includes data loading, encoding, the scheduler, Python overhead and
whatever else the machine is doing; the compressors only change the denoiser. :class:`ForwardTimer`
times exactly the denoiser calls: on CUDA with a pair of CUDA events (``torch.cuda.Event``)
recorded on the current stream around each call (the GPU's own time, with no host
synchronisation per call), on the CPU with ``time.perf_counter``. It times *around* the call,
never inside it, so a denoiser compiled with ``torch.compile`` (CUDA graphs included) is timed as
it runs, with no graph break.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ForwardTimer"]


class ForwardTimer:
    """Accumulates the time of the calls made through :meth:`call`; :meth:`seconds` reads the total
    (synchronising CUDA once) and :meth:`reset` starts again.

    Example::

        timer = ForwardTimer()
        eps = timer.call(backbone.predict_noise, x_t, t, cond)
        record["denoiser_seconds"] = timer.seconds()
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every timed call."""
        self._cpu_seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self.calls = 0

    def call(self, fn: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``fn(x, *args, **kwargs)``, timed; ``x`` (the first input) tells the device."""
        self.calls += 1
        if x.is_cuda:
            stream = torch.cuda.current_stream(x.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = fn(x, *args, **kwargs)
            end.record(stream)
            self._events.append((start, end))
            return out
        begin = time.perf_counter()
        out = fn(x, *args, **kwargs)
        self._cpu_seconds += time.perf_counter() - begin
        return out

    def seconds(self) -> float:
        """Total seconds inside the timed calls so far (waits for the last CUDA one to finish)."""
        total = self._cpu_seconds
        if self._events:
            self._events[-1][1].synchronize()
            total += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
        return total
