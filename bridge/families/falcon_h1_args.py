"""Falcon-H1 config.json <-> Megatron ``args`` translation.

HF -> Megatron writes the fields Megatron-LM / Megatron-Bridge read (argparse names, Falcon-H1
provider names for the Mamba and µP fields). The exact HF ``config.json`` also travels beside the
checkpoint (``hf_assets/``) so a round trip reproduces it byte for byte; without that sidecar
the HF config is rebuilt from ``args`` alone.
"""

from __future__ import annotations

import logging
from argparse import Namespace

import torch
from transformers import FalconH1Config

from bridge.engine.config import config_from_fields, rope_theta, transformer_args
from bridge.errors import InputError, UnsupportedError
from bridge.formats.run_config import transformer_provider_fields

_log = logging.getLogger(__name__)

MUP_SCALARS = (
    "embedding_multiplier",
    "lm_head_multiplier",
    "key_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
)
MUP_LISTS = ("mlp_multipliers", "ssm_multipliers")
MUP_FIELDS = MUP_SCALARS + MUP_LISTS

# HF field -> Megatron-Bridge FalconH1ModelProvider field (falconh1_bridge.py CONFIG_MAPPING).
HF_TO_PROVIDER = {
    "mamba_d_state": "mamba_state_dim",
    "mamba_d_head": "mamba_head_dim",
    "mamba_n_heads": "mamba_num_heads",
    "mamba_n_groups": "mamba_num_groups",
    "mamba_expand": "expand",
    "mamba_d_conv": "d_conv",
    "mamba_conv_bias": "conv_bias",
    "mamba_chunk_size": "chunk_size",
    "mamba_rms_norm": "rmsnorm",
    "mamba_norm_before_gate": "norm_before_gate",
    **{name: name for name in MUP_FIELDS},
}

# Sizes that must be positive integers (None allowed for the derived ones): transformers would build a
# model from a negative or zero size, or fail deep inside with an unrelated error.
POSITIVE_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "mamba_n_heads",
    "mamba_d_head",
    "mamba_d_state",
    "mamba_n_groups",
    "mamba_d_conv",
    "mamba_expand",
    "mamba_chunk_size",
)
OPTIONAL_SIZES = ("head_dim", "mamba_d_ssm")


def check_megatron_runs(cfg: FalconH1Config) -> None:
    """megatron-core's ``MambaMixer`` asserts ``not norm_before_gate`` whatever ``rmsnorm`` is: its gated
    RMSNorm always gates first, ``norm(y * silu(z))``. transformers' default is the other order, which
    only matters when the gated RMSNorm is on; that one config is refused, for every output Megatron
    would train."""
    if cfg.mamba_rms_norm and cfg.mamba_norm_before_gate:
        raise UnsupportedError(
            "mamba_rms_norm=True with mamba_norm_before_gate=True: megatron-core's MambaMixer only gates "
            "before its RMSNorm (it asserts not norm_before_gate); Megatron cannot run this model"
        )


def megatron_args(
    cfg: FalconH1Config,
    *,
    tp: int,
    pp: int,
    padded_vocab: int,
    divisible_by: int,
    params_dtype: torch.dtype,
    pattern: str = "P",
) -> Namespace:
    """The ``args`` Namespace stored in legacy checkpoints (plain values and torch dtypes only).
    ``pattern``: the hybrid layer symbols one HF layer becomes (see ``mappings.Layout``); Megatron
    counts every symbol as a layer. ``norm_before_gate`` is always False, the only order megatron-core
    runs (``check_megatron_runs`` refuses the config where the HF value matters); the HF value stays in
    the ``hf_assets/config.json`` sidecar."""
    check_megatron_runs(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    args = dict(
        num_layers=cfg.num_hidden_layers * len(pattern),
        hybrid_override_pattern=pattern * cfg.num_hidden_layers,
        **transformer_args(
            cfg,
            head_dim=head_dim,
            rope=dict(rotary_base=rope_theta(cfg), rotary_percent=1.0),
            tp=tp,
            pp=pp,
            padded_vocab=padded_vocab,
            divisible_by=divisible_by,
            params_dtype=params_dtype,
        ),
        add_bias_linear=bool(cfg.projectors_bias),
        add_qkv_bias=bool(cfg.attention_bias),
        mamba_proj_bias=bool(cfg.mamba_proj_bias),
        mlp_bias=bool(cfg.mlp_bias),
        mamba_d_ssm=cfg.mamba_d_ssm,
        hidden_dropout=0.0,
        attention_dropout=float(cfg.attention_dropout or 0.0),
        model_type="falcon_h1",
    )
    for hf_name, provider_name in HF_TO_PROVIDER.items():
        value = getattr(cfg, hf_name)
        args[provider_name] = list(value) if isinstance(value, (list, tuple)) else value
    args["norm_before_gate"] = False
    return Namespace(**args)


def _hf_layers(pattern: str | None, num_layers: int) -> int:
    """One HF layer per parallel-hybrid ``P`` symbol (an MLP-only ``-`` after it belongs to it)."""
    return pattern.count("P") if isinstance(pattern, str) and "P" in pattern else num_layers


# Fields a sidecar config.json and the checkpoint's args / run_config must agree on: every shape,
# the tied head and the µP factors the table or Megatron's forward depends on.
COMPARED_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "mamba_d_ssm",
    "mamba_n_heads",
    "mamba_d_head",
    "mamba_n_groups",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_conv_bias",
    "mamba_rms_norm",
    "tie_word_embeddings",
    "projectors_bias",
    "attention_bias",
)


def hf_config_from_args(args: Namespace | dict, where: str = "checkpoint args") -> FalconH1Config:
    """Rebuilds the HF config from Megatron args (or Megatron-Bridge provider fields translated to
    args names) when no ``hf_assets/config.json`` sidecar exists; ``where`` names them in errors."""
    a = vars(args) if isinstance(args, Namespace) else args

    def need(name):
        if name not in a:
            raise InputError(f"{where}: missing {name!r}; cannot rebuild the Falcon-H1 config")
        return a[name]

    fields = dict(
        num_hidden_layers=_hf_layers(a.get("hybrid_override_pattern"), need("num_layers")),
        hidden_size=need("hidden_size"),
        intermediate_size=need("ffn_hidden_size"),
        num_attention_heads=need("num_attention_heads"),
        num_key_value_heads=a.get("num_query_groups") or need("num_attention_heads"),
        head_dim=a.get("kv_channels") or need("hidden_size") // need("num_attention_heads"),
        max_position_embeddings=a.get("max_position_embeddings", 8192),
        rope_parameters={"rope_type": "default", "rope_theta": float(a.get("rotary_base", 1e11))},
        rms_norm_eps=a.get("norm_epsilon", 1e-5),
        tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", True),
        vocab_size=a.get("vocab_size") or need("padded_vocab_size"),
        projectors_bias=a.get("add_bias_linear", False),
        attention_bias=a.get("add_qkv_bias", False),
        mamba_proj_bias=a.get("mamba_proj_bias", False),
        mlp_bias=a.get("mlp_bias", False),
        mamba_d_ssm=a.get("mamba_d_ssm") or need("mamba_num_heads") * need("mamba_head_dim"),
    )
    fields["mamba_norm_before_gate"] = False  # megatron-core's only order; transformers' default is True
    for hf_name, provider_name in HF_TO_PROVIDER.items():
        if provider_name in a:
            fields[hf_name] = a[provider_name]
    missing = [name for name in MUP_FIELDS if HF_TO_PROVIDER[name] not in a]
    if missing:
        which = "all" if len(missing) == len(MUP_FIELDS) else ", ".join(missing)
        _log.warning("%s: µP multipliers missing (%s); treating them as 1.0", where, which)
    return config_from_fields(
        FalconH1Config,
        fields,
        args=a,
        where=where,
        positive=POSITIVE_SIZES,
        optional=OPTIONAL_SIZES,
        name="Falcon-H1",
        architecture="FalconH1ForCausalLM",
    )


MB_PROVIDER_TARGET = "megatron.bridge.models.falcon_h1.falconh1_provider.FalconH1ModelProvider"
# Megatron-LM args FalconH1Config takes under the same name, beyond the TransformerConfig ones.
_FALCON_H1_FIELDS = (
    "mamba_state_dim",
    "mamba_head_dim",
    "mamba_num_heads",
    "mamba_num_groups",
    "expand",
    "d_conv",
    "conv_bias",
    "chunk_size",
    "rmsnorm",
    "norm_before_gate",
    *MUP_FIELDS,
)


def provider_fields(args: dict, *, init_method_std: float) -> dict:
    """The ``model:`` section Megatron-Bridge writes for this model: what ``FalconH1Bridge.provider_bridge``
    sets (base ``CONFIG_MAPPING`` plus Falcon-H1's, Megatron-Bridge 067f987df03b), serialized the way
    ``ConfigContainer.to_yaml`` does (dtypes and functions as ``_target_`` dicts, tuples as lists)."""
    fields = transformer_provider_fields(args, target=MB_PROVIDER_TARGET, init_method_std=init_method_std)
    fields.update((name, args[name]) for name in _FALCON_H1_FIELDS)
    fields.update(
        falconh1_ratio=1.0,
        hybrid_override_pattern=None,
        use_mamba=True,
        use_attention=True,
        use_mlp=True,
    )
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
