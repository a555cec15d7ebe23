"""Progress that suits where it goes: tqdm bars on a terminal, plain rate-limited lines in logs.

A bar redrawn with carriage returns fills a CI log or ``nohup.out`` with thousands of fragments; off a
terminal ``Progress`` prints ``progress: DESC n/total`` at most every ``INTERVAL`` seconds, and a
final line when it closes. It is a drop-in ``tqdm`` (``disable=not progress`` still silences it).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

INTERVAL = 10.0  # seconds between two plain lines


class Progress(tqdm):
    """``tqdm`` on a terminal; off one (the stream is not a TTY), plain ``progress:`` lines."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        stream = kwargs.get("file") or sys.stderr
        self._plain = not kwargs.get("disable", False) and not _is_tty(stream)
        if self._plain:
            kwargs["disable"] = True  # tqdm itself draws nothing; the counting is done here
        super().__init__(*args, **kwargs)
        if self._plain:  # a disabled tqdm keeps neither desc nor unit
            self._stream, self._start, self._last = stream, time.monotonic(), time.monotonic()
            self.desc, self.unit, self._closed = kwargs.get("desc") or "", kwargs.get("unit") or "it", False

    def update(self, n: float | None = 1) -> bool | None:
        if not self._plain:
            return super().update(n)
        self.n += 1 if n is None else n
        now = time.monotonic()
        if now - self._last >= INTERVAL:
            self._last = now
            self._line("")
        return None

    def __iter__(self):
        if not self._plain:
            yield from super().__iter__()
            return
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def close(self) -> None:
        if self._plain and not self._closed:
            self._closed = True
            self._line(f" done in {time.monotonic() - self._start:.1f}s")
        super().close()

    def __del__(self) -> None:
        if self._plain:  # dropped after an error: no "done" line
            self._closed = True
        super().__del__()

    def _line(self, suffix: str) -> None:
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        unit = f" {self.unit}s" if self.unit != "it" else ""
        print(f"progress: {self.desc or 'working'} {count}{unit}{suffix}", file=self._stream, flush=True)


def progress(total: int | None, desc: str, enabled: bool = True, unit: str = "it") -> Progress:
    """A ``Progress`` of ``total`` steps; silent when not ``enabled`` (--quiet, --json)."""
    return Progress(total=total, desc=desc, unit=unit, disable=not enabled)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False
