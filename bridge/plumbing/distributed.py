"""Several processes started by torchrun share one conversion: which process this is, which part of the
work is its own, and the few messages the processes exchange.

Without torchrun's environment nothing here touches ``torch.distributed``: a plain run is process 0 of
1 (``current()``), its ``share`` is everything and its ``exchange`` is a local call.

How the processes stay in step. They meet only at ``exchange`` points, in the same order in every
process; each point is one gloo all-gather of (failure or None, payload). A process that fails first
raises a flag in the rendezvous store, so the others stop at their next unit of work (``Share``
checks the flag) rather than finishing theirs, then reports its failure at the next point (``fail``).
Every process that sees a failure at a point raises ``PeerFailed`` with that process's exit code and
message, and none meets again. A peer killed outright breaks the group: gloo reports the closed
connection at once (``PeerLost``), and torchrun's agent ends the others with SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from bridge.errors import BridgeError, sanitize
from bridge.plumbing import signals

T = TypeVar("T")

# Longest wait at one exchange point: for the slowest process to finish its share. A dead process is
# noticed at once (closed connection); only a live but stuck one is waited for this long.
TIMEOUT = timedelta(minutes=30)
# Longest wait for the others to join: torchrun starts a node's workers together, after its agents met.
JOIN_TIMEOUT = timedelta(minutes=5)
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PEER_LOST_EXIT = 4  # output not written: another process of the group vanished


@dataclass(frozen=True)
class Failure:
    """What one process reports when it stops: its exit code and error line; ``origin`` is False when
    it only stopped because another one failed."""

    rank: int
    code: int
    message: str
    origin: bool = True


class PeerFailed(BridgeError):
    """Another process of the group failed: this one stops too, with that one's exit code."""

    def __init__(self, failure: Failure, size: int):
        super().__init__(f"process {failure.rank} of {size} failed, so this one stopped too: {failure.message}")
        self.exit_code = failure.code


class PeerLost(BridgeError):
    """The group broke: another process died or stopped answering."""

    exit_code = PEER_LOST_EXIT


def failure_of(e: BaseException, rank: int) -> Failure:
    """The exit code and line the CLI gives ``e`` (a BridgeError's own, 128+N for signal N), for the
    other processes to report; anything else counts as an internal error (6)."""
    if isinstance(e, PeerFailed):
        return Failure(rank, e.exit_code, str(e), origin=False)
    if isinstance(e, BridgeError):
        return Failure(rank, e.exit_code, sanitize(str(e), 1000))
    if isinstance(e, KeyboardInterrupt):
        signum = getattr(e, "signum", signal.SIGINT)
        return Failure(rank, 128 + signum, f"interrupted by {signal.Signals(signum).name}")
    if isinstance(e, OSError):  # atomic_output_dir reports a failed write as an OutputError
        return Failure(rank, 4, f"writing failed ({sanitize(e.strerror or str(e))})")
    return Failure(rank, 6, f"internal: {type(e).__name__}: {sanitize(str(e))}")


class Share(list):
    """This process's items; iterating checks, before each, that no other process has failed."""

    def __init__(self, items: Iterable, group: Group):
        super().__init__(items)
        self._group = group

    def __iter__(self) -> Iterator:
        for item in super().__iter__():
            self._group.check_peers()
            yield item


class Group:
    """Process ``rank`` of ``size``. ``store`` is torchrun's rendezvous store (None in a plain run)."""

    def __init__(self, rank: int = 0, size: int = 1, store: Any = None):
        self.rank, self.size, self._store = rank, size, store
        self.state = "open"  # "reported": a failure was exchanged; "broken": contact lost; "closed": done
        self.leader_pid = os.getpid()  # process 0's (names its partial output); set by ``processes``

    @property
    def distributed(self) -> bool:
        return self._store is not None

    def share(self, items: Sequence[T]) -> list[T]:
        """Every ``size``-th item from ``rank``: the items this process handles."""
        return Share(list(items)[self.rank :: self.size], self) if self.distributed else list(items)

    def check_peers(self) -> None:
        """Raises ``PeerFailed`` when another process has raised the failure flag."""
        if not self.distributed or self.state != "open":
            return
        try:
            flagged = self._store.check(["failed"])
            failure = self._store.get("failed") if flagged else None
        except Exception as e:  # the store's host is gone
            self.state = "broken"
            raise PeerLost(f"lost contact with the other processes ({sanitize(str(e), 120)})") from None
        if failure is not None:
            raise PeerFailed(_decode(failure), self.size)

    def exchange(self, payload: Any = None) -> list[Any]:
        """Every process's ``payload``, by rank, once all have reached this point. Raises ``PeerFailed``
        when one reports a failure here, ``PeerLost`` when one is gone."""
        if not self.distributed:
            return [payload]
        if self.state != "open":
            raise PeerLost(f"the group is {self.state}: one conversion per distributed.processes() block")
        reports = self._gather((None, payload))
        failures = [f for f, _ in reports if f is not None]
        if failures:
            self.state = "reported"
            raise PeerFailed(next((f for f in failures if f.origin), failures[0]), self.size)
        return [p for _, p in reports]

    def fail(self, e: BaseException) -> None:
        """Reports this process's failure ``e`` at the next exchange point (once; nothing to do when the
        failure was already exchanged, the group is broken or done)."""
        if not self.distributed or self.state != "open":
            return
        failure = failure_of(e, self.rank)
        if failure.origin:
            try:
                self._store.set("failed", _encode(failure))
            except Exception:  # the store is gone: the exchange below notices the rest
                pass
        try:
            self._gather((failure, None))
        except PeerLost:
            return
        self.state = "reported"

    def close(self) -> None:
        """Ends the protocol: no further exchange is expected (a later error is this process's alone)."""
        if self.state == "open":
            self.state = "closed"

    def _gather(self, item: tuple) -> list[tuple]:
        import torch.distributed as dist

        out: list = [None] * self.size
        try:
            dist.all_gather_object(out, item)
        except Exception as e:  # a peer died (connection closed) or the wait timed out
            self.state = "broken"
            reason = re.sub(r"^\[[^]]*\]\s*", "", str(e))  # gloo's "[.../pair.cc:537] " source location
            raise PeerLost(f"lost contact with another process ({sanitize(reason, 160)})") from None
        return out


def _encode(failure: Failure) -> str:
    return f"{failure.rank}\n{failure.code}\n{failure.message}"


def _decode(raw: bytes) -> Failure:
    rank, code, message = raw.decode(errors="replace").split("\n", 2)
    return Failure(int(rank), int(code), message)


_PLAIN = Group()
_current = _PLAIN


def current() -> Group:
    """The group of this run: process 0 of 1 unless inside ``processes()`` under torchrun."""
    return _current


def launched() -> bool:
    """Started by torchrun (or another launcher that sets its environment)?"""
    return all(name in os.environ for name in TORCHRUN_ENV)


@contextmanager
def processes() -> Iterator[Group]:
    """Under torchrun: joins its processes in a gloo group for the block (``current()`` is that group),
    and reports an error leaving the block to the others; the block runs one conversion (as a CLI
    command does). Elsewhere: the plain one-process group, nothing initialised."""
    global _current
    if not launched():
        yield _PLAIN
        return
    import torch.distributed as dist

    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store, rank, size = next(dist.rendezvous("env://", timeout=JOIN_TIMEOUT))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=TIMEOUT)
    except Exception as e:
        raise PeerLost(f"cannot join the torchrun processes ({sanitize(str(e), 160)})") from None
    group = Group(rank, size, dist.PrefixStore(f"h1bridge/{attempt}/", store))
    _current = group
    try:
        group.leader_pid = group.exchange(os.getpid())[0]
        yield group
    except BaseException as e:
        group.fail(e)
        raise
    finally:
        _current = _PLAIN
        # torchrun SIGTERMs the survivors once one process has exited: raised in here, the signal cut the
        # teardown short, and gloo's threads, left running, ended the process in std::terminate (an extra
        # "terminate called without an active exception" after the error line). Recorded, not raised.
        with signals.held():
            dist.destroy_process_group()
