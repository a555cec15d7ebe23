"""Model families as values. A ``ModelFamily`` holds everything the engine, the formats and the
checks need to know about one architecture; they receive it (``family_of(config)``) instead of
importing Falcon-H1. The registry finds a family by HF ``model_type``, by Megatron ``args`` and by
Megatron-Bridge provider class. ``bridge/__init__.py`` registers the built-in families."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.errors import InputError
from mappings import Layout, Param
from mappings.bitnet import BitNetLinears
from mappings.rules import Blockwise

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


@dataclass(frozen=True)
class ModelFamily:
    name: str
    hf_model_type: str  # config.json "model_type"
    hf_architecture: str  # config.json "architectures"[0]
    config_class_name: str  # transformers' config class, resolved on first use (``config_class``)
    table: tuple[Param, ...]  # the mapping table (mappings/<family>.py)
    layouts: Mapping[str, Layout]  # Megatron key layouts, the first one the default
    params_for: Callable[[Any, int], list[Param]]  # the table entries a config and PP size have
    dims: Callable[[Any, int | None], Any]  # (hf config, padded vocab) -> the sizes the rules use
    hf_shapes: Callable[[Any, Any], dict[str, tuple[int, ...]]]  # (hf config, dims) -> HF key -> shape
    check_parallel: Callable[[Any, int, int], None]  # raises UnsupportedError where Megatron cannot run TP/PP
    to_args: Callable[..., Namespace]  # HF config -> Megatron-LM args
    from_args: Callable[..., Any]  # Megatron-LM args (dict or Namespace) -> HF config
    provider: str  # Megatron-Bridge provider class (run_config.yaml model._target_)
    provider_fields: Callable[..., dict]  # (Megatron-LM args dict, init_method_std=) -> run_config.yaml model:
    extra_state_modules: Callable[[int], tuple[list[str], list[str]]]  # TE modules, modules with None
    forward: Callable[..., Any]  # parity: logits computed from TP rank shards (bridge.checks)
    presets: Mapping[str, dict] = field(default_factory=dict)  # make-tiny presets (config fields)
    released: Mapping[str, dict] = field(default_factory=dict)  # the released shapes (make-tiny --full)
    mup_fields: tuple[str, ...] = ()  # config fields that are µP multipliers
    positive_sizes: tuple[str, ...] = ()  # config fields that must be positive integers
    optional_sizes: tuple[str, ...] = ()  # the same, or None (derived when absent)
    compared_fields: tuple[str, ...] = ()  # fields a sidecar config and args / run_config must agree on
    display_name: str = ""  # how messages name the family (its ``name`` when empty)
    args_markers: tuple[str, ...] = ()  # prefixes of Megatron-LM args names only this family's args have
    bitnet: BitNetLinears | None = None  # which HF tensors are BitNet linears; None: BitNet is refused

    @property
    def config_class(self) -> type[PreTrainedConfig]:
        """Looked up by name, so a family's config module is imported only when that family is used:
        ``LlamaConfig`` alone pulls in ~0.7 s of transformers (its validators import the model loading
        stack) that a Falcon-H1 conversion never needs."""
        import transformers

        return getattr(transformers, self.config_class_name)

    @property
    def model_roots(self) -> frozenset[str]:
        """First key component of every Megatron model tensor: everything else in a training checkpoint
        (optimizer, RNG, common state) is never read."""
        return frozenset(p.megatron.split(".", 1)[0] for p in self.table)

    @property
    def block_keys(self) -> dict[str, tuple[str, ...]]:
        """Megatron key suffix -> names of the blocks torch_dist stores it as (Mamba's split factories)."""
        return {
            p.megatron.split("{L}.", 1)[-1]: p.rule.dist_keys
            for p in self.table
            if isinstance(p.rule, Blockwise) and p.rule.dist_keys
        }


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.hf_model_type] = family
    return family


def _known() -> str:
    names = ", ".join(repr(t) for t in FAMILIES)
    return names if len(FAMILIES) == 1 else f"one of {names}"


def family_for_model_type(model_type: object, where: str) -> ModelFamily:
    if model_type not in FAMILIES:
        raise InputError(f"{where}: model_type is {model_type!r:.60}, expected {_known()}")
    return FAMILIES[model_type]


def family_of(config: Any) -> ModelFamily:
    """The family of an HF config object."""
    return family_for_model_type(getattr(config, "model_type", None), type(config).__name__)


def family_for_args(args: Mapping[str, Any], where: str) -> ModelFamily:
    """Megatron-LM args name no architecture unless this tool wrote them (``model_type``); else a family
    whose ``args_markers`` some args name starts with (a hybrid layer pattern or Mamba fields mean the
    hybrid family), else the one family without markers (a plain GPT)."""
    if "model_type" in args:
        return family_for_model_type(args["model_type"], where)
    if len(FAMILIES) == 1:
        return next(iter(FAMILIES.values()))
    for family in FAMILIES.values():
        if family.args_markers and any(str(k).startswith(family.args_markers) for k in args):
            return family
    plain = [f for f in FAMILIES.values() if not f.args_markers]
    if len(plain) == 1:
        return plain[0]
    raise InputError(f"{where}: args name no model type; pass --hf-config DIR")


def family_for_provider(target: str, where: str) -> ModelFamily:
    for family in FAMILIES.values():
        if target == family.provider or target.endswith("." + family.provider.rpartition(".")[2]):
            return family
    raise InputError(
        f"{where}: model._target_ is {target[:120]!r}; expected a provider of "
        f"{', '.join(f.provider.rpartition('.')[2] for f in FAMILIES.values())}"
    )


def all_block_keys() -> dict[str, tuple[str, ...]]:
    """Block-stored keys of every family: a torch_dist reader groups blocks before it knows the model."""
    return {k: v for f in FAMILIES.values() for k, v in f.block_keys.items()}


def all_model_roots() -> frozenset[str]:
    return frozenset().union(*(f.model_roots for f in FAMILIES.values()))
