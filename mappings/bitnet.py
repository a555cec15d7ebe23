"""Which HF tensors of a model family are BitNet linears: stored ternary-packed, with a ``weight_scale``
beside them. Each family states its rule as data in its spec (``ModelFamily.bitnet``); this module
only evaluates it.

A rule has two parts. ``only``: the ``nn.Linear`` modules transformers' BitNet quantizer replaces
(module patterns, ``{L}`` for the layer), for a family whose other tensors must never be touched
(Falcon-H1: A_log, D, conv1d and norms are not linears). ``skip``: substrings of tensor names that are
never quantized, the form onebitllms' ``quantize_to_1bit`` states its rule in (every state-dict
tensor whose name contains none of them). Only ``.weight`` tensors are ever quantized; a bias stays in
the model dtype, as transformers' ``BitLinear`` keeps it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from .falcon_h1 import LAYER


@dataclass(frozen=True)
class BitNetLinears:
    only: tuple[str, ...] | None = None  # module patterns quantized; None: every weight not skipped
    skip: tuple[str, ...] = ()  # a tensor whose name contains one of these is never quantized
    not_converted: tuple[str, ...] = ("lm_head",)  # quantization_config modules_to_not_convert

    @cached_property
    def _pattern(self) -> re.Pattern[str] | None:
        if self.only is None:
            return None
        return re.compile("|".join(re.escape(m).replace(re.escape(LAYER), r"\d+") for m in self.only))

    def is_weight(self, key: str) -> bool:
        """True for the ``.weight`` of a BitNet linear."""
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or any(s in key for s in self.skip):
            return False
        return self._pattern is None or self._pattern.fullmatch(module) is not None

    def modules(self, hf_keys) -> list[str]:
        """The BitNet linear modules among a model's HF tensor names, in their order."""
        return [k.removesuffix(".weight") for k in hf_keys if self.is_weight(k)]
