"""Random Falcon-H1 checkpoints for tests, demos and benchmarks -- never downloaded weights.

``FAMILY`` holds the released shapes (transformers' Falcon-H1 docs table; intermediate and vocab
sizes as in the published configs). Scaled presets keep each model's head, group and head-dim
ratios at a size that runs in milliseconds; test presets add the switches the family does not
cover (several Mamba groups, gated RMSNorm, biases, tied embeddings, µP multipliers).
"""

from __future__ import annotations

import copy
import math
import zlib
from pathlib import Path

import torch
from transformers import FalconH1Config

from bridge.engine.config import check_sizes
from bridge.engine.layout import expected_hf_shapes
from bridge.errors import InputError, UnsupportedError
from bridge.families import FAMILIES, ModelFamily
from bridge.families.falcon_h1 import FALCON_H1_FAMILY
from bridge.formats.hf import LazyTensors, write_hf_weights
from bridge.plumbing.atomic import atomic_output_dir

PRESETS = FALCON_H1_FAMILY.presets
FAMILY = FALCON_H1_FAMILY.released
# Every registered family's presets (names are unique across families).
ALL_PRESETS: dict[str, dict] = {name: fields for f in FAMILIES.values() for name, fields in f.presets.items()}


def preset_family(name: str) -> ModelFamily:
    return next((f for f in FAMILIES.values() if name in f.presets), FALCON_H1_FAMILY)


# ``PreTrainedModel.save_pretrained``'s default ``max_shard_size`` in the installed transformers (a test
# holds the two equal): make-tiny shards as a model saved by transformers would be.
SAVE_PRETRAINED_MAX_SHARD_SIZE = "50GB"


def preset_config(name: str, full: bool = False, **overrides):
    """The config of a preset (``full``: the unscaled released shape, family presets only): a
    FalconH1Config, or the config class of the family the preset belongs to."""
    if full and name not in FAMILY:
        raise InputError(f"--full: preset {name!r} has no released full shape; choose one of {', '.join(FAMILY)}")
    family = preset_family(name)
    check_sizes(overrides, "make-tiny --set", family.positive_sizes, family.optional_sizes)
    if family is not FALCON_H1_FAMILY:
        fields = {**family.presets[name], **overrides}
        return family.config_class(**fields, architectures=[family.hf_architecture])
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(ALL_PRESETS)}")
    fields = {**(FAMILY[name] if full else PRESETS[name]), **overrides}
    fields["mamba_d_ssm"] = fields["mamba_n_heads"] * fields["mamba_d_head"]
    return FalconH1Config(**fields, architectures=["FalconH1ForCausalLM"])


# A scaled preset is built whole by transformers: this bounds its memory (4 GiB in fp32).
MAX_IN_MEMORY_PARAMETERS = 2**30


def _parameters(cfg) -> int:
    """Parameter count from one layer's shapes times the layers, so an absurd layer count costs nothing."""
    layers = cfg.num_hidden_layers
    one = copy.copy(cfg)
    one.num_hidden_layers = 1
    shapes = expected_hf_shapes(one)
    per_layer = sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.layers."))
    return sum(math.prod(s) for k, s in shapes.items() if not k.startswith("model.layers.")) + per_layer * layers


def _random_tensor(key: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Plausible values without building the model: unit norms, Mamba-2 state init, small weights.
    Seeded per key, so the values do not depend on how the tensors are split into shards."""
    if key.endswith(("layernorm.weight", "norm.weight", ".D")):
        return torch.ones(shape, dtype=dtype)
    if key.endswith("A_log"):
        return torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32)).to(dtype)
    gen = torch.Generator().manual_seed((seed * 2**32 + zlib.crc32(key.encode())) % 2**64)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def make_tiny(
    dst: Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    full: bool = False,
    dtype: str = "fp32",
    force: bool = False,
    max_shard_size: str | int | None = None,
    **overrides,
) -> FalconH1Config:
    """Writes a random Falcon-H1 HF checkpoint. Scaled presets go through transformers'
    ``save_pretrained`` (its own init); ``full`` shapes are streamed one tensor at a time instead.
    ``max_shard_size``: ``save_pretrained``'s default when None (one file for every scaled preset);
    pass a small size (e.g. "200KB") for a sharded folder with an index."""
    max_shard_size = SAVE_PRETRAINED_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cfg = preset_config(preset, full, **overrides)
    if not full and _parameters(cfg) > MAX_IN_MEMORY_PARAMETERS:
        raise UnsupportedError(
            f"make-tiny: {preset} with these settings has {_parameters(cfg):,} parameters, more than the "
            f"{MAX_IN_MEMORY_PARAMETERS:,} a model built in memory may have; use --full, which streams"
        )
    cfg.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[torch_dtype]
    with atomic_output_dir(dst, force=force) as tmp:
        if full:
            shapes = expected_hf_shapes(cfg)
            layout = {k: (s, torch_dtype) for k, s in shapes.items()}
            write_hf_weights(
                tmp,
                layout,
                lambda keys: LazyTensors(keys, lambda k: _random_tensor(k, shapes[k], torch_dtype, seed)),
                max_shard_size=max_shard_size,
            )
            cfg.save_pretrained(tmp)
        elif preset_family(preset) is not FALCON_H1_FAMILY:
            from transformers import AutoModelForCausalLM  # ~2 s of imports; only this branch needs it

            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg).to(torch_dtype)
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            from transformers import (
                FalconH1ForCausalLM,  # ~2 s of imports; only this branch needs it
            )

            torch.manual_seed(seed)
            # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to): mypy then sees an unbound _Wrapped
            model = FalconH1ForCausalLM(cfg).to(torch_dtype)  # type: ignore[arg-type]
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
    return cfg
