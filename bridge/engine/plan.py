"""Parallel layout of one Megatron checkpoint: which rank holds what, and whether Megatron can run it.

The divisibility checks mirror megatron-core's own asserts (``MambaMixer.__init__``,
``Attention.__init__``, ``MLP``) so a layout Megatron would reject is refused here, before
anything is written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from bridge.errors import UnsupportedError
from bridge.families import ModelFamily, family_of
from mappings import Param, megatron_keys, megatron_layer, padded_vocab_size


@dataclass(frozen=True)
class ParallelPlan:
    hf_config: Any  # transformers config of a registered family
    tp: int
    pp: int
    divisible_by: int = 128
    layout: str = "bridge"
    padded_vocab: int | None = None  # as found in an existing checkpoint; computed when None
    dims: Any = field(init=False)  # the family's sizes (FalconH1Dims, LlamaDims)

    def __post_init__(self):
        check_parallel_sizes(self.hf_config, self.tp, self.pp)
        padded = self.padded_vocab or padded_vocab_size(self.hf_config.vocab_size, self.divisible_by, self.tp)
        object.__setattr__(self, "dims", self.family.dims(self.hf_config, padded))

    @property
    def family(self) -> ModelFamily:
        return family_of(self.hf_config)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    @property
    def params(self) -> list[Param]:
        return self.family.params_for(self.hf_config, self.pp)

    def ranks(self) -> list[tuple[int, int]]:
        """(tp_rank, pp_rank) pairs, in the order files are written."""
        return [(t, p) for p in range(self.pp) for t in range(self.tp)]

    def stage_entries(self, pp_rank: int) -> list[tuple[Param, int | None, int | None]]:
        """(param, global layer, local layer) for everything stored on one pipeline stage."""
        out: list[tuple[Param, int | None, int | None]] = []
        first, last = pp_rank == 0, pp_rank == self.pp - 1
        for p in self.params:
            if p.stage == "first" and first:
                out.append((p, None, None))
        for local in range(self.layers_per_stage):
            glob = pp_rank * self.layers_per_stage + local
            out += [(p, glob, local) for p in self.params if p.is_layer]
        for p in self.params:
            if p.stage == "last" and last:
                out.append((p, None, None))
        return out

    def megatron_names(self, param: Param, layer: int | None) -> tuple[str, ...]:
        """Every key the entry is stored under in this layout (copies for fused norms). ``layer`` is the
        HF layer: local to the stage for legacy files, global for torch_dist."""
        spec = self.family.layouts[self.layout]
        keys = megatron_keys(param, spec)
        if layer is None:
            return keys
        index = str(megatron_layer(param, spec, layer))
        return tuple(k.replace("{L}", index) for k in keys)

    def megatron_name(self, param: Param, local_layer: int | None) -> str:
        """The key the entry is read from."""
        return self.megatron_names(param, local_layer)[0]

    def stage_of_layer(self, layer: int) -> tuple[int, int]:
        """(pp_rank, local index) of a global layer."""
        return divmod(layer, self.layers_per_stage)

    def shard_shape(self, param: Param, hf_shapes: list[torch.Size]) -> torch.Size:
        """Per-rank shape, computed by running the rule on meta tensors."""
        return _shard_shape(param.rule, self.dims, self.tp, tuple(tuple(s) for s in hf_shapes))


@functools.cache
def _shard_shape(rule, dims: Any, tp: int, hf_shapes: tuple[tuple[int, ...], ...]) -> torch.Size:
    """Cached: every layer asks the same few questions, and a meta-tensor run costs ~2 ms."""
    metas = [torch.empty(s, device="meta") for s in hf_shapes]
    return rule.shard(metas, dims, tp, 0).shape


def hf_name(param_key: str, layer: int | None) -> str:
    return param_key if layer is None else param_key.replace("{L}", str(layer))


def check_parallel_sizes(cfg, tp: int, pp: int) -> None:
    """Raises UnsupportedError, naming the constraint, when Megatron cannot run this TP/PP (the
    family's own asserts after the generic ones)."""
    if tp < 1 or pp < 1:
        raise UnsupportedError(f"TP and PP must be >= 1 (got TP={tp}, PP={pp})")
    family_of(cfg).check_parallel(cfg, tp, pp)
