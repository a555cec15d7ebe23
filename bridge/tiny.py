"""Random Falcon-H1 checkpoints for tests, demos and benchmarks -- never downloaded weights.

``FAMILY`` holds the released shapes (transformers' Falcon-H1 docs table; intermediate and vocab
sizes as in the published configs). Scaled presets keep each model's head, group and head-dim
ratios at a size that runs in milliseconds; test presets add the switches the family does not
cover (several Mamba groups, gated RMSNorm, biases, tied embeddings, µP multipliers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import FalconH1Config

from bridge.engine.layout import expected_hf_shapes
from bridge.errors import InputError
from bridge.formats.hf import write_hf_weights
from bridge.plumbing.atomic import atomic_output_dir

FAMILY: dict[str, dict] = {
    "0.5b": dict(num_hidden_layers=36, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128,
                 vocab_size=32784),
    "1.5b": dict(num_hidden_layers=24, hidden_size=2048, intermediate_size=4096, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, mamba_n_heads=48, mamba_d_head=64, mamba_d_state=256,
                 vocab_size=65537),
    "1.5b-deep": dict(num_hidden_layers=66, hidden_size=1280, intermediate_size=3072, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=128, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=256,
                      vocab_size=65537),
    "3b": dict(num_hidden_layers=32, hidden_size=2560, intermediate_size=6144, num_attention_heads=10,
               num_key_value_heads=2, head_dim=128, mamba_n_heads=32, mamba_d_head=128, mamba_d_state=256,
               vocab_size=65537),
    "7b": dict(num_hidden_layers=44, hidden_size=3072, intermediate_size=12288, num_attention_heads=12,
               num_key_value_heads=2, head_dim=128, mamba_n_heads=24, mamba_d_head=128, mamba_d_state=256,
               vocab_size=130049),
    "34b": dict(num_hidden_layers=72, hidden_size=5120, intermediate_size=21504, num_attention_heads=20,
                num_key_value_heads=4, head_dim=128, mamba_n_heads=32, mamba_d_head=128, mamba_d_state=256,
                vocab_size=261120),
}
COMMON = dict(mamba_n_groups=1, mamba_d_conv=4, mamba_rms_norm=False, mamba_norm_before_gate=False,
              tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e11},
              max_position_embeddings=4096)


def _scaled(shape: dict) -> dict:
    """Same head/group counts, dims shrunk so the model has a few hundred thousand parameters."""
    return dict(shape, num_hidden_layers=4, hidden_size=shape["hidden_size"] // 16,
                intermediate_size=shape["intermediate_size"] // 16, head_dim=shape["head_dim"] // 8,
                mamba_d_head=shape["mamba_d_head"] // 8, mamba_d_state=shape["mamba_d_state"] // 16,
                vocab_size=317)


_MUP = dict(embedding_multiplier=2.5, lm_head_multiplier=0.375, key_multiplier=1.75, attention_in_multiplier=0.5,
            attention_out_multiplier=1.25, ssm_in_multiplier=0.75, ssm_out_multiplier=1.5,
            mlp_multipliers=[0.625, 1.375], ssm_multipliers=[1.5, 0.5, 2.0, 0.25, 1.125])

PRESETS: dict[str, dict] = {
    **{name: _scaled(shape) for name, shape in FAMILY.items()},
    # Default demo/test model: several groups so TP=2/4 is possible, gated RMSNorm on.
    "tiny": dict(_scaled(FAMILY["0.5b"]), num_key_value_heads=4, mamba_n_groups=4, mamba_rms_norm=True),
    "tiny-bias-tied": dict(_scaled(FAMILY["3b"]), mamba_n_groups=2, tie_word_embeddings=True, projectors_bias=True,
                           attention_bias=True, mlp_bias=True, mamba_proj_bias=True, mamba_conv_bias=True),
    "tiny-mup": dict(_scaled(FAMILY["1.5b"]), mamba_n_groups=4, mamba_conv_bias=False, **_MUP),
}


def preset_config(name: str, full: bool = False, **overrides) -> FalconH1Config:
    """The FalconH1Config of a preset (``full``: the unscaled released shape, family presets only)."""
    if full and name not in FAMILY:
        raise InputError(f"--full: preset {name!r} has no released full shape; choose one of {', '.join(FAMILY)}")
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {**COMMON, **(FAMILY[name] if full else PRESETS[name]), **overrides}
    fields["mamba_d_ssm"] = fields["mamba_n_heads"] * fields["mamba_d_head"]
    return FalconH1Config(**fields, architectures=["FalconH1ForCausalLM"])


def _random_tensor(key: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Plausible values without building the model: unit norms, Mamba-2 state init, small weights."""
    if key.endswith(("layernorm.weight", "norm.weight", ".D")):
        return torch.ones(shape, dtype=dtype)
    if key.endswith("A_log"):
        return torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32)).to(dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def make_tiny(
    dst: Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    full: bool = False,
    dtype: str = "fp32",
    force: bool = False,
    max_shard_size: str | int = "200KB",
    **overrides,
) -> FalconH1Config:
    """Writes a random Falcon-H1 HF checkpoint. Scaled presets go through transformers'
    ``save_pretrained`` (its own init); ``full`` shapes are streamed shard by shard instead."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cfg = preset_config(preset, full, **overrides)
    cfg.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[torch_dtype]
    with atomic_output_dir(dst, force=force) as tmp:
        if full:
            gen = torch.Generator().manual_seed(seed)
            shapes = expected_hf_shapes(cfg)
            layout = {k: (s, torch_dtype) for k, s in shapes.items()}
            write_hf_weights(tmp, layout, lambda keys: {k: _random_tensor(k, shapes[k], torch_dtype, gen) for k in keys},
                             max_shard_size=max_shard_size)
            cfg.save_pretrained(tmp)
        else:
            from transformers import (
                FalconH1ForCausalLM,  # ~2 s of imports; only this branch needs it
            )

            torch.manual_seed(seed)
            model = FalconH1ForCausalLM(cfg).to(torch_dtype)
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
    return cfg
