"""Users' conventions: reshard keeps what the source is unless told otherwise; the one gated-RMSNorm
order megatron-core cannot run is refused; make-tiny shards as save_pretrained does."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_roundtrip import assert_bit_exact, load_hf

import cli
from bridge.checks.inspect import format_inspect, inspect_checkpoint
from bridge.checks.parity import parity
from bridge.checks.verify import verify
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.engine.info import checkpoint_info
from bridge.engine.reshard import reshard
from bridge.engine.source import open_megatron
from bridge.errors import UnsupportedError
from bridge.families.falcon_h1_forward import gated_norm
from bridge.formats.legacy import HF_ASSETS
from bridge.formats.run_config import RUN_CONFIG
from bridge.tiny import SAVE_PRETRAINED_MAX_SHARD_SIZE, make_tiny

INDEX = "model.safetensors.index.json"


def _same_model(hf, meg) -> None:
    report = verify(hf, meg)
    assert report.ok, report.format()


# -- reshard keeps the source's settings -------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,layout",
    [("legacy", "bridge"), ("torch_dist", "bridge"), ("legacy", "mlm-conv1d"), ("torch_dist", "bridge-fused-norm")],
)
def test_reshard_keeps_format_and_layout(hf_preset, tmp_path, fmt, layout):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "meg", tp=2, fmt=fmt, layout=layout)
    summary = reshard(tmp_path / "meg", tmp_path / "out", tp=4, pp=2)
    info = checkpoint_info(tmp_path / "out")
    assert (summary.format, summary.layout, summary.target) == (fmt, layout, "megatron-lm")
    assert (info.format, info.layout, info.tp, info.pp) == (fmt, layout, 4, 2)
    _same_model(src, tmp_path / "out")


def test_reshard_explicit_arguments_override(hf_preset, tmp_path):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "meg", tp=2, fmt="torch_dist", layout="bridge-fused-norm")
    reshard(tmp_path / "meg", tmp_path / "out", tp=1, fmt="legacy", layout="mlm-conv1d")
    info = checkpoint_info(tmp_path / "out")
    assert (info.format, info.layout) == ("legacy", "mlm-conv1d")
    _same_model(src, tmp_path / "out")


def test_legacy_only_layout_kept_as_its_torch_dist_form(hf_preset, tmp_path):
    """mlm-conv1d exists only in legacy files; megatron-core's torch_dist stores the same model's
    conv1d as ``conv1d.weight``, which is the default layout."""
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "meg", tp=2, layout="mlm-conv1d")
    reshard(tmp_path / "meg", tmp_path / "out", tp=2, fmt="torch_dist")
    assert (checkpoint_info(tmp_path / "out").layout, checkpoint_info(tmp_path / "out").format) == (
        "bridge",
        "torch_dist",
    )
    _same_model(src, tmp_path / "out")


def test_reshard_keeps_megatron_bridge_target(hf_preset, tmp_path):
    src = hf_preset("tiny-mup")
    hf_to_megatron(src, tmp_path / "mb", tp=2, target="megatron-bridge")
    summary = reshard(tmp_path / "mb", tmp_path / "out", tp=4)
    assert (summary.target, summary.format, summary.layout) == ("megatron-bridge", "torch_dist", "bridge")
    assert (tmp_path / "out" / "iter_0000001" / RUN_CONFIG).is_file()
    assert (tmp_path / "out" / "latest_train_state.pt").is_file()
    _same_model(src, tmp_path / "out")
    # An explicit legacy format is one Megatron-Bridge cannot load: the target is then Megatron-LM.
    summary = reshard(tmp_path / "mb", tmp_path / "lm", tp=1, fmt="legacy")
    assert (summary.target, summary.format) == ("megatron-lm", "legacy")
    assert not (tmp_path / "lm" / "latest_train_state.pt").exists()
    # An explicit target wins.
    summary = reshard(tmp_path / "mb", tmp_path / "lm2", tp=1, target="megatron-lm")
    assert (summary.target, summary.format) == ("megatron-lm", "torch_dist")


def test_megatron_bridge_training_checkpoint_without_sidecar_stays_megatron_bridge(hf_preset, tmp_path):
    """What Megatron-Bridge itself wrote (run_config.yaml, no hf_assets/) is resharded for it."""
    src = hf_preset("tiny-mup")
    hf_to_megatron(src, tmp_path / "mb", tp=2, target="megatron-bridge")
    shutil.rmtree(tmp_path / "mb" / HF_ASSETS)
    assert checkpoint_info(tmp_path / "mb").writer == "megatron-bridge"
    summary = reshard(tmp_path / "mb", tmp_path / "out", tp=1)
    assert (summary.target, summary.format) == ("megatron-bridge", "torch_dist")
    _same_model(src, tmp_path / "out")


@pytest.fixture(scope="module")
def one_group(tmp_path_factory):
    """The scaled 0.5B shape as released: one Mamba group, no gated RMSNorm."""
    folder = tmp_path_factory.mktemp("g1") / "hf"
    make_tiny(folder, "0.5b", seed=3, num_key_value_heads=4)
    return folder


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_reshard_keeps_group_expansion_and_inspect_shows_it(one_group, tmp_path, fmt):
    hf_to_megatron(one_group, tmp_path / "meg", tp=2, fmt=fmt, expand_groups=True)
    reshard(tmp_path / "meg", tmp_path / "tp4", tp=4)
    args = open_megatron(tmp_path / "tp4").args
    assert (args.mamba_num_groups, args.expanded_from_groups) == (4, 1)
    report = inspect_checkpoint(tmp_path / "tp4")
    assert report["expanded_from_groups"] == 1 and report["format"] == fmt
    assert json.loads(json.dumps(report))["expanded_from_groups"] == 1  # what --json prints
    assert "expanded_from_groups=1" in format_inspect(report)
    _same_model(one_group, tmp_path / "tp4")
    megatron_to_hf(tmp_path / "tp4", tmp_path / "back")
    assert_bit_exact(load_hf(one_group), load_hf(tmp_path / "back"))
    assert (tmp_path / "back" / "config.json").read_bytes() == (one_group / "config.json").read_bytes()


def test_expansion_dropped_where_the_new_tp_needs_none(one_group, tmp_path):
    """At TP=1 megatron-core runs the model's own single group: the output is the unexpanded model."""
    hf_to_megatron(one_group, tmp_path / "meg", tp=4, expand_groups=True)
    reshard(tmp_path / "meg", tmp_path / "tp1", tp=1)
    args = open_megatron(tmp_path / "tp1").args
    assert args.mamba_num_groups == 1 and not hasattr(args, "expanded_from_groups")
    report = inspect_checkpoint(tmp_path / "tp1")
    assert report["expanded_from_groups"] is None and "expanded_from_groups" not in format_inspect(report)
    _same_model(one_group, tmp_path / "tp1")


def test_expansion_not_added_unless_asked(one_group, tmp_path):
    hf_to_megatron(one_group, tmp_path / "meg", tp=1)
    with pytest.raises(UnsupportedError, match="--expand-groups"):
        reshard(tmp_path / "meg", tmp_path / "tp2", tp=2)
    hf_to_megatron(one_group, tmp_path / "exp", tp=2, expand_groups=True)
    with pytest.raises(UnsupportedError, match="--expand-groups"):
        reshard(tmp_path / "exp", tmp_path / "tp2", tp=2, expand_groups=False)
    assert not (tmp_path / "tp2").exists()


# -- norm_before_gate -----------------------------------------------------------------------------------


def _cli(*argv):
    return CliRunner().invoke(cli.main, [str(a) for a in argv])


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_rms_norm_with_norm_before_gate_refused(tmp_path):
    make_tiny(tmp_path / "hf", "tiny", mamba_rms_norm=True, mamba_norm_before_gate=True)
    result = _cli("hf-to-megatron", tmp_path / "hf", tmp_path / "meg", "--tp", "2")
    assert result.exit_code == 5, result.output
    [line] = _error_lines(result)
    assert "mamba_rms_norm=True" in line and "mamba_norm_before_gate=True" in line
    assert not (tmp_path / "meg").exists()
    result = _cli("hf-to-megatron", tmp_path / "hf", tmp_path / "mb", "--target", "megatron-bridge")
    assert result.exit_code == 5 and not (tmp_path / "mb").exists()


def test_reshard_refuses_it_too(hf_preset, tmp_path):
    """A checkpoint whose config asks for norm-then-gate (e.g. written before this check) is not
    re-sharded into another one Megatron cannot run."""
    hf_to_megatron(hf_preset("tiny"), tmp_path / "meg", tp=2)
    sidecar = tmp_path / "meg" / HF_ASSETS / "config.json"
    sidecar.write_text(json.dumps(dict(json.loads(sidecar.read_text()), mamba_norm_before_gate=True)))
    result = _cli("reshard", tmp_path / "meg", tmp_path / "out", "--tp", "1")
    assert result.exit_code == 5, result.output
    [line] = _error_lines(result)
    assert "mamba_rms_norm=True" in line and "mamba_norm_before_gate=True" in line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def gate_first_irrelevant(tmp_path_factory):
    """transformers' default order with the gated RMSNorm off: the order changes nothing."""
    folder = tmp_path_factory.mktemp("nbg") / "hf"
    make_tiny(folder, "tiny", seed=2, mamba_rms_norm=False, mamba_norm_before_gate=True)
    return folder


def test_norm_before_gate_without_rms_norm_converts_exactly(gate_first_irrelevant, tmp_path):
    src = gate_first_irrelevant
    result = _cli("hf-to-megatron", src, tmp_path / "meg", "--tp", "2")
    assert result.exit_code == 0, result.output
    meg = open_megatron(tmp_path / "meg")
    assert meg.args.norm_before_gate is False and meg.args.rmsnorm is False
    assert json.loads((tmp_path / "meg" / HF_ASSETS / "config.json").read_text())["mamba_norm_before_gate"] is True
    result = _cli("megatron-to-hf", tmp_path / "meg", tmp_path / "back")
    assert result.exit_code == 0, result.output
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))
    assert (tmp_path / "back" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    report = parity(src, tmp_path / "meg", tokens=8)
    assert report.ok, report.format()


def test_norm_before_gate_false_in_run_config_and_rebuilt_config(gate_first_irrelevant, tmp_path):
    src = gate_first_irrelevant
    hf_to_megatron(src, tmp_path / "mb", tp=2, target="megatron-bridge")
    model = yaml.safe_load((tmp_path / "mb" / "iter_0000001" / RUN_CONFIG).read_text())["model"]
    assert model["norm_before_gate"] is False and model["rmsnorm"] is False
    reshard(tmp_path / "mb", tmp_path / "re", tp=1)  # the sidecar's True does not trip the comparison
    assert (tmp_path / "re" / HF_ASSETS / "config.json").read_bytes() == (src / "config.json").read_bytes()
    shutil.rmtree(tmp_path / "mb" / HF_ASSETS)  # rebuilt from run_config.yaml: megatron-core's order
    megatron_to_hf(tmp_path / "mb", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["mamba_norm_before_gate"] is False
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))


def test_parity_forward_gates_before_the_norm_as_megatron_core_does():
    gen = torch.Generator().manual_seed(0)
    y, z, w = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen), torch.rand(16, generator=gen)
    gated = y * torch.nn.functional.silu(z)
    g = gated.view(2, 5, 4, 4)
    expected = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view_as(gated) * w
    assert torch.equal(gated_norm(y, z, w, 4, 1e-5), expected)
    assert torch.equal(gated_norm(y, z, None, 4, 1e-5), gated)
    assert "norm_before_gate" not in inspect.signature(gated_norm).parameters


# -- make-tiny shards as save_pretrained does ----------------------------------------------------------


def test_default_shard_size_is_save_pretrained_default():
    from transformers import PreTrainedModel

    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert SAVE_PRETRAINED_MAX_SHARD_SIZE == default


def test_make_tiny_writes_one_file_like_save_pretrained(tmp_path):
    make_tiny(tmp_path / "one", "1.5b")
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "one" / INDEX).exists()
    make_tiny(tmp_path / "sharded", "1.5b", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "sharded" / INDEX).is_file()
    assert_bit_exact(load_hf(tmp_path / "one"), load_hf(tmp_path / "sharded"))


def test_hf_shards_split_as_huggingface_hub_splits_the_state_dict(tmp_path):
    """``write_hf_weights`` sizes tensors from the layout (no tensors, no DTensor probe); the shards must
    still be those of huggingface_hub's torch splitter (what save_pretrained uses) on the real tensors."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open

    from bridge.formats.hf import write_hf_weights

    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.bool]
    tensors = {f"t{i}": torch.zeros(3 + i % 5, 7 * (i % 3 + 1), dtype=dtypes[i % 5]) for i in range(23)}
    layout = {k: (t.shape, t.dtype) for k, t in tensors.items()}
    for size in (300, "1KB", "5GB"):
        folder = tmp_path / str(size)
        folder.mkdir()
        write_hf_weights(folder, layout, lambda keys: {k: tensors[k] for k in keys}, max_shard_size=size)
        written = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                written[path.name] = sorted(f.keys())
        want = split_torch_state_dict_into_shards(tensors, max_shard_size=size).filename_to_tensors
        assert written == {name: sorted(keys) for name, keys in want.items()}


FULL_SMALL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    head_dim=8,
    mamba_n_heads=8,
    mamba_d_head=8,
    mamba_d_state=8,
    vocab_size=100,
)


def test_make_tiny_full_streams_with_the_same_default(tmp_path):
    make_tiny(tmp_path / "one", "0.5b", full=True, seed=4, **FULL_SMALL)
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    make_tiny(tmp_path / "sharded", "0.5b", full=True, seed=4, max_shard_size="20KB", **FULL_SMALL)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "sharded" / INDEX).is_file()
    assert_bit_exact(load_hf(tmp_path / "one"), load_hf(tmp_path / "sharded"))
    one, sharded = load_hf(tmp_path / "one"), load_hf(tmp_path / "sharded")
    assert all(torch.equal(one[k], sharded[k]) for k in one)
