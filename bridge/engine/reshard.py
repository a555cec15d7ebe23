"""Megatron -> Megatron: any TP/PP/format/layout to any other, without writing an HF copy.

The source's tensors are merged to HF form one at a time (exactly what megatron-to-hf does) and
sharded again for the target (exactly what hf-to-megatron does), so the result is bit-identical
to going through HF, in the memory of one output file.
"""

from __future__ import annotations

import time
from pathlib import Path

from bridge.engine.convert import Summary, write_megatron
from bridge.engine.gather import MegatronToHF, megatron_plan
from bridge.engine.source import (
    ReadOptions,
    carried_assets,
    megatron_hf_config,
    open_megatron,
)
from bridge.engine.targets import DEFAULT_TARGET
from bridge.features import bitnet


def reshard(
    src: Path,
    dst: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    fmt: str | None = None,
    layout: str = "bridge",
    dtype: str = "keep",
    divisible_by: int | None = None,
    expand_groups: bool = False,
    force: bool = False,
    progress: bool = False,
    options: ReadOptions = ReadOptions(),
    target: str = DEFAULT_TARGET,
) -> Summary:
    """Re-shards a Megatron checkpoint; ``divisible_by`` defaults to the source's vocab padding rule."""
    start = time.perf_counter()
    meg = open_megatron(src, options)
    cfg, sidecar = megatron_hf_config(meg, options)
    plan, _ = megatron_plan(meg, cfg)
    source_divisible = getattr(meg.args, "make_vocab_size_divisible_by", 128) if meg.args is not None else 128
    assets = carried_assets(meg, options)
    summary = write_megatron(
        MegatronToHF(meg, plan, None),
        cfg,
        dst,
        tp=tp,
        pp=pp,
        dtype=dtype,
        force=force,
        divisible_by=divisible_by or source_divisible,
        layout=layout,
        fmt=fmt,
        expand_groups=expand_groups,
        progress=progress,
        inputs=[src],
        config_json=sidecar,
        assets=assets,
        extra_args=bitnet.carried_args(meg.args),
        target=target,
    )
    summary.source, summary.direction = str(src), "reshard"
    summary.seconds = round(time.perf_counter() - start, 3)
    return summary
