"""``hf-to-megatron --target``: what Megatron-Bridge and Megatron-LM load with their default settings.

The loaders are megatron-core's own ``dist_checkpointing.load`` (CI runs this file on 0.16.x and on
0.19.x) under the default strictness, with the request MB's Transformer-Engine model makes, and
faithful re-implementations of the small pure-Python checks of Megatron-Bridge 067f987df03b
(``training/utils/checkpoint_utils.py``, ``training/checkpointing.py``) and Megatron-LM 2a75ac12c54b
(the version MB pins; ``megatron/training/checkpointing.py``): MB itself cannot be imported here
(its package imports Transformer Engine).
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mb_checkpoint import te_modules
from megatron_stack import cpu_writer

import cli
from bridge.checks.verify import verify
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.formats.hf import HFCheckpoint
from bridge.formats.torch_dist_io import TorchDistReader

# Fields of MB's FalconH1Config (modeling_falconh1/falconh1_model.py) and FalconH1ModelProvider
# (falconh1_provider.py) beyond megatron-core's TransformerConfig, at 067f987df03b.
MB_FALCON_H1_FIELDS = {
    "mamba_state_dim",
    "mamba_head_dim",
    "mamba_num_groups",
    "mamba_num_heads",
    "use_mamba_mem_eff_path",
    "A_init_dist",
    "d_conv",
    "conv_init",
    "expand",
    "A_init_range",
    "D_has_hdim",
    "rmsnorm",
    "norm_before_gate",
    "dt_min",
    "dt_max",
    "dt_init",
    "dt_scale",
    "dt_init_floor",
    "conv_bias",
    "chunk_size",
    "use_mamba",
    "use_attention",
    "use_mlp",
    "seq_length",
    "fp16_lm_cross_entropy",
    "logit_dtype",
    "parallel_output",
    "share_embeddings_and_output_weights",
    "hybrid_attention_ratio",
    "hybrid_mlp_ratio",
    "falconh1_ratio",
    "hybrid_override_pattern",
    "position_embedding_type",
    "rotary_percent",
    "rotary_base",
    "seq_len_interpolation_factor",
    "apply_rope_fusion",
    "make_vocab_size_divisible_by",
    "vocab_size",
    "should_pad_vocab",
    "embedding_multiplier",
    "lm_head_multiplier",
    "key_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
    "mlp_multipliers",
    "ssm_multipliers",
    "falconh1_stack_spec",
}
# What the provider needs to build this model (everything else keeps the dataclass default).
MB_NEEDED = {
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "should_pad_vocab",
    "make_vocab_size_divisible_by",
    "seq_length",
    "layernorm_epsilon",
    "share_embeddings_and_output_weights",
    "add_bias_linear",
    "add_qkv_bias",
    "rotary_base",
    "gated_linear_unit",
    "activation_func",
    "mamba_state_dim",
    "mamba_head_dim",
    "mamba_num_heads",
    "mamba_num_groups",
    "d_conv",
    "expand",
    "conv_bias",
    "chunk_size",
    "rmsnorm",
    "norm_before_gate",
    "embedding_multiplier",
    "lm_head_multiplier",
    "key_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
    "mlp_multipliers",
    "ssm_multipliers",
    "params_dtype",
    "bf16",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
}
TRAIN_STATE_KEYS = (
    "step",
    "consumed_train_samples",
    "skipped_train_samples",
    "consumed_valid_samples",
    "floating_point_operations_so_far",
    "do_train",
    "do_valid",
    "do_test",
)


# ---- Megatron-Bridge's checks, re-implemented line for line ---------------------------------------


def mb_checkpoint_exists(path: Path) -> bool:
    markers = ("run_config.yaml", "train_state.pt", "metadata.json", ".metadata")
    if any((path / m).exists() for m in markers):
        return True
    return (path / "latest_train_state.pt").exists() or (path / "latest_checkpointed_iteration.txt").is_file()


def mb_read_metadata(tracker: Path) -> tuple[int, bool]:
    iteration, release = 0, False
    metastring = tracker.read_text().strip()
    try:
        iteration = int(metastring)
    except ValueError:
        release = metastring == "release"
        assert release, f"invalid metadata file {tracker}"
    assert iteration > 0 or release, f"error parsing metadata file {tracker}"
    return iteration, release


def mb_read_train_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: state[k].item() for k in TRAIN_STATE_KEYS}  # TrainState.load_state_dict


def mb_resolve_iteration_dir(load_dir: Path) -> Path:
    """``_resolve_checkpoint_iteration`` + ``get_checkpoint_name``."""
    if (load_dir / "latest_train_state.pt").exists():
        iteration, release = mb_read_train_state(load_dir / "latest_train_state.pt")["step"], False
    else:
        iteration, release = mb_read_metadata(load_dir / "latest_checkpointed_iteration.txt")
    return load_dir / ("release" if release else f"iter_{iteration:07d}")


def mb_instantiate_leaf(value: dict):
    """What hydra-style ``instantiate`` does with a ``{_target_: ..., _call_: ...}`` leaf."""
    module, _, name = value["_target_"].rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    return obj() if value.get("_call_") else obj


# ---- Megatron-LM's checks ---------------------------------------------------------------------------


def mlm_check_checkpoint_args(checkpoint_args: Namespace, args: Namespace, checkpoint_version: float) -> None:
    def _compare(arg_name, old_arg_name=None, default=None):
        checkpoint_value = (
            getattr(checkpoint_args, old_arg_name or arg_name, default)
            if default is not None
            else getattr(checkpoint_args, old_arg_name or arg_name)
        )
        args_value = getattr(args, arg_name)
        assert checkpoint_value == args_value, f"{arg_name}: {checkpoint_value} vs {args_value}"

    _compare("num_layers")
    _compare("hidden_size")
    _compare("num_attention_heads")
    _compare("add_position_embedding", default=True)
    if args.vocab_file:
        _compare("max_position_embeddings")
        _compare("make_vocab_size_divisible_by")
        if not args.use_dist_ckpt:
            _compare("padded_vocab_size")
        _compare("tokenizer_type")
    if args.data_parallel_random_init:
        _compare("data_parallel_random_init")
    if checkpoint_version >= 3.0 and not args.use_dist_ckpt:
        _compare("tensor_model_parallel_size")
        _compare("pipeline_model_parallel_size")


# Arguments ``load_args_from_checkpoint`` copies with force=True and Falcon-H1 needs.
MLM_FORCED = (
    "num_query_groups",
    "group_query_attention",
    "position_embedding_type",
    "add_position_embedding",
    "rotary_base",
    "rotary_percent",
    "add_bias_linear",
    "add_qkv_bias",
    "swiglu",
    "untie_embeddings_and_output_weights",
    "normalization",
    "mamba_state_dim",
    "mamba_head_dim",
    "mamba_num_groups",
    "mamba_num_heads",
)
MLM_SET = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "seq_length",
    "num_attention_heads",
    "kv_channels",
    "max_position_embeddings",
    "padded_vocab_size",
    "ckpt_format",
    "hybrid_override_pattern",
)


@pytest.fixture(scope="module")
def hf(hf_preset):
    return hf_preset("tiny-mup")  # µP, 4 Mamba groups, vocab 317


def _request(reader: TorchDistReader, tp: int, rank: int, objects: list[str]) -> dict:
    """One TP rank's load request as MB's TE model builds it with megatron-core's helpers: model
    ShardedTensors (fc1 as SwiGLU's two fragments; Mamba blocks split per block) and an
    ``_extra_state`` ShardedObject per module (``make_sharded_object_for_checkpoint``)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    req = {}
    for key in reader.keys():
        shape, dtype = reader.shape(key), reader.dtype(key)
        if key.endswith(("norm.weight", "layer_norm_weight")) and "mamba_mixer.norm" not in key:
            req[key] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=(0, rank, 0))
        elif key.endswith("linear_fc1.weight"):
            rows = shape[0] // (2 * tp)
            for i in range(2):
                local = torch.empty((rows, *shape[1:]), dtype=dtype)
                req[f"{key}#{i}"] = ShardedTensor.from_rank_offsets(
                    key, local, (0, i * tp + rank, 2 * tp), replica_id=(0, 0, 0)
                )
        else:
            axis = 1 if key.endswith(("linear_proj.weight", "out_proj.weight", "linear_fc2.weight")) else 0
            local = torch.empty(shape[:axis] + (shape[axis] // tp,) + shape[axis + 1 :], dtype=dtype)
            req[key] = ShardedTensor.from_rank_offsets(key, local, (axis, rank, tp), replica_id=(0, 0, 0))
    for module in objects:
        req[f"{module}._extra_state"] = make_sharded_object_for_checkpoint(
            None, f"{module}._extra_state", replica_id=(0, rank, 0)
        )
    return req


def _expected(global_tensor: torch.Tensor, key: str, tp: int, rank: int) -> torch.Tensor:
    if key.endswith(("norm.weight", "layer_norm_weight")) and "mamba_mixer.norm" not in key:
        return global_tensor
    axis = 1 if key.endswith(("linear_proj.weight", "out_proj.weight", "linear_fc2.weight")) else 0
    return global_tensor.chunk(tp, dim=axis)[rank]


def test_bridge_target_loads_under_default_strictness(hf, tmp_path, dist_checkpointing):
    hf_to_megatron(hf, tmp_path / "mb", tp=2, target="megatron-bridge")
    iter_dir = mb_resolve_iteration_dir(tmp_path / "mb")
    reader = TorchDistReader(iter_dir)
    modules = te_modules(HFCheckpoint(hf).config.num_hidden_layers)
    assert dist_checkpointing.check_is_distributed_checkpoint(str(iter_dir))
    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    for rank in range(2):
        with cpu_writer(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = dist_checkpointing.load(
                {"model": _request(reader, 2, rank, modules)}, str(iter_dir), validate_access_integrity=False
            )["model"]
        for key in reader.keys():
            glob = reader.load([key])[key]
            if key.endswith("linear_fc1.weight"):
                parts = glob.chunk(4, dim=0)
                assert torch.equal(loaded[f"{key}#0"], parts[rank]) and torch.equal(loaded[f"{key}#1"], parts[2 + rank])
            else:
                assert torch.equal(loaded[key], _expected(glob, key, 2, rank)), key
        state = loaded["decoder.layers.0.mamba_mixer.in_proj._extra_state"]
        assert isinstance(state, torch.Tensor) and state.numel() == 0 and state.dtype == torch.uint8
        assert loaded["output_layer._extra_state"] is None


def test_a_missing_extra_state_fails_the_default_load(hf, tmp_path, dist_checkpointing):
    """The failure the target exists for: the plain megatron-lm output lacks TE extra state."""
    hf_to_megatron(hf, tmp_path / "plain", tp=2, fmt="torch_dist")
    reader = TorchDistReader(tmp_path / "plain" / "release")
    request = _request(reader, 2, 0, ["decoder.layers.0.mamba_mixer.in_proj"])
    with cpu_writer(), warnings.catch_warnings(), pytest.raises(BaseException, match="Missing key.*_extra_state"):
        warnings.simplefilter("ignore")
        dist_checkpointing.load(
            {"model": request}, str(tmp_path / "plain" / "release"), validate_access_integrity=False
        )


def test_bridge_target_passes_mb_checks(hf, tmp_path):
    from megatron.core.transformer import TransformerConfig

    root = tmp_path / "mb"
    hf_to_megatron(hf, root, tp=2, pp=2, target="megatron-bridge")
    assert mb_checkpoint_exists(root)
    assert mb_read_metadata(root / "latest_checkpointed_iteration.txt") == (1, False)
    iter_dir = mb_resolve_iteration_dir(root)
    assert iter_dir == root / "iter_0000001" and mb_checkpoint_exists(iter_dir)
    assert mb_read_train_state(iter_dir / "train_state.pt")["step"] == 1
    run_config = yaml.safe_load((iter_dir / "run_config.yaml").read_text())
    model = run_config["model"]
    assert model["_target_"] == "megatron.bridge.models.falcon_h1.falconh1_provider.FalconH1ModelProvider"
    allowed = {f.name for f in dataclasses.fields(TransformerConfig)} | MB_FALCON_H1_FIELDS
    assert not set(model) - allowed - {"_target_"}, set(model) - allowed
    assert not MB_NEEDED - set(model), MB_NEEDED - set(model)
    assert (model["tensor_model_parallel_size"], model["pipeline_model_parallel_size"]) == (2, 2)
    assert mb_instantiate_leaf(model["params_dtype"]) == torch.float32
    assert mb_instantiate_leaf(model["activation_func"]) is torch.nn.functional.silu
    cfg = HFCheckpoint(hf).config
    assert (model["num_layers"], model["mamba_num_groups"], model["ssm_multipliers"]) == (
        cfg.num_hidden_layers,
        cfg.mamba_n_groups,
        list(cfg.ssm_multipliers),
    )
    assert model["vocab_size"] == cfg.vocab_size and model["should_pad_vocab"] is True  # 317: TP=2 cannot split it
    assert mb_instantiate_leaf(run_config["tokenizer"]["tokenizer_model"]) == Path()  # -> <ckpt>/tokenizer
    assert (iter_dir / "tokenizer" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert run_config["checkpoint"]["save_optim"] is False and run_config["checkpoint"]["save_rng"] is False


def test_bridge_target_keeps_a_divisible_vocabulary_unpadded(tmp_path):
    from bridge.tiny import make_tiny

    make_tiny(tmp_path / "hf", "tiny", seed=2, vocab_size=318)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mb", tp=2, target="megatron-bridge")
    reader = TorchDistReader(tmp_path / "mb" / "iter_0000001")
    assert reader.shape("embedding.word_embeddings.weight")[0] == 318
    model = yaml.safe_load((tmp_path / "mb" / "iter_0000001" / "run_config.yaml").read_text())["model"]
    assert model["should_pad_vocab"] is False and model["vocab_size"] == 318


def test_bridge_round_trip_is_bit_exact(hf, tmp_path):
    hf_to_megatron(hf, tmp_path / "mb32", tp=2, pp=2, target="megatron-bridge")
    megatron_to_hf(tmp_path / "mb32", tmp_path / "back32")
    report = verify(hf, tmp_path / "back32")
    assert report.ok and not report.config, report.format()
    # Without our sidecar, args (as Megatron-LM reads them) rebuild the model; without those too,
    # run_config.yaml does.
    shutil.rmtree(tmp_path / "mb32" / "hf_assets")
    megatron_to_hf(tmp_path / "mb32", tmp_path / "from_run_config")
    report = verify(hf, tmp_path / "from_run_config")
    assert all(t.status == "equal" for t in report.tensors), report.format()


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_megatron_lm_target_passes_its_checks(hf, tmp_path, fmt):
    import megatron.core  # noqa: F401  registers megatron's unpickling allow-list, as Megatron-LM does

    root = tmp_path / "mlm"
    hf_to_megatron(hf, root, tp=2, pp=2, fmt=fmt)
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert mb_read_metadata(root / "latest_checkpointed_iteration.txt") == (0, True)
    if fmt == "legacy":
        state = torch.load(root / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=True)
    else:
        state = TorchDistReader(root / "release").common
    ckpt_args = state["args"]
    assert state["checkpoint_version"] == 3.0 and "iteration" in state
    use_dist = fmt == "torch_dist"
    user = Namespace(
        **{
            k: getattr(ckpt_args, k)
            for k in (
                "num_layers",
                "hidden_size",
                "num_attention_heads",
                "max_position_embeddings",
                "make_vocab_size_divisible_by",
                "padded_vocab_size",
            )
        },
        add_position_embedding=False,
        tokenizer_type="HuggingFaceTokenizer",
        vocab_file="vocab.json",
        use_dist_ckpt=use_dist,
        data_parallel_random_init=False,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
    )
    mlm_check_checkpoint_args(ckpt_args, user, state["checkpoint_version"])
    with pytest.raises(AssertionError, match="hidden_size"):
        mlm_check_checkpoint_args(ckpt_args, Namespace(**{**vars(user), "hidden_size": 1}), 3.0)
    for name in MLM_FORCED + MLM_SET:
        assert getattr(ckpt_args, name, None) is not None or name == "hybrid_override_pattern", name
    assert ckpt_args.ckpt_format == ("torch_dist" if use_dist else "torch")


def test_iteration_option(hf, tmp_path):
    hf_to_megatron(hf, tmp_path / "n5", iteration=5)
    assert (tmp_path / "n5" / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert (
        torch.load(tmp_path / "n5" / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)[
            "iteration"
        ]
        == 5
    )
    run = CliRunner().invoke
    result = run(cli.main, ["hf-to-megatron", str(hf), str(tmp_path / "zero"), "--iteration", "0"])
    assert result.exit_code == 5 and "expected N >= 1 or 'release'" in result.stderr
    result = run(
        cli.main, ["hf-to-megatron", str(hf), str(tmp_path / "x"), "--target", "megatron-bridge", "--format", "legacy"]
    )
    assert result.exit_code == 5 and "loads only torch_dist" in result.stderr
    assert not (tmp_path / "zero").exists() and not (tmp_path / "x").exists()


# megatron-core 0.16.1 models/gpt/gpt_layer_specs.py, Transformer Engine spec: TELayerNormColumnParallelLinear
# linear_qkv and linear_fc1, TEDotProductAttention core_attention, TERowParallelLinear linear_proj and
# linear_fc2; the block's final_layernorm is a TENorm.
GPT_TE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


def test_llama_bridge_target_loads_under_default_strictness(tmp_path, dist_checkpointing):
    """The GPT-style family through the same loader: the TE GPT model's request, TP=2, both ranks."""
    from bridge.tiny import make_tiny

    make_tiny(tmp_path / "hf", "llama-tiny", seed=3)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mb", tp=2, target="megatron-bridge")
    iter_dir = mb_resolve_iteration_dir(tmp_path / "mb")
    reader = TorchDistReader(iter_dir)
    layers = HFCheckpoint(tmp_path / "hf").config.num_hidden_layers
    modules = [f"decoder.layers.{i}.{m}" for i in range(layers) for m in GPT_TE_MODULES] + ["decoder.final_layernorm"]
    for rank in range(2):
        with cpu_writer(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = dist_checkpointing.load(
                {"model": _request(reader, 2, rank, modules)}, str(iter_dir), validate_access_integrity=False
            )["model"]
        qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
        assert torch.equal(loaded[qkv], reader.load([qkv])[qkv].chunk(2)[rank])
    report = verify(tmp_path / "hf", tmp_path / "mb")
    assert report.ok, report.format()
