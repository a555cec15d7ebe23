"""Declarative Falcon-H1 mapping tables and the pure tensor-parallel rules they use."""

from .dims import FalconH1Dims, padded_vocab_size
from .falcon_h1 import (
    DEFAULT_LAYOUT,
    FALCON_H1,
    LAYOUTS,
    Layout,
    Param,
    extra_state_modules,
    hf_shapes,
    megatron_key,
    megatron_keys,
    megatron_layer,
    params_for,
)
from .rules import Rule, ShardError

__all__ = [
    "DEFAULT_LAYOUT",
    "FALCON_H1",
    "LAYOUTS",
    "Layout",
    "FalconH1Dims",
    "Param",
    "extra_state_modules",
    "hf_shapes",
    "Rule",
    "ShardError",
    "megatron_key",
    "megatron_keys",
    "megatron_layer",
    "padded_vocab_size",
    "params_for",
]
