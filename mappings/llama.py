"""The Llama parameter table (transformers' ``LlamaForCausalLM`` <-> megatron-core ``GPTModel``).

Also Falcon3 and Falcon-E (BitNet rule: ``bridge/families/llama.py``), whose config says
``model_type: llama``. Megatron names are megatron-core's GPT layer specs (``gpt_layer_specs.py``) as
Megatron-Bridge's ``LlamaBridge`` maps them
(067f987df03b): ``self_attention.linear_qkv`` holds q, k, v interleaved per query group,
``linear_proj`` and ``mlp.linear_fc2`` are row parallel, ``mlp.linear_fc1`` is [gate_r; up_r] per rank.

Two key layouts (``LAYOUTS``): ``te``, the Transformer Engine spec, which fuses the two norms into the
following linear (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``),
and ``local``, the local spec with separate ``input_layernorm`` and ``pre_mlp_layernorm`` modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .falcon_h1 import LAYER, Layout, Param
from .rules import GATED_MLP, QKV, REPLICATED, ROW, VOCAB, Rule


@dataclass(frozen=True)
class LlamaDims:
    """What the rules read (``VOCAB``: vocab, padded_vocab; ``QKV``: n_heads, n_kv_heads, head_dim;
    ``GATED_MLP``: mlp_blocks) plus the sizes of the HF tensors."""

    hidden: int
    vocab: int
    padded_vocab: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, cfg, padded_vocab: int | None = None) -> LlamaDims:
        return cls(
            hidden=cfg.hidden_size,
            vocab=cfg.vocab_size,
            padded_vocab=padded_vocab or cfg.vocab_size,
            ffn=cfg.intermediate_size,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        )

    @property
    def mlp_blocks(self) -> list[int]:
        """Row blocks of the fused SwiGLU ``linear_fc1``: gate | up."""
        return [self.ffn, self.ffn]


def _layer(megatron: str, hf: str | tuple[str, ...], rule: Rule, when: str | None = None) -> Param:
    hf_keys = (hf,) if isinstance(hf, str) else hf
    return Param(f"decoder.layers.{LAYER}.{megatron}", tuple(f"model.layers.{LAYER}.{k}" for k in hf_keys), rule, when)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

LLAMA: tuple[Param, ...] = (
    Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, stage="first"),
    _layer("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", REPLICATED),
    _layer("self_attention.linear_qkv.weight", tuple(f"{k}.weight" for k in _QKV), QKV),
    _layer("self_attention.linear_qkv.bias", tuple(f"{k}.bias" for k in _QKV), QKV, "attention_bias"),
    _layer("self_attention.linear_proj.weight", "self_attn.o_proj.weight", ROW),
    _layer("self_attention.linear_proj.bias", "self_attn.o_proj.bias", REPLICATED, "attention_bias"),
    _layer("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", REPLICATED),
    _layer("mlp.linear_fc1.weight", tuple(f"{k}.weight" for k in _GATE_UP), GATED_MLP),
    _layer("mlp.linear_fc1.bias", tuple(f"{k}.bias" for k in _GATE_UP), GATED_MLP, "mlp_bias"),
    _layer("mlp.linear_fc2.weight", "mlp.down_proj.weight", ROW),
    _layer("mlp.linear_fc2.bias", "mlp.down_proj.bias", REPLICATED, "mlp_bias"),
    Param("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, stage="last"),
    Param("output_layer.weight", ("lm_head.weight",), VOCAB, "untied", stage="last"),
    # With tied embeddings and PP > 1, Megatron's last stage keeps its own copy of the embedding.
    Param("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, "tied_pp", stage="last", export=False),
)

# Full HF shape of each HF key pattern, in transformers' state-dict order (tests/test_llama_family.py
# checks them against LlamaForCausalLM built on the meta device).
HF_SHAPES: dict[str, Callable[[LlamaDims], tuple[int, ...]]] = {
    "model.embed_tokens.weight": lambda d: (d.vocab, d.hidden),
    "self_attn.q_proj.weight": lambda d: (d.n_heads * d.head_dim, d.hidden),
    "self_attn.q_proj.bias": lambda d: (d.n_heads * d.head_dim,),
    "self_attn.k_proj.weight": lambda d: (d.n_kv_heads * d.head_dim, d.hidden),
    "self_attn.k_proj.bias": lambda d: (d.n_kv_heads * d.head_dim,),
    "self_attn.v_proj.weight": lambda d: (d.n_kv_heads * d.head_dim, d.hidden),
    "self_attn.v_proj.bias": lambda d: (d.n_kv_heads * d.head_dim,),
    "self_attn.o_proj.weight": lambda d: (d.hidden, d.n_heads * d.head_dim),
    "self_attn.o_proj.bias": lambda d: (d.hidden,),
    "mlp.gate_proj.weight": lambda d: (d.ffn, d.hidden),
    "mlp.gate_proj.bias": lambda d: (d.ffn,),
    "mlp.up_proj.weight": lambda d: (d.ffn, d.hidden),
    "mlp.up_proj.bias": lambda d: (d.ffn,),
    "mlp.down_proj.weight": lambda d: (d.hidden, d.ffn),
    "mlp.down_proj.bias": lambda d: (d.hidden,),
    "input_layernorm.weight": lambda d: (d.hidden,),
    "post_attention_layernorm.weight": lambda d: (d.hidden,),
    "model.norm.weight": lambda d: (d.hidden,),
    "lm_head.weight": lambda d: (d.vocab, d.hidden),
}

CONDITIONS: dict[str, Callable[[Any, int], bool]] = {
    "attention_bias": lambda c, pp: bool(c.attention_bias),
    "mlp_bias": lambda c, pp: bool(getattr(c, "mlp_bias", False)),
    "untied": lambda c, pp: not c.tie_word_embeddings,
    "tied_pp": lambda c, pp: bool(c.tie_word_embeddings) and pp > 1,
}

LAYOUTS: dict[str, Layout] = {
    # Transformer Engine spec (get_gpt_layer_with_transformer_engine_spec; Megatron-Bridge's default):
    # input_layernorm and pre_mlp_layernorm are IdentityOp, the norms live in the fused linears.
    "te": Layout(),
    # Local spec (get_gpt_layer_local_spec): separate RMSNorm modules.
    "local": Layout(
        {
            "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
            "mlp.linear_fc1.layer_norm_weight": ("pre_mlp_layernorm.weight",),
        }
    ),
}

# Modules of megatron-core's TE GPT layer spec that keep Transformer Engine ``_extra_state``: per layer
# TELayerNormColumnParallelLinear ``linear_qkv`` / ``linear_fc1``, TEDotProductAttention ``core_attention``,
# TERowParallelLinear ``linear_proj`` / ``linear_fc2``; GPTModel's TENorm ``decoder.final_layernorm``.
# ``output_layer`` is megatron-core's ColumnParallelLinear, whose extra state is None (GPTModel drops
# it from its sharded state dict; a None object beside it is harmless).
TE_LAYER_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
TE_MODEL_MODULES = ("decoder.final_layernorm",)
NONE_EXTRA_STATE_MODULES = ("output_layer",)


def extra_state_modules(num_layers: int) -> tuple[list[str], list[str]]:
    te = [f"decoder.layers.{i}.{m}" for i in range(num_layers) for m in TE_LAYER_MODULES]
    return te + list(TE_MODEL_MODULES), list(NONE_EXTRA_STATE_MODULES)


def params_for(hf_config, pp: int = 1) -> list[Param]:
    return [p for p in LLAMA if p.when is None or CONDITIONS[p.when](hf_config, pp)]


def hf_shapes(hf_config, dims: LlamaDims) -> dict[str, tuple[int, ...]]:
    """Every HF key this config stores (tied lm_head left out) and its shape, in transformers' order."""
    present = {k.rpartition(LAYER + ".")[2] for p in params_for(hf_config) if p.export for k in p.hf}
    layer_keys = [k for k in HF_SHAPES if k in present and not k.startswith(("model.", "lm_head"))]
    out = {"model.embed_tokens.weight": HF_SHAPES["model.embed_tokens.weight"](dims)}
    for layer in range(hf_config.num_hidden_layers):
        out.update((f"model.layers.{layer}.{k}", HF_SHAPES[k](dims)) for k in layer_keys)
    out.update((k, HF_SHAPES[k](dims)) for k in ("model.norm.weight", "lm_head.weight") if k in present)
    return out
