"""verify: identical across formats and TP sizes; every kind of damage is named in the report."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import cli
from bridge.checks.verify import verify
from bridge.engine.convert import hf_to_megatron, megatron_to_hf

ROUND_TRIPS = [
    ("tiny", 1, 1),
    ("tiny", 2, 1),
    ("tiny", 4, 2),
    ("tiny-bias-tied", 1, 2),
    ("tiny-bias-tied", 2, 1),
    ("tiny-mup", 1, 1),
    ("tiny-mup", 2, 2),
    ("tiny-mup", 4, 1),
]
IN_PROJ = "model.layers.0.mamba.in_proj.weight"


def rank_file(meg, tp_rank):
    return next(meg.glob(f"*/mp_rank_{tp_rank:02d}*/model_optim_rng.pt"))


def edit_rank(meg, tp_rank, edit):
    """Loads one rank file, lets ``edit`` change its model dict in place, saves it back."""
    path = rank_file(meg, tp_rank)
    state = torch.load(path, weights_only=False)
    edit(state["model"])
    torch.save(state, path)


def edit_hf_shard(folder, key, edit):
    """Rewrites the safetensors shard holding ``key`` with ``edit(tensors)`` applied."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][key]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return index


def assert_identical(report, n_tensors):
    assert report.ok, report.format()
    assert len(report.tensors) == n_tensors
    assert {t.status for t in report.tensors} == {"equal"}
    assert report.verdict.startswith("OK")


@pytest.mark.parametrize("preset,tp,pp", ROUND_TRIPS)
def test_round_trip_and_cross_format_identical(hf_preset, tmp_path, preset, tp, pp):
    src = hf_preset(preset)
    n = len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    hf_to_megatron(src, tmp_path / "meg", tp=tp, pp=pp)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert_identical(verify(src, tmp_path / "back"), n)
    assert_identical(verify(src, tmp_path / "meg"), n)
    assert_identical(verify(tmp_path / "meg", src), n)


def test_megatron_tp2_vs_tp4(hf_preset, tmp_path):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "tp2", tp=2)
    hf_to_megatron(src, tmp_path / "tp4", tp=4, pp=2)
    report = verify(tmp_path / "tp2", tmp_path / "tp4")
    assert report.ok, report.format()
    assert "TP=2 PP=1" in report.format_a and "TP=4 PP=2" in report.format_b


def test_flipped_element_is_named_with_its_index(hf_preset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(hf_preset("tiny"), copy)

    def flip(tensors):
        tensors[IN_PROJ][7, 3] = -tensors[IN_PROJ][7, 3] + 0.5

    edit_hf_shard(copy, IN_PROJ, flip)
    report = verify(hf_preset("tiny"), copy)
    assert not report.ok
    [bad] = report.problems
    assert (bad.key, bad.status, bad.n_diff, bad.first_diff) == (IN_PROJ, "differs", 1, [7, 3])
    assert bad.max_abs > 0.4
    assert IN_PROJ in report.format() and IN_PROJ in report.verdict
    assert verify(hf_preset("tiny"), copy, atol=1.0).ok  # within tolerance: "close", still passes


def test_swapped_rows_in_one_rank_shard(hf_preset, tmp_path):
    src, meg = hf_preset("tiny"), tmp_path / "meg"
    hf_to_megatron(src, meg, tp=2)

    def swap(model):
        w = model["decoder.layers.0.mamba_mixer.in_proj.weight"]
        w[[3, 5]] = w[[5, 3]].clone()

    edit_rank(meg, 1, swap)
    report = verify(src, meg)
    [bad] = report.problems
    assert bad.key == IN_PROJ and bad.status == "differs"
    d_ssm = json.loads((src / "config.json").read_text())["mamba_d_ssm"]
    assert bad.first_diff[0] == d_ssm // 2 + 3  # rank 1's z rows start half way through HF's z block
    assert "decoder.layers.0.mamba_mixer.in_proj.weight in mp_rank_00, mp_rank_01" in bad.detail


def test_missing_and_unexpected_key(hf_preset, tmp_path):
    copy, key = tmp_path / "copy", "model.layers.2.feed_forward.up_proj.weight"
    shutil.copytree(hf_preset("tiny-mup"), copy)
    index = edit_hf_shard(copy, key, lambda tensors: tensors.pop(key))
    del index["weight_map"][key]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    report = verify(hf_preset("tiny-mup"), copy)
    assert [(t.key, t.status) for t in report.problems] == [(key, "missing")]
    assert [(t.key, t.status) for t in verify(copy, hf_preset("tiny-mup")).problems] == [(key, "unexpected")]


def test_changed_mup_multiplier_in_config(hf_preset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(hf_preset("tiny-mup"), copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["ssm_multipliers"][2] = 4.0
    (copy / "config.json").write_text(json.dumps(cfg))
    report = verify(hf_preset("tiny-mup"), copy)
    assert not report.ok and not report.problems
    [diff] = report.config
    assert (diff.field, diff.mup, diff.b) == ("ssm_multipliers", True, [1.5, 0.5, 4.0, 0.25, 1.125])
    assert "ssm_multipliers" in report.verdict and "config µP  ssm_multipliers" in report.format()


def test_inconsistent_rank_shape_names_file_and_tensor(hf_preset, tmp_path):
    meg = tmp_path / "meg"
    hf_to_megatron(hf_preset("tiny"), meg, tp=2)
    name = "decoder.layers.1.mamba_mixer.in_proj.weight"
    edit_rank(meg, 1, lambda model: model.update({name: model[name][:-1].clone()}))
    report = verify(hf_preset("tiny"), meg)
    assert not report.ok
    [error] = report.errors
    assert str(rank_file(meg, 1)) in error and name in error


def test_replicated_copies_that_disagree_fail_the_gather(hf_preset, tmp_path):
    meg = tmp_path / "meg"
    hf_to_megatron(hf_preset("tiny"), meg, tp=2)
    edit_rank(meg, 1, lambda model: model["decoder.layers.3.norm.weight"].mul_(2))
    [bad] = verify(hf_preset("tiny"), meg).problems
    assert bad.key == "model.layers.3.input_layernorm.weight" and bad.status == "error"
    assert "decoder.layers.3.norm.weight" in bad.detail and "differs between TP ranks" in bad.detail


def test_cli_exit_codes_and_json(hf_preset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(hf_preset("tiny"), copy)
    runner = CliRunner()
    same = runner.invoke(cli.main, ["verify", str(hf_preset("tiny")), str(copy)])
    assert same.exit_code == 0 and same.output.strip().endswith("config identical")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["key_multiplier"] = 2.0
    (copy / "config.json").write_text(json.dumps(cfg))
    changed = runner.invoke(cli.main, ["verify", str(hf_preset("tiny")), str(copy), "--json"])
    assert changed.exit_code == 1
    out = json.loads(changed.stdout)
    assert out["ok"] is False and out["config"][0]["field"] == "key_multiplier"
