"""The direct torch_dist reader (bridge/formats/distcp_items.py + TorchDistReader): the same tensors as
``torch.distributed.checkpoint.load`` on checkpoints megatron-core itself wrote (TP fragments split
on dim 0 and dim 1, SwiGLU's 2*TP chunks, objects, the common state), neighbouring records read by one
call, unusual archives through torch.load, and one clear line for what it cannot or must not read."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

import bridge.formats.torch_dist_io as torch_dist_io
from bridge.errors import UnsupportedError
from bridge.formats.distcp_items import read_records
from bridge.formats.torch_dist_io import TorchDistFormatError, TorchDistReader, write_torch_dist

pytestmark = pytest.mark.filterwarnings("ignore:`load_state_dict` is deprecated:FutureWarning")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def dcp_reference(iter_dir: Path, reader: TorchDistReader, keys: list[str]) -> dict[str, torch.Tensor]:
    """What torch's own DCP loader reads for ``keys`` (our test files: its plain pickle is fine)."""
    state = {k: torch.zeros(reader.shape(k), dtype=reader.dtype(k)) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(
            state,
            storage_reader=FileSystemReader(str(iter_dir)),
            planner=DefaultLoadPlanner(flatten_state_dict=False),
            no_dist=True,
        )
    return state


def test_equals_dcp_on_megatron_cores_own_tp2_checkpoint(tmp_path):
    """megatron-core's save of a TP=2 run: column (dim 0), row (dim 1) and SwiGLU (2*TP) fragments,
    replicated norms, bf16 and fp32, fp32 optimizer state; every tensor bit-equal to DCP's load."""
    from megatron_stack import save_training_checkpoint

    g = torch.Generator().manual_seed(0)
    model = {
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(12, 8, generator=g).bfloat16(),
        "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(8, 6, generator=g).bfloat16(),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(16, 8, generator=g).bfloat16(),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(8, 8, generator=g),
        "decoder.final_layernorm.weight": torch.randn(8, generator=g),
        "embedding.word_embeddings.weight": torch.randn(10, 8, generator=g).half(),
    }
    iter_dir = tmp_path / "iter_0000005"
    save_training_checkpoint(
        iter_dir, model, tp=2, pp=1, iteration=5, optimizer_copies=2, extra_state_prefixes=["decoder.layers.0.mlp"]
    )
    reader = TorchDistReader(iter_dir)
    metadata = pickle.loads((iter_dir / ".metadata").read_bytes())  # written just now by megatron-core
    chunks = {k: v.chunks for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks")}
    row = "decoder.layers.0.self_attention.linear_proj.weight"
    assert [c.offsets for c in chunks[row]] == [torch.Size([0, 0]), torch.Size([0, 3])]  # split on dim 1
    assert len(chunks["decoder.layers.0.mlp.linear_fc1.weight"]) == 4  # gate/up x 2 ranks

    keys = reader.keys()
    assert set(model) < set(keys) and any(k.startswith("optimizer.") for k in keys)
    ours, theirs = reader.load(keys), dcp_reference(iter_dir, reader, keys)
    for key in keys:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(_bits(ours[key]), _bits(theirs[key])), key
    for key, tensor in model.items():
        assert torch.equal(_bits(ours[key]), _bits(tensor)), key
    blocks = ["decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(reader.load_stacked(blocks), torch.cat([model[k] for k in blocks]))
    assert torch.equal(reader.load_object("decoder.layers.0.mlp._extra_state"), torch.empty(0, dtype=torch.uint8))
    assert reader.common["iteration"] == 5


def test_neighbouring_records_are_read_by_one_call(tmp_path, monkeypatch):
    path = tmp_path / "f"
    payload = os.urandom(3 * 2**20)
    path.write_bytes(payload)
    calls: list[int] = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or preadv(fd, bufs, off))
    far = 2 * 2**20 + 100  # more than distcp_items' gap from the others
    wanted = [(500, 10), (0, 100), (100, 50), (900, 4), (far, 7), (950, 100)]  # adjacent, gaps, overlap
    views = [(off, memoryview(bytearray(n))) for off, n in wanted]
    fd = os.open(path, os.O_RDONLY)
    try:
        read_records(fd, views, str(path))
    finally:
        os.close(fd)
    for (off, n), (_, view) in zip(wanted, views, strict=True):
        assert bytes(view) == payload[off : off + n], off
    # One call for the five records in the first KiB (gaps read into scratch: 5 records + 3 gaps),
    # one for the far record.
    assert calls == [8, 1]


def test_one_file_of_adjacent_items_is_one_read(tmp_path, monkeypatch):
    tensors = [(f"t{i}", torch.full((64, 1024), float(i))) for i in range(5)]  # 256 KiB each
    write_torch_dist(tmp_path / "it", tensors, {})
    assert len(list((tmp_path / "it").glob("*.distcp"))) == 1
    reader = TorchDistReader(tmp_path / "it")
    sizes: list[int] = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: sizes.append(sum(map(len, bufs))) or preadv(fd, bufs, off))
    out = reader.load_stacked([k for k, _ in tensors])
    assert torch.equal(out, torch.cat([t for _, t in tensors]))
    big = [n for n in sizes if n >= 64 * 1024 * 4]
    assert len(big) == 1 and 5 * 2**18 <= big[0] < 5 * 2**18 + 2**14, sizes  # payloads + archive overhead
    assert sum(sizes) - big[0] < 2**16  # the rest: each archive's directory, a few hundred bytes


def test_an_unusual_archive_goes_through_torch_load(tmp_path, monkeypatch):
    """A transposed tensor is saved with its strides: not a plain record, so torch.load reads it."""
    x = torch.arange(12.0).reshape(3, 4)
    write_torch_dist(tmp_path / "it", [("t", x.t()), ("plain", x)], {})
    loaded = []
    load_tensor = torch_dist_io.load_tensor
    monkeypatch.setattr(torch_dist_io, "load_tensor", lambda *a: loaded.append(a[-1]) or load_tensor(*a))
    out = TorchDistReader(tmp_path / "it").load(["t", "plain"])
    assert torch.equal(out["t"], x.t()) and torch.equal(out["plain"], x)
    assert len(loaded) == 1 and "bytes 0.." in loaded[0]


def _rewrite_metadata(iter_dir: Path, edit) -> None:
    path = iter_dir / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # our own fixture
    edit(metadata)
    path.write_bytes(pickle.dumps(metadata))


def _item(metadata, key):
    return next(i for i in metadata.storage_data if i.fqn == key)


@pytest.fixture
def small(tmp_path) -> Path:
    write_torch_dist(tmp_path / "it", [("a", torch.ones(4, 4)), ("b", torch.zeros(8))], {})
    return tmp_path / "it"


def _transformed(m):
    info = m.storage_data[_item(m, "a")]
    info.transform_descriptors = ["zstd"]


def _past_end(m):
    info = m.storage_data[_item(m, "b")]
    info.length += 10**6


def _other_dtype(m):
    m.state_dict_metadata["a"].properties.dtype = torch.float16


def _gap(m):
    chunk = m.state_dict_metadata["a"].chunks[0]
    m.state_dict_metadata["a"].chunks = [type(chunk)(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 4]))]


def _overlap(m):
    chunk = m.state_dict_metadata["a"].chunks[0]
    half = type(chunk)(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 4]))
    m.state_dict_metadata["a"].chunks = [half, half]


def _into_data(m):
    info = m.storage_data[_item(m, "b")]
    info.offset += 700  # inside the previous archive's bytes


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (_transformed, UnsupportedError, r"'a' is stored through DCP transforms \['zstd'\]; only plain items"),
        (_past_end, TorchDistFormatError, "past the end of the"),
        (_other_dtype, TorchDistFormatError, r"holds torch.float32 \[4, 4\] for 'a'; .metadata says torch.float16"),
        (_gap, TorchDistFormatError, "chunks cover 8 of 16 elements"),
        (_overlap, TorchDistFormatError, "chunks at .* overlap"),
        (_into_data, TorchDistFormatError, "not a torch.save archive of a tensor|past the end"),
    ],
    ids=["transforms", "past-end", "dtype", "gap", "overlap", "offset"],
)
def test_refusals_are_one_line(small, edit, error, match):
    _rewrite_metadata(small, edit)
    with pytest.raises(error, match=match) as e:
        TorchDistReader(small).load(["a", "b"])
    assert "\n" not in str(e.value)
