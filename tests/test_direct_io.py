"""bridge/direct_io.py: what is written is exactly what was given, whatever the write sizes."""

import os

import pytest
import torch

from bridge.plumbing.direct_io import DirectFile


@pytest.mark.parametrize("sizes", [[0], [1], [4095, 1, 4097], [10_000] * 7, [3, 50_000, 8192, 5]])
def test_bytes_and_length_exact_across_buffer_boundaries(tmp_path, sizes):
    rng = torch.Generator().manual_seed(len(sizes))
    chunks = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=rng).numpy().tobytes() for n in sizes]
    path = tmp_path / "f.bin"
    with DirectFile(path, buffer_bytes=8192) as f:  # two blocks: most writes cross a drain
        for c in chunks:
            assert f.write(c) == len(c)
        assert f.tell() == sum(sizes)
    assert path.read_bytes() == b"".join(chunks)


def test_tensor_memory_and_torch_save_through_it(tmp_path):
    t = torch.randn(1000, 3).to(torch.bfloat16)
    with DirectFile(tmp_path / "t.pt", buffer_bytes=4096) as f:
        torch.save({"t": t}, f)
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["t"], t)


def test_error_inside_leaves_a_closed_file(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with DirectFile(tmp_path / "x.bin") as f:
            f.write(b"abc")
            raise RuntimeError("boom")
    assert f._fd == -1
    os.unlink(tmp_path / "x.bin")  # closed: removable, nothing half-written kept open


def test_filesystem_refusing_direct_writes_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """Some filesystems accept O_DIRECT at open and refuse the writes (EINVAL): the data still lands."""
    import errno

    import bridge.plumbing.direct_io as direct_io

    real_write, calls = os.pwrite, []

    def write(fd, data, offset):
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", write)
    with DirectFile(tmp_path / "f.bin", buffer_bytes=4096) as f:
        f.write(b"x" * 5000)
    assert (tmp_path / "f.bin").read_bytes() == b"x" * 5000 and not f.direct and len(calls) == 3


@pytest.mark.parametrize("skips", [[(100, 5000), (0, 3)], [(4096, 4096), (7, 0)], [(1, 20_000), (9000, 1)]])
def test_forward_seek_leaves_a_zero_hole(tmp_path, skips):
    """``torch.save`` under ``skip_data`` (dry runs) seeks past each storage; the bytes read back as zeros."""
    path, expected = tmp_path / "h.bin", b""
    with DirectFile(path, buffer_bytes=8192) as f:
        for written, hole in skips:
            f.write(b"x" * written)
            assert f.seek(hole, os.SEEK_CUR) == len(expected) + written + hole
            expected += b"x" * written + bytes(hole)
        with pytest.raises(OSError):
            f.seek(0)  # backwards: refused, the file is written sequentially
    assert path.read_bytes() == expected
