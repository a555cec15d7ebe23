"""--expand-groups: a one-group model at TP=4, exact by numbers; refusals explained."""

import pytest
import torch
from test_roundtrip import assert_bit_exact, load_hf

from bridge.checks.parity import parity
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.engine.reshard import reshard
from bridge.errors import InputError, UnsupportedError
from bridge.formats.legacy import LegacyCheckpoint
from bridge.tiny import make_tiny


@pytest.fixture(scope="module")
def one_group(tmp_path_factory):
    """The scaled 0.5B shape as released: one Mamba group, no gated RMSNorm."""
    folder = tmp_path_factory.mktemp("g1") / "hf"
    cfg = make_tiny(folder, "0.5b", seed=3, num_key_value_heads=4)
    assert cfg.mamba_n_groups == 1 and not cfg.mamba_rms_norm
    return folder


def test_expand_groups_tp4_parity_and_round_trip(one_group, tmp_path):
    hf_to_megatron(one_group, tmp_path / "meg", tp=4, expand_groups=True)
    meg = LegacyCheckpoint(tmp_path / "meg")
    assert meg.args.mamba_num_groups == 4 and meg.args.expanded_from_groups == 1
    report = parity(one_group, tmp_path / "meg", tokens=16, batch=2)
    assert report.max_abs <= 1e-5 and report.top1_agreement == 1.0, report
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert_bit_exact(load_hf(one_group), load_hf(tmp_path / "back"))
    assert (tmp_path / "back" / "config.json").read_bytes() == (one_group / "config.json").read_bytes()


def test_reshard_keeps_expansion(one_group, tmp_path):
    hf_to_megatron(one_group, tmp_path / "meg", tp=4, expand_groups=True, fmt="torch_dist")
    reshard(tmp_path / "meg", tmp_path / "tp2", tp=2, fmt="legacy", expand_groups=True)
    assert LegacyCheckpoint(tmp_path / "tp2").args.mamba_num_groups == 2
    megatron_to_hf(tmp_path / "tp2", tmp_path / "back")
    assert_bit_exact(load_hf(one_group), load_hf(tmp_path / "back"))


def test_without_flag_the_constraint_is_explained(one_group, tmp_path):
    with pytest.raises(UnsupportedError, match="mamba_n_groups=1.*--expand-groups"):
        hf_to_megatron(one_group, tmp_path / "meg", tp=2)


def test_refused_with_gated_rmsnorm(tmp_path):
    make_tiny(tmp_path / "hf", "0.5b", mamba_rms_norm=True)
    with pytest.raises(UnsupportedError, match="normalises per group"):
        hf_to_megatron(tmp_path / "hf", tmp_path / "meg", tp=2, expand_groups=True)
    assert not (tmp_path / "meg").exists()


def test_diverged_replicas_refuse_to_collapse(one_group, tmp_path):
    hf_to_megatron(one_group, tmp_path / "meg", tp=2, expand_groups=True)
    path = tmp_path / "meg/release/mp_rank_01/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.0.mamba_mixer.in_proj.weight"][-20] += 1.0  # a C row of the replica
    torch.save(state, path)
    with pytest.raises(InputError, match="replicated Mamba B/C groups differ"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back")


def test_cli_expand_groups_is_a_flag(one_group, tmp_path):
    """``hf-to-megatron --expand-groups`` takes no value (click 8.5 no longer infers a flag from a bool default)."""
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(
        cli.main, ["hf-to-megatron", str(one_group), str(tmp_path / "meg"), "--tp", "4", "--expand-groups"]
    )
    assert result.exit_code == 0, result.output
    assert LegacyCheckpoint(tmp_path / "meg").args.expanded_from_groups == 1
