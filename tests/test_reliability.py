"""Reliability catalogue: bad inputs, unusable outputs, interrupted runs, unsafe pickles, secrets.

Completes tests/test_bad_inputs.py (whose cases are not repeated here). Every refusal is checked
against the whole CLI contract (``refused``): the documented exit code, one ``error:`` line on
stderr naming the file/key and the expectation, no traceback, no output and no hidden
``.NAME.partial-*`` / ``.NAME.old-*`` sibling left, the input byte-for-byte unchanged. Positive
controls (release tracker, symlinked shards, NaN/Inf weights) check that what must work does.
"""

from __future__ import annotations

import ast
import errno
import gc
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tree_digest
from safetensors.torch import load_file, save_file

import cli
from bridge.checks.verify import verify
from bridge.engine import dry_run
from bridge.engine.convert import hf_to_megatron
from bridge.errors import InputError
from bridge.formats import hf as hf_format
from bridge.formats import legacy as legacy_format
from bridge.formats.hf import HFCheckpoint
from bridge.plumbing import direct_io
from bridge.plumbing.safe_pickle import safe_torch_load
from bridge.tiny import make_tiny

ROOT = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"
ITER = "release"


# ------------------------------------------------------------------------------------------- helpers


def run(*args, env=None):
    result = CliRunner().invoke(cli.main, [str(a) for a in args], env=env)
    return result.exit_code, result.stderr.strip(), result.stdout


def leftovers(out: Path) -> list[str]:
    """Hidden siblings an atomic write could leave: ``.NAME.partial-PID`` and ``.NAME.old-PID``."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def refused(args, src: Path, out: Path, code: int, *fragments: str) -> str:
    """Runs the CLI and checks the whole refusal contract; returns the error line."""
    before = tree_digest(src)
    exit_code, err, _ = run(*args)
    assert exit_code == code, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not out.exists() and not out.is_symlink(), f"{out} was left behind"
    assert leftovers(out) == []
    assert tree_digest(src) == before, "the input was modified"
    return err


class ExecPayload:
    """Pickles as ``builtins.exec(code)``: loading it with plain pickle creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def base(tmp_path_factory, hf_preset):
    """Good checkpoints, converted once: the tiny HF folder, legacy TP=2 PP=2, and torch_dist."""
    root = tmp_path_factory.mktemp("good")
    hf = hf_preset("tiny")
    hf_to_megatron(hf, root / "meg", tp=2, pp=2)
    hf_to_megatron(hf, root / "dist", fmt="torch_dist")
    return {"hf": hf, "meg": root / "meg", "dist": root / "dist"}


class Workspace:
    """Private copies of the good checkpoints (made on first use) that a case may damage."""

    def __init__(self, base: dict, root: Path):
        self.base, self.root = base, root
        self.out = root / "out"

    def __getattr__(self, name: str) -> Path:
        if name not in ("hf", "meg", "dist"):
            raise AttributeError(name)
        path = self.root / name
        if not path.exists():
            shutil.copytree(self.base[name], path, symlinks=True)
        return path


@pytest.fixture
def ws(base, tmp_path):
    return Workspace(base, tmp_path)


# ------------------------------------------------------------------------------ damage, HF side


def shards(hf: Path) -> list[Path]:
    return sorted(hf.glob("*.safetensors"))


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def shard_of(hf: Path, key: str) -> Path:
    return hf / json.loads((hf / INDEX).read_text())["weight_map"][key]


def edit_tensors(hf: Path, key: str, fn) -> None:
    """Rewrites the shard holding ``key`` with ``fn(tensors)`` applied (metadata kept)."""
    path = shard_of(hf, key)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def duplicate_across_shards(hf: Path) -> None:
    first, second = shards(hf)[:2]
    a, b = load_file(first), load_file(second)
    b["model.embed_tokens.weight"] = a["model.embed_tokens.weight"]
    save_file(b, second, metadata={"format": "pt"})


def extra_key(hf: Path, listed: bool) -> None:
    path = shards(hf)[0]
    tensors = load_file(path)
    tensors["model.layers.0.bogus.weight"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    if listed:
        edit_json(hf / INDEX, lambda d: d["weight_map"].update({"model.layers.0.bogus.weight": path.name}))


def remap(hf: Path) -> None:
    """The index names an existing shard that does not hold the key."""
    key = "model.embed_tokens.weight"
    other = next(p.name for p in shards(hf) if p != shard_of(hf, key))
    edit_json(hf / INDEX, lambda d: d["weight_map"].update({key: other}))


def set_config(hf: Path, **fields) -> None:
    edit_json(hf / "config.json", lambda d: d.update(fields))


EMBED = "model.embed_tokens.weight"

# name -> (damage(ws), extra CLI args, exit code, fragments the error line must hold)
HF_CASES = {
    "duplicate key across shards": (
        lambda w: duplicate_across_shards(w.hf),
        [],
        3,
        ["model-00002-of-", f"tensor {EMBED!r} is also stored in model-00001-of-"],
    ),
    "unexpected (extra) key": (
        lambda w: extra_key(w.hf, listed=True),
        [],
        3,
        ["unexpected tensor 'model.layers.0.bogus.weight'"],
    ),
    "key in a shard but not in the index": (
        lambda w: extra_key(w.hf, listed=False),
        [],
        3,
        ["'model.layers.0.bogus.weight' is not listed in " + INDEX],
    ),
    "index maps a key to the wrong shard": (
        lambda w: remap(w.hf),
        [],
        3,
        [INDEX, f"{EMBED!r} is mapped to", "that shard does not hold it"],
    ),
    "index names an absolute path": (
        lambda w: edit_json(w.hf / INDEX, lambda d: d["weight_map"].update({EMBED: "/etc/passwd"})),
        [],
        3,
        [INDEX, "'/etc/passwd' is outside the checkpoint folder"],
    ),
    "index without weight_map": (
        lambda w: (w.hf / INDEX).write_text('{"metadata": {}}'),
        [],
        3,
        [INDEX, "expected JSON with a 'weight_map' object"],
    ),
    "integer tensor where a float weight is expected": (
        lambda w: edit_tensors(w.hf, EMBED, lambda t: t.update({EMBED: t[EMBED].to(torch.int32)})),
        [],
        3,
        [f"{EMBED!r} has dtype int32, expected a floating-point weight"],
    ),
    "config: negative size": (
        lambda w: set_config(w.hf, num_attention_heads=-8),
        [],
        3,
        ["config.json: num_attention_heads is -8; expected a positive integer"],
    ),
    "config: zero vocab": (
        lambda w: set_config(w.hf, vocab_size=0),
        [],
        3,
        ["config.json: vocab_size is 0; expected a positive integer"],
    ),
    "config: wrong type": (
        lambda w: set_config(w.hf, rms_norm_eps="tiny"),
        [],
        3,
        ["config.json: not a valid FalconH1Config", "'rms_norm_eps' expected float, got str"],
    ),
    "config.json missing": (
        lambda w: (w.hf / "config.json").unlink(),
        [],
        3,
        ["config.json: missing; expected a Hugging Face config.json"],
    ),
    "TP does not divide attention heads": (
        lambda w: w.hf,
        ["--tp", "3"],
        5,
        ["TP=3 does not divide num_attention_heads=8"],
    ),
    "PP does not divide layers": (lambda w: w.hf, ["--pp", "3"], 5, ["PP=3 does not divide num_hidden_layers=4"]),
    # --tp 0 is a usage error now (exit 2, click's range check): tests/test_error_lines.py
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bad_hf_input(ws, case):
    damage, extra, code, fragments = HF_CASES[case]
    damage(ws)
    refused(["hf-to-megatron", ws.hf, ws.out, "--json", *extra], ws.hf, ws.out, code, *fragments)


def test_source_is_a_file(ws):
    refused(
        ["hf-to-megatron", ws.hf / "config.json", ws.out, "--json"], ws.hf, ws.out, 3, "config.json: not a directory"
    )


# ------------------------------------------------------------------------- damage, Megatron side


def rank_file(meg: Path, rank: str) -> Path:
    return meg / ITER / rank / "model_optim_rng.pt"


def rewrite_rank(meg: Path, rank: str, edit) -> None:
    path = rank_file(meg, rank)
    state = torch.load(path, weights_only=False)  # the test's own, trusted file
    edit(state)
    torch.save(state, path)


def drop_args_and_sidecar(meg: Path) -> None:
    (meg / "hf_assets" / "config.json").unlink()
    for rank in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        rewrite_rank(meg, rank, lambda s: s.pop("args"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def int_weight(meg: Path) -> None:
    for rank in ("mp_rank_00_000", "mp_rank_01_000"):
        rewrite_rank(
            meg,
            rank,
            lambda s: s["model"].update(
                {"decoder.layers.0.mamba_mixer.D": s["model"]["decoder.layers.0.mamba_mixer.D"].to(torch.int32)}
            ),
        )


def drop_dist_block(dist: Path, key: str) -> None:
    """Removes one entry from the DCP index (``.metadata``), as if that block had never been saved."""
    path = dist / ITER / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # the test's own, trusted file
    del metadata.state_dict_metadata[key]
    path.write_bytes(pickle.dumps(metadata))


def virtual_pipeline(meg: Path) -> None:
    rewrite_rank(meg, "mp_rank_00_000", lambda s: s.update(model0=s.pop("model")))


MEG_CASES = {
    "legacy: no args and no hf_assets sidecar": (
        lambda w: drop_args_and_sidecar(w.meg),
        "meg",
        3,
        [
            "release: no model config: no hf_assets/config.json, no "
            "'args' in the checkpoint and no run_config.yaml; pass "
            "--hf-config DIR"
        ],
    ),
    "legacy: rank file is a truncated zip": (
        lambda w: truncate(rank_file(w.meg, "mp_rank_01_001")),
        "meg",
        3,
        ["mp_rank_01_001/model_optim_rng.pt: not a readable torch checkpoint"],
    ),
    "legacy: integer tensor in a rank file": (
        lambda w: int_weight(w.meg),
        "meg",
        3,
        [
            "mp_rank_00_000/model_optim_rng.pt: 'decoder.layers.0.mamba_mixer.D' "
            "has dtype int32, expected a floating-point weight"
        ],
    ),
    "legacy: sidecar config with invalid values": (
        lambda w: set_config(w.meg / "hf_assets", hidden_size=-1),
        "meg",
        3,
        ["hf_assets/config.json: hidden_size is -1; expected a positive integer"],
    ),
    "legacy: expert-parallel rank directories": (
        lambda w: (w.meg / ITER / "mp_rank_00_000").rename(w.meg / ITER / "mp_rank_00_000_001"),
        "meg",
        5,
        ["mp_rank_00_000_001: expert-parallel rank directories"],
    ),
    "legacy: virtual pipeline model0": (
        lambda w: virtual_pipeline(w.meg),
        "meg",
        3,
        ["no 'model' state dict (virtual pipeline 'model0' is not supported)"],
    ),
    "torch_dist: .metadata missing": (
        lambda w: (w.dist / ITER / ".metadata").unlink(),
        "dist",
        3,
        [".metadata: missing; the DCP index is required"],
    ),
    "torch_dist: metadata.json missing": (
        lambda w: (w.dist / ITER / "metadata.json").unlink(),
        "dist",
        3,
        [f"{ITER}/metadata.json: missing"],
    ),
    "torch_dist: common.pt missing": (
        lambda w: (w.dist / ITER / "common.pt").unlink(),
        "dist",
        3,
        [f"{ITER}/common.pt: missing"],
    ),
    "torch_dist: a Mamba block missing (in_proj.weight.dt)": (
        lambda w: drop_dist_block(w.dist, "decoder.layers.0.mamba_mixer.in_proj.weight.dt"),
        "dist",
        3,
        ["decoder.layers.0.mamba_mixer.in_proj.weight must be stored as blocks z, x, B, C, dt"],
    ),
}


@pytest.mark.parametrize("case", list(MEG_CASES))
def test_bad_megatron_input(ws, case):
    damage, which, code, fragments = MEG_CASES[case]
    damage(ws)
    src = getattr(ws, which)
    refused(["megatron-to-hf", src, ws.out, "--json"], src, ws.out, code, *fragments)


def test_reshard_pp_not_dividing_layers(ws):
    refused(
        ["reshard", ws.meg, ws.out, "--tp", "2", "--pp", "3", "--json"],
        ws.meg,
        ws.out,
        5,
        "PP=3 does not divide num_hidden_layers=4",
    )


# ------------------------------------------------------------------- pickles that would run code


def test_legacy_args_with_code_are_refused_unrun(ws, tmp_path):
    marker = tmp_path / "pwned-args"
    rewrite_rank(ws.meg, "mp_rank_00_000", lambda s: setattr(s["args"], "hook", ExecPayload(marker)))
    refused(
        ["megatron-to-hf", ws.meg, ws.out, "--json"],
        ws.meg,
        ws.out,
        3,
        "mp_rank_00_000/model_optim_rng.pt: refused to load: pickle contains disallowed global exec",
    )
    assert not marker.exists()
    torch.load(rank_file(ws.meg, "mp_rank_00_000"), weights_only=False)  # control: the payload is live
    assert marker.exists()


def test_torch_dist_metadata_with_code_is_refused_unrun(ws, tmp_path):
    """torch's own DCP reader unpickles ``.metadata`` with plain pickle; ours allows metadata types only."""
    marker = tmp_path / "pwned-metadata"
    (ws.dist / ITER / ".metadata").write_bytes(pickle.dumps(ExecPayload(marker)))
    refused(
        ["megatron-to-hf", ws.dist, ws.out, "--json"],
        ws.dist,
        ws.out,
        3,
        ".metadata: refused to load: pickle contains disallowed global builtins.exec",
    )
    assert not marker.exists()
    pickle.loads((ws.dist / ITER / ".metadata").read_bytes())  # control: the payload is live
    assert marker.exists()


def test_torch_dist_common_with_code_is_refused_unrun(ws, tmp_path):
    marker = tmp_path / "pwned-common"
    torch.save({"args": ExecPayload(marker), "iteration": 0}, ws.dist / ITER / "common.pt")
    refused(
        ["megatron-to-hf", ws.dist, ws.out, "--json"],
        ws.dist,
        ws.out,
        3,
        "common.pt: refused to load: pickle contains disallowed global exec",
    )
    assert not marker.exists()


def test_allow_list_admits_megatron_args(tmp_path):
    """What real Megatron args hold (Namespace, PosixPath, Signals, dtypes) loads under weights_only."""
    import argparse

    args = argparse.Namespace(save=Path("/ckpt"), exit_signal=signal.SIGTERM, params_dtype=torch.bfloat16)
    torch.save({"args": args, "model": {"w": torch.ones(2)}}, tmp_path / "r.pt")
    loaded = safe_torch_load(tmp_path / "r.pt", "r.pt")
    assert loaded["args"] == args and torch.equal(loaded["model"]["w"], torch.ones(2))


def _source_files() -> list[Path]:
    return [ROOT / "cli.py", *sorted((ROOT / "bridge").glob("*.py")), *sorted((ROOT / "mappings").glob("*.py"))]


def test_every_torch_load_is_weights_only_and_no_plain_unpickling():
    """Static check over the shipped code: torch.load only with weights_only=True, no pickle.load(s)
    (``.metadata`` goes through the restricted ``_MetadataUnpickler``)."""
    problems = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads"):
                problems.append(f"{where}: {owner}.{node.func.attr}")
    assert problems == []


def test_no_trust_remote_code():
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _source_files()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "trust_remote_code" in line
    ]
    assert hits == []


# ------------------------------------------------------------------------- unusable outputs


def test_force_replaces_a_regular_file(ws):
    ws.out.write_text("not a checkpoint")
    exit_code, err, _ = run("hf-to-megatron", ws.hf, ws.out, "--force", "--json")
    assert exit_code == 0, err
    assert (ws.out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert leftovers(ws.out) == []


def test_output_through_a_symlink_into_the_input(ws, tmp_path):
    (tmp_path / "link").symlink_to(ws.hf)
    refused(
        ["hf-to-megatron", ws.hf, tmp_path / "link" / "meg", "--json"], ws.hf, ws.hf / "meg", 4, "overlaps the input"
    )


def test_output_parent_is_a_file(ws, tmp_path):
    (tmp_path / "plain").write_text("x")
    refused(
        ["hf-to-megatron", ws.hf, tmp_path / "plain" / "out", "--json"],
        ws.hf,
        tmp_path / "plain" / "out",
        4,
        "plain: cannot create output here",
    )


def test_output_on_a_filesystem_that_takes_no_directories(ws):
    out = Path(f"/proc/h1bridge-out-{os.getpid()}")
    refused(["hf-to-megatron", ws.hf, out, "--json"], ws.hf, out, 4, "/proc: cannot create output here")


def test_output_under_missing_parents_leaves_none_on_failure(ws, monkeypatch):
    """Parents created for the output are removed again when the conversion fails."""
    monkeypatch.setattr(legacy_format, "write_stage", _enospc_after(0))
    out = ws.root / "new" / "deeper" / "out"
    refused(["hf-to-megatron", ws.hf, out, "--tp", "2", "--json"], ws.hf, out, 4, "No space left on device")
    assert not (ws.root / "new").exists()


def _enospc_after(good_stages: int):
    """A write_stage that writes ``good_stages`` stages' rank files, then half of the next stage's first
    file, and fails as a full disk does."""
    real, calls = legacy_format.write_stage, []

    def write_stage(files):
        calls.append(files)
        if len(calls) <= good_stages:
            return real(files)
        path = files[0][1]
        path.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return write_stage


def test_disk_full_legacy_writer(ws, monkeypatch):
    monkeypatch.setattr(legacy_format, "write_stage", _enospc_after(1))
    refused(
        ["hf-to-megatron", ws.hf, ws.out, "--tp", "2", "--pp", "2", "--json"],
        ws.hf,
        ws.out,
        4,
        f"{ws.out}: writing failed (No space left on device); nothing was left behind",
    )


@pytest.mark.parametrize("where", ["record header", "tensor data"])
def test_disk_full_inside_a_streamed_rank_file(ws, monkeypatch, where):
    """The real legacy writer, failing half way through the second rank file: in a write torch's zip
    writer makes (a header), or in one of a shard's chunks (arrays, written as torch seeks over the
    storage). Either way the OSError is the one line, and nothing is left."""
    real, files = direct_io.DirectFile.write, []

    def write(self, data):
        if self not in files:
            files.append(self)
        if len(files) == 2 and (where == "tensor data") == isinstance(data, np.ndarray) and self.tell() > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(direct_io.DirectFile, "write", write)
    refused(
        ["hf-to-megatron", ws.hf, ws.out, "--tp", "2", "--json"],
        ws.hf,
        ws.out,
        4,
        f"{ws.out}: writing failed (No space left on device); nothing was left behind",
    )


def _failing_get(monkeypatch, calls: int, fail):
    """HFCheckpoint.get that calls ``fail()`` on its ``calls``-th use (the tiny model at TP=2 reads its
    71 tensors once for both rank files, written side by side: 40 is in the middle of both)."""
    real, count = hf_format.HFCheckpoint.get, [0]

    def get(self, key):
        count[0] += 1
        if count[0] == calls:
            fail()
        return real(self, key)

    monkeypatch.setattr(hf_format.HFCheckpoint, "get", get)


def test_source_error_inside_a_streamed_rank_file_is_its_own_line(ws, monkeypatch):
    """torch.save would report what its write callback raised as a RuntimeError (an internal error);
    the source's one-line error comes through as itself."""

    def fail():
        raise InputError(f"{ws.hf}: shard broke mid-read")

    _failing_get(monkeypatch, 40, fail)
    refused(["hf-to-megatron", ws.hf, ws.out, "--tp", "2", "--json"], ws.hf, ws.out, 3, "shard broke mid-read")


def test_sigterm_while_a_shard_is_produced_leaves_nothing(ws, monkeypatch):
    _failing_get(monkeypatch, 40, lambda: os.kill(os.getpid(), signal.SIGTERM))
    code, err, _ = run("hf-to-megatron", ws.hf, ws.out, "--tp", "2", "--json")
    assert code == 128 + signal.SIGTERM and err == "interrupted by SIGTERM; no partial output was left", err
    assert not ws.out.exists() and leftovers(ws.out) == []


def test_disk_full_safetensors_writer(ws, monkeypatch):
    """The HF writer's file fills up after 200 kB: the next write raises ENOSPC, as on a full disk."""
    budget = [200_000]

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            budget[0] -= len(data)
            if budget[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real = hf_format.DirectFile
    monkeypatch.setattr(hf_format, "DirectFile", lambda *a, **k: FullDisk(real(*a, **k)))
    refused(
        ["megatron-to-hf", ws.meg, ws.out, "--max-shard-size", "100KB", "--json"],
        ws.meg,
        ws.out,
        4,
        f"{ws.out}: writing failed (No space left on device); nothing was left behind",
    )


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(options)`` -> a fresh tmpfs directory; skips where mounting is not allowed (non-root)."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the monkeypatched cases cover it")
        mounted.append(where)
        return where

    yield mount
    gc.collect()  # drop CliRunner results that may hold a file of the mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist", "hf"])
@pytest.mark.parametrize("upfront", [True, False], ids=["refused-up-front", "enospc-while-writing"])
def test_disk_full_for_real(ws, mount_tmpfs, monkeypatch, fmt, upfront):
    """A 256 kB tmpfs: the free-space check refuses before any tensor is written; with that check
    fooled (the disk filled by someone else meanwhile), each writer (torch.save zip, DCP, safetensors)
    meets a real ENOSPC, and both end in one line and leave nothing."""
    out = mount_tmpfs("size=256k") / "out"
    args = ["megatron-to-hf", ws.meg, out] if fmt == "hf" else ["hf-to-megatron", ws.hf, out, "--format", fmt]
    src = ws.meg if fmt == "hf" else ws.hf
    if upfront:
        expected = f"{out}: the output needs 1.4 MiB but only 0.2 MiB are free there"
    else:
        monkeypatch.setattr(dry_run, "disk_free", lambda dst: 2**40)
        expected = f"{out}: writing failed (No space left on device)"
    refused([*args, "--json"], src, out, 4, expected)
    assert list(out.parent.iterdir()) == []


def test_read_only_output_location(ws, mount_tmpfs, tmp_path):
    """Tests run as root, where chmod 0o555 does not stop writes (CAP_DAC_OVERRIDE): a read-only
    tmpfs does; as a normal user the chmod'ed directory is used instead."""
    if os.geteuid() == 0:
        parent, reason = mount_tmpfs("ro,size=64k"), "Read-only file system"
    else:
        parent, reason = tmp_path / "locked", "Permission denied"
        parent.mkdir(mode=0o555)
    refused(
        ["hf-to-megatron", ws.hf, parent / "out", "--json"],
        ws.hf,
        parent / "out",
        4,
        f"{parent}: cannot create output here ({reason})",
    )


# --------------------------------------------------------------------------- positive controls


def test_release_tracker_works(ws):
    (ws.meg / ITER).rename(ws.meg / "release")
    (ws.meg / "latest_checkpointed_iteration.txt").write_text("release")
    exit_code, err, _ = run("megatron-to-hf", ws.meg, ws.out, "--json")
    assert exit_code == 0, err
    assert verify(ws.base["hf"], ws.out).ok


def test_symlinked_shards_are_followed(ws, tmp_path):
    """Hub cache snapshots link every file into ../../blobs: shards may be symlinks to outside the folder
    (an index entry itself must still be a plain file name, see the '../' and absolute-path cases)."""
    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in ws.base["hf"].iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    exit_code, err, _ = run("hf-to-megatron", snapshot, ws.out, "--tp", "2", "--json")
    assert exit_code == 0, err
    exit_code, err, _ = run("hf-to-megatron", ws.base["hf"], tmp_path / "plain", "--tp", "2", "--json")
    assert exit_code == 0, err
    assert tree_digest(ws.out) == tree_digest(tmp_path / "plain")


def test_nan_and_inf_warn_with_count_and_convert_as_is(ws, monkeypatch):
    """5 NaN/Inf in the embedding and 1 in a layer-3 weight: one warning per run with the total (counted
    once per tensor, though TP=2 reads each twice) and the first tensor; the values survive bit for bit."""
    layer3 = "model.layers.3.mamba.out_proj.weight"
    bad = {EMBED: 5, layer3: 1}
    values = {EMBED: [float("nan"), float("inf"), float("-inf"), float("nan"), float("inf")], layer3: [float("nan")]}
    for key, vals in values.items():  # the two may live in different shards
        edit_tensors(ws.hf, key, lambda t, k=key, v=vals: t[k].view(-1)[7 : 7 + len(v)].copy_(torch.tensor(v)))
    # As in the real CLI, where no logging handler is configured and logging's last resort prints to
    # stderr: keep pytest's capture handler (on the root logger) from taking the record instead.
    monkeypatch.setattr(logging.getLogger("bridge.formats.hf"), "propagate", False)
    warning = f"warning: 6 non-finite values (NaN/Inf) in 2 tensor(s), first {EMBED!r}; converted as they are"

    exit_code, err, _ = run("hf-to-megatron", ws.hf, ws.out, "--tp", "2", "--pp", "2", "--json")
    assert exit_code == 0 and err.splitlines() == [warning], err
    exit_code, err, _ = run("megatron-to-hf", ws.out, ws.root / "back", "--json")
    assert exit_code == 0 and err.splitlines() == [warning], err
    back, orig = HFCheckpoint(ws.root / "back"), HFCheckpoint(ws.hf)
    for key, n in bad.items():
        assert torch.equal(back.get(key).view(torch.int32), orig.get(key).view(torch.int32))
        assert int((~torch.isfinite(back.get(key))).sum()) == n
    assert verify(ws.hf, ws.root / "back").ok  # verify counts NaN == NaN


# ------------------------------------------------------------------------------- Hub token


def test_hub_token_never_in_output(ws, tmp_path, monkeypatch):
    """HF_TOKEN set to a marker through conversions, push --dry-run, a real push and a failed push to
    the fake Hub: the marker reaches the server as the bearer token and nowhere else."""
    import huggingface_hub
    from fake_hub import FakeHub

    marker = "hf_MARKERtoken0123456789abcdefXYZ"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    texts = []
    with FakeHub() as hub:
        env = {"HF_TOKEN": marker, "HF_ENDPOINT": hub.url}

        def cli_ok(*args, code=0):
            result = CliRunner().invoke(cli.main, [str(a) for a in args], env=env)
            texts.extend([result.stdout, result.stderr])
            assert result.exit_code == code, result.stderr

        cli_ok("hf-to-megatron", ws.hf, ws.root / "meg", "--tp", "2")
        cli_ok("megatron-to-hf", ws.root / "meg", ws.root / "back", "--push-to", "acme/h1", "--private")
        cli_ok("push", ws.root / "back", "acme/h1", "--dry-run")
        cli_ok("push", ws.root / "back", "acme/h1", "--dry-run", "--json")
        hub.fail_once("POST", r"/commit/", status=401)
        cli_ok("push", ws.root / "back", "acme/h1", "--revision", "v2", code=4)
        remote = hub.repos["acme/h1"].files("main")
        sent = {r.authorization for r in hub.requests if not r.path.startswith("/_lfs/")}
    assert sent == {f"Bearer {marker}"}  # the token was really used
    assert "README.md" in remote and all(marker.encode() not in data for data in remote.values())
    assert all(marker not in t for t in texts)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert marker.encode() not in p.read_bytes(), p


# --------------------------------------------------------------------------- SIGKILL at random points

ZYGOTE = r"""
import json, os, sys
import cli  # imported once; every conversion runs in a fork of this process
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        pid = os.fork()
        if pid == 0:
            fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1); os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            code = 0
            try:
                cli.main(cmd["args"], prog_name="h1bridge")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    else:
        _, status = os.waitpid(cmd["pid"], 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class Zygote:
    """A Python process that imported the CLI once and forks one converter per request (importing torch
    and transformers takes longer than the tiny conversion being killed). The forks are real processes
    running ``cli.main`` end to end; the test SIGKILLs them."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.n = 0
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}  # imports done: runs are timed alone

    def _ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, args) -> int:
        self.n += 1
        log = str(self.logs / f"run{self.n}.log")
        return self._ask({"op": "run", "args": [str(a) for a in args], "log": log})["pid"]

    def wait(self, pid: int) -> dict:
        return self._ask({"op": "wait", "pid": pid})

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_sigkill_at_20_random_points_leaves_absent_or_complete(tmp_path):
    src = tmp_path / "hf"  # 32 layers of the scaled 3b shape: ~64 MB, ~0.5 s to convert into 16 rank files
    make_tiny(src, "3b", seed=3, num_hidden_layers=32, mamba_n_groups=2, max_shard_size="4MB")
    conv = ["hf-to-megatron", src, None, "--tp", "2", "--pp", "8", "--json"]
    logs = tmp_path / "logs"
    logs.mkdir()
    zygote = Zygote(logs)
    try:
        ref = tmp_path / "reference"
        start = time.monotonic()
        assert zygote.wait(zygote.start([*conv[:2], ref, *conv[3:]])) == {"signal": None, "code": 0}
        duration = time.monotonic() - start
        assert verify(src, ref).ok
        ref_digest = tree_digest(ref)

        rng = random.Random(1234)
        outcomes = []
        for i in range(20):
            out = tmp_path / f"out{i:02d}"
            force = i % 2 == 1  # odd runs replace an existing complete copy (--force), even ones start from none
            if force:
                shutil.copytree(ref, out)
            delay = rng.uniform(0, duration)
            pid = zygote.start([*conv[:2], out, *conv[3:], *(["--force"] if force else [])])
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            status = zygote.wait(pid)
            olds = [p for p in tmp_path.glob(f".{out.name}.old-*")]
            if out.exists():
                state = "complete" if tree_digest(out) == ref_digest else "CORRUPT"
            else:  # absent; under --force, killed between moving the old copy aside and renaming the new one
                state = "absent"
                assert not force or (len(olds) == 1 and tree_digest(olds[0]) == ref_digest)
            outcomes.append((round(delay, 3), force, status["signal"] or f"exit {status['code']}", state))
            assert state != "CORRUPT", outcomes
            assert status["code"] in (None, 0), (logs / f"run{zygote.n}.log").read_text()
    finally:
        zygote.close()
    killed = [o for o in outcomes if o[2] == signal.SIGKILL]
    print("kill outcomes (delay s, --force, end, destination):", *outcomes, sep="\n  ")
    assert len(killed) >= 10, outcomes  # most kills landed while the converter was running

    # A killed run leaves its .NAME.partial-PID behind; the next run on that destination (through the
    # real console script, no --force: the destination is absent) succeeds and removes it.
    victim = next(
        (
            out
            for out in (tmp_path / f"out{i:02d}" for i in range(20))
            if not out.exists() and any(".partial-" in name for name in leftovers(out))
        ),
        None,
    )
    assert victim is not None, f"no kill left a partial directory to clean up: {outcomes}"
    script = Path(sys.executable).with_name("h1bridge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cli"]
    done = subprocess.run(
        [*command, *[str(a) for a in conv[:2]], str(victim), *conv[3:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert tree_digest(victim) == ref_digest
    assert leftovers(victim) == []
