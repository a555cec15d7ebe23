"""``inspect``: what a checkpoint is, without converting it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bridge.engine.gather import megatron_plan
from bridge.engine.info import megatron_info
from bridge.engine.layout import expected_hf_shapes
from bridge.engine.source import ReadOptions, megatron_hf_config, open_megatron
from bridge.families import family_of
from bridge.features.bitnet import describe as describe_bitnet
from bridge.formats.detect import HF, detect_format
from bridge.formats.hf import HFCheckpoint

_CONFIG_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "mamba_d_ssm",
    "mamba_n_heads",
    "mamba_d_head",
    "mamba_n_groups",
    "mamba_d_state",
    "mamba_rms_norm",
    "tie_word_embeddings",
)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _config_info(cfg) -> tuple[dict, dict, int]:
    config = {k: getattr(cfg, k, None) for k in _CONFIG_FIELDS}
    mup = {k: getattr(cfg, k) for k in family_of(cfg).mup_fields}
    params = sum(s.numel() for s in expected_hf_shapes(cfg).values())
    return config, mup, params


def inspect_checkpoint(path: Path, options: ReadOptions = ReadOptions()) -> dict:
    """Format, model config, µP multipliers, parallel layout, dtypes, parameter count and bytes."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == HF:
        ckpt = HFCheckpoint(path)
        cfg = ckpt.config
        dtypes = Counter(str(ckpt.dtype(k)).removeprefix("torch.") for k in ckpt.keys())
        extra = {"format": HF, "tensors": len(ckpt.keys()), "files": len(set(ckpt.key_to_file.values()))}
        args = {}
    else:
        meg = open_megatron(path, options)
        cfg, sidecar = megatron_hf_config(meg, options)
        plan, _ = megatron_plan(meg, cfg)
        dtypes = Counter(
            str(dtype).removeprefix("torch.") for r in plan.ranks() for _, dtype in meg.tensor_meta(*r).values()
        )
        info = megatron_info(meg, sidecar, plan)
        extra = {**info.to_dict(), "saved_as": info.describe(), "padded_vocab": plan.dims.padded_vocab}
        args = vars(meg.args) if meg.args is not None else {}
    config, mup, params = _config_info(cfg)
    return {
        **extra,
        "path": str(path),
        "parameters": params,
        "bytes": _bytes(path),
        "dtypes": dict(dtypes),
        "config": config,
        "mup": mup,
        "bitnet": describe_bitnet(cfg, args),
    }


def format_inspect(info: dict) -> str:
    lines = [f"{info['path']}: {info.get('saved_as', info['format'])}"]
    if info["format"] != HF:
        groups = f" expanded_from_groups={info['expanded_from_groups']}" if info["expanded_from_groups"] else ""
        lines.append(
            f"  iteration={info['iteration']} layout={info['layout']} padded_vocab={info['padded_vocab']}"
            f"{groups} written by {info['writer']}, config from {info['config_from']}"
        )
        if info["common_state"]:
            lines.append(f"  common state: {info['common_state']}")
    lines.append(f"  parameters {info['parameters']:,}  bytes {info['bytes']:,}  dtypes {info['dtypes']}")
    lines.append("  config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    lines.append("  µP: " + ", ".join(f"{k}={v}" for k, v in info["mup"].items()))
    if info["bitnet"]:
        lines.append(f"  BitNet: {info['bitnet']}")
    return "\n".join(lines)
