"""Shared fixtures: tiny random Falcon-H1 checkpoints, built once per session (never downloaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bridge.tiny import make_tiny


@pytest.fixture(scope="session")
def hf_preset(tmp_path_factory):
    """``hf_preset(name)`` -> folder of a random HF checkpoint of that preset (cached per session)."""
    cache: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in cache:
            folder = tmp_path_factory.mktemp("hf") / name
            make_tiny(folder, name, seed=1)
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
