"""Falcon-H1 as a ``ModelFamily``: the mapping table (``mappings/falcon_h1.py``), its sizes, the
config <-> Megatron args translation, Megatron-Bridge's provider, the TP/PP megatron-core accepts,
the parity forward, and the make-tiny presets (the released family's shapes, scaled down)."""

from __future__ import annotations

from bridge.errors import UnsupportedError
from bridge.families import ModelFamily, falcon_h1_forward, register
from bridge.families.falcon_h1_args import (
    COMPARED_FIELDS,
    MB_PROVIDER_TARGET,
    MUP_FIELDS,
    OPTIONAL_SIZES,
    POSITIVE_SIZES,
    hf_config_from_args,
    megatron_args,
    provider_fields,
)
from mappings import (
    FALCON_H1,
    LAYOUTS,
    FalconH1Dims,
    extra_state_modules,
    hf_shapes,
    params_for,
)
from mappings.bitnet import BitNetLinears
from mappings.falcon_h1 import LAYER

RELEASED: dict[str, dict] = {
    "0.5b": dict(
        num_hidden_layers=36,
        hidden_size=1024,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        mamba_n_heads=24,
        mamba_d_head=64,
        mamba_d_state=128,
        vocab_size=32784,
    ),
    "1.5b": dict(
        num_hidden_layers=24,
        hidden_size=2048,
        intermediate_size=4096,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        mamba_n_heads=48,
        mamba_d_head=64,
        mamba_d_state=256,
        vocab_size=65537,
    ),
    "1.5b-deep": dict(
        num_hidden_layers=66,
        hidden_size=1280,
        intermediate_size=3072,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=128,
        mamba_n_heads=24,
        mamba_d_head=64,
        mamba_d_state=256,
        vocab_size=65537,
    ),
    "3b": dict(
        num_hidden_layers=32,
        hidden_size=2560,
        intermediate_size=6144,
        num_attention_heads=10,
        num_key_value_heads=2,
        head_dim=128,
        mamba_n_heads=32,
        mamba_d_head=128,
        mamba_d_state=256,
        vocab_size=65537,
    ),
    "7b": dict(
        num_hidden_layers=44,
        hidden_size=3072,
        intermediate_size=12288,
        num_attention_heads=12,
        num_key_value_heads=2,
        head_dim=128,
        mamba_n_heads=24,
        mamba_d_head=128,
        mamba_d_state=256,
        vocab_size=130049,
    ),
    "34b": dict(
        num_hidden_layers=72,
        hidden_size=5120,
        intermediate_size=21504,
        num_attention_heads=20,
        num_key_value_heads=4,
        head_dim=128,
        mamba_n_heads=32,
        mamba_d_head=128,
        mamba_d_state=256,
        vocab_size=261120,
    ),
}
COMMON = dict(
    mamba_n_groups=1,
    mamba_d_conv=4,
    mamba_rms_norm=False,
    mamba_norm_before_gate=False,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1e11},
    max_position_embeddings=4096,
)


def _scaled(shape: dict) -> dict:
    """Same head/group counts, dims shrunk so the model has a few hundred thousand parameters."""
    return dict(
        shape,
        num_hidden_layers=4,
        hidden_size=shape["hidden_size"] // 16,
        intermediate_size=shape["intermediate_size"] // 16,
        head_dim=shape["head_dim"] // 8,
        mamba_d_head=shape["mamba_d_head"] // 8,
        mamba_d_state=shape["mamba_d_state"] // 16,
        vocab_size=317,
    )


_MUP = dict(
    embedding_multiplier=2.5,
    lm_head_multiplier=0.375,
    key_multiplier=1.75,
    attention_in_multiplier=0.5,
    attention_out_multiplier=1.25,
    ssm_in_multiplier=0.75,
    ssm_out_multiplier=1.5,
    mlp_multipliers=[0.625, 1.375],
    ssm_multipliers=[1.5, 0.5, 2.0, 0.25, 1.125],
)

PRESETS: dict[str, dict] = {
    **{name: _scaled(shape) for name, shape in RELEASED.items()},
    # Default demo/test model: several groups so TP=2/4 is possible, gated RMSNorm on.
    "tiny": dict(_scaled(RELEASED["0.5b"]), num_key_value_heads=4, mamba_n_groups=4, mamba_rms_norm=True),
    "tiny-bias-tied": dict(
        _scaled(RELEASED["3b"]),
        mamba_n_groups=2,
        tie_word_embeddings=True,
        projectors_bias=True,
        attention_bias=True,
        mlp_bias=True,
        mamba_proj_bias=True,
        mamba_conv_bias=True,
    ),
    "tiny-mup": dict(_scaled(RELEASED["1.5b"]), mamba_n_groups=4, mamba_conv_bias=False, **_MUP),
}

# Complete config fields: what every preset shares, then its own.
RELEASED = {name: {**COMMON, **shape} for name, shape in RELEASED.items()}
PRESETS = {name: {**COMMON, **fields} for name, fields in PRESETS.items()}


# BitNet: only the nn.Linear modules transformers' BitNet quantizer replaces in FalconH1ForCausalLM
# (lm_head left out, its default), i.e. what onebitllms' BitNetLinear trains. onebitllms'
# quantize_to_1bit skip list (written for Llama) must never be applied here: it would ternarize
# A_log, D, dt_bias, conv1d and the norms.
BITNET = BitNetLinears(
    only=tuple(
        f"model.layers.{LAYER}.{module}"
        for module in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mamba.in_proj",
            "mamba.out_proj",
            "feed_forward.gate_proj",
            "feed_forward.up_proj",
            "feed_forward.down_proj",
        )
    )
)


def check_parallel(cfg, tp: int, pp: int) -> None:
    """megatron-core's own asserts (``MambaMixer.__init__``, ``Attention.__init__``, ``MLP``) for TP/PP >= 1."""
    d_ssm = cfg.mamba_d_ssm if cfg.mamba_d_ssm is not None else cfg.mamba_expand * cfg.hidden_size
    checks = [
        (cfg.num_attention_heads, "num_attention_heads"),
        (cfg.intermediate_size, "intermediate_size (ffn_hidden_size)"),
        (cfg.mamba_n_heads, "mamba_n_heads"),
        (d_ssm, "mamba_d_ssm"),
    ]
    for value, what in checks:
        if value % tp:
            raise UnsupportedError(f"TP={tp} does not divide {what}={value}; Megatron cannot shard this model")
    if cfg.mamba_n_groups % tp:
        raise UnsupportedError(
            f"TP={tp} does not divide mamba_n_groups={cfg.mamba_n_groups} (megatron-core asserts ngroups % tp == 0); "
            "--expand-groups replicates B/C groups, exact when mamba_rms_norm is off"
        )
    kv = cfg.num_key_value_heads
    if kv % tp and tp % kv:
        raise UnsupportedError(
            f"TP={tp} and num_key_value_heads={kv}: megatron-core needs one to divide the other "
            "(groups split across ranks, or ranks sharing a group)"
        )
    if cfg.mamba_n_heads % cfg.mamba_n_groups:
        raise UnsupportedError(
            f"mamba_n_heads={cfg.mamba_n_heads} is not divisible by mamba_n_groups={cfg.mamba_n_groups}"
        )
    if cfg.num_hidden_layers % pp:
        raise UnsupportedError(f"PP={pp} does not divide num_hidden_layers={cfg.num_hidden_layers}")


FALCON_H1_FAMILY = register(
    ModelFamily(
        name="falcon-h1",
        hf_model_type="falcon_h1",
        hf_architecture="FalconH1ForCausalLM",
        config_class_name="FalconH1Config",
        table=FALCON_H1,
        layouts=LAYOUTS,
        params_for=params_for,
        dims=FalconH1Dims.from_hf_config,
        hf_shapes=hf_shapes,
        check_parallel=check_parallel,
        to_args=megatron_args,
        from_args=hf_config_from_args,
        provider=MB_PROVIDER_TARGET,
        provider_fields=provider_fields,
        extra_state_modules=extra_state_modules,
        forward=falcon_h1_forward.forward,
        presets=PRESETS,
        released=RELEASED,
        mup_fields=MUP_FIELDS,
        positive_sizes=POSITIVE_SIZES,
        optional_sizes=OPTIONAL_SIZES,
        compared_fields=COMPARED_FIELDS + MUP_FIELDS,
        display_name="Falcon-H1",
        args_markers=("mamba_", "hybrid_override_pattern"),
        bitnet=BITNET,
    )
)
