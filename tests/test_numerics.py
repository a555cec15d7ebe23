"""Row order checked by numerics: projections recomputed from Megatron shards vs transformers' modules."""

import pytest
import torch
from transformers import FalconH1ForCausalLM

from bridge.engine.convert import hf_to_megatron
from bridge.formats.legacy import LegacyCheckpoint


def split_rank_in_proj(out, cfg, tp):
    """A rank's in_proj output, split with megatron-core's TP-local sizes (MambaMixer.forward)."""
    d_inner = cfg.mamba_d_ssm // tp
    gn = cfg.mamba_n_groups * cfg.mamba_d_state // tp
    return out.split([d_inner, d_inner, gn, gn, cfg.mamba_n_heads // tp], -1)


def split_rank_qkv(out, cfg, tp):
    """A rank's linear_qkv output, split per query group as megatron-core's get_query_key_value_tensors."""
    groups = cfg.num_key_value_heads // tp
    qpg = cfg.num_attention_heads // cfg.num_key_value_heads
    hd = cfg.head_dim
    q, k, v = out.view(*out.shape[:-1], groups, (qpg + 2) * hd).split([qpg * hd, hd, hd], -1)
    return [t.flatten(-2) for t in (q, k, v)]


@pytest.mark.parametrize("preset,tp", [("tiny", 2), ("tiny", 4), ("tiny-bias-tied", 2), ("tiny-mup", 2)])
def test_projections_from_shards_match_transformers(hf_preset, tmp_path, preset, tp):
    src = hf_preset(preset)
    model = FalconH1ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    cfg = model.config
    hf_to_megatron(src, tmp_path / "meg", tp=tp)
    meg = LegacyCheckpoint(tmp_path / "meg")
    h = torch.randn(3, 5, cfg.hidden_size)
    layer = model.model.layers[1]
    with torch.no_grad():
        hf_parts = layer.mamba.in_proj(h).split(
            [
                cfg.mamba_d_ssm,
                cfg.mamba_d_ssm,
                cfg.mamba_n_groups * cfg.mamba_d_state,
                cfg.mamba_n_groups * cfg.mamba_d_state,
                cfg.mamba_n_heads,
            ],
            -1,
        )
        hf_qkv = [layer.self_attn.q_proj(h), layer.self_attn.k_proj(h), layer.self_attn.v_proj(h)]
        hf_gate, hf_up = layer.feed_forward.gate_proj(h), layer.feed_forward.up_proj(h)
        ranks = [meg.model(r, 0) for r in range(tp)]
        pre = "decoder.layers.1."

        def linear(state, name):
            bias = state.get(pre + name + ".bias")
            return torch.nn.functional.linear(h, state[pre + name + ".weight"], bias)

        in_proj = [split_rank_in_proj(linear(s, "mamba_mixer.in_proj"), cfg, tp) for s in ranks]
        qkv = [split_rank_qkv(linear(s, "self_attention.linear_qkv"), cfg, tp) for s in ranks]
        fc1 = [linear(s, "mlp.linear_fc1").chunk(2, -1) for s in ranks]
    for i, name in enumerate("z x B C dt".split()):
        torch.testing.assert_close(torch.cat([r[i] for r in in_proj], -1), hf_parts[i], msg=name)
    for i, name in enumerate("q k v".split()):
        torch.testing.assert_close(torch.cat([r[i] for r in qkv], -1), hf_qkv[i], msg=name)
    torch.testing.assert_close(torch.cat([r[0] for r in fc1], -1), hf_gate)
    torch.testing.assert_close(torch.cat([r[1] for r in fc1], -1), hf_up)
