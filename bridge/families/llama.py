"""Llama as a ``ModelFamily`` (also Falcon3 and Falcon-E, whose configs say ``model_type: llama``):
transformers' ``LlamaForCausalLM`` <-> megatron-core's ``GPTModel`` (``mappings/llama.py``), the
config <-> Megatron args translation, Megatron-Bridge's GPT provider, the TP/PP megatron-core accepts,
the parity forward and the make-tiny presets."""

from __future__ import annotations

from bridge.errors import UnsupportedError
from bridge.families import ModelFamily, llama_forward, register
from bridge.families.llama_args import (
    COMPARED_FIELDS,
    MB_PROVIDER_TARGET,
    OPTIONAL_SIZES,
    POSITIVE_SIZES,
    hf_config_from_args,
    megatron_args,
    provider_fields,
)
from mappings.bitnet import BitNetLinears
from mappings.llama import LAYOUTS, LLAMA, LlamaDims, extra_state_modules, hf_shapes, params_for

_TINY = dict(
    num_hidden_layers=4,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    vocab_size=317,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    tie_word_embeddings=False,
)
PRESETS: dict[str, dict] = {
    # Plain GQA (Falcon3 / Llama 3 style): 8 query heads, 4 KV groups.
    "llama-tiny": _TINY,
    # Tied embeddings (Llama 3.2 1B/3B style); 2 KV groups, so TP=4 shares groups between ranks.
    "llama-tiny-tied": dict(_TINY, num_key_value_heads=2, tie_word_embeddings=True),
    # q/k/v/o and MLP biases, llama3 RoPE scaling.
    "llama-tiny-bias": dict(
        _TINY,
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=16384,  # above llama3's fixed original 8192, as transformers expects
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


# BitNet: onebitllms' quantize_to_1bit rule (tiiuae/onebitllms 66f212b,
# src/onebitllms/utils/quantization_utils.py ``_is_param_to_not_quantize``): every weight except these.
# On a Llama state dict that is exactly the q/k/v/o and gate/up/down linears, the modules
# transformers' BitNet quantizer replaces when lm_head is left out.
BITNET = BitNetLinears(
    skip=(
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "input_layernorm",
        "post_attention_layernorm",
    )
)


def check_parallel(cfg, tp: int, pp: int) -> None:
    """megatron-core's asserts (``Attention.__init__``, ``MLP``, ``TransformerBlock``) for TP/PP >= 1."""
    for value, what in (
        (cfg.num_attention_heads, "num_attention_heads"),
        (cfg.intermediate_size, "intermediate_size (ffn_hidden_size)"),
    ):
        if value % tp:
            raise UnsupportedError(f"TP={tp} does not divide {what}={value}; Megatron cannot shard this model")
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    if cfg.num_attention_heads % kv:
        raise UnsupportedError(
            f"num_attention_heads={cfg.num_attention_heads} is not divisible by num_key_value_heads={kv}"
        )
    if kv % tp and tp % kv:
        raise UnsupportedError(
            f"TP={tp} and num_key_value_heads={kv}: megatron-core needs one to divide the other "
            "(groups split across ranks, or ranks sharing a group)"
        )
    if cfg.num_hidden_layers % pp:
        raise UnsupportedError(f"PP={pp} does not divide num_hidden_layers={cfg.num_hidden_layers}")


LLAMA_FAMILY = register(
    ModelFamily(
        name="llama",
        hf_model_type="llama",
        hf_architecture="LlamaForCausalLM",
        config_class_name="LlamaConfig",
        table=LLAMA,
        layouts=LAYOUTS,
        params_for=params_for,
        dims=LlamaDims.from_hf_config,
        hf_shapes=hf_shapes,
        check_parallel=check_parallel,
        to_args=megatron_args,
        from_args=hf_config_from_args,
        provider=MB_PROVIDER_TARGET,
        provider_fields=provider_fields,
        extra_state_modules=extra_state_modules,
        forward=llama_forward.forward,
        presets=PRESETS,
        mup_fields=(),
        positive_sizes=POSITIVE_SIZES,
        optional_sizes=OPTIONAL_SIZES,
        compared_fields=COMPARED_FIELDS,
        display_name="Llama",
        bitnet=BITNET,
    )
)
