"""SIGTERM and SIGHUP end a run the way Ctrl-C does: as an exception, so that every ``finally`` and
``atomic_output_dir``'s cleanup run and the partial output is removed.

The handler raises ``Interrupted`` (a ``KeyboardInterrupt``) carrying the signal number, once: a
second signal during the cleanup is only recorded, so the cleanup finishes. The signal is also
recorded, because code between us and the handler may wrap the exception (``torch.save`` turns an
exception raised in its Python write callback into a ``RuntimeError``); the CLI asks ``received()``
before it calls anything an internal error.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_received: int | None = None
_holding = False


class Interrupted(KeyboardInterrupt):
    """Raised by the handler in the main thread; ``signum`` is the signal that arrived."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def received() -> int | None:
    """The first handled signal since ``install``, or None."""
    return _received


def check() -> None:
    """Raises ``Interrupted`` if a handled signal arrived: the handler's own exception can be lost when
    the signal lands in code that swallows exceptions (a ``__del__``, a weakref callback print
    "Exception ignored" and go on), so a run checks again before it commits its output."""
    if _received is not None:
        raise Interrupted(_received)


@contextmanager
def held() -> Iterator[None]:
    """A cleanup that must run to its end: a signal arriving inside is only recorded (``received()``),
    not raised, so the exception already on its way up is not replaced halfway through."""
    global _holding
    previous, _holding = _holding, True
    try:
        yield
    finally:
        _holding = previous


def _handler(signum: int, frame: object) -> None:
    global _received
    if _received is None:
        _received = signum
        if not _holding:
            raise Interrupted(signum)


def install() -> Callable[[], None]:
    """Handles SIGINT, SIGTERM and SIGHUP as above; returns the function that restores the previous
    handlers. A signal that is ignored (``nohup`` ignores SIGHUP, a shell's background job SIGINT)
    stays ignored. Outside the main thread (where Python delivers signals) nothing is installed."""
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}
    for signum in HANDLED:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _handler)

    def restore() -> None:
        global _received
        _received = None  # in-process callers (tests, the Python API after a CLI run) start clean
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore
