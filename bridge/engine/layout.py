"""What a valid checkpoint of a given config must contain, on the HF side and per Megatron rank.

HF names and shapes come from the table (``mappings.hf_shapes``), which tests hold against
transformers' own state dict; Megatron per-rank shapes come from running each rule on meta tensors
of those shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

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
