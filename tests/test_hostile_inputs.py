"""Hostile and odd inputs: carried files that leak secrets, special files, paths read from files.

* Non-weight files (tokenizer, card, sidecar ``hf_assets/``, Megatron-Bridge ``tokenizer/``) are
  carried and pushed only when they are regular files inside their folder (or a Hub cache
  snapshot's ``blobs/``): a ``tokenizer_config.json`` linked to ``/proc/self/environ`` must not put
  ``HF_TOKEN`` into any output.
* Every file is checked regular before it is opened: a FIFO named like a checkpoint file is refused
  with one line instead of blocking the run (these run in a forked CLI with a deadline).
* Paths read from files stay inside the checkpoint: a ``.metadata`` naming ``../x.distcp`` is refused.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tree_digest
from test_reliability import Zygote

import cli
from bridge.engine.convert import hf_to_megatron
from bridge.tiny import make_tiny

MARKER = "hf_" + "A" * 34
DEADLINE_S = 20.0


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", MARKER)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF folder with a tokenizer and card, and its legacy and torch_dist conversions."""
    root = tmp_path_factory.mktemp("hostile")
    hf = root / "hf"
    make_tiny(hf, "tiny", seed=1)
    (hf / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (hf / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (hf / "README.md").write_text("---\nlicense: other\n---\n# tiny\n")
    hf_to_megatron(hf, root / "legacy", tp=1, fmt="legacy")
    hf_to_megatron(hf, root / "dist", tp=1, fmt="torch_dist")
    return {"hf": hf, "legacy": root / "legacy", "dist": root / "dist"}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_refused(code: int, err: str, out: str, *, expected: int, names: str, tmp_path: Path, before: set[str]):
    """Exit ``expected``, exactly one ``error:`` line, last, naming ``names``; no traceback, no token,
    and nothing new under ``tmp_path`` (no output, no partial directory)."""
    lines = err.strip().splitlines()
    assert code == expected, err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert names in lines[-1], err
    assert "Traceback" not in err and MARKER not in err and MARKER not in out
    assert listing(tmp_path) == before, listing(tmp_path) ^ before


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stderr, result.stdout


def no_marker_under(*roots: Path) -> None:
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                assert MARKER.encode() not in p.read_bytes(), p


# ------------------------------------------------------------------------ 1. carried files and secrets


def test_tokenizer_config_linked_to_proc_environ_is_refused(base, tmp_path):
    src = copy(base["hf"], tmp_path / "hf")
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to("/proc/self/environ")
    before, digest = listing(tmp_path), tree_digest(src)
    code, err, out = run("hf-to-megatron", src, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="tokenizer_config.json", tmp_path=tmp_path, before=before)
    assert tree_digest(src) == digest


def test_symlink_out_of_the_hf_folder_is_not_carried(base, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(MARKER)
    src = copy(base["hf"], tmp_path / "hf")
    (src / "chat_template.jinja").symlink_to(secret)
    before = listing(tmp_path)
    code, err, out = run("hf-to-megatron", src, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="chat_template.jinja", tmp_path=tmp_path, before=before)


def test_sidecar_symlink_to_proc_is_refused_by_megatron_to_hf(base, tmp_path):
    meg = copy(base["legacy"], tmp_path / "meg")
    (meg / "hf_assets" / "tokenizer_config.json").unlink()
    (meg / "hf_assets" / "tokenizer_config.json").symlink_to("/proc/self/environ")
    before, digest = listing(tmp_path), tree_digest(meg)
    code, err, out = run("megatron-to-hf", meg, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="tokenizer_config.json", tmp_path=tmp_path, before=before)
    assert tree_digest(meg) == digest


def test_sidecar_card_symlink_out_is_refused(base, tmp_path):
    secret = tmp_path / "secret.md"
    secret.write_text(MARKER)
    meg = copy(base["legacy"], tmp_path / "meg")
    (meg / "hf_assets" / "README.md").unlink()
    (meg / "hf_assets" / "README.md").symlink_to(secret)
    before = listing(tmp_path)
    code, err, out = run("megatron-to-hf", meg, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="README.md", tmp_path=tmp_path, before=before)


def test_megatron_bridge_tokenizer_symlink_out_is_refused(base, tmp_path):
    meg = copy(base["dist"], tmp_path / "meg")
    shutil.rmtree(meg / "hf_assets")
    iter_dir = next(p for p in meg.iterdir() if p.name.startswith(("iter_", "release")))
    (iter_dir / "tokenizer").mkdir(exist_ok=True)
    (iter_dir / "tokenizer" / "tokenizer.json").symlink_to("/proc/self/environ")
    before = listing(tmp_path)
    code, err, out = run("megatron-to-hf", meg, tmp_path / "out", "--hf-config", base["hf"], "--json")
    assert_refused(code, err, out, expected=3, names="tokenizer.json", tmp_path=tmp_path, before=before)


def test_hf_reference_symlink_out_is_refused(base, tmp_path):
    meg = copy(base["legacy"], tmp_path / "meg")
    shutil.rmtree(meg / "hf_assets")
    ref = copy(base["hf"], tmp_path / "ref")
    (ref / "tokenizer.json").unlink()
    (ref / "tokenizer.json").symlink_to("/proc/self/environ")
    before = listing(tmp_path)
    code, err, out = run("megatron-to-hf", meg, tmp_path / "out", "--hf-reference", ref, "--json")
    assert_refused(code, err, out, expected=3, names="tokenizer.json", tmp_path=tmp_path, before=before)


def test_push_refuses_a_folder_with_a_symlink_out(base, tmp_path):
    folder = copy(base["hf"], tmp_path / "hf")
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to("/proc/self/environ")
    before = listing(tmp_path)
    code, err, out = run("push", folder, "acme/tiny", "--dry-run")
    assert_refused(code, err, out, expected=3, names="tokenizer_config.json", tmp_path=tmp_path, before=before)


def test_hub_cache_snapshot_links_into_blobs_are_carried(base, tmp_path):
    """Control: a cache snapshot links every file into ../../blobs; those are carried and pushed."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(base["hf"].iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    code, err, _ = run("hf-to-megatron", snapshot, tmp_path / "meg", "--json")
    assert code == 0, err
    assert (tmp_path / "meg" / "hf_assets" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    code, err, out = run("push", snapshot, "acme/tiny", "--dry-run")
    assert code == 0, err
    assert "tokenizer_config.json" in out
    no_marker_under(tmp_path / "meg")


# ------------------------------------------------------------------------ 3. special files never block


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", MARKER)
        z = Zygote(logs)
    yield z
    z.close()


def run_forked(zygote: Zygote, args) -> tuple[int, str]:
    """Runs the CLI in a fork; a run still going after DEADLINE_S is killed and fails the test."""
    pid = zygote.start(args)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        zygote.wait(pid)
        pytest.fail(f"{args[0]} still running after {DEADLINE_S} s: blocked on a special file")
    status = zygote.wait(pid)
    return status["code"], (zygote.logs / f"run{zygote.n}.log").read_text()


def _iter_dir(meg: Path) -> Path:
    return next(p for p in sorted(meg.iterdir()) if p.is_dir() and p.name.startswith(("iter_", "release")))


def _distcp(meg: Path) -> Path:
    return sorted(_iter_dir(meg).glob("*.distcp"))[-1]


FIFO_CASES = {
    "dcp .metadata": ("dist", lambda m: _iter_dir(m) / ".metadata"),
    "dcp common.pt": ("dist", lambda m: _iter_dir(m) / "common.pt"),
    "dcp .distcp data file": ("dist", _distcp),
    "dcp metadata.json": ("dist", lambda m: _iter_dir(m) / "metadata.json"),
    "legacy rank file": ("legacy", lambda m: next(_iter_dir(m).glob("mp_rank_*")) / "model_optim_rng.pt"),
    "tracker": ("legacy", lambda m: m / "latest_checkpointed_iteration.txt"),
    "sidecar config.json": ("legacy", lambda m: m / "hf_assets" / "config.json"),
    "sidecar tokenizer": ("legacy", lambda m: m / "hf_assets" / "tokenizer.json"),
}


@pytest.mark.parametrize("case", list(FIFO_CASES))
def test_fifo_in_a_megatron_checkpoint_is_refused_without_blocking(base, zygote, tmp_path, case):
    kind, where = FIFO_CASES[case]
    meg = copy(base[kind], tmp_path / "meg")
    victim = where(meg)
    victim.unlink()
    os.mkfifo(victim)
    before = listing(tmp_path)
    code, log = run_forked(zygote, ["megatron-to-hf", meg, tmp_path / "out", "--json"])
    assert_refused(code, log, "", expected=3, names=victim.name, tmp_path=tmp_path, before=before)
    assert "FIFO" in log.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["tokenizer.json", "model.safetensors.index.json"])
def test_fifo_in_an_hf_folder_is_refused_without_blocking(base, zygote, tmp_path, name):
    src = tmp_path / "hf"
    make_tiny(src, "tiny", seed=1, max_shard_size="200KB")  # sharded: it has an index
    if (src / name).exists():
        (src / name).unlink()
    os.mkfifo(src / name)
    before = listing(tmp_path)
    code, log = run_forked(zygote, ["hf-to-megatron", src, tmp_path / "out", "--json"])
    assert_refused(code, log, "", expected=3, names=name, tmp_path=tmp_path, before=before)


def test_oversized_tracker_is_refused_before_reading(base, tmp_path):
    meg = copy(base["legacy"], tmp_path / "meg")
    (meg / "latest_checkpointed_iteration.txt").write_text("1" + " " * 100)
    before = listing(tmp_path)
    code, err, out = run("megatron-to-hf", meg, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="larger than 64 bytes", tmp_path=tmp_path, before=before)


def test_oversized_dcp_metadata_json_is_refused(base, tmp_path):
    meg = copy(base["dist"], tmp_path / "meg")
    with open(_iter_dir(meg) / "metadata.json", "w") as f:
        f.truncate(16 * 2**20 + 1)  # sparse: no disk used
    before = listing(tmp_path)
    code, err, out = run("megatron-to-hf", meg, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="larger than", tmp_path=tmp_path, before=before)


def test_tracker_linked_to_proc_environ_is_refused(base, tmp_path):
    meg = copy(base["legacy"], tmp_path / "meg")
    (meg / "latest_checkpointed_iteration.txt").unlink()
    (meg / "latest_checkpointed_iteration.txt").symlink_to("/proc/self/environ")
    before = listing(tmp_path)
    code, err, out = run("megatron-to-hf", meg, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="/proc", tmp_path=tmp_path, before=before)


# ------------------------------------------------------------------------ 4. paths read from files


def _rewrite_storage_paths(meg: Path, new_path) -> None:
    path = _iter_dir(meg) / ".metadata"
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # our own test fixture, written by this tool
    for info in metadata.storage_data.values():
        info.relative_path = new_path(info.relative_path)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_dcp_metadata_naming_a_file_outside_the_checkpoint_is_refused(base, tmp_path, how):
    meg = copy(base["dist"], tmp_path / "meg")
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in _iter_dir(meg).glob("*.distcp"):  # the data really is there: only the path is wrong
        shutil.copy(f, outside / f.name)
    if how == "dotdot":
        _rewrite_storage_paths(meg, lambda rel: f"../../outside/{rel}")
    else:
        _rewrite_storage_paths(meg, lambda rel: str(outside / rel))
    before = listing(tmp_path)
    code, err, out = run("verify", base["hf"], meg)
    assert_refused(code, err, out, expected=3, names="outside the checkpoint", tmp_path=tmp_path, before=before)
    code, err, out = run("megatron-to-hf", meg, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="outside the checkpoint", tmp_path=tmp_path, before=before)


def test_hf_index_naming_a_shard_outside_the_folder_is_refused(base, tmp_path):
    src = tmp_path / "hf"
    make_tiny(src, "tiny", seed=1, max_shard_size="200KB")
    index = src / "model.safetensors.index.json"
    text = index.read_text()
    first = sorted(p.name for p in src.glob("model-*.safetensors"))[0]
    index.write_text(text.replace(f'"{first}"', f'"../{first}"'))
    before = listing(tmp_path)
    code, err, out = run("hf-to-megatron", src, tmp_path / "out", "--json")
    assert_refused(code, err, out, expected=3, names="outside the checkpoint folder", tmp_path=tmp_path, before=before)


def _cli(*args):
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def test_u32_safetensors_dtype_is_named_not_internal(tmp_path):
    import json
    import struct

    from bridge.tiny import make_tiny

    make_tiny(tmp_path / "hf", "tiny")
    path = tmp_path / "hf" / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["lm_head.weight"]["dtype"] = "U32"
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    code, err = _cli("inspect", tmp_path / "hf")
    assert code == 0, err
    code, err = _cli("hf-to-megatron", tmp_path / "hf", tmp_path / "out")
    assert code == 3 and "'lm_head.weight' has dtype uint32" in err and err.count("\n") == 0


@pytest.mark.parametrize(
    ("setting", "code", "text"),
    [
        ("hidden_size=99999999999", 3, "expected at most"),
        ("num_attention_heads=0", 3, "expected a positive integer"),
        ("num_hidden_layers=10000000", 5, "use --full"),
    ],
)
def test_absurd_make_tiny_settings_are_one_line(tmp_path, setting, code, text):
    got, err = _cli("make-tiny", tmp_path / "x", "--set", setting)
    assert got == code and text in err and err.count("\n") == 0 and not (tmp_path / "x").exists()


def test_sparse_tensor_in_a_rank_file_is_bad_input(tmp_path):
    import torch

    from bridge.engine.convert import hf_to_megatron
    from bridge.tiny import make_tiny

    make_tiny(tmp_path / "hf", "tiny")
    hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    path = tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["embedding.word_embeddings.weight"] = state["model"]["embedding.word_embeddings.weight"].to_sparse()
    torch.save(state, path)
    code, err = _cli("megatron-to-hf", tmp_path / "meg", tmp_path / "out")
    assert code == 3 and "is a torch.sparse_coo tensor; expected a dense tensor" in err
