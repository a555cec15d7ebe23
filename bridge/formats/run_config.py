"""Megatron-Bridge's ``run_config.yaml``: the model section read as Megatron ``args``.

Megatron-Bridge checkpoints carry no ``args``; their model config is the serialized provider
(``ConfigContainer.to_yaml``: ``model:`` holds ``_target_`` = the provider class and its dataclass
fields; a torch dtype is ``{_target_: torch.bfloat16, _call_: false}``). The provider extends
megatron-core's ``TransformerConfig``, so most fields already carry Megatron's names; the few that
differ from Megatron-LM's argparse names are renamed here, and then one code path
(the family's ``from_args``) builds the HF config for both stacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from bridge.errors import InputError, sanitize
from bridge.plumbing.safe_files import read_bytes_capped

RUN_CONFIG = "run_config.yaml"
MAX_RUN_CONFIG_BYTES = 4 * 2**20  # a real one is ~30 kB; anything far larger is not a run config
# TransformerConfig / provider field -> Megatron-LM argparse name, where they differ.
_PROVIDER_TO_ARGS = {
    "seq_length": "max_position_embeddings",
    "layernorm_epsilon": "norm_epsilon",
    "hybrid_layer_pattern": "hybrid_override_pattern",
}


def read_run_config(iter_dir: Path) -> dict | None:
    """The parsed ``run_config.yaml`` of an iteration, or None when there is none."""
    path = Path(iter_dir) / RUN_CONFIG
    if not os.path.lexists(path):
        return None
    raw = read_bytes_capped(path, MAX_RUN_CONFIG_BYTES)  # a FIFO, device or oversized file is refused
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        detail = sanitize(str(e).splitlines()[0], 80) if str(e) else type(e).__name__
        raise InputError(f"{path}: not valid YAML ({detail})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise InputError(f"{path}: no 'model:' section; expected a Megatron-Bridge run config")
    return data


def _dtype(value: object, where: str) -> torch.dtype | None:
    target = value.get("_target_") if isinstance(value, dict) else value
    if target is None:
        return None
    dtype = getattr(torch, str(target).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"{where}: params_dtype {target!r:.60} is not a torch dtype")
    return dtype


def args_from_run_config(run_config: dict) -> dict:
    """The ``model:`` section as Megatron-LM ``args`` names (the provider class picks the family)."""
    model = run_config["model"]
    where = "run_config.yaml"
    args = {_PROVIDER_TO_ARGS.get(k, k): v for k, v in model.items() if not k.startswith("_")}
    args["untie_embeddings_and_output_weights"] = not model.get("share_embeddings_and_output_weights", False)
    args["params_dtype"] = _dtype(model.get("params_dtype"), where)
    if not args.get("mamba_num_heads") and isinstance(args.get("mamba_head_dim"), int) and args["mamba_head_dim"]:
        args["mamba_num_heads"] = args.get("expand", 2) * args.get("hidden_size", 0) // args["mamba_head_dim"]
    if not model.get("should_pad_vocab", False):
        args["padded_vocab_size"] = args.get("vocab_size")  # the provider builds the embedding unpadded
    return args


def run_config_yaml(model: dict, *, save: str, with_tokenizer: bool) -> str:
    """A ``run_config.yaml`` for fine-tuning: the provider, a checkpoint section saying no optimizer or
    RNG state was saved, and an HF tokenizer whose ``tokenizer_model`` is ``Path()``, serialized as
    ``to_yaml`` does: Megatron-Bridge's ``load_tokenizer`` then reads the iteration's ``tokenizer/``."""
    config = {
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "model": model,
        "checkpoint": {
            "_target_": "megatron.bridge.training.config.CheckpointConfig",
            "save": save,
            "ckpt_format": "torch_dist",
            "save_optim": False,
            "save_rng": False,
            "async_save": False,
            "fully_parallel_save": True,
            "dist_ckpt_optim_fully_reshardable": True,
        },
        "tokenizer": None
        if not with_tokenizer
        else {
            "_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
            "tokenizer_type": "HuggingFaceTokenizer",
            "hf_tokenizer_kwargs": {},
            "tokenizer_model": {"_target_": "pathlib.PosixPath", "_call_": True},
        },
        "train": None,
        "ddp": None,
        "scheduler": None,
        "dataset": None,
        "dist": None,
        "env_vars": {},
    }
    return yaml.safe_dump(config, default_flow_style=False)


# Megatron-LM args that Megatron-Bridge's providers take under the same name (TransformerConfig fields).
TRANSFORMER_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "rotary_percent",
    "position_embedding_type",
    "normalization",
    "add_bias_linear",
    "add_qkv_bias",
    "hidden_dropout",
    "attention_dropout",
    "bf16",
    "fp16",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
)


def transformer_provider_fields(args: dict, *, target: str, init_method_std: float) -> dict:
    """What every decoder provider's ``model:`` section holds, from Megatron-LM ``args``: the
    TransformerConfig fields, the renamed ones, and a SwiGLU model built from loaded weights, serialized
    as ``ConfigContainer.to_yaml`` does (a dtype or function as a ``_target_`` dict)."""
    fields = {name: args[name] for name in TRANSFORMER_FIELDS}
    fields.update(
        _target_=target,
        seq_length=args["max_position_embeddings"],
        layernorm_epsilon=args["norm_epsilon"],
        rotary_base=int(args["rotary_base"]),
        share_embeddings_and_output_weights=not args["untie_embeddings_and_output_weights"],
        should_pad_vocab=args["padded_vocab_size"] != args["vocab_size"],
        params_dtype={"_target_": str(args["params_dtype"]), "_call_": False},
        gated_linear_unit=True,
        activation_func={"_target_": "torch.nn.functional.silu", "_call_": False},
        init_method_std=init_method_std,
        perform_initialization=False,
    )
    return fields
