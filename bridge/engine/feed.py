"""A source's entries fetched one step ahead, each once for every rank file that takes a piece of it.

A stage's TP rank files hold the same entries in the same order and are written side by side
(``streamed_save.stream_save_all``), so the HF tensors of an entry are asked for TP times in a row.
Fetched once and kept until the next entry is asked for, each is read (or merged, when re-sharding)
once instead of TP times; fetched on a second thread while the previous entry is written, the reads
and merges overlap the writes.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch

from bridge.plumbing.pipeline import read_ahead

Keys = tuple[str, ...]


class EntryFeed:
    """``get(keys)`` for the entries in ``order``. Asked in that order (entries may be skipped), each is
    fetched ahead once; asked out of order, an entry is fetched from the source there and then."""

    def __init__(self, source, order: Sequence[Keys]):
        self.source = source
        self._position = {keys: i for i, keys in enumerate(order)}
        self._ahead: Generator[tuple[int, list[torch.Tensor]], None, None] = read_ahead(
            (i, [source.get(k) for k in keys]) for i, keys in enumerate(order)
        )
        self._current: tuple[int, list[torch.Tensor]] | None = None
        self._taken = -1  # the position of the last entry taken from the feed

    def get(self, keys: Keys) -> list[torch.Tensor]:
        wanted = self._position.get(keys, -1)
        if self._current is not None and self._current[0] == wanted:
            return self._current[1]
        if wanted <= self._taken:  # behind the feed, or not in its order
            return [self.source.get(k) for k in keys]
        self._current = None  # the previous entry is done with: its tensors go before the next arrives
        for fetched in self._ahead:
            self._taken = fetched[0]
            if fetched[0] == wanted:
                self._current = fetched
                return fetched[1]
            del fetched
        raise AssertionError("unreachable: every entry in the order is fetched")

    def close(self) -> None:
        """Stops fetching ahead (also on an error) and drops what was fetched."""
        self._current = None
        self._ahead.close()

    def __enter__(self) -> EntryFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
