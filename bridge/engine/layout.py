"""What a valid checkpoint of a given config must contain, on the HF side and per Megatron rank.

HF names and shapes come from the table (``mappings.hf_shapes``), which tests hold against
transformers' own state dict; Megatron per-rank shapes come from running each rule on meta tensors
of those shapes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from bridge.engine.plan import ParallelPlan, hf_name
from bridge.errors import InputError
from bridge.families import family_of
from mappings import Param


def expected_hf_shapes(cfg) -> dict[str, torch.Size]:
    """HF key -> shape of what ``save_pretrained`` stores for this config (tied lm_head dropped)."""
    family = family_of(cfg)
    return {k: torch.Size(s) for k, s in family.hf_shapes(cfg, family.dims(cfg, None)).items()}


def hf_index(plan: ParallelPlan) -> dict[str, tuple[Param, int | None, int]]:
    """HF key -> (table entry, global layer, position in the entry's HF keys), exported entries only."""
    index = {}
    for pp_rank in range(plan.pp):
        for param, layer, _ in plan.stage_entries(pp_rank):
            if param.export:
                for pos, key in enumerate(param.hf):
                    index[hf_name(key, layer)] = (param, layer, pos)
    return index


def expected_rank_shapes(
    plan: ParallelPlan, hf_shapes: Mapping[str, torch.Size], pp_rank: int
) -> dict[str, torch.Size]:
    """Megatron key -> per-rank shape on one pipeline stage."""
    out: dict[str, torch.Size] = {}
    for param, layer, local in plan.stage_entries(pp_rank):
        shapes = [hf_shapes[hf_name(k, layer)] for k in param.hf]
        shape = plan.shard_shape(param, shapes)
        out.update((name, shape) for name in plan.megatron_names(param, local))
    return out


def check_tensor_set(
    where: str, found: Mapping[str, torch.Size], expected: Mapping[str, torch.Size], hint: str = ""
) -> None:
    """One-line errors for the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise InputError(f"{where}: missing tensor {missing[0]!r}{hint} ({len(missing)} missing in all)")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise InputError(f"{where}: unexpected tensor {unexpected[0]!r}{hint} ({len(unexpected)} in all)")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise InputError(f"{where}: {key!r} has shape {tuple(found[key])}, config expects {tuple(shape)}")


def check_float_dtypes(where: str, dtypes: Mapping[str, torch.dtype]) -> None:
    """Every Falcon-H1 weight is floating point; an integer tensor is a corrupt or foreign checkpoint
    (casting it would silently turn it into nonsense weights)."""
    for key, dtype in dtypes.items():
        if not dtype.is_floating_point:
            name = str(dtype).removeprefix("torch.")
            raise InputError(f"{where}: {key!r} has dtype {name}, expected a floating-point weight (bf16/fp16/fp32)")


_HF_LAYER = re.compile(r"model\.layers\.(\d{1,9})\.")
_MEGATRON_LAYER = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")


def _layer_of(pattern: re.Pattern, key: str) -> int | None:
    match = pattern.match(key) if pattern is _HF_LAYER else pattern.search(key)
    return int(match.group(1)) if match else None


def _one_layer(cfg):
    """A copy of ``cfg`` with one layer: what every layer of it looks like, without expanding them all."""
    small = copy.deepcopy(cfg)
    small.num_hidden_layers = 1
    return small


def _size_fields(cfg) -> dict[str, int]:
    family = family_of(cfg)
    fields = {name: getattr(cfg, name, None) for name in family.positive_sizes + family.optional_sizes}
    return {k: v for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool)}


def check_hf_sizes(where: str, cfg, shapes: Mapping[str, Sequence[int]]) -> None:
    """The config's sizes against the tensors actually present (``shapes``: key -> header shape), before
    anything is expanded per layer: the layer count against the distinct ``model.layers.N.`` prefixes,
    then every present tensor against its shape in a one-layer copy of the config (the embedding gives
    vocab and hidden size, q_proj heads × head_dim...). Missing and unexpected tensors are left to
    ``check_tensor_set``. ``where`` is the config file the error names."""
    layers = {n for n in (_layer_of(_HF_LAYER, k) for k in shapes) if n is not None}
    declared = cfg.num_hidden_layers
    if len(layers) != declared or (layers and max(layers) >= declared):
        held = f"layers {min(layers)} to {max(layers)}" if layers else "no model.layers.N tensors"
        raise InputError(f"{where}: num_hidden_layers is {declared}; the tensors hold {len(layers)} layer(s) ({held})")
    if getattr(cfg, "quantization_config", None):  # packed weights (BitNet) have their own shapes
        return
    small = _one_layer(cfg)
    family = family_of(small)
    anchors = family.hf_shapes(small, family.dims(small, None))
    for key, shape in shapes.items():
        layer = _layer_of(_HF_LAYER, key)
        anchor = key if layer is None else key.replace(f"model.layers.{layer}.", "model.layers.0.", 1)
        if anchor not in anchors or tuple(shape) == tuple(anchors[anchor]):
            continue
        expected = tuple(anchors[anchor])
        found = f"{key!r} has shape {tuple(shape)} in the shards, the config expects {expected}"
        named = _field_to_blame(small, anchor, tuple(shape), expected)
        if named is not None:
            name, want, got = named
            raise InputError(f"{where}: {name} is {want}; the tensors say {got} ({found})")
        raise InputError(f"{where}: {found}")


def _field_to_blame(small, anchor: str, shape: tuple, expected: tuple) -> tuple[str, int, int] | None:
    """(field, config value, value the tensor implies) for the one size field whose change to a
    mismatched dimension makes ``anchor``'s expected shape the one found; None when none does alone."""
    if len(shape) != len(expected):
        return None
    family = family_of(small)
    for name, value in _size_fields(small).items():
        for want, got in zip(expected, shape, strict=True):
            if want == got or value != want:
                continue
            trial = copy.deepcopy(small)
            try:
                setattr(trial, name, got)
                if tuple(family.hf_shapes(trial, family.dims(trial, None)).get(anchor, ())) == shape:
                    return name, want, got
            except Exception:  # a value the config cannot take: not this field
                continue
    return None


def check_megatron_layers(where: str, cfg, stage_keys: Sequence[Iterable[str]]) -> None:
    """The config's layer count against the Megatron layers present (``stage_keys``: the model keys of
    TP rank 0 on each pipeline stage, layers numbered per stage), before anything is expanded per
    layer. Each HF layer is ``len(pattern)`` Megatron layers in one of the family's layouts."""
    present = 0
    for keys in stage_keys:
        present += len({n for n in (_layer_of(_MEGATRON_LAYER, k) for k in keys) if n is not None})
    declared = cfg.num_hidden_layers
    per_layer = sorted({len(getattr(layout, "pattern", "P")) for layout in family_of(cfg).layouts.values()})
    if present not in {declared * k for k in per_layer}:
        raise InputError(
            f"{where}: the model config has num_hidden_layers {declared}; the rank files hold {present} "
            f"Megatron layer(s) (expected {' or '.join(str(declared * k) for k in per_layer)})"
        )
