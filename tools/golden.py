"""Digests of every output the converter writes for a grid of presets, formats and TP/PP: run it before
and after a change that must not change behaviour, and compare the two JSON files.

Legacy rank files and safetensors are digested byte for byte. torch_dist is digested tensor by
tensor plus its unpickled ``.metadata`` without ``storage_meta`` (a random save id) and its
``common.pt`` content, since DCP's file layout is not part of the format's meaning.

    python tools/golden.py OUT.json          # then diff two runs' files
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import tempfile
from pathlib import Path

import torch

from bridge.api import hf_to_megatron, make_tiny, megatron_to_hf

PRESETS = ("tiny", "tiny-bias-tied", "tiny-mup")
GRID = [(fmt, tp, pp) for fmt in ("legacy", "torch_dist") for tp in (1, 2) for pp in (1, 2)]


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(
        str((t.dtype, tuple(t.shape))).encode() + t.contiguous().view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def _torch_dist_digest(iter_dir: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        from bridge.formats.torch_dist_io import TorchDistReader
    except ImportError:  # before the formats package existed
        from bridge.formats.torch_dist_io import TorchDistReader

    reader = TorchDistReader(iter_dir)
    out = {k: _tensor_digest(reader.load([k])[k]) for k in reader.keys()}
    metadata = FileSystemReader(str(iter_dir)).read_metadata()
    metadata.storage_meta = None
    out[".metadata"] = hashlib.sha256(repr(sorted(metadata.state_dict_metadata.items())).encode()).hexdigest()
    out["common"] = hashlib.sha256(pickle.dumps(sorted((k, repr(v)) for k, v in reader.common.items()))).hexdigest()
    return out


def _files_digest(root: Path) -> dict:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if any(part in {".metadata"} or part.endswith(".distcp") or part == "common.pt" for part in path.parts):
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main(out_file: str) -> None:
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for preset in PRESETS:
            hf = work / preset
            make_tiny(hf, preset, seed=1)
            for fmt, tp, pp in GRID:
                name = f"{preset}/{fmt}/tp{tp}pp{pp}"
                meg = work / name.replace("/", "_")
                hf_to_megatron(hf, meg, tp=tp, pp=pp, fmt=fmt)
                digest = _files_digest(meg)
                for iter_dir in meg.iterdir():
                    if (iter_dir / "metadata.json").is_file():
                        digest[iter_dir.name] = _torch_dist_digest(iter_dir)
                back = work / (name.replace("/", "_") + "_hf")
                megatron_to_hf(meg, back)
                result[name] = {"megatron": digest, "hf": _files_digest(back)}
    Path(out_file).write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
