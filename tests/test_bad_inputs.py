"""Bad inputs: one-line error naming the file/key, documented exit code, no output left, input untouched."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tree_digest
from safetensors.torch import load_file, save_file

import cli
from bridge.engine.convert import hf_to_megatron


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip(), result.stdout


@pytest.fixture
def hf(hf_preset, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(hf_preset("tiny"), dst)
    return dst


@pytest.fixture
def meg(hf_preset, tmp_path):
    dst = tmp_path / "meg"
    hf_to_megatron(hf_preset("tiny"), dst, tp=2, pp=2)
    return dst


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def rewrite_rank(meg: Path, rank_dir: str, edit):
    path = meg / "release" / rank_dir / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/h1bridge-pwned",))


def _index(hf):
    return hf / "model.safetensors.index.json"


def edit_index(hf, fn):
    data = json.loads(_index(hf).read_text())
    fn(data["weight_map"])
    _index(hf).write_text(json.dumps(data))


def drop_key(hf):
    shard = first_shard(hf)
    tensors = load_file(shard)
    key = sorted(tensors)[0]
    del tensors[key]
    save_file(tensors, shard)
    edit_index(hf, lambda m: m.pop(key))


HF_CASES = {
    "missing shard": (lambda hf: first_shard(hf).unlink(), 3, "does not exist"),
    "shard outside folder": (
        lambda hf: edit_index(hf, lambda m: m.update({k: "../x.safetensors" for k in list(m)[:1]})),
        3,
        "outside the checkpoint folder",
    ),
    "corrupt header": (lambda hf: first_shard(hf).write_bytes(b"\xff" * 64), 3, "not a readable safetensors"),
    "truncated shard": (
        lambda hf: first_shard(hf).write_bytes(first_shard(hf).read_bytes()[:-100]),
        3,
        "not a readable safetensors",
    ),
    "other model type": (
        lambda hf: (hf / "config.json").write_text('{"model_type": "gpt2"}'),
        3,
        "model_type is 'gpt2', expected one of 'falcon_h1', 'llama'",
    ),
    "invalid config json": (lambda hf: (hf / "config.json").write_text("{nope"), 3, "invalid JSON"),
    "dtype not a name": (  # transformers' repr of such a config raised IndexError (found by test_fuzz)
        lambda hf: (hf / "config.json").write_text(
            json.dumps({**json.loads((hf / "config.json").read_text()), "dtype": 1e-06})
        ),
        3,
        "dtype is 1e-06; expected a dtype name",
    ),
    "missing key": (drop_key, 3, "missing tensor"),
    "shape vs config": (
        lambda hf: (hf / "config.json").write_text(
            (hf / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 64')
        ),
        3,
        "config expects",
    ),
    "empty dir": (lambda hf: [p.unlink() for p in hf.iterdir()], 3, "empty directory"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bad_hf_inputs(hf, tmp_path, case):
    corrupt, code, message = HF_CASES[case]
    corrupt(hf)
    before = tree_digest(hf)
    exit_code, err, _ = run("hf-to-megatron", hf, tmp_path / "out", "--tp", "2")
    assert exit_code == code, err
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert tree_digest(hf) == before


MEG_CASES = {
    "missing rank dir": (lambda m: shutil.rmtree(m / "release/mp_rank_01_001"), 3, "missing rank directory"),
    "missing rank file": (lambda m: (m / "release/mp_rank_01_000/model_optim_rng.pt").unlink(), 3, "missing rank file"),
    "tracker nowhere": (
        lambda m: (m / "latest_checkpointed_iteration.txt").write_text("500"),
        3,
        "points to iter_0000500",
    ),
    "tracker garbage": (
        lambda m: (m / "latest_checkpointed_iteration.txt").write_text("soon"),
        3,
        "expected an iteration number",
    ),
    "inconsistent rank shapes": (
        lambda m: rewrite_rank(
            m, "mp_rank_01_000", lambda s: s["model"].update({"decoder.layers.0.mamba_mixer.D": torch.ones(3)})
        ),
        3,
        "mp_rank_01_000",
    ),
    "disallowed pickle global": (
        lambda m: rewrite_rank(m, "mp_rank_00_001", lambda s: s.update(evil=Evil())),
        3,
        "refused to load",
    ),
    "args disagree with dirs": (
        lambda m: rewrite_rank(m, "mp_rank_00_000", lambda s: setattr(s["args"], "tensor_model_parallel_size", 4)),
        3,
        "tensor_model_parallel_size=4",
    ),
    "diverging replicas": (
        lambda m: rewrite_rank(
            m, "mp_rank_01_000", lambda s: s["model"].update({"decoder.layers.0.norm.weight": torch.zeros(64)})
        ),
        3,
        "differs between TP ranks",
    ),
}


@pytest.mark.parametrize("case", list(MEG_CASES))
def test_bad_megatron_inputs(meg, tmp_path, case):
    corrupt, code, message = MEG_CASES[case]
    corrupt(meg)
    before = tree_digest(meg)
    exit_code, err, _ = run("megatron-to-hf", meg, tmp_path / "out")
    assert exit_code == code, err
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert tree_digest(meg) == before
    assert not Path("/tmp/h1bridge-pwned").exists()


def test_tp_that_megatron_cannot_run(hf, tmp_path):
    exit_code, err, _ = run("hf-to-megatron", hf, tmp_path / "out", "--tp", "8")
    assert exit_code == 5 and "TP=8 does not divide" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(hf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    exit_code, err, _ = run("hf-to-megatron", hf, tmp_path / "out")
    assert exit_code == 4 and "--force" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    exit_code, _, _ = run("hf-to-megatron", hf, tmp_path / "out", "--force")
    assert exit_code == 0 and not (tmp_path / "out" / "keep.txt").exists()


def test_output_inside_input_refused(hf):
    before = tree_digest(hf)
    exit_code, err, _ = run("hf-to-megatron", hf, hf / "meg")
    assert exit_code == 4 and "overlaps the input" in err
    assert tree_digest(hf) == before


def test_missing_input(tmp_path):
    exit_code, err, _ = run("inspect", tmp_path / "nothing")
    assert exit_code == 3 and "does not exist" in err
