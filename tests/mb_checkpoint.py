"""What Megatron-Bridge leaves next to the weights of a training run, rebuilt independently of the
product code so the reader is tested against MB's conventions, not against our own writer.

Every rule below is reimplemented from Megatron-Bridge at 067f987df03b (and the Megatron-LM it
pins, 2a75ac12c54b):
- ``run_config.yaml``: ``ConfigContainer.to_yaml`` = ``yaml.safe_dump(to_dict())`` (keys sorted);
  every dataclass becomes ``{_target_: module.Qualname, field: value}``; a torch dtype
  ``{_target_: torch.bfloat16, _call_: false}``; an enum ``{_target_, _call_: true, _args_, _name_}``;
  tuples become lists (``megatron/training/config/{container,yaml_utils}.py``);
- the ``model:`` fields: ``FalconH1Bridge.provider_bridge`` = the base ``CONFIG_MAPPING``
  (``models/conversion/model_bridge.py``) plus Falcon-H1's own (``models/falcon_h1/falconh1_bridge.py``);
- ``train_state.pt``: ``TrainState.state_dict()`` (``training/state.py``), eight tensors;
- ``tokenizer/``: ``save_tokenizer_assets`` = the HF tokenizer's ``save_pretrained`` files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

MB_PROVIDER = "megatron.bridge.models.falcon_h1.falconh1_provider.FalconH1ModelProvider"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_HF_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype: torch.dtype) -> dict:
    return {"_target_": str(dtype), "_call_": False}


def provider_fields(cfg, *, tp: int, pp: int) -> dict:
    """The ``model:`` section MB writes for an HF Falcon-H1 config (shape, µP and parallel fields)."""
    dtype = cfg.dtype if isinstance(cfg.dtype, torch.dtype) else _HF_DTYPE[str(cfg.dtype or "float32")]
    rope_theta = (cfg.rope_parameters or {}).get("rope_theta", 1e11)
    return {
        "_target_": MB_PROVIDER,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_key_value_heads,
        "kv_channels": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "should_pad_vocab": False,
        "make_vocab_size_divisible_by": 128,
        "seq_length": cfg.max_position_embeddings,
        "layernorm_epsilon": cfg.rms_norm_eps,
        "share_embeddings_and_output_weights": cfg.tie_word_embeddings,
        "add_qkv_bias": cfg.attention_bias,
        "add_bias_linear": cfg.projectors_bias,
        "rotary_base": int(rope_theta),
        "rotary_percent": 1.0,
        "position_embedding_type": "rope",
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "attention_backend": {
            "_target_": "megatron.core.transformer.enums.AttnBackend",
            "_call_": True,
            "_args_": [3],
            "_name_": "unfused",
        },
        "init_method": {"_target_": "torch.nn.init.normal_", "_partial_": True, "_args_": [], "mean": 0.0, "std": 0.02},
        "mamba_state_dim": cfg.mamba_d_state,
        "mamba_head_dim": cfg.mamba_d_head,
        "mamba_num_heads": cfg.mamba_n_heads,
        "mamba_num_groups": cfg.mamba_n_groups,
        "expand": cfg.mamba_expand,
        "d_conv": cfg.mamba_d_conv,
        "conv_bias": cfg.mamba_conv_bias,
        "chunk_size": cfg.mamba_chunk_size,
        "rmsnorm": cfg.mamba_rms_norm,
        "norm_before_gate": cfg.mamba_norm_before_gate,
        "hybrid_override_pattern": None,
        "falconh1_ratio": 1.0,
        "embedding_multiplier": cfg.embedding_multiplier,
        "lm_head_multiplier": cfg.lm_head_multiplier,
        "key_multiplier": cfg.key_multiplier,
        "attention_in_multiplier": cfg.attention_in_multiplier,
        "attention_out_multiplier": cfg.attention_out_multiplier,
        "ssm_in_multiplier": cfg.ssm_in_multiplier,
        "ssm_out_multiplier": cfg.ssm_out_multiplier,
        "mlp_multipliers": list(cfg.mlp_multipliers),
        "ssm_multipliers": list(cfg.ssm_multipliers),
        "params_dtype": _dtype(dtype),
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "transformer_impl": "local",
    }


def run_config_text(model: dict, save: Path) -> str:
    container = {
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "model": model,
        "checkpoint": {
            "_target_": "megatron.bridge.training.config.CheckpointConfig",
            "save": str(save),
            "ckpt_format": "torch_dist",
            "save_optim": True,
            "save_rng": True,
        },
        "tokenizer": {
            "_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
            "tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": "tiiuae/Falcon-H1-0.5B-Base",
            "hf_tokenizer_kwargs": {},
        },
        "train": {
            "_target_": "megatron.bridge.training.config.TrainingConfig",
            "train_iters": 1000,
            "global_batch_size": 8,
            "micro_batch_size": 1,
        },
        "dataset": None,
        "dist": None,
        "env_vars": {},
    }
    return yaml.safe_dump(container, default_flow_style=False)


def train_state(step: int) -> dict[str, torch.Tensor]:
    """``TrainState.state_dict()`` as MB saves it."""
    return {
        "step": torch.tensor(step, dtype=torch.int64),
        "consumed_train_samples": torch.tensor(step * 8, dtype=torch.int64),
        "skipped_train_samples": torch.tensor(0, dtype=torch.int64),
        "consumed_valid_samples": torch.tensor(0, dtype=torch.int64),
        "floating_point_operations_so_far": torch.tensor(1.5e15, dtype=torch.float32),
        "do_train": torch.tensor(True),
        "do_valid": torch.tensor(False),
        "do_test": torch.tensor(False),
    }


def te_modules(num_layers: int) -> list[str]:
    """Every module of MB's Falcon-H1 spec that keeps Transformer Engine ``_extra_state``."""
    per_layer = (
        "norm",
        "mamba_mixer.in_proj",
        "mamba_mixer.out_proj",
        "self_attention.linear_qkv",
        "self_attention.core_attention",
        "self_attention.linear_proj",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
    )
    return [f"decoder.layers.{i}.{m}" for i in range(num_layers) for m in per_layer] + [
        "decoder.final_norm",
        "output_layer",
    ]


def finish_mb_checkpoint(root: Path, iteration: int, cfg, *, tp: int, pp: int, tokenizer_from: Path) -> None:
    """Writes run_config.yaml, train_state.pt, tokenizer/ and the root's tracker files around an
    iteration folder already holding megatron-core's torch_dist files."""
    iter_dir = root / f"iter_{iteration:07d}"
    (iter_dir / "run_config.yaml").write_text(run_config_text(provider_fields(cfg, tp=tp, pp=pp), root))
    torch.save(train_state(iteration), iter_dir / "train_state.pt")
    shutil.copy(iter_dir / "train_state.pt", root / "latest_train_state.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    (iter_dir / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, iter_dir / "tokenizer" / name)
