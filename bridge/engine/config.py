"""Reading HF ``config.json`` strictly, for any registered family, and the dtype names both sides use.
Each family translates its config to Megatron ``args`` and back itself (``bridge.families``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from bridge.errors import InputError
from bridge.families import family_for_model_type

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# transformers' names (config.json "dtype") accepted wherever ours are: users know both.
DTYPE_ALIASES = {HF_DTYPE_NAMES[dtype]: short for short, dtype in DTYPES.items()}


def dtype_name(choice: str) -> str:
    """Our short name for a --dtype value given in either spelling ("bfloat16" -> "bf16"); others as-is."""
    return DTYPE_ALIASES.get(choice, choice)


def load_hf_config(folder: Path):
    """Reads ``config.json`` strictly: it must parse and describe a model of a registered family."""
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: missing; expected a Hugging Face config.json")
    return hf_config_from_json(path.read_text(), str(path))


def hf_config_from_json(text: str, where: str):
    """A config.json parsed strictly into the config class of the family its model_type names."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON ({e.msg} at line {e.lineno})") from None
    found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
    family = family_for_model_type(found, where)
    config_class = family.config_class
    check_sizes(data, where, family.positive_sizes, family.optional_sizes)
    for name in ("dtype", "torch_dtype"):  # transformers' own repr of the config breaks on anything else
        if not isinstance(data.get(name), str | None):
            raise InputError(f'{where}: {name} is {data[name]!r:.40}; expected a dtype name such as "bfloat16"')
    try:
        return config_class.from_dict(config_class._decode_special_floats(data))
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, StrictDataclassError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines())
        raise InputError(f"{where}: not a valid {config_class.__name__} ({detail})") from None


# No real model has a size near this; a larger one is a corrupt or hostile config, refused before
# anything (transformers, the table, a per-layer expansion) is built from it.
MAX_SIZE = 2**31


def check_sizes(fields: dict, where: str, positive: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """One-line error for the first size field that is not a positive integer (``optional`` ones may be
    None) or is absurdly large: transformers would build a model from a negative or zero size, or fail
    deep inside; a huge one would be expanded per layer before any tensor is compared."""
    for name in positive + optional:
        if name not in fields or (fields[name] is None and name in optional):
            continue
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{where}: {name} is {value!r:.60}; expected a positive integer")
        if value > MAX_SIZE:
            raise InputError(f"{where}: {name} is {value}; expected at most {MAX_SIZE} (no model is that large)")


def rope_theta(cfg) -> float:
    return float((cfg.rope_parameters or {}).get("rope_theta", 1e11))


def config_dtype(cfg) -> torch.dtype:
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def config_from_fields(
    config_class,
    fields: dict,
    *,
    args: dict,
    where: str,
    positive: tuple[str, ...],
    optional: tuple[str, ...],
    name: str,
    architecture: str,
):
    """The HF config a family rebuilt from Megatron args: dtype from ``params_dtype``, sizes checked,
    and transformers' own validation turned into one line naming ``where``."""
    params_dtype = args.get("params_dtype")
    if isinstance(params_dtype, torch.dtype):
        fields["dtype"] = HF_DTYPE_NAMES.get(params_dtype, "float32")
    check_sizes(fields, where, positive, optional)
    try:
        cfg = config_class(**fields)
    except (TypeError, ValueError, AttributeError, KeyError, StrictDataclassError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines())
        raise InputError(f"{where}: do not describe a valid {name} model ({detail})") from None
    cfg.architectures = [architecture]
    return cfg


def transformer_args(
    cfg, *, head_dim: int, rope: dict, tp: int, pp: int, padded_vocab: int, divisible_by: int, params_dtype: torch.dtype
) -> dict:
    """The Megatron-LM args every decoder family shares, in the order they are stored (a legacy rank
    file pickles them in this order); ``rope`` holds the family's rotary fields."""
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    return dict(
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=kv != cfg.num_attention_heads,
        num_query_groups=kv,
        kv_channels=head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=cfg.max_position_embeddings,
        position_embedding_type="rope",
        **rope,
        normalization="RMSNorm",
        norm_epsilon=cfg.rms_norm_eps,
        swiglu=True,
        add_position_embedding=False,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
