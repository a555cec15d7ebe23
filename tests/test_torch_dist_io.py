"""bridge/torch_dist_io.py: bit-exact round trip, megatron-core compatibility both ways, streaming, errors."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import weakref
from pathlib import Path

import pytest
import torch

from bridge.formats.detect import is_torch_dist
from bridge.formats.torch_dist_io import (
    TorchDistFormatError,
    TorchDistReader,
    write_torch_dist,
)

# megatron-core 0.16 calls torch's deprecated dcp.load_state_dict.
pytestmark = pytest.mark.filterwarnings("ignore:`load_state_dict` is deprecated:FutureWarning")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "decoder.layers.0.mamba_mixer.in_proj.weight.z": torch.randn(8, 6, generator=g).bfloat16(),
        "decoder.layers.0.mamba_mixer.A_log": torch.randn(4, generator=g),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(6, 10, generator=g).half(),
    }
    for t in out.values():  # bit patterns torch.equal would not tell apart
        t.view(-1)[:2] = torch.tensor([float("nan"), -0.0])
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


COMMON = {
    "checkpoint_version": 3.0,
    "iteration": 7,
    "args": argparse.Namespace(num_layers=1, params_dtype=torch.bfloat16),
}
OBJECTS = {  # TE extra state comes as a uint8 tensor (TE 2.x), a BytesIO (TE 1.x) or None
    "decoder.layers.0.mamba_mixer.in_proj._extra_state": torch.arange(5, dtype=torch.uint8),
    "y._extra_state": io.BytesIO(b"te"),
    "x._extra_state": None,
}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "iter_0000007"
    write_torch_dist(d, _tensors().items(), COMMON, objects=OBJECTS)
    return d


def test_round_trip_bit_exact(ckpt):
    expected = _tensors()
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert is_torch_dist(ckpt) and any(p.name.startswith("__0_") and p.suffix == ".distcp" for p in ckpt.iterdir())
    r = TorchDistReader(ckpt)
    assert r.keys() == list(expected)
    assert r.common == COMMON
    loaded = r.load(r.keys())
    for k, t in expected.items():
        assert (r.shape(k), r.dtype(k)) == (t.shape, t.dtype)
        assert loaded[k].dtype == t.dtype and torch.equal(_bits(loaded[k]), _bits(t)), k
    assert sorted(r.object_keys()) == sorted(OBJECTS)
    assert torch.equal(r.load_object("decoder.layers.0.mamba_mixer.in_proj._extra_state"), torch.arange(5).byte())
    assert r.load_object("y._extra_state").getvalue() == b"te"
    assert r.load_object("x._extra_state") is None
    with pytest.raises(KeyError, match="nope"):
        r.load(["nope"])


def test_write_streams_in_bounded_batches(tmp_path):
    """One-tensor batches: when a tensor is requested, at most three earlier ones are alive (the batch
    being written, the one waiting for the writer, the one being filled); each batch is its own
    .distcp file and everything reads back."""
    refs: list[weakref.ref] = []

    def produce():
        for i in range(8):
            alive = sum(ref() is not None for ref in refs)
            assert alive <= 3, f"{alive} earlier tensors still alive"
            t = torch.full((1000,), float(i))
            refs.append(weakref.ref(t))
            yield f"t{i}", t
            del t

    write_torch_dist(tmp_path / "it", produce(), {}, batch_bytes=4000)
    assert len(list((tmp_path / "it").glob("*.distcp"))) == 8
    loaded = TorchDistReader(tmp_path / "it").load([f"t{i}" for i in range(8)])
    assert all(loaded[f"t{i}"].eq(i).all() for i in range(8))
    write_torch_dist(tmp_path / "few", [(f"u{i}", torch.ones(1000)) for i in range(8)], {}, batch_bytes=8000)
    assert len(list((tmp_path / "few").glob("*.distcp"))) == 4


def test_write_refuses_bad_input(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        write_torch_dist(tmp_path / "full", [], {})
    with pytest.raises(ValueError, match="written twice"):
        write_torch_dist(tmp_path / "dup", [("a", torch.ones(1)), ("a", torch.ones(1))], {})
    with pytest.raises(TypeError, match="torch.Tensor"):
        write_torch_dist(tmp_path / "nt", [("a", [1.0])], {})


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_load_reads_only_requested_tensors(tmp_path):
    n = 4 << 20  # two 16 MiB tensors
    write_torch_dist(tmp_path / "it", [("big.a", torch.ones(n)), ("big.b", torch.zeros(n))], {})
    r = TorchDistReader(tmp_path / "it")
    before = _bytes_read()
    out = r.load(["big.a"])
    read = _bytes_read() - before
    assert list(out) == ["big.a"] and out["big.a"].eq(1).all()
    # All of big.a and at most a small part of anything else (.metadata, zip headers).
    assert 4 * n <= read < 4 * n + (1 << 20), read


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: [p.unlink() for p in d.iterdir()], "metadata.json: missing"),
        (lambda d: (d / ".metadata").unlink(), r"\.metadata: missing"),
        (lambda d: (d / "metadata.json").unlink(), "metadata.json: missing"),
        (lambda d: (d / "metadata.json").write_text("{"), "metadata.json: unreadable"),
        (lambda d: (d / "metadata.json").write_text('{"sharded_backend": "zarr"}'), "'zarr'; only 'torch_dist'"),
        (lambda d: (d / "common.pt").unlink(), "common.pt: missing"),
        (lambda d: (d / "common.pt").write_bytes(b"garbage"), "common.pt: not a readable torch checkpoint"),
        (lambda d: torch.save({"when": datetime.date(2024, 1, 1)}, d / "common.pt"), "disallowed global datetime.date"),
    ],
    ids=["empty", "no-.metadata", "no-metadata.json", "bad-json", "zarr", "no-common", "bad-common", "unsafe-common"],
)
def test_clear_errors(ckpt, damage, match):
    damage(ckpt)
    with pytest.raises(TorchDistFormatError, match=match) as e:
        TorchDistReader(ckpt)
    assert isinstance(e.value, ValueError)


def test_missing_directory_is_not_torch_dist(tmp_path):
    assert not is_torch_dist(tmp_path)
    with pytest.raises(TorchDistFormatError, match="metadata.json: missing"):
        TorchDistReader(tmp_path / "absent")


# --- megatron-core's own loader/saver, in a one-rank gloo group ---------------------------------


def test_megatron_loads_our_output(ckpt, dist_checkpointing):
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint.api import CheckpointException

    key = "decoder.layers.0.mamba_mixer.in_proj.weight.z"
    full = _tensors()[key]
    for axis in (0, 1):  # column- and row-parallel halves, as TP ranks 0 and 1 of TP=2 request them
        for rank, half in enumerate(full.chunk(2, dim=axis)):
            shard = ShardedTensor.from_rank_offsets(key, torch.empty_like(half), (axis, rank, 2), replica_id=0)
            req = {"model": {"w": shard}}
            out = dist_checkpointing.load(req, str(ckpt), validate_access_integrity=False)
            assert torch.equal(_bits(out["model"]["w"]), _bits(half)), (axis, rank)
            assert out["iteration"] == 7  # common.pt is merged into the result
    obj_key = "decoder.layers.0.mamba_mixer.in_proj._extra_state"
    req = {
        "w": ShardedTensor.from_rank_offsets(key, torch.empty_like(full), replica_id=0),  # TP=1
        "e": ShardedObject(obj_key, None, (1,), (0,), replica_id=0),
    }
    out = dist_checkpointing.load(req, str(ckpt), validate_access_integrity=False)
    assert torch.equal(_bits(out["w"]), _bits(full)) and torch.equal(out["e"], OBJECTS[obj_key])
    assert dist_checkpointing.load_common_state_dict(str(ckpt)) == COMMON
    assert dist_checkpointing.check_is_distributed_checkpoint(str(ckpt))

    # Strictness: a requested _extra_state the checkpoint lacks is fatal by default, dropped with log_all.
    req = {"e": ShardedObject("absent._extra_state", None, (1,), (0,), replica_id=0)}
    with pytest.raises(CheckpointException, match="Missing key in checkpoint"):
        dist_checkpointing.load(req, str(ckpt))
    assert "e" not in dist_checkpointing.load(req, str(ckpt), strict="log_all")


def test_reader_reads_megatron_output(tmp_path, dist_checkpointing, monkeypatch):
    pytest.importorskip("psutil", reason="megatron-core's checkpoint writer needs psutil")
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.transformer.enums import AttnBackend

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # CPU-only save workarounds
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    w = _tensors()["decoder.layers.0.mamba_mixer.in_proj.weight.z"]
    extra = torch.arange(3, dtype=torch.uint8)
    sd = {
        "model": {
            "w": ShardedTensor.from_rank_offsets("x.weight", w, replica_id=0),
            "e": ShardedObject("x._extra_state", extra, (1,), (0,), replica_id=0),
        },
        "args": argparse.Namespace(attention_backend=AttnBackend.auto),  # as MLM's args hold
        "iteration": 3,
    }
    dist_checkpointing.save(sd, str(tmp_path))
    r = TorchDistReader(tmp_path)
    assert r.keys() == ["x.weight"] and r.object_keys() == ["x._extra_state"]
    assert torch.equal(_bits(r.load(["x.weight"])["x.weight"]), _bits(w))
    assert torch.equal(r.load_object("x._extra_state"), extra)
    assert r.common["iteration"] == 3
    # Our reader leaves megatron's process-wide allow-list intact: megatron still reads its args.
    assert dist_checkpointing.load_common_state_dict(str(tmp_path))["args"].attention_backend is AttnBackend.auto

    # As in a process that never imported megatron (whose import registers its allow-list
    # process-wide): MLM args still load, by borrowing megatron's list, and none stays registered.
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        assert TorchDistReader(tmp_path).common["args"].attention_backend is AttnBackend.auto
        assert torch.serialization.get_safe_globals() == []
    finally:
        torch.serialization.add_safe_globals(registered)
