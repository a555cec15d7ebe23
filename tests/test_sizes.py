"""Config sizes are checked against the tensors present before anything is expanded per layer: a 1 KB
config.json (or args) naming ten million layers is refused at once, with one line naming the field."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tree_digest

import cli
from bridge.engine.convert import hf_to_megatron


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def edited_hf(hf: Path, tmp: Path, **fields) -> Path:
    case = tmp / "case"
    shutil.copytree(hf, case)
    config = json.loads((case / "config.json").read_text())
    config.update(fields)
    (case / "config.json").write_text(json.dumps(config))
    return case


@pytest.mark.parametrize("command", ["inspect", "hf-to-megatron", "push"])
def test_ten_million_layers_refused_at_once(hf_preset, tmp_path, command):
    case = edited_hf(hf_preset("tiny"), tmp_path, num_hidden_layers=10_000_000)
    args = {"inspect": [case], "hf-to-megatron": [case, tmp_path / "out"], "push": [case, "org/r", "--dry-run"]}
    before, start = tree_digest(case), time.monotonic()
    code, err = run(command, *args[command])
    assert time.monotonic() - start < 20
    assert code == 3, err
    assert err.startswith("error: ") and "\n" not in err
    assert "num_hidden_layers is 10000000" in err and "4 layer(s)" in err, err
    assert tree_digest(case) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"num_hidden_layers": 3}, "num_hidden_layers is 3; the tensors hold 4 layer(s)"),
        ({"num_hidden_layers": 5}, "num_hidden_layers is 5; the tensors hold 4 layer(s)"),
        ({"vocab_size": 300}, "vocab_size is 300; the tensors say 317"),
        ({"hidden_size": 96}, "hidden_size is 96; the tensors say 64"),
        ({"num_hidden_layers": 2**31 + 1}, "expected at most 2147483648"),
        ({"vocab_size": 2**40}, "vocab_size is 1099511627776; expected at most"),
    ],
)
def test_size_against_tensors(hf_preset, tmp_path, fields, fragment):
    case = edited_hf(hf_preset("tiny"), tmp_path, **fields)
    code, err = run("inspect", case)
    assert code == 3, err
    assert err.startswith("error: ") and "\n" not in err and "config.json" in err
    assert fragment in err, err


def test_megatron_args_layers_against_rank_files(hf_preset, tmp_path):
    meg = tmp_path / "meg"
    hf_to_megatron(hf_preset("tiny"), meg, tp=1, pp=2)
    shutil.rmtree(meg / "hf_assets")  # the config then comes from args
    for path in meg.rglob("model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        state["args"].num_layers = 10_000_000
        state["args"].hybrid_override_pattern = None
        torch.save(state, path)
    start = time.monotonic()
    for args in (["inspect", meg], ["megatron-to-hf", meg, tmp_path / "out"]):
        code, err = run(*args)
        assert code == 3, err
        assert "num_hidden_layers 10000000" in err and "hold 4 Megatron layer(s)" in err, err
    assert time.monotonic() - start < 20
