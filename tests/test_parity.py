"""parity: transformers' logits vs the independent Megatron forward on the TP shards themselves.

The wrong-layout cases write rank files the way a plausible buggy converter would; parity must fail
on them loudly, since each one still round-trips perfectly through its own (wrong) inverse.
"""

import json

import pytest
import torch
from click.testing import CliRunner

import cli
from bridge.checks.parity import parity
from bridge.engine.convert import hf_to_megatron
from bridge.formats.hf import HFCheckpoint
from bridge.tiny import make_tiny
from mappings import FalconH1Dims

TOL = 1e-5
CASES = [
    ("tiny", 1, 1),
    ("tiny", 2, 1),
    ("tiny", 4, 2),
    ("tiny-bias-tied", 1, 2),
    ("tiny-bias-tied", 2, 1),
    ("tiny-mup", 1, 1),
    ("tiny-mup", 2, 2),
    ("tiny-mup", 4, 1),
]


def check(hf_dir, meg_dir):
    return parity(hf_dir, meg_dir, tokens=16, batch=2, seed=0, atol=TOL)


def rewrite_layer_tensors(hf_dir, meg_dir, suffix, shard):
    """Replaces every rank's ``decoder.layers.L.<suffix>`` by ``shard(hf_layer_prefix, hf, tp, rank)`` (PP=1)."""
    hf = HFCheckpoint(hf_dir)
    files = sorted(meg_dir.glob("*/mp_rank_*/model_optim_rng.pt"))
    for rank, path in enumerate(files):
        state = torch.load(path, weights_only=False)
        for name in [n for n in state["model"] if n.endswith(suffix)]:
            prefix = f"model.layers.{name.split('.')[2]}."
            state["model"][name] = shard(prefix, hf, len(files), rank).clone()
        torch.save(state, path)


def qkv_not_interleaved(prefix, hf, tp, rank):
    q, k, v = (hf.get(f"{prefix}self_attn.{p}_proj.weight") for p in "qkv")
    return torch.cat([q, k, v]).chunk(tp)[rank]


def in_proj_plain_chunk(prefix, hf, tp, rank):
    return hf.get(prefix + "mamba.in_proj.weight").chunk(tp)[rank]


def bc_groups_round_robin(prefix, hf, tp, rank, conv: bool):
    """Blockwise like the real rule, except B/C groups dealt r, r+tp, ... instead of contiguous."""
    dims = FalconH1Dims.from_hf_config(hf.config)
    key, sizes, first_bc = ("conv1d", dims.conv_blocks, 1) if conv else ("in_proj", dims.in_proj_blocks, 2)
    blocks = hf.get(f"{prefix}mamba.{key}.weight").split(sizes)
    out = [
        b.unflatten(0, (dims.mamba_groups, -1))[rank::tp].flatten(0, 1)
        if i in (first_bc, first_bc + 1)
        else b.chunk(tp)[rank]
        for i, b in enumerate(blocks)
    ]
    return torch.cat(out)


@pytest.mark.parametrize("preset,tp,pp", CASES)
def test_logits_match_transformers(hf_preset, tmp_path, preset, tp, pp):
    hf_to_megatron(hf_preset(preset), tmp_path / "meg", tp=tp, pp=pp)
    report = check(hf_preset(preset), tmp_path / "meg")
    assert report.ok, report.format()
    assert report.max_abs <= TOL and report.top1_agreement == 1.0
    assert (report.tp, report.pp) == (tp, pp) and report.max_logit > 0.1


@pytest.mark.parametrize(
    "suffix,wrong",
    [("self_attention.linear_qkv.weight", qkv_not_interleaved), ("mamba_mixer.in_proj.weight", in_proj_plain_chunk)],
)
def test_wrong_layout_fails_loudly(hf_preset, tmp_path, suffix, wrong):
    src, meg = hf_preset("tiny"), tmp_path / "meg"
    hf_to_megatron(src, meg, tp=2)
    rewrite_layer_tensors(src, meg, suffix, wrong)
    report = check(src, meg)
    assert not report.ok
    assert report.max_abs > 1000 * TOL, report.format()
    assert report.verdict.startswith("FAIL")


@pytest.fixture(scope="module")
def ssm_heavy(tmp_path_factory):
    """'tiny' with 2.5x transformers' default init: at std 0.02 the B·C state term is ~1e-6 of the
    logits (D=1 skip dominates), too small for any tolerance to see a B/C placement bug."""
    folder = tmp_path_factory.mktemp("ssm") / "hf"
    make_tiny(folder, "tiny", seed=1, initializer_range=0.05)
    return folder


def test_bc_group_placement_is_visible(ssm_heavy, tmp_path):
    hf_to_megatron(ssm_heavy, tmp_path / "good", tp=2)
    assert check(ssm_heavy, tmp_path / "good").ok
    hf_to_megatron(ssm_heavy, tmp_path / "bad", tp=2)
    rewrite_layer_tensors(
        ssm_heavy, tmp_path / "bad", "mamba_mixer.in_proj.weight", lambda *a: bc_groups_round_robin(*a, conv=False)
    )
    rewrite_layer_tensors(
        ssm_heavy, tmp_path / "bad", "mamba_mixer.conv1d.weight", lambda *a: bc_groups_round_robin(*a, conv=True)
    )
    report = check(ssm_heavy, tmp_path / "bad")
    assert not report.ok and report.max_abs > 10 * TOL, report.format()


def test_cli_parity(hf_preset, tmp_path):
    src, meg = hf_preset("tiny-mup"), tmp_path / "meg"
    hf_to_megatron(src, meg, tp=2)
    runner = CliRunner()
    good = runner.invoke(cli.main, ["parity", str(src), str(meg), "--tokens", "8", "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout)["ok"] is True
    rewrite_layer_tensors(src, meg, "mamba_mixer.in_proj.weight", in_proj_plain_chunk)
    bad = runner.invoke(cli.main, ["parity", str(src), str(meg), "--tokens", "8"])
    assert bad.exit_code == 1 and "FAIL" in bad.stdout
