"""BitNet b1.58 ternary weights: transformers' packed HF format <-> plain (latent or dequantized) weights.

Which tensors are BitNet linears is the family's (``ModelFamily.bitnet``, evaluated by
``mappings.bitnet``). Packed format (transformers ``integrations/bitnet.py``): each BitNet linear
stores ``weight`` as uint8 ``[out/4, in]``, four ternary values per byte in row blocks (bits 2i..2i+1
of ``packed[r, c]`` hold ``W[i*R + r, c] + 1``, ``R = out/4``), and ``weight_scale`` ``[1]`` in the
model dtype: ``1/mean|W|`` for ``linear_class="bitlinear"`` (BitLinear divides its output by it),
``mean|W|`` for ``"autobitlinear"`` (AutoBitLinear multiplies).

Quantization arithmetic (``quantize``). "onebitllms", the default, is TII's ``quantize_to_1bit``
byte for byte: the weight is cast to bf16 and every step runs in bf16, ``s = 1/max(mean|W|, 1e-5)``,
``t = clamp(round(W*s), -1, 1)``, ``weight_scale = s`` stored in bf16. "fp32" runs the same steps in
fp32 (transformers' ``WeightQuant`` on fp32 weights; the onebitllms Triton training kernel also
multiplies in fp32) and stores the scale in fp32: the explicit choice when the ternary pattern must be
the one an fp32-arithmetic training forward used rather than the one TII's exporter writes.

Scale design. Unpacking writes ``W = t * m`` in the chosen dtype, ``m`` the magnitude a ternary ±1
stands for. Re-quantizing that with absmean would keep ``t`` but give ``mean|W| = m * (share of
non-zeros)``, not ``m``; and for bitlinear even ``m`` does not determine the stored scale (in bf16,
``s -> bf16(1/s)`` maps distinct scales to one magnitude). So ``ternarize`` first recognises a
dequantized tensor (every non-zero has the same magnitude: ``t = sign(W)``) and takes its scale
from the record written when it was unpacked, provided that record reproduces ``W`` bit for bit;
with no (or a stale) record the scale is derived from the magnitude. Only a latent tensor is
quantized with absmean. The record travels in ``config.json`` (``bitnet_unpacked``) of unpacked HF
folders and in ``args.bitnet_weight_scales`` of Megatron checkpoints.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

import torch

from bridge.engine.config import config_dtype
from bridge.engine.hf_rewrite import Layout, Producer, rewrite_hf, target_dtype
from bridge.engine.layout import check_tensor_set, expected_hf_shapes
from bridge.errors import InputError, UnsupportedError
from bridge.families import family_of
from bridge.formats.hf import HFCheckpoint, LazyTensors
from mappings.bitnet import BitNetLinears

EPS = 1e-5  # absmean floor of transformers' WeightQuant and onebitllms
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
RECORD_KEY = "bitnet_unpacked"  # config.json entry of an unpacked folder: quantization_config, weight_scale(_dtype)
SCALE_SHAPE = torch.Size((1,))
# Quantization arithmetic -> the dtype it computes in and stores weight_scale in (module docstring).
ARITHMETICS: dict[str, torch.dtype] = {"onebitllms": torch.bfloat16, "fp32": torch.float32}
DEFAULT_ARITHMETIC = "onebitllms"


def quantize(latent: torch.Tensor, arithmetic: str = DEFAULT_ARITHMETIC) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarization over the whole tensor: ``(t int8, s 0-d)``, ``s = 1/max(mean|W|, 1e-5)``.

    Every step runs in the arithmetic's dtype (``ARITHMETICS``), rounding each result to it: the
    mean, its reciprocal, the product ``W*s`` (rounded before ``round``, so in bf16 a product just
    above or below .5 can land on the tie) and ``s`` itself. ``torch.round`` rounds half to even, as
    ``quantize_to_1bit`` does; onebitllms' Triton training kernel rounds half up (``floor(x + 0.5)``).
    """
    w = latent.to(ARITHMETICS[arithmetic])
    s = 1.0 / w.abs().mean().clamp(min=EPS)
    return (w * s).round().clamp(-1, 1).to(torch.int8), s


def weight_scale(magnitude: torch.Tensor, linear_class: str) -> torch.Tensor:
    """The stored ``weight_scale`` for the value a ternary ±1 stands for (``mean`` when quantizing),
    computed in the argument's dtype: 1/magnitude for bitlinear, magnitude for autobitlinear. The map
    is its own inverse, so it also turns a stored scale back into its magnitude."""
    return 1.0 / magnitude if linear_class == "bitlinear" else magnitude


def dequantize(ternary: torch.Tensor, scale: torch.Tensor, linear_class: str, dtype: torch.dtype) -> torch.Tensor:
    """``t * magnitude`` in ``dtype``; the magnitude is computed in float64 and rounded once."""
    magnitude = weight_scale(scale.double().reshape(()), linear_class).to(dtype)
    return ternary.to(dtype) * magnitude


def pack(ternary: torch.Tensor) -> torch.Tensor:
    """uint8 ``[ceil(rows/4), ...]``, bit-identical to transformers' ``pack_weights`` (which adds 1 to its
    input in place; this leaves the input alone). Padding rows hold field 0."""
    if not bool(((ternary == -1) | (ternary == 0) | (ternary == 1)).all()):
        raise ValueError("values outside {-1, 0, 1}")
    rows, rest = ternary.shape[0], ternary.shape[1:]
    packed_rows = -(-rows // 4)
    fields = torch.zeros((4 * packed_rows, *rest), dtype=torch.uint8)
    fields[:rows] = (ternary + 1).to(torch.uint8)
    f = fields.view(4, packed_rows, *rest)
    return f[0] | f[1] << 2 | f[2] << 4 | f[3] << 6


def unpack(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """int8 ternary ``[rows, ...]``: transformers' ``unpack_weights`` cropped to ``rows``. The unused field
    value 3 raises ValueError -- the tensor is corrupt or not BitNet."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"dtype {packed.dtype}, expected uint8 packed ternary values")
    fields = torch.cat([(packed >> 2 * i) & 3 for i in range(4)])[:rows]
    bad = (fields == 3).nonzero()
    if len(bad):
        byte = (int(bad[0, 0]) % packed.shape[0], *bad[0, 1:].tolist())
        raise ValueError(f"packed byte {byte} holds the unused field value 3, which is not a ternary value")
    return fields.to(torch.int8) - 1


def ternarize(
    w: torch.Tensor, linear_class: str, arithmetic: str = DEFAULT_ARITHMETIC, recorded: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(t int8, weight_scale, how)`` for one whole (TP-gathered) HF tensor; ``how`` says which rule:
    "record" / "dequantized" for a tensor that already is ternary × one magnitude (its recorded
    scale when that reproduces it bit for bit, else one derived from the magnitude), "latent" for
    anything else (``quantize``; autobitlinear stores ``1/s`` in the same dtype, the magnitude
    transformers' ``WeightQuant`` and onebitllms' ``convert_to_bf16`` dequantize ±1 to). See the module
    docstring for why."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError("non-finite values")
    t = w.sign().to(torch.int8)
    nonzero = w[t != 0].abs()
    if bool((nonzero == nonzero[:1]).all()):
        if recorded is not None:
            scale = torch.tensor(recorded, dtype=torch.float64)
            if torch.equal(dequantize(t, scale, linear_class, w.dtype), w):
                return t, scale, "record"
        if len(nonzero):
            return t, weight_scale(nonzero[0].double(), linear_class), "dequantized"
    t, s = quantize(w, arithmetic)
    return t, s if linear_class == "bitlinear" else 1.0 / s, "latent"


def scale_key(weight_key: str) -> str:
    return weight_key + "_scale"


def bitnet_linears(cfg) -> BitNetLinears:
    """The config's family's BitNet rule; UnsupportedError for a family without one."""
    family = family_of(cfg)
    if family.bitnet is None:
        raise UnsupportedError(f"BitNet is not supported for {family.display_name or family.name} models")
    return family.bitnet


def default_quant_config(linear_class: str, linears: BitNetLinears) -> dict:
    """The quantization_config a packed checkpoint gets (transformers' BitNetQuantConfig fields)."""
    if linear_class not in LINEAR_CLASSES:
        raise InputError(f"linear_class {linear_class!r}: expected one of {', '.join(LINEAR_CLASSES)}")
    return {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": "offline",
        "modules_to_not_convert": list(linears.not_converted),
    }


def quant_config(cfg) -> dict | None:
    """The checkpoint's BitNet quantization_config, checked to be one this tool packs the same way
    transformers loads it; None when the config has none."""
    quant = getattr(cfg, "quantization_config", None)
    if not quant:
        return None
    linears = bitnet_linears(cfg)
    family = family_of(cfg)
    name = family.display_name or family.name
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != "bitnet":
        raise UnsupportedError(f"config.json: quantization_config quant_method={method!r}; only 'bitnet' is supported")
    linear_class = quant.get("linear_class", "bitlinear")
    if linear_class not in LINEAR_CLASSES:
        raise InputError(
            f"config.json: quantization_config linear_class={linear_class!r}, expected one of "
            f"{', '.join(LINEAR_CLASSES)}"
        )
    if linear_class == "autobitlinear" and quant.get("quantization_mode", "offline") != "offline":
        raise UnsupportedError(
            "config.json: autobitlinear in online mode stores float weights, not packed ones; "
            "drop quantization_config and convert it as a plain checkpoint"
        )
    if quant.get("use_rms_norm"):
        raise UnsupportedError(
            "config.json: quantization_config use_rms_norm adds an RMSNorm to every linear, "
            f"which Megatron's {name} has no place for"
        )
    from transformers.quantizers.quantizers_utils import (
        should_convert_module,  # slow import; BitNet only
    )

    not_converted = list(linears.not_converted)
    skip = quant.get("modules_to_not_convert")
    skip = not_converted if skip is None else skip  # None: transformers' default skip, lm_head here
    modules = linears.modules(expected_hf_shapes(cfg))
    wrong = [m for m in modules if not should_convert_module(m, skip)]
    if wrong or should_convert_module("lm_head", skip):
        what = f"leaves {wrong[0]!r} unquantized" if wrong else "quantizes lm_head"
        raise UnsupportedError(
            f"config.json: quantization_config modules_to_not_convert={skip} {what}; "
            f"supported: every {name} BitNet linear packed except {not_converted}"
        )
    return quant


@overload
def packed_layout(
    layout: Layout, linears: BitNetLinears, scale_dtype: torch.dtype
) -> dict[str, tuple[torch.Size, torch.dtype]]: ...


@overload
def packed_layout(
    layout: Mapping[str, tuple[torch.Size, torch.dtype | None]], linears: BitNetLinears, scale_dtype: None
) -> dict[str, tuple[torch.Size, torch.dtype | None]]: ...


def packed_layout(
    layout: Mapping[str, tuple[torch.Size, torch.dtype | None]], linears: BitNetLinears, scale_dtype: torch.dtype | None
) -> dict[str, tuple[torch.Size, Any]]:  # Any: the overloads above give the precise dtype type
    """The layout with each BitNet linear as uint8 ``[out/4, in]`` followed by its ``weight_scale [1]``
    (a ``None`` dtype, as when only the shapes are wanted, stays ``None``)."""
    out: dict[str, tuple[torch.Size, torch.dtype | None]] = {}
    for key, (shape, dtype) in layout.items():
        if not linears.is_weight(key):
            out[key] = (shape, dtype)
            continue
        if shape[0] % 4:
            hint = " (Mamba in_proj rows = 2*d_ssm + 2*n_groups*d_state + n_heads)" if "in_proj" in key else ""
            raise UnsupportedError(
                f"{key}: {shape[0]} output rows{hint}; BitNet packing needs a multiple of 4 "
                "(transformers' BitLinear stores out_features // 4 packed rows)"
            )
        out[key] = (torch.Size((shape[0] // 4, *shape[1:])), torch.uint8)
        out[scale_key(key)] = (SCALE_SHAPE, scale_dtype)
    return out


def check_biases(keys, linears: BitNetLinears, linear_class: str) -> None:
    """transformers' AutoBitLinear (offline) computes ``(x·t + bias)·weight_scale``: it scales the bias
    too, so a BitNet linear with a bias has no faithful autobitlinear form (BitLinear adds it after)."""
    if linear_class != "autobitlinear":
        return
    for key in keys:
        if linears.is_weight(key) and (bias := key.removesuffix("weight") + "bias") in keys:
            raise UnsupportedError(
                f"{bias}: transformers' AutoBitLinear multiplies the bias by weight_scale too, so a "
                "biased BitNet linear cannot be stored as autobitlinear; use linear_class bitlinear"
            )


class UnpackedView:
    """A BitNet-packed HF folder read as the plain checkpoint it encodes: BitNet linears come out as
    ternary × magnitude in ``dtype`` (default: the config's), everything else as stored. It has
    HFCheckpoint's reading interface, so it is a drop-in source for hf_to_megatron."""

    def __init__(self, ckpt: HFCheckpoint, dtype: torch.dtype | None = None):
        self.ckpt, self.folder, self.config = ckpt, ckpt.folder, ckpt.config
        quant = quant_config(self.config)
        if quant is None:
            raise InputError(f"{self.folder / 'config.json'}: no BitNet quantization_config; not a packed checkpoint")
        self.quant, self.linear_class = quant, quant.get("linear_class", "bitlinear")
        self.linears = bitnet_linears(self.config)
        self.shapes = expected_hf_shapes(self.config)
        check_biases(self.shapes, self.linears, self.linear_class)
        packed = packed_layout({k: (s, None) for k, s in self.shapes.items()}, self.linears, None)
        check_tensor_set(
            str(self.folder),
            {k: ckpt.shape(k) for k in ckpt.keys()},
            {k: s for k, (s, _) in packed.items()},
            " (BitNet-packed checkpoint)",
        )
        self.weight_dtype = dtype or config_dtype(self.config)

    def release(self) -> None:
        self.ckpt.release()

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> torch.Size:
        return self.shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.weight_dtype if self.linears.is_weight(key) else self.ckpt.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        if not self.linears.is_weight(key):
            return self.ckpt.get(key)
        try:
            ternary = unpack(self.ckpt.get(key), self.shapes[key][0])
        except ValueError as e:
            raise InputError(f"{self.folder}: {key!r}: {e}") from None
        return dequantize(ternary, self.scale(key), self.linear_class, self.weight_dtype)

    def scale(self, weight_key: str) -> torch.Tensor:
        key = scale_key(weight_key)
        scale = self.ckpt.get(key)
        if not scale.is_floating_point() or not bool(torch.isfinite(scale).all() & (scale > 0).all()):
            raise InputError(f"{self.folder}: {key!r} = {scale.tolist()}; expected one finite positive float")
        return scale

    def record(self) -> dict[str, float]:
        """Every stored weight_scale, exactly (a float64 holds any bf16/fp16/fp32 value)."""
        return {scale_key(k): float(self.scale(k)) for k in self.shapes if self.linears.is_weight(k)}

    def scale_dtype(self) -> torch.dtype:
        """The one dtype the weight_scale tensors are stored in (onebitllms: bf16, whatever config.json says)."""
        dtypes = {self.ckpt.dtype(scale_key(k)) for k in self.shapes if self.linears.is_weight(k)}
        if len(dtypes) != 1:
            names = ", ".join(sorted(map(dtype_str, dtypes)))
            raise UnsupportedError(f"{self.folder}: weight_scale tensors in several dtypes ({names}); expected one")
        return dtypes.pop()

    def asset_files(self) -> list[Path]:
        return self.ckpt.asset_files()


def hf_source(ckpt: HFCheckpoint, dtype: torch.dtype | None) -> tuple[HFCheckpoint | UnpackedView, dict]:
    """What hf_to_megatron reads and adds to ``args``. A packed folder is read unpacked (ternary × scale
    in ``dtype``) and adds the BitNet flag (Megatron-LM's ``--use-bitnet``), the scale convention and
    the exact scales (values and dtype) that make the export bit-exact; any other folder is read as is."""
    if not getattr(ckpt.config, "quantization_config", None):
        return ckpt, {}
    view = UnpackedView(ckpt, dtype)  # checks the quantization_config
    return view, {
        "use_bitnet": True,
        "bitnet_linear_class": view.linear_class,
        "bitnet_weight_scales": view.record(),
        "bitnet_scale_dtype": dtype_str(view.scale_dtype()),
    }


ARGS_FIELDS = ("use_bitnet", "bitnet_linear_class", "bitnet_weight_scales", "bitnet_scale_dtype")


def carried_args(args) -> dict:
    """The BitNet fields of a Megatron checkpoint's ``args``, for re-sharding to keep (its exact scales)."""
    return {k: getattr(args, k) for k in ARGS_FIELDS if args is not None and hasattr(args, k)}


def dtype_str(dtype: torch.dtype) -> str:
    """How args and config.json name a dtype: "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def scale_dtype(recorded: str | None, arithmetic: str) -> torch.dtype:
    """The dtype weight_scale is written in: the recorded one (a packed origin's), else the arithmetic's."""
    if arithmetic not in ARITHMETICS:
        raise InputError(f"BitNet arithmetic {arithmetic!r}: expected one of {', '.join(ARITHMETICS)}")
    if recorded is None:
        return ARITHMETICS[arithmetic]
    dtype = getattr(torch, str(recorded), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"BitNet weight_scale dtype {str(recorded)[:40]!r}: expected a float dtype name")
    return dtype


class BitNetExport:
    """Writes BitNet linears packed (``pack``) or plain, and config.json with quantization_config or the
    unpacked record. An export transform in bridge.convert's sense: ``layout``, ``producer``,
    ``edit_config``; tensors arrive whole (TP-gathered) at source precision."""

    def __init__(
        self,
        pack: bool,
        quant: dict,
        scales: Mapping[str, float],
        scale_dtype: torch.dtype,
        linears: BitNetLinears,
        arithmetic: str = DEFAULT_ARITHMETIC,
    ):
        self.pack, self.quant, self.scales, self.scale_dtype = pack, quant, dict(scales), scale_dtype
        self.linears, self.arithmetic = linears, arithmetic
        self.linear_class = quant.get("linear_class", "bitlinear")
        self.counts: Counter[str] = Counter()
        self._last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def layout(self, layout: Layout) -> dict[str, tuple[torch.Size, torch.dtype]]:
        if not self.pack:
            return dict(layout)
        check_biases(layout, self.linears, self.linear_class)
        return packed_layout(layout, self.linears, self.scale_dtype)

    def producer(self, source: Producer, layout: Layout) -> Producer:
        is_weight = self.linears.is_weight

        def tensor(key: str) -> torch.Tensor:
            if self.pack and key.endswith("_scale") and is_weight(key[: -len("_scale")]):
                return self._packed(key[: -len("_scale")], source)[1]
            if self.pack and is_weight(key):
                return self._packed(key, source)[0]
            return source([key])[key].to(layout[key][1])

        return lambda keys: LazyTensors(keys, tensor)

    def _packed(self, key: str, source: Producer) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed weight and scale of one linear; kept until the next, as a shard may end between the two."""
        if self._last is None or self._last[0] != key:
            try:
                t, scale, how = ternarize(
                    source([key])[key], self.linear_class, self.arithmetic, self.scales.get(scale_key(key))
                )
            except ValueError as e:
                raise InputError(f"{key}: {e}") from None
            self.counts[how] += 1
            self._last = (key, (pack(t), scale.reshape(1).to(self.scale_dtype)))
        return self._last[1]

    def edit_config(self, path: Path) -> None:
        """Packed: quantization_config in, record out. Plain: the reverse, when there are scales to record.
        An unchanged config keeps its bytes."""
        data = json.loads(path.read_text())
        new = dict(data)
        if self.pack:
            new.pop(RECORD_KEY, None)
            new["quantization_config"] = self.quant
        else:
            new.pop("quantization_config", None)
            if self.scales:
                new[RECORD_KEY] = {
                    "quantization_config": self.quant,
                    "weight_scale": dict(sorted(self.scales.items())),
                    "weight_scale_dtype": dtype_str(self.scale_dtype),
                }
        if new != data:
            path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")


def export_transform(
    cfg, args: Mapping, pack: bool | None, arithmetic: str = DEFAULT_ARITHMETIC
) -> BitNetExport | None:
    """The BitNet rewrite for megatron_to_hf, or None. ``pack=None`` packs a BitNet checkpoint (config
    quantization_config or ``args.use_bitnet``); a packed-origin one exported plain loses its
    quantization_config and records its scales instead."""
    quant = quant_config(cfg)
    record = getattr(cfg, RECORD_KEY, None) or {}
    if pack is None:
        pack = quant is not None or bool(args.get("use_bitnet"))
    if not pack and quant is None:
        return None
    linears = bitnet_linears(cfg)
    quant = (
        quant
        or record.get("quantization_config")
        or default_quant_config(args.get("bitnet_linear_class", "bitlinear"), linears)
    )
    scales = args.get("bitnet_weight_scales") or record.get("weight_scale") or {}
    dtype = scale_dtype(args.get("bitnet_scale_dtype") or record.get("weight_scale_dtype"), arithmetic)
    return BitNetExport(pack, quant, scales, dtype, linears, arithmetic)


@dataclass
class BitNetReport:
    """What pack/unpack did; ``quantized`` counts the linears by ``ternarize`` rule."""

    source: str
    destination: str
    direction: str
    linear_class: str
    dtype: str
    arithmetic: str | None = None  # pack only: the quantization arithmetic of latent weights
    tensors: int = 0
    linears: int = 0
    quantized: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    plan: dict | None = None  # --dry-run: ``engine.dry_run.OutputPlan``

    def to_dict(self) -> dict:
        return asdict(self)


def _rewrite(
    src: Path,
    dst: Path,
    source,
    transform: BitNetExport,
    report: BitNetReport,
    target: torch.dtype | None,
    force: bool,
    max_shard_size: str | int,
    progress: bool,
    dry_run: bool,
) -> BitNetReport:
    """Streams ``source`` through ``transform`` into an HF folder, config and tokenizer assets included."""
    start = time.perf_counter()
    layout = transform.layout({k: (source.shape(k), target or source.dtype(k)) for k in source.keys()})
    report.bytes_written, report.plan = rewrite_hf(
        src,
        dst,
        source,
        transform,
        layout,
        target,
        force=force,
        max_shard_size=max_shard_size,
        progress=progress,
        desc=f"bitnet {report.direction}",
        dry_run=dry_run,
    )
    report.dry_run = dry_run
    report.tensors, report.quantized = len(layout), dict(transform.counts)
    report.linears = sum(transform.linears.is_weight(k) for k in layout)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def pack_checkpoint(
    src_hf: Path,
    dst_hf: Path,
    *,
    linear_class: str | None = None,
    arithmetic: str = DEFAULT_ARITHMETIC,
    dtype: str = "keep",
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    dry_run: bool = False,
) -> BitNetReport:
    """HF latent or unpacked weights -> ternary-packed HF with ``weight_scale`` and quantization_config.

    Each BitNet linear of the family (``ModelFamily.bitnet``) is quantized over its whole tensor with
    ``arithmetic`` (``ARITHMETICS``; the default is onebitllms' bytes). ``linear_class`` defaults to the
    one an unpacked folder records, else bitlinear; ``dtype`` is that of the unquantized tensors;
    weight_scale keeps the recorded dtype of an unpacked folder, else the arithmetic's.
    """
    src_hf, dst_hf = Path(src_hf), Path(dst_hf)
    target = target_dtype(dtype)
    ckpt = HFCheckpoint(src_hf)
    cfg = ckpt.config
    if quant_config(cfg) is not None:
        raise InputError(f"{src_hf / 'config.json'}: already BitNet-packed (quantization_config); nothing to pack")
    check_tensor_set(str(src_hf), {k: ckpt.shape(k) for k in ckpt.keys()}, expected_hf_shapes(cfg))
    record = getattr(cfg, RECORD_KEY, None) or {}
    recorded = record.get("quantization_config")
    linear_class = linear_class or (recorded or {}).get("linear_class", "bitlinear")
    linears = bitnet_linears(cfg)
    if recorded and recorded.get("linear_class", "bitlinear") == linear_class:
        quant, scales, dtype_name = recorded, record.get("weight_scale", {}), record.get("weight_scale_dtype")
    else:  # recorded scales follow the other convention; derive them from the magnitudes instead
        quant, scales, dtype_name = default_quant_config(linear_class, linears), {}, None
    transform = BitNetExport(True, quant, scales, scale_dtype(dtype_name, arithmetic), linears, arithmetic)
    report = BitNetReport(str(src_hf), str(dst_hf), "pack", linear_class, dtype, arithmetic)
    return _rewrite(src_hf, dst_hf, ckpt, transform, report, target, force, max_shard_size, progress, dry_run)


def unpack_checkpoint(
    src_packed: Path,
    dst_hf: Path,
    *,
    dtype: str = "keep",
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    dry_run: bool = False,
) -> BitNetReport:
    """Ternary-packed HF -> plain HF with ternary × scale weights in ``dtype`` (default: the config's),
    no quantization_config, and the exact scales recorded so that packing again is bit-exact."""
    src_packed, dst_hf = Path(src_packed), Path(dst_hf)
    target = target_dtype(dtype)
    view = UnpackedView(HFCheckpoint(src_packed), target)
    transform = BitNetExport(False, view.quant, view.record(), view.scale_dtype(), view.linears)
    report = BitNetReport(str(src_packed), str(dst_hf), "unpack", view.linear_class, dtype)
    return _rewrite(src_packed, dst_hf, view, transform, report, target, force, max_shard_size, progress, dry_run)


def describe(cfg, args: Mapping) -> str | None:
    """One line for ``inspect``: how this checkpoint holds BitNet weights, None when it has none."""
    quant = getattr(cfg, "quantization_config", None)
    record = getattr(cfg, RECORD_KEY, None)
    if args.get("use_bitnet"):
        return (
            f"Megatron BitNet ({args.get('bitnet_linear_class', 'bitlinear')}): weights stored unpacked, "
            "megatron-to-hf writes them ternary-packed"
        )
    if isinstance(quant, dict) and quant.get("quant_method") == "bitnet":
        return f"ternary-packed ({quant.get('linear_class', 'bitlinear')}), one weight_scale per linear"
    if isinstance(record, dict):
        return (
            f"unpacked ternary × scale, {len(record.get('weight_scale', {}))} exact scales recorded "
            "(bitnet pack restores the packed checkpoint bit for bit)"
        )
    return None
