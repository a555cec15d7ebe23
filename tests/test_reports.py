"""Every command reports a checkpoint through one record (``bridge.engine.info.CheckpointInfo``):
torch_dist says torch_dist and the TP/PP it was saved at, and iteration folders are accepted."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import cli
from bridge.engine.convert import hf_to_megatron
from bridge.engine.info import checkpoint_info


def _run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def dist(hf_preset, tmp_path_factory):
    hf = hf_preset("tiny")
    out = tmp_path_factory.mktemp("reports") / "dist"
    hf_to_megatron(hf, out, tp=4, pp=2, fmt="torch_dist")
    return hf, out


def test_torch_dist_is_reported_as_saved(dist, tmp_path):
    hf, meg = dist
    info = checkpoint_info(meg)
    assert (info.format, info.tp, info.pp, info.writer) == ("torch_dist", 4, 2, "falcon-h1-bridge")
    assert info.describe() == "torch_dist, saved at TP=4 PP=2"
    code, out, err = _run("inspect", meg, "--json")
    report = json.loads(out)
    assert code == 0 and (report["format"], report["tp"], report["pp"]) == ("torch_dist", 4, 2), err
    code, out, _ = _run("verify", hf, meg, "--json")
    assert code == 0 and json.loads(out)["format_b"].startswith("torch_dist, saved at TP=4 PP=2")
    code, out, _ = _run("parity", hf, meg, "--tokens", "8", "--json")
    report = json.loads(out)
    assert code == 0 and report["ranks"] == 8 and (report["tp"], report["pp"]) == (4, 2)
    assert report["source"] == "torch_dist, saved at TP=4 PP=2"
    code, out, _ = _run("megatron-to-hf", meg, tmp_path / "hf", "--json")
    summary = json.loads(out)
    assert (summary["format"], summary["tp"], summary["pp"]) == ("torch_dist", 4, 2)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_every_command_takes_an_iteration_folder(hf_preset, tmp_path, fmt):
    hf = hf_preset("tiny")
    hf_to_megatron(hf, tmp_path / "meg", tp=2, fmt=fmt, iteration=5)
    iter_dir = tmp_path / "meg" / "iter_0000005"
    for args in (
        ("inspect", iter_dir),
        ("verify", hf, iter_dir),
        ("parity", hf, iter_dir, "--tokens", "4"),
        ("megatron-to-hf", iter_dir, tmp_path / "hf"),
        ("reshard", iter_dir, tmp_path / "re", "--tp", "1"),
    ):
        code, _, err = _run(*args)
        assert code == 0, (args, err)
    assert checkpoint_info(iter_dir).iteration == 5
