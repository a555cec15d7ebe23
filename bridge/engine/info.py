"""What a checkpoint is, decided once: every command's report and the Hub card use this record.

torch_dist stores global tensors, so the TP/PP it reports is the one the writer recorded (``args``
or ``run_config.yaml``), shown as "saved at TP=4 PP=2"; legacy files are one per rank.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from bridge.engine.gather import megatron_plan
from bridge.engine.plan import ParallelPlan
from bridge.engine.source import (
    MegatronCheckpoint,
    ReadOptions,
    config_origin,
    hf_assets_dir,
    megatron_hf_config,
    open_megatron,
)
from bridge.formats.detect import HF, detect_format
from bridge.formats.hf import HFCheckpoint


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    format: str  # "hf", "legacy" or "torch_dist"
    tp: int | None = None  # as saved
    pp: int | None = None
    iteration: int | str | None = None
    iter_dir: str | None = None
    layout: str | None = None
    expanded_from_groups: int | None = None  # --expand-groups: the model's own Mamba group count
    writer: str = "transformers"  # falcon-h1-bridge, megatron-bridge, megatron-lm or transformers
    config_from: str | None = None  # hf_assets, args, run_config.yaml, --hf-config
    common_state: str | None = None  # torch_dist: common.pt, or inside the shards (megatron-core >= 0.19)
    dtype: str | None = None  # the dtype most tensors have

    def describe(self) -> str:
        """``legacy TP=2 PP=1`` / ``torch_dist, saved at TP=4 PP=2`` / ``hf``."""
        if self.format == HF:
            return HF
        tp, pp = self.tp or "?", self.pp or "?"
        return f"legacy TP={tp} PP={pp}" if self.format == "legacy" else f"torch_dist, saved at TP={tp} PP={pp}"

    def to_dict(self) -> dict:
        return asdict(self)


def _writer(meg: MegatronCheckpoint) -> str:
    if hf_assets_dir(meg).is_dir():
        return "falcon-h1-bridge"
    if meg.run_config is not None:
        return "megatron-bridge"
    return "megatron-lm" if meg.args is not None else "megatron-core"


def megatron_info(meg: MegatronCheckpoint, sidecar: Path | None, plan: ParallelPlan) -> CheckpointInfo:
    """The record of an opened Megatron checkpoint (``plan``: from ``megatron_plan``)."""
    tp, pp = meg.saved_parallelism()
    dtypes = Counter(dtype for r in plan.ranks() for _, dtype in meg.tensor_meta(*r).values())
    common = None
    if meg.format == "torch_dist":
        common = "common.pt" if (meg.iter_dir / "common.pt").exists() else "in the shards (megatron-core >= 0.19)"
    expanded = getattr(meg.args, "expanded_from_groups", None) if meg.args is not None else None
    return CheckpointInfo(
        str(meg.root),
        meg.format,
        tp,
        pp,
        meg.iteration,
        str(meg.iter_dir),
        plan.layout,
        expanded,
        _writer(meg),
        config_origin(meg, sidecar),
        common,
        str(dtypes.most_common(1)[0][0]).removeprefix("torch.") if dtypes else None,
    )


def checkpoint_info(path: Path, options: ReadOptions = ReadOptions()) -> CheckpointInfo:
    """Detects the format of ``path`` and opens just enough of it to fill the record."""
    path = Path(path)
    if detect_format(path) == HF:
        ckpt = HFCheckpoint(path)
        dtypes = Counter(ckpt.dtype(k) for k in ckpt.keys())
        return CheckpointInfo(str(path), HF, dtype=str(dtypes.most_common(1)[0][0]).removeprefix("torch."))
    meg = open_megatron(path, options)
    cfg, sidecar = megatron_hf_config(meg, options)
    plan, _ = megatron_plan(meg, cfg)
    return megatron_info(meg, sidecar, plan)
