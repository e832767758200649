"""Stopping a command cleanly: SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's preemption).

While :func:`handle_signals` is active, the first SIGINT or SIGTERM raises :class:`Interrupted` in the
main thread (deferred to the end of a :func:`deferred` section, such as a shard append, so no record
is ever half written) and is forwarded to the child processes registered with :func:`forward_to`
(DDP ranks launched by this process, a sweep's cell). :class:`Interrupted` is a ``BaseException``
but not a ``KeyboardInterrupt``, so Lightning tears the trainer down and re-raises it instead of
turning it into ``SystemExit(1)``. The ``bigain`` command exits with ``128 + signal number``: 130
for SIGINT, 143 for SIGTERM.

A repeat of the signal within a few seconds (the same Ctrl-C reaching a child both from the terminal
and from its parent) is ignored; one sent later stops the process at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

__all__ = ["Interrupted", "handle_signals", "deferred", "forward_to", "requested", "nested", "reinstall",
           "HANDLED_SIGNALS"]

#: The signals that stop a run cleanly.
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_REPEAT_GRACE_S = 3.0


class Interrupted(BaseException):
    """A run was stopped by a signal; finished work is saved and the same command resumes it.

    Attributes:
        signum: the signal number (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {self.name}"


class _State:
    def __init__(self) -> None:
        self.depth = 0
        self.signum: int | None = None
        self.when = 0.0
        self.critical = 0
        self.pending = False
        self.previous: dict[int, object] = {}
        self.children: list[Callable[[], Iterable[int]]] = []


_state = _State()


def requested() -> int | None:
    """The signal number that asked this process to stop, or None."""
    return _state.signum


def nested() -> bool:
    """True inside an inner :func:`handle_signals` block (a command run by another command)."""
    return _state.depth > 1


def _forward(signum: int) -> None:
    for source in list(_state.children):
        try:
            pids = list(source())
        except Exception:  # noqa: BLE001 - a stale source must not stop the others
            continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signum)


def _handler(signum: int, frame) -> None:
    now = time.monotonic()
    if _state.signum is not None:
        if now - _state.when < _REPEAT_GRACE_S:
            return  # the same stop request arriving twice (terminal and parent)
        print(f"\nbigain: {signal.Signals(signum).name} again: stopping at once", file=sys.stderr)
        _forward(signal.SIGKILL)
        os._exit(128 + signum)
    _state.signum, _state.when = signum, now
    print(f"\nbigain: {signal.Signals(signum).name} received: stopping (finished work is saved; the same "
          f"command resumes)", file=sys.stderr, flush=True)
    _forward(signum)
    if _state.critical:
        _state.pending = True
        return
    raise Interrupted(signum)


def reinstall() -> None:
    """Put bigain's handlers back (after a library such as Lightning installed its own)."""
    if _state.depth and threading.current_thread() is threading.main_thread():
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _handler)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` while the block runs (nests; main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state.depth == 0:
        _state.previous = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
        _state.signum, _state.pending, _state.critical = None, False, 0
    _state.depth += 1
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            for sig, previous in _state.previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            _state.children.clear()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section a signal must not cut in half: :class:`Interrupted` is raised when it ends.

    Only the main thread receives signals; in other threads the section is an ordinary block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.critical += 1
    try:
        yield
    finally:
        _state.critical -= 1
        if _state.critical == 0 and _state.pending:
            _state.pending = False
            raise Interrupted(_state.signum or signal.SIGINT)


@contextlib.contextmanager
def forward_to(pids: Callable[[], Iterable[int]]) -> Iterator[None]:
    """Forward a stop signal to the processes ``pids()`` returns while the block runs."""
    _state.children.append(pids)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _state.children.remove(pids)
