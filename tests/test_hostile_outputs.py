"""Hostile and odd inputs, classes B and C: signals and output safety.

SIGTERM / SIGHUP end a run as Ctrl-C does (partial output removed, one line, exit 128+N); the final
rename never replaces what the run did not create; a second run on the same destination is refused;
--force never replaces an output that shares files with the input; a dangling symlink is something
that exists; temporary names fit wherever the destination's name fits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tree_digest
from test_reliability import Zygote

import cli
from bridge.formats import legacy as legacy_format
from bridge.plumbing import atomic
from bridge.tiny import make_tiny


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip(), result.stdout


def siblings(out: Path) -> list[str]:
    """Every hidden name an atomic write to ``out`` could leave (plain and hashed forms)."""
    if not out.parent.is_dir():
        return []
    prefixes = atomic._sibling_prefixes(out)
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefixes))


# ------------------------------------------------------------------------------------------ signals


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    z = Zygote(logs)
    yield z
    z.close()


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    """The scaled 3b shape at 96 layers (~190 MB): about a second of conversion to interrupt."""
    src = tmp_path_factory.mktemp("big") / "hf"
    make_tiny(src, "3b", seed=3, num_hidden_layers=96, mamba_n_groups=2, max_shard_size="16MB")
    return src


def _first_rank_file(out: Path, timeout: float = 60.0) -> None:
    """Waits until the run's partial directory holds a rank file (torch.save under way or done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for partial in out.parent.glob(f".{out.name}.partial-*"):
            if any(partial.rglob("*.pt")):
                return
        time.sleep(0.005)
    raise AssertionError("the conversion never started writing")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_sigterm_and_sighup_remove_the_partial_output(zygote, big_hf, tmp_path, signum):
    out = tmp_path / "out"
    before = tree_digest(big_hf)
    pid = zygote.start(["hf-to-megatron", big_hf, out, "--tp", "1", "--pp", "8", "--json"])
    _first_rank_file(out)
    os.kill(pid, signum)
    status = zygote.wait(pid)
    log = (zygote.logs / f"run{zygote.n}.log").read_text().strip()
    assert status == {"signal": None, "code": 128 + signum}, log
    assert log == f"interrupted by {signum.name}; no partial output was left"
    assert not out.exists() and siblings(out) == []
    assert tree_digest(big_hf) == before


# ----------------------------------------------------------------------------------- output safety


@pytest.fixture
def hf(hf_preset):
    return hf_preset("tiny")


def _creates_dst_first(out: Path):
    """A write_stage that, before the first rank file, has someone else create ``out``."""
    real = legacy_format.write_stage

    def write_stage(path, *args, **kwargs):
        if not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("not yours")
        return real(path, *args, **kwargs)

    return write_stage


@pytest.mark.parametrize("renameat2", ["renameat2", "fallback"])
def test_folder_created_at_dst_during_the_run_is_not_replaced(hf, tmp_path, monkeypatch, renameat2):
    """Before: an empty folder was silently replaced by rename(2)."""
    if renameat2 == "fallback":
        monkeypatch.setattr(atomic, "_renameat2", None)
    elif atomic._renameat2 is None:
        pytest.skip("no renameat2 in this libc")
    out = tmp_path / "out"
    monkeypatch.setattr(legacy_format, "write_stage", _creates_dst_first(out))
    code, err, _ = run("hf-to-megatron", hf, out, "--json")
    assert code == 4, err
    assert (
        err == f"error: {out}: was created by something else during the run; left it untouched and removed this output"
    )
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and siblings(out) == []


def test_force_does_not_replace_a_folder_swapped_in_during_the_run(hf, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def swap(path, *args, **kwargs):
        if not (tmp_path / "orig").exists():  # once, before the first rank file
            out.rename(tmp_path / "orig")
            out.mkdir()
            (out / "theirs.txt").write_text("x")
        return real(path, *args, **kwargs)

    real = legacy_format.write_stage
    monkeypatch.setattr(legacy_format, "write_stage", swap)
    code, err, _ = run("hf-to-megatron", hf, out, "--force", "--json")
    assert code == 4 and "was created by something else during the run" in err, err
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and siblings(out) == []


def test_second_concurrent_run_is_refused(hf, tmp_path):
    out = tmp_path / "out"
    lock = atomic._Lock.acquire(out)  # what a first, still running conversion holds
    assert lock is not None
    try:
        code, err, _ = run("hf-to-megatron", hf, out, "--json")
    finally:
        lock.release()
    assert code == 4, err
    assert err == f"error: {out}: another run is writing this output (lock .out.lock held); wait for it to finish"
    assert not out.exists() and siblings(out) == []
    code, err, _ = run("hf-to-megatron", hf, out, "--json")  # once it is done, a run goes ahead
    assert code == 0 and siblings(out) == [], err


def test_second_concurrent_process_is_refused(hf, tmp_path):
    """The same through two processes: the lock is the kernel's, and dies with its holder."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from bridge.plumbing import atomic;"
         f"lock = atomic._Lock.acquire(Path({str(out)!r})); print('held', flush=True); sys.stdin.read()"],
        cwd=Path(cli.__file__).parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err, _ = run("hf-to-megatron", hf, out, "--json")
        assert code == 4 and "lock .out.lock held" in err, err
    finally:
        holder.kill()
        holder.wait()
    code, err, _ = run("hf-to-megatron", hf, out, "--json")  # killed holder: its lock file is taken over
    assert code == 0 and siblings(out) == [], err


@pytest.mark.parametrize("how", ["hard link", "symlink", "symlinked folder"])
def test_force_refuses_an_output_sharing_files_with_the_input(hf, tmp_path, how):
    src = tmp_path / "src"
    src.mkdir()
    for p in hf.iterdir():
        os.link(p, src / p.name)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    if how == "hard link":
        os.link(src / "config.json", out / "sub" / "copy.json")
    elif how == "symlink":
        (out / "sub" / "copy.json").symlink_to(src / "config.json")
    else:
        (out / "sub" / "all").symlink_to(src, target_is_directory=True)
    before = tree_digest(src)
    code, err, _ = run("hf-to-megatron", src, out, "--force", "--json")
    assert code == 4, err
    assert err.startswith(f"error: {out / 'sub'}/") and "is the same file as the input's" in err, err
    assert tree_digest(src) == before and (out / "sub").exists() and siblings(out) == []


def test_dangling_symlink_at_dst_counts_as_existing(hf, tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    code, err, _ = run("hf-to-megatron", hf, out, "--json")
    assert code == 4 and err == f"error: {out}: is a dangling symlink; pass --force to replace it", err
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    code, err, _ = run("hf-to-megatron", hf, out, "--force", "--json")
    assert code == 0 and out.is_dir() and not out.is_symlink(), err


def test_long_destination_name_gets_a_short_temporary_name(tmp_path):
    """A 250-byte name is valid, ``.NAME.partial-PID`` would not be (ENAMETOOLONG, exit 4 before)."""
    out = tmp_path / ("m" * 250)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = atomic._sibling(out, "partial", dead.pid)  # left by a killed run
    assert stale.name.startswith(".h1b-") and len(stale.name) < 64
    stale.mkdir()
    (stale / "junk").write_text("x")
    code, err, _ = run("make-tiny", out)
    assert code == 0, err
    assert (out / "config.json").is_file() and siblings(out) == []


def test_swallowed_signal_still_stops_before_the_output_is_committed(hf, tmp_path, monkeypatch):
    """A signal landing in code that swallows exceptions (a ``__del__``: "Exception ignored") used to
    let the run finish; the recorded signal stops it before the rename."""
    real = legacy_format.write_stage

    def write_stage(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGHUP)
        except KeyboardInterrupt:
            pass  # as a finalizer would
        return real(*args, **kwargs)

    monkeypatch.setattr(legacy_format, "write_stage", write_stage)
    out = tmp_path / "out"
    code, err, _ = run("hf-to-megatron", hf, out, "--json")
    assert code == 128 + signal.SIGHUP and err == "interrupted by SIGHUP; no partial output was left", err
    assert not out.exists() and siblings(out) == []
