"""The table against code no one here wrote: transformers' state dict and megatron-core's size arithmetic."""

import pytest
import torch
from transformers import FalconH1ForCausalLM

from bridge.engine.layout import expected_hf_shapes, expected_rank_shapes, hf_index
from bridge.engine.plan import ParallelPlan
from bridge.errors import UnsupportedError
from bridge.tiny import PRESETS, preset_config

VARIANTS = {
    "plain": {},
    "all-biases": dict(projectors_bias=True, attention_bias=True, mlp_bias=True, mamba_proj_bias=True),
    "no-conv-bias-tied-rmsnorm": dict(mamba_conv_bias=False, tie_word_embeddings=True, mamba_rms_norm=True),
}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pp", [1, 2])
def test_table_covers_exactly_transformers_state_dict(preset, variant, pp):
    cfg = preset_config(preset, **VARIANTS[variant])
    plan = ParallelPlan(cfg, 1, pp)
    assert set(hf_index(plan)) == set(expected_hf_shapes(cfg))


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_table_shapes_are_transformers_state_dict(preset, variant):
    """The HF shape table (used at run time instead of building the model) against the oracle: keys,
    order and shapes of FalconH1ForCausalLM's state dict on the meta device."""
    cfg = preset_config(preset, **VARIANTS[variant])
    with torch.device("meta"):
        model = FalconH1ForCausalLM(cfg)
    oracle = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del oracle["lm_head.weight"]
    table = {k: tuple(s) for k, s in expected_hf_shapes(cfg).items()}
    assert list(table.items()) == list(oracle.items())


def megatron_core_local_shapes(cfg, tp):
    """Per-rank sizes as megatron-core 0.16 allocates them (ssm/mamba_mixer.py, transformer/attention.py,
    mlp.py, tensor_parallel/layers.py), written out independently of the rules."""
    nheads, headdim, ngroups, d_state = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
    d_inner_local, ngroups_local, nheads_local = nheads * headdim // tp, ngroups // tp, nheads // tp
    in_proj_local = (2 * nheads * headdim + 2 * ngroups * d_state + nheads) // tp  # ColumnParallelLinear
    conv_dim = d_inner_local + 2 * ngroups_local * d_state
    kv = cfg.head_dim
    qkv_local = (cfg.num_attention_heads * kv + 2 * cfg.num_key_value_heads * kv) // tp
    h = cfg.hidden_size
    return {
        "mamba_mixer.in_proj.weight": (in_proj_local, h),
        "mamba_mixer.conv1d.weight": (conv_dim, 1, cfg.mamba_d_conv),
        "mamba_mixer.conv1d.bias": (conv_dim,),
        "mamba_mixer.A_log": (nheads_local,),
        "mamba_mixer.D": (nheads_local,),
        "mamba_mixer.dt_bias": (nheads_local,),
        "mamba_mixer.norm.weight": (d_inner_local,),
        "mamba_mixer.out_proj.weight": (h, d_inner_local),
        "self_attention.linear_qkv.weight": (qkv_local, h),
        "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * kv // tp),
        "mlp.linear_fc1.weight": (2 * cfg.intermediate_size // tp, h),
        "mlp.linear_fc2.weight": (h, cfg.intermediate_size // tp),
        "norm.weight": (h,),
        "mlp.linear_fc1.layer_norm_weight": (h,),
    }


@pytest.mark.parametrize("preset,tp", [("tiny", 1), ("tiny", 2), ("tiny", 4), ("tiny-mup", 4), ("tiny-bias-tied", 2)])
# tiny-mup has 2 KV heads: TP=4 exercises megatron-core's num_query_groups < tp path.
def test_rank_shapes_match_megatron_core(preset, tp):
    cfg = preset_config(preset)
    plan = ParallelPlan(cfg, tp, 1)
    shapes = expected_rank_shapes(plan, expected_hf_shapes(cfg), 0)
    for suffix, shape in megatron_core_local_shapes(cfg, tp).items():
        key = f"decoder.layers.0.{suffix}"
        if key in shapes:
            assert tuple(shapes[key]) == shape, key
    vocab_local = shapes["embedding.word_embeddings.weight"][0]
    assert vocab_local * tp % (128 * tp) == 0 and vocab_local * tp >= cfg.vocab_size


@pytest.mark.parametrize(
    "preset,tp,pp,overrides,match",
    [
        ("0.5b", 2, 1, {}, "mamba_n_groups"),  # released models have one Mamba group
        ("tiny", 4, 1, {"mamba_n_groups": 2}, "mamba_n_groups"),
        ("tiny", 3, 1, {}, "TP=3 does not divide num_attention_heads"),
        ("7b", 6, 1, {"num_key_value_heads": 4, "mamba_n_groups": 6}, "num_key_value_heads=4: megatron-core needs"),
        ("tiny", 1, 3, {}, "PP=3 does not divide num_hidden_layers=4"),
    ],
)
def test_parallel_sizes_megatron_cannot_run_are_refused(preset, tp, pp, overrides, match):
    with pytest.raises(UnsupportedError, match=match):
        ParallelPlan(preset_config(preset, **overrides), tp, pp)


def test_heads_not_divisible_by_groups_refused():
    cfg = preset_config("tiny")
    cfg.mamba_n_groups = 5
    with pytest.raises(UnsupportedError, match="not divisible by mamba_n_groups"):
        ParallelPlan(cfg, 1, 1)
