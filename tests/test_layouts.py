"""Megatron key layouts are data: each round-trips, converts to every other, and is detected on read."""

import itertools
import json
import shutil

import pytest
import torch
from test_roundtrip import assert_bit_exact, load_hf

from bridge.checks.inspect import inspect_checkpoint
from bridge.checks.parity import parity
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.engine.reshard import reshard
from bridge.engine.source import open_megatron
from bridge.errors import InputError, UnsupportedError
from bridge.formats.legacy import LegacyCheckpoint
from mappings import LAYOUTS

KEYS = {
    "bridge": ["decoder.layers.1.norm.weight", "decoder.layers.1.mamba_mixer.conv1d.weight"],
    "mlm-conv1d": ["decoder.layers.1.norm.weight", "decoder.layers.1.mamba_mixer.conv1d_weight"],
    "bridge-fused-norm": [
        "decoder.layers.1.mamba_mixer.in_proj.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
    ],
    # HF layer 1 -> Megatron layers 2 (Mamba || attention) and 3 (MLP only), per Megatron-LM PR #1785.
    "mlm-parallel-hybrid": [
        "decoder.layers.2.mamba_mixer.in_proj.layer_norm_weight",
        "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.2.mamba_mixer.in_proj.weight",
        "decoder.layers.3.mlp.linear_fc1.weight",
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.3.mlp.linear_fc2.weight",
    ],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_round_trip_and_detection(hf_preset, tmp_path, layout):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "meg", tp=2, layout=layout)
    model = LegacyCheckpoint(tmp_path / "meg").model(1, 0)
    assert all(k in model for k in KEYS[layout])
    assert inspect_checkpoint(tmp_path / "meg")["layout"] == layout
    assert parity(src, tmp_path / "meg", tokens=8).ok
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))


@pytest.mark.parametrize("a,b", list(itertools.permutations(LAYOUTS, 2)))
def test_layout_to_layout(hf_preset, tmp_path, a, b):
    src = hf_preset("tiny-bias-tied")
    hf_to_megatron(src, tmp_path / "a", tp=2, pp=2, layout=a)
    reshard(tmp_path / "a", tmp_path / "b", tp=2, pp=2, layout=b)
    hf_to_megatron(src, tmp_path / "direct", tp=2, pp=2, layout=b)
    for r in range(2):
        got, want = LegacyCheckpoint(tmp_path / "b").model(r, 1), LegacyCheckpoint(tmp_path / "direct").model(r, 1)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_fused_norm_in_torch_dist(hf_preset, tmp_path):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "dist", tp=2, fmt="torch_dist", layout="bridge-fused-norm")
    assert inspect_checkpoint(tmp_path / "dist")["layout"] == "bridge-fused-norm"
    megatron_to_hf(tmp_path / "dist", tmp_path / "back")
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))


@pytest.mark.parametrize("layout", sorted(k for k, v in LAYOUTS.items() if v.legacy_only))
def test_legacy_only_layout_refused_for_torch_dist(hf_preset, tmp_path, layout):
    with pytest.raises(UnsupportedError, match="only in legacy files"):
        hf_to_megatron(hf_preset("tiny"), tmp_path / "dist", fmt="torch_dist", layout=layout)


def test_diverging_fused_norm_copies_refused(hf_preset, tmp_path):
    hf_to_megatron(hf_preset("tiny"), tmp_path / "meg", layout="bridge-fused-norm")
    path = tmp_path / "meg/release/mp_rank_00/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    key = "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"
    state["model"][key] = state["model"][key].clone() * 2
    torch.save(state, path)
    with pytest.raises(InputError, match="differs from decoder.layers.2.mamba_mixer.in_proj.layer_norm_weight"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back")


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_parallel_hybrid_alternates_mamba_attention_and_mlp_layers(hf_preset, tmp_path, fmt):
    """Megatron-LM's P-P-... pattern: even layers hold Mamba and attention, odd layers only the MLP; the
    args count every symbol as a layer, and without the config sidecar the HF model is rebuilt from them."""
    src = hf_preset("tiny-bias-tied")
    hf_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    pp = 2 if fmt == "legacy" else 1
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=pp, fmt=fmt, layout="mlm-parallel-hybrid")
    meg = open_megatron(tmp_path / "meg")
    kinds: dict[int, set[str]] = {}
    for key in meg.tensor_meta(0, 0):
        if key.startswith("decoder.layers."):
            index, _, rest = key.removeprefix("decoder.layers.").partition(".")
            kinds.setdefault(int(index), set()).add(rest.split(".")[0])
    assert sorted(kinds) == list(range(2 * hf_layers // pp))
    assert all(k == ({"mlp"} if i % 2 else {"mamba_mixer", "self_attention"}) for i, k in kinds.items())
    assert meg.args.num_layers == 2 * hf_layers and meg.args.hybrid_override_pattern == "P-" * hf_layers
    shutil.rmtree(tmp_path / "meg" / "hf_assets")
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_hidden_layers"] == hf_layers
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))
