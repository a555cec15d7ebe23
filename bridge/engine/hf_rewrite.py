"""HF -> HF rewriting and what every writer shares: the output dtype, materialised tensors, config.json
carried along with its dtype updated. µP folding and BitNet packing are ``ExportTransform`` s over it
(``bridge.features``), and ``megatron_to_hf`` applies the same transforms on export."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from bridge.engine.config import DTYPE_ALIASES, DTYPES, HF_DTYPE_NAMES, dtype_name
from bridge.engine.dry_run import (
    fake_producer,
    file_sizes,
    largest_tensor,
    output_dir,
    output_plan,
    payload_bytes,
)
from bridge.errors import InputError
from bridge.formats.hf import LazyTensors, copy_assets, write_hf_weights
from bridge.plumbing.progress import Progress
from bridge.plumbing.safe_files import MAX_JSON_BYTES, carried_file, read_bytes_capped

DTYPE_CHOICES = ("keep", *DTYPES, *DTYPE_ALIASES)


def materialize(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous tensor that owns exactly its bytes: shards are often views, and torch.save would
    store the whole base. A tensor that already is one (a concatenation's result) is not copied again."""
    if (
        (dtype is None or t.dtype == dtype)
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ):
        return t
    out = torch.empty_like(t, dtype=dtype or t.dtype, memory_format=torch.contiguous_format)  # fake stays fake
    out.copy_(t)
    return out


def target_dtype(choice: str) -> torch.dtype | None:
    if choice not in DTYPE_CHOICES:
        raise InputError(f"--dtype {choice!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES.get(dtype_name(choice))


def dir_bytes(folder: Path) -> tuple[int, list[str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [str(p.relative_to(folder)) for p in files]


def config_bytes(config_json: Path, dtype: torch.dtype | None) -> bytes:
    """config.json as-is, or with its dtype fields updated when the conversion changed the dtype."""
    raw = read_bytes_capped(config_json, MAX_JSON_BYTES)  # a FIFO or an oversized file is refused
    if dtype is None:
        return raw
    data = json.loads(raw)
    data["dtype"] = HF_DTYPE_NAMES[dtype]
    if "torch_dtype" in data:
        data["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_hf_config(folder: Path, cfg, sidecar: Path | None, target: torch.dtype | None) -> None:
    if sidecar is not None:
        (folder / "config.json").write_bytes(config_bytes(sidecar, target))
        return
    if target is not None:
        cfg.dtype = HF_DTYPE_NAMES[target]
    cfg.save_pretrained(folder)


Layout = Mapping[str, tuple[torch.Size, torch.dtype]]
Producer = Callable[[list[str]], Mapping[str, torch.Tensor]]


class ExportTransform(Protocol):
    """A rewrite of what megatron_to_hf writes: µP folding (bridge.mup), BitNet packing (bridge.bitnet).

    ``producer`` gets each tensor whole (TP-gathered) at source precision and returns the tensors of
    ``layout`` in its dtypes."""

    def layout(self, layout: Layout) -> Layout:
        """The output keys, shapes and dtypes."""

    def producer(self, source: Producer, layout: Layout) -> Producer: ...

    def edit_config(self, path: Path) -> None: ...


def rewrite_hf(
    src: Path,
    dst: Path,
    source,
    transform: ExportTransform,
    layout: dict,
    target: torch.dtype | None,
    *,
    force: bool,
    max_shard_size: str | int,
    progress: bool,
    desc: str,
    dry_run: bool = False,
) -> tuple[int, dict | None]:
    """HF -> HF through one transform (µP fold/unfold, BitNet pack/unpack), one tensor in memory at a
    time; config.json and tokenizer assets carried along. Returns the bytes written, and for a
    ``dry_run`` (nothing written) the plan, ``OutputPlan.to_dict()`` (see ``engine.dry_run``)."""
    with output_dir(dst, force=force, inputs=[src], dry_run=dry_run, needed=payload_bytes(layout, None)) as tmp:
        bar = Progress(total=len(layout), unit="tensor", desc=desc, disable=not progress or dry_run)
        if dry_run:
            produce = fake_producer(layout)
        else:
            produce = transform.producer(lambda keys: LazyTensors(keys, source.get), layout)
        write_hf_weights(tmp, layout, produce, max_shard_size, progress=bar.update)
        source.release()
        (tmp / "config.json").write_bytes(config_bytes(carried_file(src / "config.json", src), target))
        transform.edit_config(tmp / "config.json")
        copy_assets(source.asset_files(), tmp)
        files = file_sizes(tmp)
    bar.close()
    plan = output_plan(files, dst, largest_tensor(layout, None), "safetensors").to_dict() if dry_run else None
    return sum(files.values()), plan
