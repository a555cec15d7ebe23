"""Llama (Falcon3, Falcon-E) config.json <-> Megatron ``args`` and Megatron-Bridge provider fields.

Megatron-LM names: a GPT model with RMSNorm, SwiGLU, RoPE and grouped-query attention. RoPE scaling
(``llama3``, ``linear``) becomes Megatron-LM's ``use_rope_scaling`` / ``rope_scaling_factor`` and
``rotary_seq_len_interpolation_factor`` (Megatron-Bridge: ``rope_scaling`` / ``seq_len_interpolation_factor``);
its other fields stay in the ``hf_assets/config.json`` sidecar, which a round trip copies byte for byte.
"""

from __future__ import annotations

from argparse import Namespace
from typing import TYPE_CHECKING

import torch

from bridge.engine.config import config_from_fields, transformer_args
from bridge.errors import InputError, UnsupportedError
from bridge.formats.run_config import transformer_provider_fields

if TYPE_CHECKING:
    from transformers import LlamaConfig

POSITIVE_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
)
OPTIONAL_SIZES = ("head_dim",)
COMPARED_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)
# RoPE types megatron-core computes as transformers does.
ROPE_TYPES = ("default", "linear", "llama3")
# megatron-core's RotaryEmbedding._apply_scaling takes only the factor; the rest are fixed (Llama 3.1's).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope(cfg) -> dict:
    return dict(cfg.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})


def check_megatron_runs(cfg) -> None:
    """What megatron-core's GPTModel cannot compute: another activation than SwiGLU's SiLU, a RoPE
    variant it does not implement."""
    if cfg.hidden_act != "silu":
        raise UnsupportedError(f"hidden_act={cfg.hidden_act!r}: Megatron's SwiGLU MLP computes silu only")
    rope_type = rope(cfg).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedError(f"rope_type={rope_type!r}: supported RoPE types are {', '.join(ROPE_TYPES)}")
    if rope_type == "llama3":
        for name, fixed in LLAMA3_FIXED.items():
            if rope(cfg).get(name) != fixed:
                raise UnsupportedError(
                    f"rope_parameters {name}={rope(cfg).get(name)!r}: megatron-core's llama3 RoPE scaling "
                    f"fixes it to {fixed:g}"
                )


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def megatron_args(
    cfg,
    *,
    tp: int,
    pp: int,
    padded_vocab: int,
    divisible_by: int,
    params_dtype: torch.dtype,
    pattern: str = "P",
) -> Namespace:
    """The ``args`` Namespace stored in Megatron checkpoints (plain values and torch dtypes only).
    ``pattern`` is the hybrid families' layer pattern; a GPT layer is one Megatron layer."""
    check_megatron_runs(cfg)
    r = rope(cfg)
    rope_type = r.get("rope_type", "default")
    args = dict(
        num_layers=cfg.num_hidden_layers,
        **transformer_args(
            cfg,
            head_dim=head_dim(cfg),
            rope=dict(
                rotary_base=float(r.get("rope_theta", 10000.0)),
                rotary_percent=1.0,
                use_rope_scaling=rope_type == "llama3",
                rope_scaling_factor=float(r.get("factor", 8.0)) if rope_type == "llama3" else 1.0,
                rotary_seq_len_interpolation_factor=float(r["factor"]) if rope_type == "linear" else None,
            ),
            tp=tp,
            pp=pp,
            padded_vocab=padded_vocab,
            divisible_by=divisible_by,
            params_dtype=params_dtype,
        ),
        # Megatron has one switch for the biases of linear_proj, linear_fc1 and linear_fc2, another for qkv.
        add_bias_linear=bool(cfg.attention_bias or cfg.mlp_bias),
        add_qkv_bias=bool(cfg.attention_bias),
        mlp_bias=bool(cfg.mlp_bias),
        hidden_dropout=0.0,
        attention_dropout=float(cfg.attention_dropout or 0.0),
        model_type="llama",
    )
    return Namespace(**args)


def hf_config_from_args(args: Namespace | dict, where: str = "checkpoint args") -> LlamaConfig:
    """Rebuilds the HF config from Megatron-LM args (or Megatron-Bridge provider fields in args names)."""
    a = vars(args) if isinstance(args, Namespace) else args

    def need(name):
        if name not in a:
            raise InputError(f"{where}: missing {name!r}; cannot rebuild the Llama config")
        return a[name]

    rope_parameters: dict = {"rope_type": "default", "rope_theta": float(a.get("rotary_base", 10000.0))}
    if a.get("use_rope_scaling") or a.get("rope_scaling") is True:
        rope_parameters.update(rope_type="llama3", factor=float(a.get("rope_scaling_factor", 8.0)), **LLAMA3_FIXED)
    interpolation = a.get("rotary_seq_len_interpolation_factor") or a.get("seq_len_interpolation_factor")
    if interpolation:
        rope_parameters.update(rope_type="linear", factor=float(interpolation))
    gqa = a.get("group_query_attention", True)
    fields = dict(
        num_hidden_layers=need("num_layers"),
        hidden_size=need("hidden_size"),
        intermediate_size=need("ffn_hidden_size"),
        num_attention_heads=need("num_attention_heads"),
        num_key_value_heads=(a.get("num_query_groups") if gqa else None) or need("num_attention_heads"),
        head_dim=a.get("kv_channels") or need("hidden_size") // need("num_attention_heads"),
        max_position_embeddings=a.get("max_position_embeddings", 4096),
        rope_parameters=rope_parameters,
        rms_norm_eps=a.get("norm_epsilon", 1e-5),
        tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", True),
        vocab_size=a.get("vocab_size") or need("padded_vocab_size"),
        attention_bias=bool(a.get("add_qkv_bias", False)),
        mlp_bias=bool(a.get("mlp_bias", a.get("add_bias_linear", False) and not a.get("add_qkv_bias", False))),
        hidden_act="silu",
    )
    from transformers import LlamaConfig  # imported on first use: it costs a Falcon-H1 run ~0.7 s (ModelFamily)

    return config_from_fields(
        LlamaConfig,
        fields,
        args=a,
        where=where,
        positive=POSITIVE_SIZES,
        optional=OPTIONAL_SIZES,
        name="Llama",
        architecture="LlamaForCausalLM",
    )


# Megatron-Bridge 067f987df03b builds Llama through the generic GPT provider (LlamaBridge.provider_bridge);
# older releases had megatron.bridge.models.llama.llama_provider.LlamaModelProvider.
MB_PROVIDER_TARGET = "megatron.bridge.models.gpt_provider.GPTModelProvider"


def provider_fields(args: dict, *, init_method_std: float) -> dict:
    """The ``model:`` section Megatron-Bridge writes for a Llama (``LlamaBridge.hf_config_to_model_config_kwargs``
    on top of the base mapping), serialized as ``ConfigContainer.to_yaml`` does."""
    fields = transformer_provider_fields(args, target=MB_PROVIDER_TARGET, init_method_std=init_method_std)
    fields.update(
        rope_scaling_factor=args["rope_scaling_factor"],
        rope_scaling=bool(args["use_rope_scaling"]),
        seq_len_interpolation_factor=args["rotary_seq_len_interpolation_factor"],
    )
    return dict(fields)
