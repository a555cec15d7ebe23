"""µP multipliers: carried losslessly through Megatron, and folded into / unfolded from the weights."""

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_roundtrip import assert_bit_exact, load_hf
from transformers import FalconH1ForCausalLM

import cli
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.errors import UnsupportedError
from bridge.families.falcon_h1_args import (
    MUP_FIELDS,
    hf_config_from_args,
    megatron_args,
)
from bridge.features.mup import FOLDED_KEY, fold_mup, unfold_mup
from bridge.formats.legacy import HF_ASSETS
from bridge.tiny import preset_config

BIASES = dict(projectors_bias=True, attention_bias=True, mlp_bias=True, mamba_proj_bias=True)


def random_multipliers(seed: int, draw=lambda rng: rng.uniform(0.3, 3.0)) -> dict:
    """All 14 factors non-default (nine config fields)."""
    rng = random.Random(seed)
    return dict(
        embedding_multiplier=draw(rng),
        lm_head_multiplier=draw(rng),
        key_multiplier=draw(rng),
        attention_in_multiplier=draw(rng),
        attention_out_multiplier=draw(rng),
        ssm_in_multiplier=draw(rng),
        ssm_out_multiplier=draw(rng),
        mlp_multipliers=[draw(rng) for _ in range(2)],
        ssm_multipliers=[draw(rng) for _ in range(5)],
    )


def power_of_two(rng: random.Random) -> float:
    return 2.0 ** rng.randint(-3, 3)


def write_model(folder: Path, preset: str = "tiny", **fields) -> Path:
    """A tiny HF checkpoint with random weights and random (non-zero) biases."""
    torch.manual_seed(0)
    model = FalconH1ForCausalLM(preset_config(preset, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return folder


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = FalconH1ForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def multipliers(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    return {name: cfg.get(name) for name in MUP_FIELDS}


# -- lossless carriage through Megatron --------------------------------------------------------------


def test_random_multipliers_survive_megatron_round_trip(tmp_path):
    src = write_model(tmp_path / "hf", **BIASES, **random_multipliers(7))
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert (tmp_path / "back" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))

    shutil.rmtree(tmp_path / "meg" / HF_ASSETS)  # config now rebuilt from args alone
    megatron_to_hf(tmp_path / "meg", tmp_path / "rebuilt")
    assert multipliers(tmp_path / "rebuilt") == multipliers(src)
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "rebuilt"))


def strip_mup_args(meg: Path) -> None:
    """Makes the checkpoint look like one from a Megatron run that never had µP fields."""
    shutil.rmtree(meg / HF_ASSETS)
    for path in meg.glob("*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        for name in MUP_FIELDS:
            delattr(state["args"], name)
        torch.save(state, path)


@pytest.mark.parametrize("removed", [(), ("key_multiplier", "ssm_multipliers")])
def test_args_warning_names_the_missing_multipliers(caplog, removed):
    args = megatron_args(
        preset_config("tiny-mup"), tp=1, pp=1, padded_vocab=384, divisible_by=128, params_dtype=torch.float32
    )
    for name in removed:
        delattr(args, name)
    with caplog.at_level(logging.WARNING, logger="bridge.engine.config"):
        cfg = hf_config_from_args(args)
    assert [r.getMessage() for r in caplog.records] == (
        ["checkpoint args: µP multipliers missing (key_multiplier, ssm_multipliers); treating them as 1.0"]
        if removed
        else []
    )
    assert cfg.key_multiplier == (1.0 if removed else 1.75)
    assert cfg.ssm_multipliers == ([1.0] * 5 if removed else [1.5, 0.5, 2.0, 0.25, 1.125])


def test_args_without_multipliers_mean_one_with_a_one_line_warning(hf_preset, tmp_path, monkeypatch):
    hf_to_megatron(hf_preset("tiny-mup"), tmp_path / "meg")
    strip_mup_args(tmp_path / "meg")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in the CLI: no handler, logging's stderr fallback
    result = CliRunner().invoke(cli.main, ["megatron-to-hf", str(tmp_path / "meg"), str(tmp_path / "back"), "--json"])
    assert result.exit_code == 0, result.output
    assert "checkpoint args: µP multipliers missing (all); treating them as 1.0" in result.stderr.splitlines()
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert all(cfg.get(name, 1.0) in (1.0, [1.0] * 2, [1.0] * 5) for name in MUP_FIELDS)


# -- fold / unfold -----------------------------------------------------------------------------------

FOLD_CASES = {
    "gated-norm+biases": dict(BIASES),
    "norm-before-gate": dict(BIASES, mamba_norm_before_gate=True),
    "no-mamba-norm": dict(BIASES, mamba_rms_norm=False),
}


@pytest.mark.parametrize("case", FOLD_CASES)
def test_folded_model_gives_the_same_logits(tmp_path, case):
    src = write_model(tmp_path / "hf", **FOLD_CASES[case], **random_multipliers(3))
    report = fold_mup(src, tmp_path / "folded")
    folded = multipliers(tmp_path / "folded")
    assert all(v in (1.0, [1.0] * 2, [1.0] * 5) for v in folded.values())
    assert json.loads((tmp_path / "folded" / "config.json").read_text())[FOLDED_KEY] == multipliers(src)
    assert report.rounding == {} and report.scaled > 0
    ids = torch.randint(0, 317, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = logits(src, ids), logits(tmp_path / "folded", ids)
    assert a.abs().max() > 1e-2  # the comparison is not vacuous
    assert (a - b).abs().max() < 1e-5


def test_tied_embeddings_fold_when_both_factors_agree(tmp_path):
    mup = dict(random_multipliers(5), lm_head_multiplier=1.75, embedding_multiplier=1.75)
    src = write_model(tmp_path / "hf", "tiny-bias-tied", **mup)
    fold_mup(src, tmp_path / "folded")
    ids = torch.randint(0, 317, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (logits(src, ids) - logits(tmp_path / "folded", ids)).abs().max() < 1e-5


def test_fold_unfold_is_bit_exact_for_power_of_two_factors(tmp_path):
    src = write_model(tmp_path / "hf", **BIASES, **random_multipliers(11, power_of_two))
    fold_mup(src, tmp_path / "folded", max_shard_size="100KB")
    unfold_mup(tmp_path / "folded", tmp_path / "back")
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))
    assert (tmp_path / "back" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_fold_unfold_is_within_one_ulp_for_other_factors(tmp_path):
    """x * m / m is not always x in fp32: the fold is not injective unless m is a power of two."""
    src = write_model(tmp_path / "hf", **BIASES, **random_multipliers(13))
    fold_mup(src, tmp_path / "folded")
    unfold_mup(tmp_path / "folded", tmp_path / "back")
    assert (tmp_path / "back" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    orig, back = load_hf(src), load_hf(tmp_path / "back")
    for k in orig:
        ulp = torch.nextafter(orig[k].abs(), torch.tensor(float("inf"))) - orig[k].abs()
        assert ((back[k] - orig[k]).abs() <= ulp).all(), k


def test_bf16_fold_reports_rounding(tmp_path):
    src = write_model(tmp_path / "hf", **BIASES, **random_multipliers(3))
    report = fold_mup(src, tmp_path / "folded", dtype="bf16")
    assert len(report.rounding) == report.scaled
    worst = max(r["max_rel"] for r in report.rounding.values())
    assert 0 < worst < 2**-7
    assert json.loads((tmp_path / "folded" / "config.json").read_text())["dtype"] == "bfloat16"


def test_megatron_export_can_fold(tmp_path):
    src = write_model(tmp_path / "hf", **BIASES, **random_multipliers(17))
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2)
    megatron_to_hf(tmp_path / "meg", tmp_path / "exported", fold_mup=True, dtype="bf16")
    fold_mup(src, tmp_path / "folded", dtype="bf16")
    assert_bit_exact(load_hf(tmp_path / "folded"), load_hf(tmp_path / "exported"))
    assert (tmp_path / "exported" / "config.json").read_bytes() == (tmp_path / "folded" / "config.json").read_bytes()


# -- refusals ----------------------------------------------------------------------------------------


def edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "action,setup,match",
    [
        ("fold", dict(preset="tiny-bias-tied"), "one shared tensor cannot carry two factors"),
        ("fold", dict(config={FOLDED_KEY: {"key_multiplier": 2.0}}), "folded before"),
        ("unfold", dict(), "not folded"),
        ("fold", dict(config={"quantization_config": {"quant_method": "bitnet"}}), "ternary"),
        ("fold", dict(config={"ssm_in_multiplier": 0.0}), "cannot be divided back out"),
        ("unfold", dict(config={FOLDED_KEY: {"key_multiplier": 2.0}, "key_multiplier": 3.0}), "edited after folding"),
    ],
)
def test_refusals(tmp_path, action, setup, match):
    src = write_model(tmp_path / "hf", setup.get("preset", "tiny"), **random_multipliers(1))
    edit_config(src, **setup.get("config", {}))
    run = fold_mup if action == "fold" else unfold_mup
    with pytest.raises(UnsupportedError, match=match) as err:
        run(src, tmp_path / "out")
    assert "\n" not in str(err.value) and str(src / "config.json") in str(err.value)
    assert not (tmp_path / "out").exists()


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_fold_and_unfold(hf_preset, tmp_path):
    runner = CliRunner()
    src = hf_preset("tiny-mup")
    folded = runner.invoke(cli.main, ["mup", "fold", str(src), str(tmp_path / "f"), "--dtype", "bf16"])
    assert folded.exit_code == 0, folded.output
    assert "34 of 63 tensors scaled" in folded.output and "storage rounding" in folded.output
    back = runner.invoke(cli.main, ["mup", "unfold", str(tmp_path / "f"), str(tmp_path / "b"), "--json"])
    assert back.exit_code == 0 and json.loads(back.output)["factors"]["ssm_multipliers"] == [1.5, 0.5, 2.0, 0.25, 1.125]
    again = runner.invoke(cli.main, ["mup", "fold", str(tmp_path / "f"), str(tmp_path / "ff")])
    assert again.exit_code == 5 and again.stderr.count("\n") == 1 and again.stderr.startswith("error: ")
