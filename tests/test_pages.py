"""bridge/pages.py: pages of mapped inputs leave RSS without unmapping, and the data stays readable."""

import sys

import pytest
import torch
from test_roundtrip import assert_bit_exact, load_hf

from bridge.engine.convert import MegatronToHF, hf_to_megatron, megatron_to_hf
from bridge.plumbing.pages import drop_resident


def rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's")
def test_drop_resident_gives_back_mapped_pages(tmp_path):
    torch.save({"w": torch.arange(16 * 2**20, dtype=torch.float32)}, tmp_path / "f.pt")  # 64 MiB
    w = torch.load(tmp_path / "f.pt", mmap=True, weights_only=True)["w"]
    assert float(w.sum()) > 0  # touch every page
    before = rss_file_kb()
    assert drop_resident([w])
    assert before - rss_file_kb() > 60 * 1024
    assert torch.equal(w, torch.arange(16 * 2**20, dtype=torch.float32))  # refaults from the file


def test_conversion_exact_when_pages_are_given_back_after_every_tensor(hf_preset, tmp_path, monkeypatch):
    monkeypatch.setattr(MegatronToHF, "release_bytes", 0)
    src = hf_preset("tiny-bias-tied")
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))
