"""Reading what training leaves: Megatron-Bridge-style checkpoints written by megatron-core's own
``dist_checkpointing.save`` (whichever megatron-core is importable: CI runs this file on 0.16.x,
which writes ``common.pt``, and on 0.19.x, which keeps the common state inside the shards), with
``run_config.yaml`` and no ``args``, optimizer / RNG / TE extra state, ``tokenizer/``, iteration
1000 and an unpadded vocabulary."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tree_digest
from mb_checkpoint import TOKENIZER_FILES, finish_mb_checkpoint, te_modules
from megatron_stack import save_training_checkpoint

import cli
from bridge.checks.verify import verify
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.engine.source import ReadOptions
from bridge.formats.hf import HFCheckpoint
from bridge.formats.torch_dist_io import TorchDistReader

# µP factors in run_config, several Mamba groups; a vocabulary TP=2 divides but 128 does not, which
# MB's provider keeps unpadded (should_pad_vocab: false).
PRESET, VOCAB = "tiny-mup", 318


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def global_model(hf: Path, work: Path) -> dict[str, torch.Tensor]:
    """torch_dist key -> global tensor, unpadded vocabulary (what MB's provider builds)."""
    hf_to_megatron(hf, work, fmt="torch_dist", divisible_by=1)
    reader = TorchDistReader(work / "release")
    return reader.load(reader.keys())


def build(root: Path, hf: Path, model: dict, *, tp: int, pp: int, optimizer_copies: int, iteration: int = 1000):
    cfg = HFCheckpoint(hf).config
    save_training_checkpoint(
        root / f"iter_{iteration:07d}",
        model,
        tp=tp,
        pp=pp,
        iteration=iteration,
        optimizer_copies=optimizer_copies,
        extra_state_prefixes=te_modules(cfg.num_hidden_layers),
    )
    finish_mb_checkpoint(root, iteration, cfg, tp=tp, pp=pp, tokenizer_from=hf)
    return root


@pytest.fixture(scope="module")
def mb(tmp_path_factory):
    from bridge.tiny import make_tiny

    work = tmp_path_factory.mktemp("mb")
    hf = work / "hf"
    make_tiny(hf, PRESET, seed=1, vocab_size=VOCAB)
    (hf / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (hf / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    model = global_model(hf, work / "ours")
    return hf, build(work / "mb", hf, model, tp=2, pp=2, optimizer_copies=3), model


def test_the_writer_is_megatron_cores_own(mb):
    _, root, _ = mb
    iter_dir = root / "iter_0001000"
    on_disk = TorchDistReader(iter_dir)
    assert any(k.startswith("optimizer.state.exp_avg.") for k in on_disk.keys())
    assert any(k.startswith("rng_state") for k in on_disk.object_keys())
    assert any(k.endswith("in_proj._extra_state") for k in on_disk.object_keys())
    assert "args" not in on_disk.common and on_disk.common["iteration"] == 1000
    new_style = tuple(int(x) for x in megatron_core_version().split(".")[:2]) >= (0, 19)
    assert (iter_dir / "common.pt").exists() is not new_style  # 0.19 keeps the common state in the shards


def test_training_checkpoint_converts_bit_exactly(mb, tmp_path):
    hf, root, _ = mb
    before = tree_digest(root)
    summary = megatron_to_hf(root, tmp_path / "out")
    report = verify(hf, tmp_path / "out")
    assert report.ok and all(t.status == "equal" for t in report.tensors), report.format()
    assert not [d for d in report.config if d.name != "dtype"], report.config
    for name in TOKENIZER_FILES:
        if (hf / name).is_file():
            assert (tmp_path / "out" / name).read_bytes() == (hf / name).read_bytes(), name
    assert summary.format == "torch_dist" and (summary.tp, summary.pp) == (2, 2)
    assert tree_digest(root) == before


def test_every_reader_accepts_it(mb, tmp_path):
    hf, root, _ = mb
    run = CliRunner().invoke
    info = json.loads(run(cli.main, ["inspect", str(root), "--json"]).stdout)
    assert (info["format"], info["tp"], info["pp"], info["iteration"]) == ("torch_dist", 2, 2, 1000)
    assert info["config_from"] == "run_config.yaml" and info["config"]["vocab_size"] == VOCAB
    assert run(cli.main, ["verify", str(hf), str(root)]).exit_code == 0
    result = run(cli.main, ["parity", str(hf), str(root / "iter_0001000"), "--json"])
    assert result.exit_code == 0, result.output
    result = run(cli.main, ["reshard", str(root), str(tmp_path / "tp2"), "--tp", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert run(cli.main, ["verify", str(hf), str(tmp_path / "tp2")]).exit_code == 0


def test_iteration_choice(mb, tmp_path):
    hf, root, model = mb
    copy = tmp_path / "two"
    shutil.copytree(root, copy)
    # An older iteration with other weights: --iteration picks it, the tracker picks the newest.
    older = {k: (v + 1 if v.is_floating_point() else v) for k, v in model.items()}
    build(tmp_path / "old", hf, older, tp=1, pp=1, optimizer_copies=0, iteration=500)
    shutil.copytree(tmp_path / "old" / "iter_0000500", copy / "iter_0000500")
    megatron_to_hf(copy, tmp_path / "new")
    assert verify(hf, tmp_path / "new").ok
    megatron_to_hf(copy, tmp_path / "old_hf", options=ReadOptions(iteration=500))
    assert not verify(hf, tmp_path / "old_hf").ok
    # Without tracker files, latest_train_state.pt decides; without that, the newest iter_*.
    (copy / "latest_checkpointed_iteration.txt").unlink()
    torch.save({"step": torch.tensor(500)}, copy / "latest_train_state.pt")
    megatron_to_hf(copy, tmp_path / "by_state")
    assert not verify(hf, tmp_path / "by_state").ok
    (copy / "latest_train_state.pt").unlink()
    megatron_to_hf(copy, tmp_path / "newest")
    assert verify(hf, tmp_path / "newest").ok


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, list(map(str, args)))
    return result.exit_code, result.stderr.strip()


def test_missing_iteration_lists_those_present(mb, tmp_path):
    _, root, _ = mb
    code, err = _cli("megatron-to-hf", root, tmp_path / "out", "--iteration", "7")
    assert code == 3 and err.endswith("no iteration 7; iterations present: 1000"), err
    assert not (tmp_path / "out").exists()


def test_no_model_config_anywhere(mb, tmp_path):
    _, root, _ = mb
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "iter_0001000" / "run_config.yaml").unlink()
    code, err = _cli("megatron-to-hf", copy, tmp_path / "out")
    assert code == 3 and err.count("\n") == 0, err
    assert "no hf_assets/config.json, no 'args' in the checkpoint and no run_config.yaml; pass --hf-config" in err
    hf = mb[0]
    code, err = _cli("megatron-to-hf", copy, tmp_path / "out", "--hf-config", hf)
    assert code == 0, err
    assert verify(hf, tmp_path / "out").ok


def test_run_config_of_another_model_is_refused(mb, tmp_path):
    _, root, _ = mb
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    path = copy / "iter_0001000" / "run_config.yaml"
    data = yaml.safe_load(path.read_text())
    data["model"]["_target_"] = "megatron.bridge.models.llama.llama_provider.Llama3ModelProvider8B"
    path.write_text(yaml.safe_dump(data))
    code, err = _cli("megatron-to-hf", copy, tmp_path / "out")
    assert code == 3 and "model._target_ is 'megatron.bridge.models.llama" in err and "FalconH1ModelProvider" in err


def test_sidecar_disagreeing_with_run_config_is_refused(mb, tmp_path):
    hf, root, _ = mb
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "hf_assets").mkdir()
    config = json.loads((hf / "config.json").read_text())
    assert config["num_key_value_heads"] == 2
    config["num_key_value_heads"] = 1
    (copy / "hf_assets" / "config.json").write_text(json.dumps(config))
    code, err = _cli("megatron-to-hf", copy, tmp_path / "out")
    assert code == 3 and "num_key_value_heads=1 but the checkpoint's run_config.yaml has 2" in err, err
    code, err = _cli("megatron-to-hf", copy, tmp_path / "out", "--hf-config", hf)
    assert code == 0, err


def test_no_tokenizer_warns_once_and_reference_fills_in(mb, tmp_path, monkeypatch):
    hf, root, _ = mb
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in the CLI: logging's stderr fallback
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "iter_0001000" / "tokenizer")
    code, err = _cli("megatron-to-hf", copy, tmp_path / "bare", "--json")
    assert code == 0 and [line for line in err.splitlines() if "tokenizer" in line] == [
        f"{copy / 'iter_0001000'}: no tokenizer found (looked in hf_assets/, tokenizer/ and --hf-reference); "
        "the HF output will have none"
    ]
    (hf / "README.md").write_text("---\nlicense: other\n---\n# reference card\n")
    code, err = _cli("megatron-to-hf", copy, tmp_path / "ref", "--hf-reference", hf, "--json")
    assert code == 0 and "tokenizer" not in err, err
    assert (tmp_path / "ref" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    card = (tmp_path / "ref" / "README.md").read_text()  # the reference card, with the conversion's provenance
    assert "license: other" in card and "# reference card" in card and "| Source format | torch_dist |" in card


RSS_SCRIPT = """
import resource, sys
from bridge.engine.convert import megatron_to_hf
megatron_to_hf(sys.argv[1], sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(src: Path, dst: Path) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), *sys.path]))
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(src), str(dst)], env=env, check=True, capture_output=True, text=True
    )
    return int(out.stdout.split()[-1])


def test_optimizer_state_is_never_loaded(hf_preset, tmp_path):
    """Optimizer state of 4x the model's bytes: peak RSS within 10 % of a checkpoint with none. The
    model is large enough (~48 MB bf16) that loading the 200 MB of optimizer state would show."""
    from bridge.tiny import make_tiny

    hf = tmp_path / "hf"
    make_tiny(
        hf,
        "tiny",
        seed=3,
        dtype="bf16",
        hidden_size=512,
        intermediate_size=1536,
        vocab_size=8000,
        mamba_n_heads=16,
        mamba_d_head=64,
        num_hidden_layers=4,
    )
    model = global_model(hf, tmp_path / "ours")
    model_bytes = sum(t.numel() * t.element_size() for t in model.values())
    build(tmp_path / "none", hf, model, tp=2, pp=1, optimizer_copies=0)
    build(tmp_path / "adam", hf, model, tp=2, pp=1, optimizer_copies=2)
    reader = TorchDistReader(tmp_path / "adam" / "iter_0001000")
    optim_bytes = sum(
        reader.shape(k).numel() * reader.dtype(k).itemsize for k in reader.keys() if k.startswith("optimizer.")
    )
    assert optim_bytes >= 4 * model_bytes
    with_none = _peak_rss_kib(tmp_path / "none", tmp_path / "out_none")
    with_adam = _peak_rss_kib(tmp_path / "adam", tmp_path / "out_adam")
    assert with_adam <= 1.10 * with_none, (with_none, with_adam)
