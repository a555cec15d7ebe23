"""The Falcon-H1 parameter table: HF key(s) <-> Megatron key, and the TP rule between them.

Megatron names follow Megatron-Bridge's Falcon-H1 bridge (``falconh1_bridge.py``): one Megatron
layer per HF layer, holding ``mamba_mixer``, ``self_attention`` and ``mlp``; the shared input
norm is ``decoder.layers.L.norm.weight`` and the pre-MLP norm is fused into ``linear_fc1``.

``{L}`` stands for the layer index (HF: global; Megatron legacy: local to the pipeline stage).
``when`` names a condition from ``CONDITIONS``; an entry exists only where it holds. ``stage``
says which pipeline stage holds a non-layer parameter. Entries with ``export=False`` are
copies Megatron keeps for itself and that HF does not store again.

Other Megatron key layouts are data too (``LAYOUTS``): renames and a layer pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .dims import FalconH1Dims
from .rules import (
    COLUMN,
    GATED_MLP,
    MAMBA_CONV1D,
    MAMBA_IN_PROJ,
    QKV,
    REPLICATED,
    ROW,
    VOCAB,
    Rule,
)

LAYER = "{L}"


@dataclass(frozen=True)
class Param:
    megatron: str
    hf: tuple[str, ...]
    rule: Rule
    when: str | None = None
    stage: str = "layer"  # "layer", "first" or "last" pipeline stage
    export: bool = True

    @property
    def is_layer(self) -> bool:
        return self.stage == "layer"


def _layer(megatron: str, hf: str | tuple[str, ...], rule: Rule, when: str | None = None) -> Param:
    hf_keys = (hf,) if isinstance(hf, str) else hf
    return Param(
        f"decoder.layers.{LAYER}.{megatron}",
        tuple(f"model.layers.{LAYER}.{k}" for k in hf_keys),
        rule,
        when,
    )


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("feed_forward.gate_proj", "feed_forward.up_proj")

FALCON_H1: tuple[Param, ...] = (
    Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, stage="first"),
    _layer("norm.weight", "input_layernorm.weight", REPLICATED),
    _layer("mamba_mixer.in_proj.weight", "mamba.in_proj.weight", MAMBA_IN_PROJ),
    _layer("mamba_mixer.in_proj.bias", "mamba.in_proj.bias", MAMBA_IN_PROJ, "mamba_proj_bias"),
    _layer("mamba_mixer.conv1d.weight", "mamba.conv1d.weight", MAMBA_CONV1D),
    _layer("mamba_mixer.conv1d.bias", "mamba.conv1d.bias", MAMBA_CONV1D, "mamba_conv_bias"),
    _layer("mamba_mixer.A_log", "mamba.A_log", COLUMN),
    _layer("mamba_mixer.D", "mamba.D", COLUMN),
    _layer("mamba_mixer.dt_bias", "mamba.dt_bias", COLUMN),
    _layer("mamba_mixer.norm.weight", "mamba.norm.weight", COLUMN, "mamba_rms_norm"),
    _layer("mamba_mixer.out_proj.weight", "mamba.out_proj.weight", ROW),
    _layer("mamba_mixer.out_proj.bias", "mamba.out_proj.bias", REPLICATED, "projectors_bias"),
    _layer("self_attention.linear_qkv.weight", tuple(f"{k}.weight" for k in _QKV), QKV),
    _layer("self_attention.linear_qkv.bias", tuple(f"{k}.bias" for k in _QKV), QKV, "attention_bias"),
    _layer("self_attention.linear_proj.weight", "self_attn.o_proj.weight", ROW),
    _layer("self_attention.linear_proj.bias", "self_attn.o_proj.bias", REPLICATED, "attention_bias"),
    _layer("mlp.linear_fc1.layer_norm_weight", "pre_ff_layernorm.weight", REPLICATED),
    _layer("mlp.linear_fc1.weight", tuple(f"{k}.weight" for k in _GATE_UP), GATED_MLP),
    _layer("mlp.linear_fc1.bias", tuple(f"{k}.bias" for k in _GATE_UP), GATED_MLP, "mlp_bias"),
    _layer("mlp.linear_fc2.weight", "feed_forward.down_proj.weight", ROW),
    _layer("mlp.linear_fc2.bias", "feed_forward.down_proj.bias", REPLICATED, "mlp_bias"),
    Param("decoder.final_norm.weight", ("model.final_layernorm.weight",), REPLICATED, stage="last"),
    Param("output_layer.weight", ("lm_head.weight",), VOCAB, "untied", stage="last"),
    # With tied embeddings and PP > 1, Megatron's last stage keeps its own copy of the embedding.
    Param("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, "tied_pp", stage="last", export=False),
)

# Full HF shape of each HF key pattern. transformers is the oracle: tests/test_table.py checks these
# against the state dict of FalconH1ForCausalLM built on the meta device, for every preset and
# condition; at run time this table saves building that model (and importing its ~3 s of modules).
HF_SHAPES: dict[str, Callable[[FalconH1Dims], tuple[int, ...]]] = {  # in transformers' state-dict order
    "model.embed_tokens.weight": lambda d: (d.vocab, d.hidden),
    "feed_forward.gate_proj.weight": lambda d: (d.ffn, d.hidden),
    "feed_forward.gate_proj.bias": lambda d: (d.ffn,),
    "feed_forward.up_proj.weight": lambda d: (d.ffn, d.hidden),
    "feed_forward.up_proj.bias": lambda d: (d.ffn,),
    "feed_forward.down_proj.weight": lambda d: (d.hidden, d.ffn),
    "feed_forward.down_proj.bias": lambda d: (d.hidden,),
    "mamba.dt_bias": lambda d: (d.mamba_heads,),
    "mamba.A_log": lambda d: (d.mamba_heads,),
    "mamba.D": lambda d: (d.mamba_heads,),
    "mamba.conv1d.weight": lambda d: (sum(d.conv_blocks), 1, d.d_conv),
    "mamba.conv1d.bias": lambda d: (sum(d.conv_blocks),),
    "mamba.in_proj.weight": lambda d: (sum(d.in_proj_blocks), d.hidden),
    "mamba.in_proj.bias": lambda d: (sum(d.in_proj_blocks),),
    "mamba.norm.weight": lambda d: (d.d_ssm,),
    "mamba.out_proj.weight": lambda d: (d.hidden, d.d_ssm),
    "mamba.out_proj.bias": lambda d: (d.hidden,),
    "self_attn.q_proj.weight": lambda d: (d.n_heads * d.head_dim, d.hidden),
    "self_attn.q_proj.bias": lambda d: (d.n_heads * d.head_dim,),
    "self_attn.k_proj.weight": lambda d: (d.n_kv_heads * d.head_dim, d.hidden),
    "self_attn.k_proj.bias": lambda d: (d.n_kv_heads * d.head_dim,),
    "self_attn.v_proj.weight": lambda d: (d.n_kv_heads * d.head_dim, d.hidden),
    "self_attn.v_proj.bias": lambda d: (d.n_kv_heads * d.head_dim,),
    "self_attn.o_proj.weight": lambda d: (d.hidden, d.n_heads * d.head_dim),
    "self_attn.o_proj.bias": lambda d: (d.hidden,),
    "input_layernorm.weight": lambda d: (d.hidden,),
    "pre_ff_layernorm.weight": lambda d: (d.hidden,),
    "model.final_layernorm.weight": lambda d: (d.hidden,),
    "lm_head.weight": lambda d: (d.vocab, d.hidden),
}


# A condition sees the HF config and the pipeline size.
CONDITIONS: dict[str, Callable[[Any, int], bool]] = {
    "mamba_proj_bias": lambda c, pp: bool(c.mamba_proj_bias),
    "mamba_conv_bias": lambda c, pp: bool(c.mamba_conv_bias),
    "mamba_rms_norm": lambda c, pp: bool(c.mamba_rms_norm),
    "projectors_bias": lambda c, pp: bool(c.projectors_bias),
    "attention_bias": lambda c, pp: bool(c.attention_bias),
    "mlp_bias": lambda c, pp: bool(c.mlp_bias),
    "untied": lambda c, pp: not c.tie_word_embeddings,
    "tied_pp": lambda c, pp: bool(c.tie_word_embeddings) and pp > 1,
}


@dataclass(frozen=True)
class Layout:
    """One Megatron key layout: renames of the canonical (Megatron-Bridge) layer-key suffixes (a rename
    to several keys stores one HF tensor under each, as Megatron keeps separate copies), and the
    hybrid pattern one HF layer becomes: ``"P"`` is one Megatron layer holding the whole Falcon-H1
    block; ``"P-"`` is a parallel Mamba‖attention layer followed by an MLP-only layer, so HF layer i
    is Megatron layers 2i and 2i+1 and the ``mlp.*`` keys live in the second."""

    renames: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pattern: str = "P"
    legacy_only: bool = False  # key names only legacy state_dict() files use

    def sublayer(self, suffix: str) -> int:
        """Which of an HF layer's Megatron layers holds this canonical suffix."""
        return self.pattern.index("-") if "-" in self.pattern and suffix.startswith("mlp.") else 0


_FUSED_NORM = {"norm.weight": ("mamba_mixer.in_proj.layer_norm_weight", "self_attention.linear_qkv.layer_norm_weight")}

LAYOUTS: dict[str, Layout] = {
    "bridge": Layout(),
    # Megatron-LM main stores conv1d as direct parameters (legacy state_dict keys only; torch_dist
    # keeps conv1d.weight through megatron-core's conv_checkpoint_key_map).
    "mlm-conv1d": Layout(
        {
            "mamba_mixer.conv1d.weight": ("mamba_mixer.conv1d_weight",),
            "mamba_mixer.conv1d.bias": ("mamba_mixer.conv1d_bias",),
        },
        legacy_only=True,
    ),
    # Megatron-Bridge before 50ccc9774: the shared input norm fused into both branches' first linear.
    "bridge-fused-norm": Layout(_FUSED_NORM),
    # Megatron-LM's parallel hybrid (PR #1785, ParallelHybridLayer, hybrid_override_pattern "P-P-..."):
    # the P layer's input norm is an identity and the norm is fused into in_proj and linear_qkv; the
    # "-" layer is an MLP-only layer with the pre-MLP norm fused into linear_fc1.
    "mlm-parallel-hybrid": Layout(_FUSED_NORM, pattern="P-"),
}
DEFAULT_LAYOUT = "bridge"

# Modules of Megatron-Bridge's Falcon-H1 spec that keep Transformer Engine ``_extra_state``, which its
# loader requests under the default strictness. Derived from Megatron-Bridge 067f987df03b
# (modeling_falconh1/falconh1_layer_specs.py, falconh1_block.py, falconh1_model.py): per layer TENorm
# ``norm``, TEColumnParallelLinear ``in_proj`` / ``linear_qkv``, TERowParallelLinear ``out_proj`` /
# ``linear_proj`` / ``linear_fc2``, TEDotProductAttention ``core_attention``, TELayerNormColumnParallelLinear
# ``linear_fc1``; the stack's TENorm ``final_norm``. ``output_layer`` is megatron-core's own
# ColumnParallelLinear, whose ``get_extra_state()`` is None, and FalconH1Model does not drop it.
TE_LAYER_MODULES = (
    "norm",
    "mamba_mixer.in_proj",
    "mamba_mixer.out_proj",
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
TE_MODEL_MODULES = ("decoder.final_norm",)
NONE_EXTRA_STATE_MODULES = ("output_layer",)


def extra_state_modules(num_layers: int) -> tuple[list[str], list[str]]:
    """(modules whose extra state is TE's, modules whose extra state is None) of an MB Falcon-H1 model."""
    te = [f"decoder.layers.{i}.{m}" for i in range(num_layers) for m in TE_LAYER_MODULES]
    return te + list(TE_MODEL_MODULES), list(NONE_EXTRA_STATE_MODULES)


def params_for(hf_config, pp: int = 1) -> list[Param]:
    """The entries that exist for this config and pipeline size."""
    return [p for p in FALCON_H1 if p.when is None or CONDITIONS[p.when](hf_config, pp)]


def _suffix(param: Param) -> str:
    return param.megatron.rpartition(LAYER + ".")[2]


def _spec(layout: str | Layout) -> Layout:
    """A layout by name (Falcon-H1's ``LAYOUTS``), or given as a ``Layout`` (any family's)."""
    return LAYOUTS[layout] if isinstance(layout, str) else layout


def megatron_keys(param: Param, layout: str | Layout = DEFAULT_LAYOUT) -> tuple[str, ...]:
    """The entry's Megatron key pattern(s) in the given layout, ``{L}`` standing for the Megatron
    layer (see ``megatron_layer``); the first is the one read."""
    if not param.is_layer:
        return (param.megatron,)
    prefix = param.megatron[: -len(_suffix(param))]
    return tuple(prefix + r for r in _spec(layout).renames.get(_suffix(param), (_suffix(param),)))


def megatron_key(param: Param, layout: str | Layout = DEFAULT_LAYOUT) -> str:
    return megatron_keys(param, layout)[0]


def megatron_layer(param: Param, layout: str | Layout, hf_layer: int) -> int:
    """Megatron layer index holding a layer entry of HF layer ``hf_layer`` (both global, or both
    local to one pipeline stage)."""
    spec = _spec(layout)
    return hf_layer * len(spec.pattern) + spec.sublayer(_suffix(param))


def hf_shapes(hf_config, dims: FalconH1Dims) -> dict[str, tuple[int, ...]]:
    """Every HF key this config stores (tied lm_head left out) and its shape, in transformers' order."""
    present = {k.rpartition(LAYER + ".")[2] for p in params_for(hf_config) if p.export for k in p.hf}
    layer_keys = [k for k in HF_SHAPES if k in present and not k.startswith(("model.", "lm_head"))]
    out = {"model.embed_tokens.weight": HF_SHAPES["model.embed_tokens.weight"](dims)}
    for layer in range(hf_config.num_hidden_layers):
        out.update((f"model.layers.{layer}.{k}", HF_SHAPES[k](dims)) for k in layer_keys)
    out.update((k, HF_SHAPES[k](dims)) for k in ("model.final_layernorm.weight", "lm_head.weight") if k in present)
    return out
