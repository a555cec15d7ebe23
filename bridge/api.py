"""The public Python API; the CLI is a thin layer over these names."""

from __future__ import annotations

from mappings import FALCON_H1, LAYOUTS, megatron_key

from .hub import plan_push, push, validate_hf_folder
from .convert import DTYPE_CHOICES, Summary, hf_to_megatron, megatron_to_hf
from .inspect import format_inspect, inspect_checkpoint
from .tiny import PRESETS, make_tiny

LAYOUT_CHOICES = tuple(LAYOUTS)
PRESET_CHOICES = tuple(PRESETS)


def mapping_rows(layout: str = "bridge") -> list[dict]:
    """The Falcon-H1 table as plain rows (what ``h1bridge mappings`` prints)."""
    return [
        {"megatron": megatron_key(p, layout), "hf": list(p.hf), "rule": p.rule.name, "when": p.when,
         "stage": p.stage, "export": p.export}
        for p in FALCON_H1
    ]


__all__ = [
    "DTYPE_CHOICES", "LAYOUT_CHOICES", "PRESET_CHOICES", "Summary", "format_inspect", "hf_to_megatron",
    "inspect_checkpoint", "make_tiny", "mapping_rows", "megatron_to_hf", "plan_push", "push", "validate_hf_folder",
]
