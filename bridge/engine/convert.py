"""Streaming conversion between HF safetensors and legacy Megatron TP/PP checkpoints.

HF -> Megatron builds one rank file at a time: for each table entry on that rank's stage it
reads the entry's HF tensors, keeps the rank's shard and drops the rest, so memory holds one
output file plus one parameter. Megatron -> HF builds one safetensors shard at a time from the
memory-mapped rank files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bridge.engine.config import config_dtype, dtype_name
from bridge.engine.dry_run import (
    FakeSource,
    fake_producer,
    file_sizes,
    largest_tensor,
    output_dir,
    output_plan,
    payload_bytes,
)
from bridge.engine.gather import MegatronToHF, megatron_plan
from bridge.engine.hf_rewrite import (
    ExportTransform,
    Layout,
    Producer,
    config_bytes,
    dir_bytes,
    target_dtype,
    write_hf_config,
)
from bridge.engine.info import megatron_info
from bridge.engine.layout import (
    check_float_dtypes,
    check_tensor_set,
    expected_hf_shapes,
)
from bridge.engine.plan import ParallelPlan, check_parallel_sizes
from bridge.engine.source import (
    MegatronCheckpoint,
    ReadOptions,
    carried_assets,
    megatron_hf_config,
    open_megatron,
    source_card,
)
from bridge.engine.targets import (
    DEFAULT_TARGET,
    extra_state_objects,
    resolve_target,
    write_bridge_files,
)
from bridge.errors import InputError, UnsupportedError
from bridge.families import family_of
from bridge.features.groups import ExpandedSource, expanded_config, expansion_factor
from bridge.formats.hf import (
    CheckedSource,
    HFCheckpoint,
    NonFiniteCount,
    copy_assets,
    write_hf_weights,
)
from bridge.formats.iterations import RELEASE, iteration_dir_name
from bridge.formats.legacy import (
    HF_ASSETS,
    write_tracker,
)
from bridge.formats.registry import FORMATS
from bridge.hub import build_model_card
from bridge.plumbing import distributed
from bridge.plumbing.direct_io import tally
from bridge.plumbing.progress import Progress
from bridge.plumbing.safe_files import carried_file, copy_regular


@dataclass
class Summary:
    """What a conversion did; printed by the CLI and emitted as JSON with --json. Under torchrun only
    process 0's is complete (it alone reports)."""

    source: str
    destination: str
    direction: str
    tp: int
    pp: int
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    layout: str = "bridge"
    dtype: str = "keep"
    format: str = "legacy"
    target: str | None = None
    iteration: int | str | None = None
    source_info: dict | None = None  # megatron-to-hf: what the source is (``CheckpointInfo``)
    dry_run: bool = False
    plan: dict | None = None  # --dry-run: ``OutputPlan`` (files and bytes, disk, peak RSS estimate)
    processes: int = 1  # torchrun processes that shared the work
    per_process: list[dict] = field(default_factory=list)  # each one's rank, tensors, files, bytes

    def to_dict(self) -> dict:
        return asdict(self)

    def account(self, tmp: Path, shares: list[dict]) -> None:
        """Totals from the finished folder ``tmp``, and what each process wrote (``shares``, by rank, from
        ``share_report``); process 0's part is every file no other process reports."""
        self.bytes_written, self.files = dir_bytes(tmp)
        others = [
            {"rank": s["rank"], "tensors": s["tensors"], "files": sorted(s["files"]), "bytes": sum(s["files"].values())}
            for s in shares[1:]
        ]
        theirs = {name for share in others for name in share["files"]}
        first = {
            "rank": 0,
            "tensors": shares[0]["tensors"],
            "files": [name for name in self.files if name not in theirs],
            "bytes": self.bytes_written - sum(share["bytes"] for share in others),
        }
        self.per_process = [first, *others]
        self.processes = len(shares)
        self.tensors = sum(share["tensors"] for share in shares)


def share_report(tmp: Path, tensors: int, written: dict[str, int]) -> dict:
    """What this process wrote into ``tmp``: its tensors, and its files (``direct_io.tally``) with their sizes."""
    group = distributed.current()
    return {"rank": group.rank, "tensors": tensors, "files": {os.path.relpath(p, tmp): n for p, n in written.items()}}


def hf_to_megatron(
    src: Path,
    dst: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "keep",
    force: bool = False,
    divisible_by: int = 128,
    layout: str | None = None,
    fmt: str | None = None,
    expand_groups: bool = False,
    progress: bool = False,
    target: str = DEFAULT_TARGET,
    iteration: int | str | None = None,
    dry_run: bool = False,
) -> Summary:
    """Converts an HF folder of a registered family into a Megatron checkpoint (legacy per-rank files or torch_dist)
    that ``target``'s loader accepts with its default settings (see ``bridge.targets``); ``fmt`` and
    ``iteration`` default to the target's, ``layout`` to the family's first (``bridge``, ``te``).

    ``expand_groups`` replicates Mamba B/C groups when TP exceeds them (see ``bridge.groups``).
    ``dry_run``: write nothing; the summary's ``plan`` lists the files and bytes (see ``dry_run``)."""
    from bridge.features import bitnet  # builds on this module

    start = time.perf_counter()
    ckpt = HFCheckpoint(src)
    source, extra_args = bitnet.hf_source(ckpt, target_dtype(dtype))  # a BitNet-packed folder is read unpacked
    check_tensor_set(str(src), {k: source.shape(k) for k in source.keys()}, expected_hf_shapes(ckpt.config))
    check_float_dtypes(str(src), {k: source.dtype(k) for k in source.keys()})
    summary = write_megatron(
        FakeSource(source) if dry_run else source,
        ckpt.config,
        dst,
        tp=tp,
        pp=pp,
        dtype=dtype,
        force=force,
        divisible_by=divisible_by,
        layout=layout,
        fmt=fmt,
        expand_groups=expand_groups,
        progress=progress,
        inputs=[src],
        config_json=carried_file(src / "config.json", src),  # copied: must not link out
        assets=ckpt.asset_files() + ckpt.card_files(),
        extra_args=extra_args,
        target=target,
        iteration=iteration,
        hf_layout={k: (source.shape(k), source.dtype(k)) for k in source.keys()},
        dry_run=dry_run,
    )
    ckpt.release()
    summary.source, summary.direction = str(src), "hf-to-megatron"
    summary.seconds = round(time.perf_counter() - start, 3)
    return summary


def write_megatron(
    source,
    cfg,
    dst: Path,
    *,
    tp: int,
    pp: int,
    dtype: str,
    force: bool,
    divisible_by: int,
    layout: str | None,
    fmt: str | None,
    progress: bool,
    inputs: list[Path],
    config_json: Path | None,
    assets: list[Path],
    extra_args: Mapping | None = None,
    expand_groups: bool = False,
    target: str = DEFAULT_TARGET,
    iteration: int | str | None = None,
    hf_layout: Layout,
    dry_run: bool = False,
    source_format: str = "hf",
) -> Summary:
    """Writes a Megatron checkpoint from any ``source.get(hf_key)`` / ``source.dtype(hf_key)``: an HF
    folder, or another Megatron checkpoint being re-sharded (its tensors merged on the fly).
    ``extra_args`` are stored in ``args`` as given (e.g. BitNet's flag and scales). ``expand_groups``:
    see ``bridge.groups``. ``target``, ``iteration``: see ``bridge.targets``. ``hf_layout``: the model's
    HF shapes and dtypes, to size the output before writing; ``dry_run``: ``source`` gives fake tensors,
    nothing is written; ``source_format``: what ``source`` reads ("hf", or a Megatron format when re-sharding)."""
    family = family_of(cfg)
    layout = layout or next(iter(family.layouts))
    stack = resolve_target(
        target, fmt, layout, iteration, next(iter(family.layouts)), family.display_name or family.name
    )
    fmt = stack.fmt
    out_dtype = target_dtype(dtype)
    nonfinite = NonFiniteCount()
    source = CheckedSource(source, nonfinite)  # NaN/Inf are converted as they are, and reported once at the end
    extra_args = dict(extra_args or {})
    factor = expansion_factor(cfg, tp) if expand_groups else 1
    if factor > 1:
        source = ExpandedSource(source, family_of(cfg).dims(cfg, None), factor)
        extra_args["expanded_from_groups"] = cfg.mamba_n_groups
        cfg = expanded_config(cfg, factor)
    layouts = family_of(cfg).layouts
    if layout not in layouts:
        raise InputError(f"--layout {layout!r}: expected one of {', '.join(layouts)}")
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt != "legacy" and layouts[layout].legacy_only:
        raise UnsupportedError(
            f"--layout {layout} exists only in legacy files (torch_dist keeps conv1d.weight "
            "through megatron-core's conv_checkpoint_key_map)"
        )
    check_parallel_sizes(cfg, tp, pp)  # before the vocabulary is divided by TP
    plan = ParallelPlan(
        cfg, tp, pp, divisible_by, layout, padded_vocab=stack.padded_vocab(cfg.vocab_size, divisible_by, tp)
    )
    args = plan.family.to_args(
        cfg,
        tp=tp,
        pp=pp,
        padded_vocab=plan.dims.padded_vocab,
        divisible_by=divisible_by,
        params_dtype=out_dtype or config_dtype(cfg),
        pattern=layouts[layout].pattern,
    )
    vars(args).update(stack.extra_args(), **extra_args)
    step = 0 if stack.iteration == RELEASE else stack.iteration
    assert isinstance(step, int)  # resolve_target allows only N >= 1 or RELEASE
    summary = Summary(
        "", str(dst), "", tp, pp, layout=layout, dtype=dtype, format=fmt, target=stack.name, iteration=stack.iteration
    )
    summary.dry_run = dry_run
    group = distributed.current()
    needed = payload_bytes(hf_layout, out_dtype)
    with output_dir(dst, force=force, inputs=inputs, dry_run=dry_run, needed=needed) as tmp, tally() as written:
        iter_dir = tmp / iteration_dir_name(stack.iteration)
        objects = extra_state_objects(plan.family, cfg.num_hidden_layers) if stack.is_bridge else None
        count = FORMATS[fmt].write(
            iter_dir, source, plan, dtype=out_dtype, args=args, iteration=step, objects=objects, progress=progress
        )
        shares = group.exchange(share_report(tmp, count, written))  # every process's share is written
        if group.rank == 0:  # process 0 writes the rest and reports
            if stack.is_bridge:
                write_bridge_files(
                    plan.family,
                    tmp,
                    iter_dir,
                    args,
                    save=str(dst),
                    init_method_std=cfg.initializer_range,
                    iteration=step,
                    assets=assets,
                )
            write_tracker(tmp, stack.iteration)
            hf_assets = tmp / HF_ASSETS
            copy_assets(assets, hf_assets)
            if config_json is not None:
                (hf_assets / "config.json").write_bytes(config_bytes(config_json, out_dtype))
            else:
                write_hf_config(hf_assets, cfg, None, out_dtype)
            summary.account(tmp, shares)
            if dry_run:
                summary.plan = output_plan(
                    file_sizes(tmp), dst, largest_tensor(hf_layout, out_dtype), fmt, source=source_format
                ).to_dict()
    nonfinite.warn()
    return summary


def _export_transform(
    meg: MegatronCheckpoint,
    cfg,
    plan: ParallelPlan,
    sidecar: Path | None,
    fold_mup: bool,
    bitnet_pack: bool | None,
    bitnet_arithmetic: str,
) -> ExportTransform | None:
    from bridge.features import bitnet
    from bridge.features.mup import MupScaler  # both build on this module

    packing = bitnet.export_transform(
        cfg, vars(meg.args) if meg.args is not None else {}, bitnet_pack, bitnet_arithmetic
    )
    if not fold_mup:
        return packing
    if not plan.family.mup_fields:
        raise UnsupportedError(f"--fold-mup: a {cfg.model_type} model has no µP multipliers to fold")
    if packing is not None:
        raise UnsupportedError(
            "--fold-mup with BitNet weights: per-row µP factors change the ternary pattern; "
            "fold the full-precision checkpoint instead"
        )
    return MupScaler.fold(cfg, plan.dims, str(sidecar or meg.iter_dir))


def megatron_to_hf(
    src: Path,
    dst: Path,
    *,
    dtype: str = "keep",
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    fold_mup: bool = False,
    bitnet_pack: bool | None = None,
    bitnet_arithmetic: str = "onebitllms",
    options: ReadOptions = ReadOptions(),
    dry_run: bool = False,
) -> Summary:
    """Converts a Megatron checkpoint (legacy any TP/PP, or torch_dist) into an HF Falcon-H1 folder.

    ``fold_mup`` folds the µP multipliers into the exported weights (see ``bridge.mup``).
    ``bitnet_pack`` writes BitNet linears ternary-packed (see ``bridge.bitnet``); by default a BitNet
    checkpoint (``args.use_bitnet`` or a packed-origin config) is packed, others are not; latent
    weights are quantized with ``bitnet_arithmetic`` (``bridge.features.bitnet.ARITHMETICS``).
    ``options``: which iteration, and where the config and tokenizer come from (``ReadOptions``).
    ``dry_run``: write nothing, read no tensor data; the summary's ``plan`` lists files and bytes.
    """
    start = time.perf_counter()
    target = target_dtype(dtype)
    meg = open_megatron(src, options)
    cfg, sidecar = megatron_hf_config(meg, options)
    plan, hf_shapes = megatron_plan(meg, cfg)
    transform = _export_transform(meg, cfg, plan, sidecar, fold_mup, bitnet_pack, bitnet_arithmetic)
    gather = MegatronToHF(meg, plan, None if transform else target)  # a transform works first, then casts
    layout: Layout = {k: (hf_shapes[k], target or gather.dtype(k)) for k in hf_shapes}
    produce: Producer = gather.tensors
    if transform:
        layout = transform.layout(layout)
        produce = transform.producer(gather.tensors, layout)
    if dry_run:
        produce = fake_producer(layout)
    info = megatron_info(meg, sidecar, plan)
    summary = Summary(
        str(src),
        str(dst),
        "megatron-to-hf",
        info.tp or meg.tp,
        info.pp or meg.pp,
        layout=plan.layout,
        dtype=dtype,
        format=info.format,
        iteration=info.iteration,
        source_info=info.to_dict(),
        dry_run=dry_run,
    )
    group = distributed.current()
    needed = payload_bytes(layout, None)
    with output_dir(dst, force=force, inputs=[src], dry_run=dry_run, needed=needed) as tmp, tally() as written:
        total = len(layout) if group.size == 1 else None  # under torchrun the bar counts this process's share
        bar = Progress(total=total, unit="tensor", desc="megatron→hf", disable=not progress)
        count = write_hf_weights(tmp, layout, produce, max_shard_size, progress=bar.update)
        gather.release()
        shares = group.exchange(share_report(tmp, count, written))  # every process's shards are written
        bar.close()
        if group.rank == 0:  # process 0 writes the rest and reports
            write_hf_config(tmp, cfg, sidecar, target)
            if transform:
                transform.edit_config(tmp / "config.json")
            copy_assets(carried_assets(meg, options), tmp)
            card = source_card(meg, options)
            if card is not None:
                copy_regular(card, tmp / "README.md")
            provenance = {
                "source_format": info.format,
                "source": Path(info.path).name,  # the folder's name: a local path has no place in a public card
                "tp": info.tp,
                "pp": info.pp,
                "iteration": info.iteration,
                "source_writer": info.writer,
                "dtype": dtype_name(dtype),
                "mup_policy": "fold (originals in config.json mup_folded)"
                if fold_mup
                else "keep (multipliers in config.json)",
            }
            (tmp / "README.md").write_text(str(build_model_card(tmp, provenance, title=Path(dst).name)))
            summary.account(tmp, shares)
            if dry_run:
                summary.plan = output_plan(
                    file_sizes(tmp), dst, largest_tensor(layout, None), "safetensors", source=meg.format
                ).to_dict()
    summary.seconds = round(time.perf_counter() - start, 3)
    return summary
