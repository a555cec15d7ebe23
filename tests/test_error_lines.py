"""Hostile and odd inputs, class A: every failure is one ``error:`` line with a documented exit code.

0 ok, 1 difference found (and nothing else), 2 usage, 3 bad input, 4 output refused, 5 unsupported,
6 internal error (``--debug`` / ``H1BRIDGE_DEBUG=1`` show the traceback), 128+N a signal.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import cli
from bridge import api
from bridge.engine import config as config_module
from bridge.errors import sanitize
from bridge.plumbing import direct_io

TOKEN = "hf_" + "Q" * 34  # shaped like a Hub token
ACTIVE = "secret-token-value-1234567890"  # the active one need not look like one


def run(*args, env=None):
    result = CliRunner().invoke(cli.main, [str(a) for a in args], env=env)
    return result.exit_code, result.stderr.strip(), result.stdout


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _raiser(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def test_unexpected_exception_is_one_internal_line_exit_6(monkeypatch, tmp_path):
    monkeypatch.setattr(
        api, "inspect_checkpoint", _raiser(ZeroDivisionError("line one\nline two\x1b[31m\x00" + "x" * 500))
    )
    code, err, _ = run("inspect", tmp_path)
    assert code == 6, err
    line = one_error_line(err)
    assert line.startswith("error: internal: ZeroDivisionError: line one line two")
    assert line.endswith(" (rerun with --debug)")
    assert "\x1b" not in line and "\x00" not in line and len(line) < 260


def test_exceptions_outside_the_command_wrapper_are_internal_too(monkeypatch):
    """``mappings`` has no per-command wrapper: the group catches it (before: traceback, exit 1)."""
    monkeypatch.setattr(api, "mapping_rows", _raiser(KeyError("boom")))
    code, err, _ = run("mappings")
    assert code == 6 and one_error_line(err) == "error: internal: KeyError: 'boom' (rerun with --debug)"


def test_nothing_but_a_difference_exits_1(monkeypatch):
    """A KeyboardInterrupt outside the command wrapper was click's "Aborted!" with exit 1."""
    monkeypatch.setattr(api, "mapping_rows", _raiser(KeyboardInterrupt()))
    code, err, _ = run("mappings")
    assert code == 130 and err == "interrupted by SIGINT; no partial output was left"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch, tmp_path, how):
    monkeypatch.setattr(api, "inspect_checkpoint", _raiser(ZeroDivisionError("deliberate")))
    args = ["--debug", "inspect", tmp_path] if how == "flag" else ["inspect", tmp_path]
    code, err, _ = run(*args, env={"H1BRIDGE_DEBUG": "1"} if how == "env" else None)
    assert code == 6
    assert "Traceback (most recent call last)" in err and err.endswith("ZeroDivisionError: deliberate")
    assert "error: internal" not in err


def test_internal_error_never_shows_the_hub_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", ACTIVE)
    message = f"request failed with Authorization: Bearer {ACTIVE} (also {TOKEN})"
    monkeypatch.setattr(api, "inspect_checkpoint", _raiser(RuntimeError(message)))
    code, err, _ = run("inspect", tmp_path)
    assert code == 6 and ACTIVE not in err and TOKEN not in err and "hf_***" in err, err
    code, err, _ = run("--debug", "inspect", tmp_path)
    assert code == 6 and ACTIVE not in err and TOKEN not in err, err


def test_bridge_error_quoting_file_content_is_sanitised(hf_preset, tmp_path):
    """An unknown model_type is quoted in the error: newlines, ESC and a token in it must not pass."""
    hf = tmp_path / "hf"
    hf.mkdir()
    data = json.loads((hf_preset("tiny") / "config.json").read_text())
    data["model_type"] = f"evil\n\x1b[2Jforged line {TOKEN}\u202e"
    (hf / "config.json").write_text(json.dumps(data))
    code, err, _ = run("inspect", hf)
    assert code == 3, err
    line = one_error_line(err)
    assert "\x1b" not in line and "\u202e" not in line and TOKEN not in line and "config.json" in line


def test_sanitize_cannot_be_split_around_control_characters():
    assert sanitize("a\x00hf_" + "\x07".join("A" * 31) + "\tb") == "ahf_*** b"
    assert len(sanitize("é" * 1000)) == 200


BAD_NUMBERS = [
    ["hf-to-megatron", "SRC", "DST", "--tp", "0"],
    ["hf-to-megatron", "SRC", "DST", "--pp", "-1"],
    ["hf-to-megatron", "SRC", "DST", "--tensor-model-parallel-size", "0"],
    ["hf-to-megatron", "SRC", "DST", "--vocab-divisible-by", "0"],
    ["reshard", "SRC", "DST", "--tp", "0"],
    ["reshard", "SRC", "DST", "--target-pipeline-parallel-size", "0"],
    ["parity", "SRC", "DST", "--tokens", "0"],
    ["parity", "SRC", "DST", "--batch", "0"],
    ["parity", "SRC", "DST", "--seed", "-1"],
    ["parity", "SRC", "DST", "--atol", "-1e-5"],
    ["parity", "SRC", "DST", "--atol", "nan"],
    ["verify", "SRC", "DST", "--atol", "-1"],
    ["make-tiny", "DST", "--seed", "-3"],
    ["megatron-to-hf", "SRC", "DST", "--max-shard-size", "5G"],
    ["megatron-to-hf", "SRC", "DST", "--max-shard-size", "0"],
    ["megatron-to-hf", "SRC", "DST", "--max-shard-size", "lots"],
    ["megatron-to-hf", "SRC", "DST", "--max-shard-size", "0GB"],
    ["mup", "fold", "SRC", "DST", "--max-shard-size", "-5GB"],
]


@pytest.mark.parametrize("args", BAD_NUMBERS, ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_numeric_options_are_validated_by_click(args, tmp_path):
    code, err, _ = run(*[str(tmp_path / a) if a in ("SRC", "DST") else a for a in args])
    assert code == 2, err
    assert "Invalid value for '" in err and args[-2] in err.splitlines()[-1], err
    assert not (tmp_path / "DST").exists()


@pytest.mark.parametrize("value, size", [("5GB", 5 * 10**9), ("200MB", 200 * 10**6), ("1GiB", 2**30), ("4096", 4096)])
def test_max_shard_size_takes_what_save_pretrained_takes(value, size):
    assert cli._parse_shard_size(None, None, value) == size


def _damaged_config(hf_preset, tmp_path: Path, text: bytes) -> Path:
    hf = tmp_path / "hf"
    hf.mkdir()
    for p in hf_preset("tiny").iterdir():
        (hf / p.name).symlink_to(p)
    (hf / "config.json").unlink()
    (hf / "config.json").write_bytes(text)
    return hf


def _huge_int_config(hf_preset) -> bytes:
    text = (hf_preset("tiny") / "config.json").read_text()
    return text.replace('"num_hidden_layers": ', '"num_hidden_layers": ' + "9" * 5000 + ', "x": ', 1).encode()


UNREADABLE = {
    "undecodable bytes": (lambda hf_preset: b'{"model_type": "\xff\xfe"}', "UnicodeDecodeError"),
    "nested too deep": (lambda hf_preset: b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
    "integer too long": (_huge_int_config, "ValueError: Exceeds the limit"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_config_is_bad_input_naming_the_file(hf_preset, tmp_path, case):
    content, fragment = UNREADABLE[case]
    hf = _damaged_config(hf_preset, tmp_path, content(hf_preset))
    code, err, _ = run("hf-to-megatron", hf, tmp_path / "out")
    assert code == 3, err
    line = one_error_line(err)
    assert line.startswith(f"error: {hf / 'config.json'}: cannot be read (") and fragment in line, line
    assert not (tmp_path / "out").exists()


def test_out_of_memory_while_reading_is_bad_input(hf_preset, tmp_path, monkeypatch):
    monkeypatch.setattr(
        config_module, "json", SimpleNamespace(loads=_raiser(MemoryError()), JSONDecodeError=ValueError)
    )
    code, err, _ = run("inspect", hf_preset("tiny"))
    assert code == 3 and one_error_line(err).endswith("config.json: cannot be read (MemoryError: )"), err


def test_signal_inside_torch_save_is_an_interruption_not_an_internal_error(hf_preset, tmp_path, monkeypatch):
    """torch.save re-raises what its Python write callback raised as a RuntimeError: the handler's
    record of the signal still makes it exit 143 with the interrupted line."""
    real, calls = direct_io.DirectFile.write, []

    def write(self, data):
        calls.append(len(data))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the CLI's handler, installed for this run
        return real(self, data)

    monkeypatch.setattr(direct_io.DirectFile, "write", write)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    code, err, _ = run("hf-to-megatron", hf_preset("tiny"), out, "--json")
    assert code == 128 + signal.SIGTERM, err
    assert err == "interrupted by SIGTERM; no partial output was left"
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI's handlers are gone again
