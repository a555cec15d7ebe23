"""Names users already know (Megatron-LM's options, transformers' dtypes), --quiet, log-friendly
progress, a swapped ``push`` and ``verdict`` being one thing in Python and JSON."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from conftest import tree_digest

import cli
from bridge.checks.parity import parity
from bridge.checks.verify import verify
from bridge.engine.convert import hf_to_megatron
from bridge.engine.hf_rewrite import target_dtype
from bridge.plumbing import progress as progress_module
from bridge.plumbing.progress import Progress


def _run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def meg(hf_preset, tmp_path_factory):
    hf = hf_preset("tiny")
    out = tmp_path_factory.mktemp("conventions") / "meg"
    hf_to_megatron(hf, out, tp=2)
    return hf, out


def test_megatron_lm_names_write_the_same_bytes(hf_preset, tmp_path):
    hf = hf_preset("tiny")
    ours = ("--tp", 2, "--pp", 2, "--dtype", "bf16", "--vocab-divisible-by", 64)
    megatron = (
        "--tensor-model-parallel-size",
        2,
        "--pipeline-model-parallel-size",
        2,
        "--dtype",
        "bfloat16",
        "--make-vocab-size-divisible-by",
        64,
    )
    code, out, err = _run("hf-to-megatron", hf, tmp_path / "a", *ours, "--json")
    assert code == 0, err
    code, out2, err = _run("hf-to-megatron", hf, tmp_path / "b", *megatron, "--json")
    assert code == 0, err
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert json.loads(out)["dtype"] == json.loads(out2)["dtype"] == "bf16"  # one spelling past the CLI


@pytest.mark.parametrize(
    "names",
    [
        ("--target-tensor-parallel-size", "--target-pipeline-parallel-size"),
        ("--target-tensor-parallel-size", "--target-pipeline-model-parallel-size"),
        ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"),
    ],
)
def test_reshard_takes_megatron_names(meg, tmp_path, names):
    _, src = meg
    tp, pp = names
    assert _run("reshard", src, tmp_path / "ours", "--tp", 4, "--pp", 2, "--quiet")[0] == 0
    code, _, err = _run("reshard", src, tmp_path / "theirs", tp, 4, pp, 2, "--quiet")
    assert code == 0, err
    assert tree_digest(tmp_path / "ours") == tree_digest(tmp_path / "theirs")


def test_transformers_dtype_names_everywhere(meg, tmp_path):
    hf, src = meg
    for short, long in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        assert target_dtype(short) is target_dtype(long)
    for command in (["megatron-to-hf", src], ["mup", "fold", hf], ["bitnet", "unpack", hf]):
        if command[0] == "bitnet":  # needs a packed folder
            packed = tmp_path / "packed"
            assert _run("bitnet", "pack", hf, packed, "--quiet")[0] == 0
            command = ["bitnet", "unpack", packed]
        name = "-".join(str(c) for c in command[:-1])
        for dtype in ("bf16", "bfloat16"):  # same folder name: megatron-to-hf's model card is titled by it
            code, _, err = _run(*command, tmp_path / dtype / name, "--dtype", dtype, "--quiet")
            assert code == 0, err
        assert tree_digest(tmp_path / "bf16" / name) == tree_digest(tmp_path / "bfloat16" / name), name
    code, _, err = _run("make-tiny", tmp_path / "tiny", "--dtype", "bfloat16", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["dtype"] == "bfloat16"


def test_plain_progress_off_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "INTERVAL", 0.0)
    stream = io.StringIO()
    with Progress(total=3, desc="verify", unit="tensor", file=stream) as bar:
        for _ in range(3):
            bar.update()
    for _ in Progress(range(2), desc="→megatron", unit="rank", file=stream):
        pass
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and all(line.startswith("progress: ") for line in lines)
    assert lines[:3] == [f"progress: verify {n}/3 tensors" for n in (1, 2, 3)]
    assert lines[3].startswith("progress: verify 3/3 tensors done in")
    assert lines[-1].startswith("progress: →megatron 2/2 ranks done in")


def test_plain_progress_is_rate_limited():
    stream = io.StringIO()
    bar = Progress(total=1000, desc="verify", file=stream)
    for _ in range(1000):
        bar.update()
    bar.close()
    (line,) = stream.getvalue().splitlines()  # under 10 s: only the final line
    assert line.startswith("progress: verify 1000/1000 done in")
    silent = io.StringIO()
    with Progress(total=2, desc="quiet", file=silent, disable=True) as bar:
        bar.update(2)
    assert silent.getvalue() == ""


@pytest.mark.parametrize("command", ["verify", "parity"])
def test_checks_show_progress_and_quiet_hides_it(meg, command):
    hf, src = meg
    extra = ["--tokens", 8] if command == "parity" else []
    code, out, err = _run(command, hf, src, *extra)
    assert code == 0, err
    assert f"progress: {command} " in err and "\r" not in err
    assert all(line.startswith("progress: ") for line in err.splitlines())
    code, quiet_out, quiet_err = _run(command, hf, src, *extra, "--quiet")
    assert code == 0 and "progress" not in quiet_err and quiet_out == out  # the report still prints
    code, json_out, json_err = _run(command, hf, src, *extra, "--json")
    assert "progress" not in json_err and json.loads(json_out)["ok"]


def test_quiet_converters_print_only_the_summary(meg, tmp_path):
    hf, src = meg
    runs = [
        ["hf-to-megatron", hf, tmp_path / "m", "--tp", 2],
        ["reshard", src, tmp_path / "r", "--tp", 1],
        ["megatron-to-hf", src, tmp_path / "h"],
        ["mup", "fold", hf, tmp_path / "f"],
        ["mup", "unfold", tmp_path / "f", tmp_path / "u"],
        ["bitnet", "pack", hf, tmp_path / "p"],
        ["bitnet", "unpack", tmp_path / "p", tmp_path / "up"],
        ["make-tiny", tmp_path / "t"],
    ]
    for args in runs:
        code, out, err = _run(*args, "--quiet")
        assert code == 0 and out.strip() and err == "", (args, err)
    code, out, err = _run("hf-to-megatron", hf, tmp_path / "j", "--tp", 2, "--quiet", "--json")
    assert code == 0 and json.loads(out)["tp"] == 2 and err == ""


def test_swapped_push_arguments_suggest_the_order(hf_preset):
    hf = hf_preset("tiny")
    code, out, err = _run("push", "my-org/Falcon-H1-tiny", hf, "--dry-run")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert err.rstrip().endswith(f"did you mean: h1bridge push {hf} my-org/Falcon-H1-tiny")


def test_push_of_a_missing_folder_is_not_called_swapped(tmp_path):
    code, _, err = _run("push", tmp_path / "absent", "my-org/name", "--dry-run")
    assert code == 3 and "did you mean" not in err


def test_verdict_is_the_same_in_python_and_json(meg):
    hf, src = meg
    for report in (verify(hf, src), parity(hf, src, tokens=8)):
        assert isinstance(report.verdict, str) and report.verdict.startswith("OK")
        assert report.to_dict()["verdict"] == report.verdict and report.format().endswith(report.verdict)
