"""Fold Falcon-H1 µP multipliers into the weights they scale, or divide them back out (HF -> HF).

Falcon-H1 applies 14 µP factors (nine config fields) at run time. Every one multiplies the
input or the output of a single linear map, with no norm or nonlinearity in between, so it can
be folded into that map's weight (and its bias, when it scales the output) exactly in math;
llama.cpp does the same at GGUF export. Placements, checked against transformers'
``modeling_falcon_h1.py``, are in ``TENSOR_FACTORS``. Folding writes the fields as 1.0 and keeps
the replaced config entries under ``mup_folded``, which is what ``unfold_mup`` divides out again.
Tensors are streamed one shard at a time and scaled in fp32.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bridge.engine.hf_rewrite import rewrite_hf, target_dtype
from bridge.engine.layout import check_tensor_set, expected_hf_shapes
from bridge.errors import InputError, UnsupportedError
from bridge.families import family_of
from bridge.families.falcon_h1_args import MUP_FIELDS, MUP_LISTS, MUP_SCALARS
from bridge.formats.hf import HFCheckpoint
from mappings import FalconH1Dims

FOLDED_KEY = "mup_folded"
ONE: dict[str, float | list[float]] = {
    **{name: 1.0 for name in MUP_SCALARS},
    "mlp_multipliers": [1.0, 1.0],
    "ssm_multipliers": [1.0] * 5,
}
ROWS = "ssm_multipliers"  # one factor per in_proj row block z | x | B | C | dt (compute_mup_vector)

# HF tensor (name inside model.layers.N for layer tensors) -> the factors it absorbs.
TENSOR_FACTORS: dict[str, tuple[str, ...]] = {
    "model.embed_tokens.weight": ("embedding_multiplier",),  # embed_tokens(ids) * m
    "lm_head.weight": ("lm_head_multiplier",),  # lm_head(h) * m; no bias
    "self_attn.q_proj.weight": ("attention_in_multiplier",),  # q_proj(h * m): input side, bias untouched
    "self_attn.k_proj.weight": ("attention_in_multiplier", "key_multiplier"),  # k_proj(h * a) * k, before RoPE
    "self_attn.k_proj.bias": ("key_multiplier",),
    "self_attn.v_proj.weight": ("attention_in_multiplier",),
    "self_attn.o_proj.weight": ("attention_out_multiplier",),  # o_proj(.) * m
    "self_attn.o_proj.bias": ("attention_out_multiplier",),
    "mamba.in_proj.weight": ("ssm_in_multiplier", ROWS),  # in_proj(h * s) * mup_vector
    "mamba.in_proj.bias": (ROWS,),  # dt_bias is added later, unscaled
    "mamba.out_proj.weight": ("ssm_out_multiplier",),  # mamba(h) * m
    "mamba.out_proj.bias": ("ssm_out_multiplier",),
    "feed_forward.gate_proj.weight": ("mlp_multipliers[0]",),  # silu(gate_proj(x) * m0): gate, not up
    "feed_forward.gate_proj.bias": ("mlp_multipliers[0]",),
    "feed_forward.down_proj.weight": ("mlp_multipliers[1]",),  # down_proj(y) * m1
    "feed_forward.down_proj.bias": ("mlp_multipliers[1]",),
}
Produce = Callable[[list[str]], Mapping[str, torch.Tensor]]  # write_hf_weights' shard callback
_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")
_EXACT_DTYPES = (torch.float32, torch.float64)


@dataclass
class FoldReport:
    """What a fold/unfold did; ``rounding`` maps each scaled tensor stored in bf16/fp16 to its error."""

    source: str
    destination: str
    direction: str
    dtype: str
    factors: dict
    tensors: int = 0
    scaled: int = 0
    rounding: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    plan: dict | None = None  # --dry-run: ``engine.dry_run.OutputPlan``

    def to_dict(self) -> dict:
        return asdict(self)


def _factors(values: Mapping, where: str) -> dict[str, float | list[float]]:
    """The nine fields as floats, defaults (1.0) for absent ones; refuses factors that cannot be divided out."""
    out: dict[str, float | list[float]] = {}
    for name, default in ONE.items():
        value = values.get(name, default)
        try:
            factor = [float(v) for v in value] if name in MUP_LISTS else float(value)
        except (TypeError, ValueError):
            kind = "list of numbers" if name in MUP_LISTS else "number"
            raise InputError(f"{where}: {name} = {value!r}, expected a {kind}") from None
        if isinstance(factor, list) and isinstance(default, list) and len(factor) != len(default):
            raise InputError(f"{where}: {name} has {len(factor)} values, Falcon-H1 uses {len(default)}")
        out[name] = factor
    for name, value in _flat(out).items():
        if not math.isfinite(value) or value == 0.0:
            raise UnsupportedError(f"{where}: {name} = {value}: a zero or non-finite factor cannot be divided back out")
    return out


def _flat(factors: Mapping) -> dict[str, float]:
    """All 14 factors by name, list entries as ``name[i]``."""
    flat = {name: factors[name] for name in MUP_SCALARS}
    for name in MUP_LISTS:
        flat.update({f"{name}[{i}]": v for i, v in enumerate(factors[name])})
    return flat


def _check_foldable(cfg, factors: Mapping, where: str) -> None:
    """Refuses the checkpoints where scaling the stored tensors does not reproduce the model."""
    quant = getattr(cfg, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UnsupportedError(
            f"{where}: quantization_config (quant_method={method!r}) present: µP factors cannot be folded into "
            "quantized weights (per-row factors change BitNet's ternary pattern); fold the full-precision checkpoint"
        )
    emb, head = factors["embedding_multiplier"], factors["lm_head_multiplier"]
    if cfg.tie_word_embeddings and emb != head:
        raise UnsupportedError(
            f"{where}: tie_word_embeddings with embedding_multiplier {emb} != lm_head_multiplier {head}: "
            "the one shared tensor cannot carry two factors; keep the multipliers in the config"
        )


class MupScaler:
    """Multiplies (fold) or divides (unfold) each HF tensor by the µP factors it absorbs."""

    def __init__(self, factors: dict, dims: FalconH1Dims, inverse: bool):
        self.factors, self.dims, self.inverse = factors, dims, inverse
        self.flat = _flat(factors)
        self.scaled = 0
        self.rounding: dict[str, dict[str, float]] = {}

    @classmethod
    def fold(cls, cfg, dims: FalconH1Dims, where: str = "config.json") -> MupScaler:
        if getattr(cfg, FOLDED_KEY, None) is not None:
            raise UnsupportedError(
                f"{where}: has {FOLDED_KEY!r}, so the multipliers were folded before; "
                "folding again would apply them twice"
            )
        factors = _factors({name: getattr(cfg, name) for name in MUP_FIELDS}, where)
        _check_foldable(cfg, factors, where)
        return cls(factors, dims, inverse=False)

    @classmethod
    def unfold(cls, cfg, dims: FalconH1Dims, where: str = "config.json") -> MupScaler:
        record = getattr(cfg, FOLDED_KEY, None)
        if record is None:
            raise UnsupportedError(
                f"{where}: no {FOLDED_KEY!r} record, so the checkpoint was not folded; "
                "there are no factors to divide out"
            )
        if not isinstance(record, dict) or set(record) - set(MUP_FIELDS):
            raise InputError(f"{where}: {FOLDED_KEY} must map µP field names to their values")
        current = _factors({name: getattr(cfg, name) for name in MUP_FIELDS}, where)
        changed = [name for name, value in current.items() if value != ONE[name]]
        if changed:
            raise UnsupportedError(
                f"{where}: {changed[0]} is not 1.0 although the multipliers were folded; "
                "it was edited after folding, so unfolding would lose that value"
            )
        factors = _factors(record, f"{where}: {FOLDED_KEY}")
        _check_foldable(cfg, factors, where)
        return cls(factors, dims, inverse=True)

    def factor(self, key: str) -> torch.Tensor | None:
        """The float64 factor for ``key`` (0-d, or per row for in_proj), None when it is 1."""
        names = TENSOR_FACTORS.get(_LAYER_PREFIX.sub("", key), ())
        f = torch.tensor(math.prod(self.flat[n] for n in names if n != ROWS), dtype=torch.float64)
        if ROWS in names:
            rows = torch.tensor(self.factors[ROWS], dtype=torch.float64)
            f = f * rows.repeat_interleave(torch.tensor(self.dims.in_proj_blocks))
            f = f[:, None] if key.endswith(".weight") else f
        return None if bool((f == 1.0).all()) else f

    def apply(self, key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t`` scaled in fp32 (or wider) and stored as ``dtype``; records the storage rounding error."""
        f = self.factor(key)
        if f is None:
            return t.to(dtype)
        work = t.to(torch.promote_types(t.dtype, torch.float32))
        exact = work / f.to(work.dtype) if self.inverse else work * f.to(work.dtype)
        stored = exact.to(dtype)
        if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(t).all()):
            raise UnsupportedError(f"{key}: scaled by its µP factors it overflows {dtype}; choose --dtype fp32")
        self.scaled += 1
        if dtype not in _EXACT_DTYPES:
            err = float((stored.to(exact.dtype) - exact).abs().max())
            top = float(exact.abs().max())
            self.rounding[key] = {"max_abs": err, "max_rel": err / top if top else 0.0}
        return stored

    def layout(self, layout: Mapping[str, tuple[torch.Size, torch.dtype]]) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Scaling keeps every key, shape and dtype (the ExportTransform contract of bridge.engine.hf_rewrite)."""
        return dict(layout)

    def producer(self, source: Produce, layout: Mapping[str, tuple[torch.Size, torch.dtype]]) -> Produce:
        """Wraps a shard producer for ``write_hf_weights``: each tensor scaled, then stored in its layout dtype."""
        return lambda keys: {k: self.apply(k, t, layout[k][1]) for k, t in source(keys).items()}

    def edit_config(self, path: Path) -> None:
        """Rewrites config.json: fold sets the present µP entries to 1.0 and records them; unfold restores them."""
        data = json.loads(path.read_text())
        if self.inverse:
            data.update(data.pop(FOLDED_KEY))
        else:
            data[FOLDED_KEY] = {name: data[name] for name in MUP_FIELDS if name in data}
            data.update({name: ONE[name] for name in data[FOLDED_KEY]})
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _rescale(
    src: Path,
    dst: Path,
    direction: str,
    make: Callable[..., MupScaler],
    dtype: str,
    force: bool,
    max_shard_size: str | int,
    progress: bool,
    dry_run: bool,
) -> FoldReport:
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    target = target_dtype(dtype)
    ckpt = HFCheckpoint(src)
    if not family_of(ckpt.config).mup_fields:
        raise UnsupportedError(
            f"{src / 'config.json'}: a {ckpt.config.model_type} model has no µP multipliers to {direction}"
        )
    scaler = make(ckpt.config, FalconH1Dims.from_hf_config(ckpt.config), str(src / "config.json"))
    shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
    check_tensor_set(str(src), shapes, expected_hf_shapes(ckpt.config))
    layout = {k: (shapes[k], target or ckpt.dtype(k)) for k in shapes}
    report = FoldReport(str(src), str(dst), direction, dtype, scaler.factors, tensors=len(layout), dry_run=dry_run)
    report.bytes_written, report.plan = rewrite_hf(
        src,
        dst,
        ckpt,
        scaler,
        layout,
        target,
        force=force,
        max_shard_size=max_shard_size,
        progress=progress,
        desc=f"mup {direction}",
        dry_run=dry_run,
    )
    report.scaled, report.rounding = scaler.scaled, scaler.rounding
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def fold_mup(
    src_hf: Path,
    dst_hf: Path,
    *,
    dtype: str = "keep",
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    dry_run: bool = False,
) -> FoldReport:
    """Writes ``dst_hf``: ``src_hf`` with every µP factor folded into its weights and the multipliers set to 1.0."""
    return _rescale(src_hf, dst_hf, "fold", MupScaler.fold, dtype, force, max_shard_size, progress, dry_run)


def unfold_mup(
    src_hf: Path,
    dst_hf: Path,
    *,
    dtype: str = "keep",
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    dry_run: bool = False,
) -> FoldReport:
    """Undoes ``fold_mup``: divides the recorded factors out of the weights and restores the config entries."""
    return _rescale(src_hf, dst_hf, "unfold", MupScaler.unfold, dtype, force, max_shard_size, progress, dry_run)
