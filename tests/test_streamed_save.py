"""bridge/plumbing/streamed_save.py: the file is byte for byte torch.save's for the same state (CRC32
off, as every torch.save here), loads memory-mapped with weights_only, and is written without the
state's tensors ever being in memory whole."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.serialization import config

from bridge.plumbing.streamed_save import Deferred, stream_save_all

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int64,
    torch.bool,
    torch.uint16,  # stored as an UntypedStorage (torch's "v3" dtypes)
    torch.float8_e4m3fn,
    torch.complex64,
]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).view(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (random bytes make NaNs, which torch.equal calls unequal)."""
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*flat)


def _torch_save_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    with config.patch({"save.compute_crc32": False}):
        torch.save(state, buf)
    return buf.getvalue()


def _streamed(state: dict, tmp_path, chunk_rows: int = 3, transpose: bool = False) -> bytes:
    """Writes ``state`` through placeholders whose chunks come from the real tensors, ``chunk_rows``
    rows at a time (as non-contiguous views when ``transpose``)."""
    deferred = Deferred()
    placeholders: dict[int, torch.Tensor] = {}

    def chunks(t: torch.Tensor):
        def produce():
            if t.dim() == 0:
                yield t
                return
            for part in t.split(chunk_rows):
                yield part.transpose(0, -1).contiguous().transpose(0, -1) if transpose else part

        return produce

    def swap(value):
        if isinstance(value, torch.Tensor):
            if id(value) not in placeholders:
                placeholders[id(value)] = deferred.tensor(value.shape, value.dtype, chunks(value))
            return placeholders[id(value)]
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    path = tmp_path / "streamed.pt"
    stream_save_all([(swap(state), path, deferred)])
    return path.read_bytes()


def test_files_side_by_side_each_equal_torch_save_and_interleave(tmp_path):
    """A stage's rank files: each still byte for byte torch.save's, their storages produced in turn (the
    first of each file, then the second of each...), whatever number of storages each holds."""
    models = [{f"w{j}": _random((4, 3), torch.float32, 10 * i + j) for j in range(n)} for i, n in enumerate([3, 1, 2])]
    produced: list[tuple[int, str]] = []
    files = []
    for i, model in enumerate(models):
        deferred = Deferred()

        def chunks(i=i, key="", t=None):
            produced.append((i, key))
            yield t

        placeholders = {
            k: deferred.tensor(v.shape, v.dtype, lambda i=i, k=k, v=v: chunks(i, k, v)) for k, v in model.items()
        }
        files.append((_legacy_state(placeholders), tmp_path / f"rank{i}.pt", deferred))
    stream_save_all(files)
    for i, model in enumerate(models):
        assert (tmp_path / f"rank{i}.pt").read_bytes() == _torch_save_bytes(_legacy_state(model))
    assert produced == [(0, "w0"), (1, "w0"), (2, "w0"), (0, "w1"), (2, "w1"), (0, "w2")]


def _load(path) -> dict:
    """As Megatron's rank files are read here (``safe_pickle``): mmap, weights only, Namespace allowed.
    safe_globals() un-registers what it is given on exit, so not a Namespace megatron-core registered."""
    new = [g for g in [argparse.Namespace] if g not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(new):
        return torch.load(path, mmap=True, weights_only=True)


def _legacy_state(model: dict) -> dict:
    args = argparse.Namespace(num_layers=2, hidden_size=8, tokenizer_type="1", params_dtype=torch.bfloat16)
    return {"args": args, "checkpoint_version": 3.0, "iteration": 7, "model": model}


def test_bytes_equal_torch_save_for_every_dtype_and_shape(tmp_path):
    model = {}
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate([(5, 3), (7,), (2, 3, 4), (), (0,), (0, 4)]):
            model[f"layers.{i}.{j}.weight"] = _random(shape, dtype, 10 * i + j)
    state = _legacy_state(model)
    assert _streamed(state, tmp_path) == _torch_save_bytes(state)


def test_shared_tensor_is_one_storage_as_in_torch_save(tmp_path):
    """Fused norms are stored under two names: one storage, the second name a reference to it."""
    norm, w = _random((16,), torch.bfloat16, 1), _random((4, 16), torch.bfloat16, 2)
    state = _legacy_state({"a.norm": norm, "w": w, "b.norm": norm, "c.norm": norm})
    data = _streamed(state, tmp_path)
    assert data == _torch_save_bytes(state)
    loaded = _load(tmp_path / "streamed.pt")["model"]
    assert loaded["a.norm"].data_ptr() == loaded["b.norm"].data_ptr() == loaded["c.norm"].data_ptr()
    assert _same(loaded["a.norm"], norm) and _same(loaded["w"], w)


def test_non_contiguous_and_uneven_chunks_write_the_row_major_bytes(tmp_path):
    model = {f"t{i}": _random((9, 5), torch.float32, i) for i in range(3)}
    state = _legacy_state(model)
    expected = _torch_save_bytes(state)
    assert _streamed(state, tmp_path, chunk_rows=2, transpose=True) == expected
    assert _streamed(state, tmp_path, chunk_rows=100) == expected


def test_loads_memory_mapped_with_weights_only(tmp_path):
    model = {"embedding": _random((32, 8), torch.bfloat16, 0), "empty": torch.empty(0, 8), "step": torch.tensor(3)}
    _streamed(_legacy_state(model), tmp_path)
    loaded = _load(tmp_path / "streamed.pt")
    assert loaded["iteration"] == 7 and loaded["args"].tokenizer_type == "1"
    assert loaded["model"].keys() == model.keys()
    for k, v in model.items():
        assert _same(loaded["model"][k], v), k


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            st.lists(st.integers(0, 6), max_size=3),
            st.integers(0, 3),  # share the storage of an earlier entry (if any) when 0
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 4),
)
def test_any_state_dict_matches_torch_save(tmp_path_factory, entries, chunk_rows):
    model: dict[str, torch.Tensor] = {}
    for i, (dtype, shape, share) in enumerate(entries):
        earlier = list(model.values())
        model[f"k{i}"] = earlier[i % len(earlier)] if share == 0 and earlier else _random(tuple(shape), dtype, i)
    state = _legacy_state(model)
    assert _streamed(state, tmp_path_factory.mktemp("s"), chunk_rows) == _torch_save_bytes(state)


def _one(tmp_path, chunks, shape=(4, 4), dtype=torch.float32):
    deferred = Deferred()
    stream_save_all([({"t": deferred.tensor(torch.Size(shape), dtype, chunks)}, tmp_path / "x.pt", deferred)])


@pytest.mark.parametrize(
    ("chunks", "error", "match"),
    [
        (lambda: [torch.zeros(3, 4)], ValueError, "chunks gave 48 of the"),
        (lambda: [torch.zeros(4, 4), torch.zeros(1, 4)], ValueError, "chunks exceed"),
        (lambda: [torch.zeros(4, 4, dtype=torch.float64)], TypeError, "a chunk of torch.float64"),
    ],
)
def test_chunks_that_do_not_make_the_tensor_are_refused(tmp_path, chunks, error, match):
    with pytest.raises(error, match=match):
        _one(tmp_path, chunks)


def test_an_error_while_producing_is_raised_as_itself(tmp_path):
    """torch would turn it into a RuntimeError; an InputError from a source, or a signal's
    KeyboardInterrupt, must reach the CLI as what it is."""

    class SourceBroken(Exception):
        pass

    def chunks():
        yield torch.zeros(2, 4)
        raise SourceBroken("shard 3")

    with pytest.raises(SourceBroken, match="shard 3"):
        _one(tmp_path, chunks)


def test_chunks_read_by_torch_load_hold_their_data(tmp_path):
    """A re-shard's chunks come from torch.load of the source's rank files: they are produced outside
    torch.save's skip_data, under which torch.load leaves tensors unfilled."""
    source = _random((6, 4), torch.float32, 5)
    torch.save({"w": source}, tmp_path / "source.pt")
    state = {"w": source}
    deferred = Deferred()

    def chunks():
        yield torch.load(tmp_path / "source.pt", mmap=True, weights_only=True)["w"]

    stream_save_all([({"w": deferred.tensor(source.shape, source.dtype, chunks)}, tmp_path / "x.pt", deferred)])
    assert (tmp_path / "x.pt").read_bytes() == _torch_save_bytes(state)


def test_only_placeholders_may_be_in_the_state(tmp_path):
    deferred = Deferred()
    with pytest.raises(TypeError, match="must come from Deferred.tensor"):
        stream_save_all([({"t": torch.zeros(2)}, tmp_path / "x.pt", deferred)])
    with pytest.raises(TypeError, match="holds a storage"):
        stream_save_all([({"s": torch.zeros(2).untyped_storage()}, tmp_path / "x.pt", deferred)])


_PEAK = """
import resource, sys, torch
from pathlib import Path
from bridge.plumbing.streamed_save import Deferred, stream_save_all
deferred, rows = Deferred(), 2**20 // 4  # 1 MiB chunks of float32 rows of 1 element
model = {
    f"t{i}": deferred.tensor(torch.Size([64 * rows, 1]), torch.float32,
                             lambda i=i: (torch.full((rows, 1), float(i)) for _ in range(64)))
    for i in range(4)
}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stream_save_all([({"model": model}, Path(sys.argv[1]), deferred)])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_file_larger_than_memory_allowed_is_written_in_little_memory(tmp_path):
    """256 MiB of tensors written with the peak RSS growing by less than half of that (measured:
    the 32 MiB direct-I/O buffer and a chunk); holding the tensors would take all 256."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path / "big.pt")], capture_output=True, text=True, check=True
    )
    assert int(out.stdout) < 128, out.stdout
    loaded = torch.load(tmp_path / "big.pt", mmap=True, weights_only=True)["model"]
    assert [float(loaded[f"t{i}"][-1, 0]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert loaded["t3"].shape == (64 * 2**18, 1)
