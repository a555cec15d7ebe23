"""The public Python API; the CLI is a thin layer over these names."""

from __future__ import annotations

from bridge.checks.inspect import format_inspect, inspect_checkpoint
from bridge.checks.parity import ParityReport, parity
from bridge.checks.verify import VerifyReport, verify
from bridge.engine.convert import Summary, hf_to_megatron, megatron_to_hf
from bridge.engine.hf_rewrite import DTYPE_CHOICES
from bridge.engine.reshard import reshard
from bridge.engine.targets import DEFAULT_TARGET, TARGETS
from bridge.errors import InputError
from bridge.families import FAMILIES, family_for_model_type
from bridge.features.bitnet import ARITHMETICS, DEFAULT_ARITHMETIC, pack_checkpoint, unpack_checkpoint
from bridge.features.bitnet import LINEAR_CLASSES as BITNET_LINEAR_CLASSES
from bridge.features.mup import FoldReport, fold_mup, unfold_mup
from bridge.formats.registry import FORMATS
from bridge.hub import plan_push, push, validate_hf_folder
from bridge.tiny import ALL_PRESETS, PRESETS, make_tiny
from mappings import LAYOUTS, Layout, megatron_keys, megatron_layer

LAYOUT_CHOICES = tuple(LAYOUTS)
# Every registered family's layouts and make-tiny presets (the CLI's choices should become these).
ALL_LAYOUT_CHOICES = tuple(dict.fromkeys(name for f in FAMILIES.values() for name in f.layouts))
FORMAT_CHOICES = tuple(FORMATS)
PRESET_CHOICES = tuple(PRESETS)
ALL_PRESET_CHOICES = tuple(ALL_PRESETS)
FAMILY_CHOICES = tuple(FAMILIES)
TARGET_CHOICES = TARGETS


def _layer_expr(param, layout: Layout) -> str:
    """How the Megatron layer follows from the HF layer L: ``{L}``, or ``{2L}``/``{2L+1}`` in "P-"."""
    stride, sub = megatron_layer(param, layout, 1) - megatron_layer(param, layout, 0), megatron_layer(param, layout, 0)
    return "{" + (f"{stride}L" if stride > 1 else "L") + (f"+{sub}" if sub else "") + "}"


def mapping_rows(layout: str | None = None, family: str = "falcon_h1") -> list[dict]:
    """A family's table as plain rows (what ``h1bridge mappings`` prints); ``copies``: further keys
    holding the same tensor in this layout (fused norms). ``layout``: the family's first when None."""
    fam = family_for_model_type(family, "--family")
    name = layout or next(iter(fam.layouts))
    if name not in fam.layouts:
        raise InputError(f"--layout {name!r}: the {family} family has {', '.join(fam.layouts)}")
    spec = fam.layouts[name]
    rows = []
    for p in fam.table:
        keys = [k.replace("{L}", _layer_expr(p, spec)) if p.is_layer else k for k in megatron_keys(p, spec)]
        rows.append(
            {
                "megatron": keys[0],
                "copies": keys[1:],
                "hf": list(p.hf),
                "rule": p.rule.name,
                "when": p.when,
                "stage": p.stage,
                "export": p.export,
            }
        )
    return rows


BITNET_ARITHMETICS = tuple(ARITHMETICS)
BITNET_DEFAULT_ARITHMETIC = DEFAULT_ARITHMETIC

__all__ = [
    "BITNET_ARITHMETICS",
    "BITNET_DEFAULT_ARITHMETIC",
    "BITNET_LINEAR_CLASSES",
    "pack_checkpoint",
    "unpack_checkpoint",
    "DEFAULT_TARGET",
    "TARGET_CHOICES",
    "DTYPE_CHOICES",
    "FORMAT_CHOICES",
    "reshard",
    "LAYOUT_CHOICES",
    "ALL_LAYOUT_CHOICES",
    "PRESET_CHOICES",
    "ALL_PRESET_CHOICES",
    "FoldReport",
    "Summary",
    "fold_mup",
    "format_inspect",
    "hf_to_megatron",
    "inspect_checkpoint",
    "make_tiny",
    "mapping_rows",
    "megatron_to_hf",
    "plan_push",
    "push",
    "unfold_mup",
    "validate_hf_folder",
    "ParityReport",
    "parity",
    "VerifyReport",
    "verify",
]
