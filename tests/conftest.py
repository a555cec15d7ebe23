"""Shared fixtures: tiny random Falcon-H1 checkpoints, built once per session (never downloaded)."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import socket
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch.distributed as dist
from fake_hub import FakeHub

from bridge.tiny import make_tiny


@pytest.fixture(scope="session")
def hf_preset(tmp_path_factory):
    """``hf_preset(name)`` -> folder of a random HF checkpoint of that preset (cached per session)."""
    cache: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in cache:
            folder = tmp_path_factory.mktemp("hf") / name
            make_tiny(folder, name, seed=1, max_shard_size="200KB")  # sharded + index: tests damage shards
            (folder / "tokenizer.json").write_text('{"fake": "tokenizer"}')
            cache[name] = folder
        return cache[name]

    return build


def tree_digest(root: Path) -> str:
    """Hash of every file name and byte under root: proves an input was not modified."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dist_checkpointing():
    """megatron-core's own ``dist_checkpointing`` in a one-rank gloo group (no launcher, no GPU)."""
    owned = not dist.is_initialized()
    if owned:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed"
        warnings.simplefilter("ignore")
        from megatron.core import dist_checkpointing
    yield dist_checkpointing
    if owned:
        dist.destroy_process_group()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1 and a huggingface_hub that can reach nothing else and finds no stored token."""
    # huggingface_hub 2.4 uploads through Xet whenever hf_xet is installed (no server negotiation);
    # the constant is read at import from HF_HUB_DISABLE_XET, so patch the module attribute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    # Anything that forgot the endpoint would otherwise go to huggingface.co: send it to a closed port.
    # Both constants are derived from HF_ENDPOINT at import and must agree: hf_hub_url() formats the
    # template, then swaps in an explicit `endpoint=` only where the URL starts with ENDPOINT.
    dead = "http://127.0.0.1:9"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    monkeypatch.setattr(
        huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    with FakeHub() as fake:
        yield fake
        assert fake.unhandled == []  # the fake covers every request huggingface_hub made


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (mincore over a fresh shared mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert libc.mincore(address, size, vec) == 0
        libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


def evict(files: list[Path]) -> None:
    os.sync()  # dirty pages cannot be dropped
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
