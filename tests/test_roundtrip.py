"""HF -> Megatron legacy -> HF must be bit-exact and reproduce config.json byte for byte."""

import json
import shutil

import pytest
import torch
from conftest import tree_digest
from safetensors.torch import load_file

from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.formats.legacy import LegacyCheckpoint


def load_hf(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_exact(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


CASES = [
    ("tiny", 1, 1),
    ("tiny", 2, 1),
    ("tiny", 4, 1),
    ("tiny", 1, 2),
    ("tiny", 2, 2),
    ("tiny", 4, 2),
    ("tiny-bias-tied", 1, 1),
    ("tiny-bias-tied", 2, 1),
    ("tiny-bias-tied", 2, 2),
    ("tiny-mup", 2, 1),
    ("tiny-mup", 4, 2),
]


@pytest.mark.parametrize("preset,tp,pp", CASES)
def test_round_trip_bit_exact(hf_preset, tmp_path, preset, tp, pp):
    src = hf_preset(preset)
    before = tree_digest(src)
    hf_to_megatron(src, tmp_path / "meg", tp=tp, pp=pp)
    meg = LegacyCheckpoint(tmp_path / "meg")
    assert (meg.tp, meg.pp) == (tp, pp)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_size="100KB")
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))
    assert (tmp_path / "back" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    for name in ("generation_config.json", "tokenizer.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes()
    assert tree_digest(src) == before


def test_legacy_files_hold_megatron_args(hf_preset, tmp_path):
    hf_to_megatron(hf_preset("tiny-mup"), tmp_path / "meg", tp=2, pp=2, dtype="bf16")
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    state = torch.load(tmp_path / "meg/release/mp_rank_01_001/model_optim_rng.pt", weights_only=False)
    args = state["args"]
    assert state["checkpoint_version"] == 3.0
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.params_dtype == torch.bfloat16 and args.bf16
    assert args.padded_vocab_size == 512 and args.make_vocab_size_divisible_by == 128
    assert args.mamba_num_groups == 4 and args.ssm_multipliers == [1.5, 0.5, 2.0, 0.25, 1.125]
    # Layers are numbered from 0 on every pipeline stage; the last stage holds the head.
    assert "decoder.layers.0.norm.weight" in state["model"] and "decoder.layers.2.norm.weight" not in state["model"]
    assert "output_layer.weight" in state["model"] and "embedding.word_embeddings.weight" not in state["model"]
    assert all(t.dtype == torch.bfloat16 for t in state["model"].values())


@pytest.mark.parametrize("preset", ["tiny", "tiny-bias-tied", "tiny-mup"])
def test_without_sidecar_config_is_rebuilt_from_args(hf_preset, tmp_path, preset):
    src = hf_preset(preset)
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2)
    shutil.rmtree(tmp_path / "meg" / "hf_assets")
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))
    original = json.loads((src / "config.json").read_text())
    rebuilt = json.loads((tmp_path / "back" / "config.json").read_text())
    skip = {
        "transformers_version",
        "time_step_limit",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "initializer_range",
        "use_cache",
        "num_logits_to_keep",
        "max_position_embeddings",
    }
    for key, value in original.items():
        if key not in skip:
            assert rebuilt.get(key) == value, key


def test_dtype_conversion(hf_preset, tmp_path):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "meg", tp=2, dtype="bf16")
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    a, b = load_hf(src), load_hf(tmp_path / "back")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    megatron_to_hf(tmp_path / "meg", tmp_path / "fp32", dtype="fp32")
    assert all(t.dtype == torch.float32 for t in load_hf(tmp_path / "fp32").values())


def test_mlm_conv1d_layout_round_trips(hf_preset, tmp_path):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "meg", tp=2, layout="mlm-conv1d")
    keys = LegacyCheckpoint(tmp_path / "meg").model(0, 0)
    assert "decoder.layers.0.mamba_mixer.conv1d_weight" in keys
    s = megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert s.layout == "mlm-conv1d"
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))
