"""The Llama family (transformers' LlamaForCausalLM <-> megatron-core GPTModel): table against
transformers' meta-model, per-rank QKV / fc1 layouts built independently, bit-exact round trips in both
formats and norm layouts, parity with transformers, resharding, the mapping table."""

from __future__ import annotations

import pytest
import torch

from bridge.api import hf_to_megatron, mapping_rows, megatron_to_hf, parity, reshard
from bridge.checks.verify import verify
from bridge.engine.layout import expected_hf_shapes
from bridge.engine.source import open_megatron
from bridge.errors import UnsupportedError
from bridge.families import FAMILIES, family_for_args
from bridge.families.llama import PRESETS
from bridge.tiny import make_tiny, preset_config

PRESET_NAMES = list(PRESETS)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for name in PRESET_NAMES:
        make_tiny(root / name, name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_table_matches_transformers_state_dict(preset):
    from transformers import LlamaForCausalLM

    cfg = preset_config(preset)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    got = {k: tuple(s) for k, s in expected_hf_shapes(cfg).items()}
    assert list(got.items()) == list(state.items())


def _qkv_expected(q, k, v, groups, tp):
    """Megatron's linear_qkv: per query group [q_g; k_g; v_g], the fused tensor row-chunked per rank."""
    qg, kg, vg = q.chunk(groups), k.chunk(groups), v.chunk(groups)
    fused = torch.cat([torch.cat([qg[g], kg[g], vg[g]]) for g in range(groups)])
    return fused.chunk(tp)


@pytest.mark.parametrize("preset,tp", [("llama-tiny", 2), ("llama-tiny", 4), ("llama-tiny-tied", 4)])
def test_rank_layouts_equal_megatron_core(tiny_hf, tmp_path, preset, tp):
    from safetensors.torch import load_file

    hf = load_file(str(next(tiny_hf[preset].glob("*.safetensors"))))
    cfg = preset_config(preset)
    meg = tmp_path / "meg"
    hf_to_megatron(tiny_hf[preset], meg, tp=tp)
    ckpt = open_megatron(meg)
    p = "model.layers.1.self_attn."
    qkv = _qkv_expected(
        hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], hf[p + "v_proj.weight"], cfg.num_key_value_heads, tp
    )
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    for r in range(tp):
        model = ckpt.model(r, 0)
        assert torch.equal(model["decoder.layers.1.self_attention.linear_qkv.weight"], qkv[r])
        fc1 = torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
        assert torch.equal(model["decoder.layers.1.mlp.linear_fc1.weight"], fc1)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("layout", ["te", "local"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_round_trip_bit_exact(tiny_hf, tmp_path, fmt, layout, preset):
    meg, back = tmp_path / "meg", tmp_path / "back"
    hf_to_megatron(tiny_hf[preset], meg, tp=2, pp=2, fmt=fmt, layout=layout)
    summary = megatron_to_hf(meg, back)
    assert summary.layout == layout
    report = verify(tiny_hf[preset], back)
    assert report.ok


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_parity(tiny_hf, tmp_path, preset, tp):
    """tp=4 on llama-tiny-tied: 2 KV groups < 4 ranks (ranks share a group)."""
    meg = tmp_path / "meg"
    hf_to_megatron(tiny_hf[preset], meg, tp=tp, pp=2 if tp == 1 else 1, layout="local" if tp == 2 else "te")
    report = parity(tiny_hf[preset], meg)
    assert report.ok and report.max_abs <= 1e-5, report.format()


def test_reshard_legacy_torch_dist(tiny_hf, tmp_path):
    src = tiny_hf["llama-tiny-bias"]
    hf_to_megatron(src, tmp_path / "a", tp=2, pp=2, layout="local")
    reshard(tmp_path / "a", tmp_path / "b", tp=1, pp=2, fmt="torch_dist")
    reshard(tmp_path / "b", tmp_path / "c", tp=4, pp=1, fmt="legacy", layout="te")
    megatron_to_hf(tmp_path / "c", tmp_path / "back")
    assert verify(src, tmp_path / "back").ok


def test_megatron_bridge_target(tiny_hf, tmp_path):
    hf_to_megatron(tiny_hf["llama-tiny"], tmp_path / "mb", tp=2, target="megatron-bridge")
    run_config = (tmp_path / "mb" / "iter_0000001" / "run_config.yaml").read_text()
    assert "GPTModelProvider" in run_config
    megatron_to_hf(tmp_path / "mb", tmp_path / "back")
    assert verify(tiny_hf["llama-tiny"], tmp_path / "back").ok


def test_config_rebuilt_from_args(tiny_hf, tmp_path):
    """Without the sidecar the config comes from args (model_type llama), RoPE scaling included."""
    import shutil

    src = tiny_hf["llama-tiny-bias"]
    hf_to_megatron(src, tmp_path / "meg", tp=2)
    shutil.rmtree(tmp_path / "meg" / "hf_assets")
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert verify(src, tmp_path / "back").ok
    assert parity(src, tmp_path / "meg").ok


def test_mapping_rows():
    rows = mapping_rows(None, "llama")
    keys = [r["megatron"] for r in rows]
    assert "decoder.layers.{L}.self_attention.linear_qkv.weight" in keys
    assert "decoder.final_layernorm.weight" in keys
    local = [r["megatron"] for r in mapping_rows("local", "llama")]
    assert "decoder.layers.{L}.input_layernorm.weight" in local
    assert "decoder.layers.{L}.pre_mlp_layernorm.weight" in local


def test_family_from_plain_args():
    """Megatron-LM args without model_type: Mamba fields mean Falcon-H1, a plain GPT means Llama."""
    assert family_for_args({"num_layers": 2}, "args") is FAMILIES["llama"]
    assert family_for_args({"mamba_num_heads": 2}, "args") is FAMILIES["falcon_h1"]


def test_refusals(tiny_hf, tmp_path):
    with pytest.raises(UnsupportedError, match="Mamba groups"):
        hf_to_megatron(tiny_hf["llama-tiny"], tmp_path / "x", tp=2, expand_groups=True)
    with pytest.raises(UnsupportedError, match="does not divide"):
        hf_to_megatron(tiny_hf["llama-tiny"], tmp_path / "y", tp=3)
    with pytest.raises(UnsupportedError, match="µP"):
        hf_to_megatron(tiny_hf["llama-tiny"], tmp_path / "z")
        megatron_to_hf(tmp_path / "z", tmp_path / "z_hf", fold_mup=True)
