"""Megatron -> Megatron: any TP/PP/format/layout to any other, without writing an HF copy.

The source's tensors are merged to HF form one at a time (exactly what megatron-to-hf does) and
sharded again for the target (exactly what hf-to-megatron does), so the result is bit-identical
to going through HF, in the memory of one output file.

What is not given is kept from the source (``None`` means "keep"): its format, its key layout, its
``--expand-groups`` and the stack it was written for (a ``run_config.yaml`` means Megatron-Bridge).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bridge.engine.convert import Summary, write_megatron
from bridge.engine.dry_run import FakeRanks
from bridge.engine.gather import MegatronToHF, megatron_plan
from bridge.engine.plan import ParallelPlan
from bridge.engine.source import (
    MegatronCheckpoint,
    ReadOptions,
    carried_assets,
    megatron_hf_config,
    open_megatron,
    source_card,
)
from bridge.engine.targets import DEFAULT_TARGET, MEGATRON_BRIDGE
from bridge.features import bitnet


@dataclass(frozen=True)
class Kept:
    """The output's target, format, layout and group expansion: each as given, else the source's."""

    target: str
    fmt: str
    layout: str
    expand_groups: bool


def kept_settings(
    meg: MegatronCheckpoint,
    plan: ParallelPlan,
    *,
    target: str | None,
    fmt: str | None,
    layout: str | None,
    expand_groups: bool | None,
) -> Kept:
    """Fills in what the user did not give from the source (``plan``: the source's, from ``megatron_plan``).

    * target: Megatron-Bridge when the source has ``run_config.yaml`` (Megatron-Bridge wrote it, or
      ``hf-to-megatron --target megatron-bridge`` did) and the given format / layout are ones it loads;
      else Megatron-LM.
    * format: Megatron-Bridge loads only torch_dist; else the source's.
    * layout: Megatron-Bridge needs ``bridge``; a legacy-only layout written as torch_dist becomes the
      default layout (megatron-core's torch_dist keys for the same model); else the source's.
    * expand_groups: on when the source's ``args`` record ``expanded_from_groups``; the output is then
      expanded just as far as the new TP needs (not at all when TP divides the model's own groups).
    """
    if target is None:
        wants_bridge = fmt in (None, "torch_dist") and layout in (None, next(iter(plan.family.layouts)))
        target = MEGATRON_BRIDGE if meg.run_config is not None and wants_bridge else DEFAULT_TARGET
    if fmt is None:
        fmt = "torch_dist" if target == MEGATRON_BRIDGE else meg.format
    if layout is None:
        layouts = plan.family.layouts
        layout = plan.layout
        if target == MEGATRON_BRIDGE or (fmt != "legacy" and layouts[layout].legacy_only):
            layout = next(iter(layouts))
    if expand_groups is None:
        expand_groups = meg.args is not None and getattr(meg.args, "expanded_from_groups", None) is not None
    return Kept(target, fmt, layout, expand_groups)


def reshard(
    src: Path,
    dst: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    fmt: str | None = None,
    layout: str | None = None,
    dtype: str = "keep",
    divisible_by: int | None = None,
    expand_groups: bool | None = None,
    force: bool = False,
    progress: bool = False,
    options: ReadOptions = ReadOptions(),
    target: str | None = None,
    dry_run: bool = False,
) -> Summary:
    """Re-shards a Megatron checkpoint. ``fmt``, ``layout``, ``expand_groups``, ``target``: None keeps the
    source's (``kept_settings``); ``divisible_by`` defaults to the source's vocab padding rule. ``dry_run``:
    nothing written, no tensor data read; the summary's ``plan`` lists files and bytes."""
    start = time.perf_counter()
    meg = open_megatron(src, options)
    cfg, sidecar = megatron_hf_config(meg, options)
    plan, hf_shapes = megatron_plan(meg, cfg)
    kept = kept_settings(meg, plan, target=target, fmt=fmt, layout=layout, expand_groups=expand_groups)
    source_divisible = getattr(meg.args, "make_vocab_size_divisible_by", 128) if meg.args is not None else 128
    card = source_card(meg, options)  # kept in the sidecar, for the card of a later export
    assets = carried_assets(meg, options) + ([card] if card is not None else [])
    gather = MegatronToHF(FakeRanks(meg) if dry_run else meg, plan, None)
    summary = write_megatron(
        gather,
        cfg,
        dst,
        tp=tp,
        pp=pp,
        dtype=dtype,
        force=force,
        divisible_by=divisible_by or source_divisible,
        layout=kept.layout,
        fmt=kept.fmt,
        expand_groups=kept.expand_groups,
        progress=progress,
        inputs=[src],
        config_json=sidecar,
        assets=assets,
        extra_args=bitnet.carried_args(meg.args),
        target=kept.target,
        hf_layout={k: (shape, gather.dtype(k)) for k, shape in hf_shapes.items()},
        dry_run=dry_run,
        source_format=meg.format,
    )
    gather.release()
    summary.source, summary.direction = str(src), "reshard"
    summary.seconds = round(time.perf_counter() - start, 3)
    return summary
