"""bridge/pipeline.py: order kept, producer errors surface in the consumer, early exit stops the producer."""

import threading
import time

import pytest

from bridge.plumbing.pipeline import read_ahead


def test_order_and_all_items():
    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))


def test_producer_error_is_raised_in_consumer_after_the_good_items():
    def items():
        yield 1
        yield 2
        raise KeyError("broken input")

    got = []
    with pytest.raises(KeyError, match="broken input"):
        for x in read_ahead(items()):
            got.append(x)
    assert got == [1, 2]


def test_consumer_stopping_early_stops_the_producer():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    gen = read_ahead(items(), depth=1)
    assert next(gen) == 0
    gen.close()  # what a `for` loop left by an exception does
    time.sleep(0.3)
    assert len(produced) <= 3  # the one consumed, one queued, one waiting to be queued
    assert not any(t.name == "h1bridge-read-ahead" for t in threading.enumerate())
