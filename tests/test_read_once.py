"""Every input byte is read once: a stage's TP rank files are written side by side from one fetch of
each entry (``engine/feed.py``), re-sharding merges each entry once whatever the new TP, and what was
read leaves the page cache (``plumbing/page_cache.py``). The outputs themselves are checked elsewhere
(round trips, golden digests); here, how often the source is asked and what stays cached."""

from __future__ import annotations

import collections
import mmap

import pytest
import torch
from conftest import evict, resident_pages

from bridge import api
from bridge.engine import gather
from bridge.engine.feed import EntryFeed
from bridge.formats import hf as hf_format


@pytest.fixture
def asked(monkeypatch):
    """How many times each HF key was read from an HF folder."""
    counts: collections.Counter[str] = collections.Counter()
    real = hf_format.HFCheckpoint.get

    def get(self, key):
        counts[key] += 1
        return real(self, key)

    monkeypatch.setattr(hf_format.HFCheckpoint, "get", get)
    return counts


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (4, 1), (2, 2)])
def test_hf_to_legacy_reads_each_tensor_once_for_all_tp_ranks(hf_preset, tmp_path, asked, tp, pp):
    api.hf_to_megatron(hf_preset("tiny"), tmp_path / "out", tp=tp, pp=pp, expand_groups=True)
    assert asked and set(asked.values()) == {1}, asked.most_common(3)


def test_reshard_merges_each_entry_once_whatever_the_new_tp(hf_preset, tmp_path, monkeypatch):
    """TP=2 -> TP=4 used to merge every entry once per output rank: the model read 4 times."""
    api.hf_to_megatron(hf_preset("tiny"), tmp_path / "tp2", tp=2)
    reads: collections.Counter[tuple[int, str]] = collections.Counter()
    real = gather.MegatronToHF._read

    def read(self, tp_rank, pp_rank, name, copies):
        reads[(tp_rank, name)] += 1
        return real(self, tp_rank, pp_rank, name, copies)

    monkeypatch.setattr(gather.MegatronToHF, "_read", read)
    api.reshard(tmp_path / "tp2", tmp_path / "tp4", tp=4, expand_groups=True)
    # q, k and v come from one merge; each is asked for once (a merge shared by several keys is kept)
    assert reads and set(reads.values()) == {1}, reads.most_common(3)
    api.reshard(tmp_path / "tp4", tmp_path / "back", tp=2)
    api.megatron_to_hf(tmp_path / "back", tmp_path / "hf")
    api.megatron_to_hf(tmp_path / "tp2", tmp_path / "hf0")
    assert api.verify(tmp_path / "hf0", tmp_path / "hf").ok


def test_entry_feed_serves_repeats_skips_and_strays():
    got: list[str] = []

    class Source:
        def get(self, key):
            got.append(key)
            return torch.tensor([len(got)])

    order = [("a",), ("b", "c"), ("d",), ("e",)]
    with EntryFeed(Source(), order) as feed:
        first = feed.get(("a",))
        assert feed.get(("a",)) is first  # a second rank's ask: no second read
        assert [int(t) for t in feed.get(("b", "c"))] == [2, 3]
        assert feed.get(("e",))[0].item() == 5  # d was skipped (an empty tensor, never asked for)
        feed.get(("b", "c"))  # behind the feed: read there and then
        feed.get(("zz",))  # not in the order at all: the same
    assert got[:5] == ["a", "b", "c", "d", "e"] and sorted(got[5:]) == ["b", "c", "zz"]


@pytest.mark.parametrize("source", ["hf", "legacy", "torch_dist"])
def test_what_a_conversion_read_leaves_the_page_cache(tmp_path, source):
    """Fresh page-cache pages were most of a cold read's cost; the input's pages are given back once
    read (on a disk-backed temporary folder, where eviction can be seen)."""
    from bridge.tiny import make_tiny

    hf = tmp_path / "hf"
    make_tiny(hf, "tiny", hidden_size=1024, intermediate_size=4096, vocab_size=8192)
    src = hf
    if source != "hf":
        src = tmp_path / source
        api.hf_to_megatron(hf, src, tp=2, fmt=source)
    weights = [p for p in src.rglob("*") if p.suffix in (".safetensors", ".pt", ".distcp")]
    total = sum(-(-p.stat().st_size // mmap.PAGESIZE) for p in weights)
    evict(weights)
    if source == "hf":
        api.hf_to_megatron(src, tmp_path / "out", tp=2)
    else:
        api.megatron_to_hf(src, tmp_path / "out")
    assert sum(resident_pages(p) for p in weights) < total / 10
