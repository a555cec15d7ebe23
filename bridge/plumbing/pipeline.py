"""Overlap producing tensors with writing them: a bounded read-ahead on a second thread.

Writing is a ``write`` syscall and producing is torch copies and page faults on mapped inputs;
both release the GIL, so on two cores a writer no longer waits for the next tensor. ``depth``
bounds how many finished items wait, so memory grows by at most that many items.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
_DONE = object()
_inline = threading.local()


@contextmanager
def same_thread() -> Iterator[None]:
    """``read_ahead`` produces in the consumer's thread meanwhile: a dry run's fake tensors belong to
    one ``FakeTensorMode``, which two threads must not enter at once."""
    before = getattr(_inline, "on", False)
    _inline.on = True
    try:
        yield
    finally:
        _inline.on = before


def read_ahead(items: Iterable[T], depth: int = 1) -> Generator[T, None, None]:
    """Yields ``items`` in order while a background thread computes up to ``depth`` ahead.

    An exception in the producer is re-raised here, in the consumer, at the item where it happened.
    When the consumer stops early (an error, Ctrl-C, ``close``), the producer stops at its next item.
    """
    if getattr(_inline, "on", False):
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
                del item  # the queue holds it now; keep no second reference
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            put((_DONE, e))
            return
        put((_DONE, None))

    thread = threading.Thread(target=produce, name="h1bridge-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
            del item
    finally:
        stop.set()
        thread.join()
