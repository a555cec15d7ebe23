"""Which Falcon-H1 HF tensors are BitNet linears: stored ternary-packed, with a ``weight_scale`` beside them.

They are exactly the ``nn.Linear`` modules transformers' BitNet quantizer replaces in
``FalconH1ForCausalLM`` when ``lm_head`` is left out (its default skip). Everything else --
embeddings, ``lm_head``, norms, conv1d, ``A_log``, ``D``, ``dt_bias`` and every bias -- stays
unquantized. This is a list of what is quantized, not a skip list: a tensor it does not name is
never packed.
"""

from __future__ import annotations

import re

from .falcon_h1 import LAYER

BITNET_LINEARS: tuple[str, ...] = tuple(
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
# What a packed checkpoint's quantization_config lists as modules_to_not_convert.
NOT_CONVERTED: tuple[str, ...] = ("lm_head",)

_MODULE = re.compile("|".join(re.escape(m).replace(re.escape(LAYER), r"\d+") for m in BITNET_LINEARS))


def bitnet_modules(num_layers: int) -> list[str]:
    """Every BitNet linear module name of a model with ``num_layers`` layers."""
    return [m.replace(LAYER, str(i)) for i in range(num_layers) for m in BITNET_LINEARS]


def is_bitnet_weight(key: str) -> bool:
    """True for the ``.weight`` of a BitNet linear (its bias, if any, stays unquantized)."""
    module, _, leaf = key.rpartition(".")
    return leaf == "weight" and _MODULE.fullmatch(module) is not None
