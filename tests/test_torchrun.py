"""Conversions spread over processes by torchrun (gloo, 2 processes on this machine): the same bytes as one
process, one atomic commit, and a failure or a killed process anywhere leaves nothing and fails every
process. Each test launches ``python -m torch.distributed.run --standalone --nproc-per-node N -m cli``."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_torch_dist import megatron_requests

from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.engine.plan import ParallelPlan
from bridge.engine.reshard import reshard
from bridge.formats.legacy import LegacyCheckpoint
from bridge.formats.torch_dist_io import TorchDistReader
from bridge.plumbing import atomic
from bridge.tiny import make_tiny, preset_config

ROOT = Path(__file__).resolve().parents[1]


def torchrun_command(logs: Path, *args, nproc: int = 2) -> list[str]:
    """torchrun with each worker's stdout and stderr in its own file under ``logs`` (``worker_output``)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--log-dir", str(logs), "--redirects", "3", "-m", "cli", *[str(a) for a in args],
    ]  # fmt: skip


def worker_output(logs: Path, rank: int) -> tuple[str, str]:
    """(stdout, stderr) of worker ``rank``."""
    (folder,) = logs.glob(f"*/attempt_0/{rank}")
    return (folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()


def torchrun(logs: Path, *args, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(logs, *args, nproc=nproc), capture_output=True, text=True, timeout=300)


def worker_exits(launcher_stderr: str) -> dict[int, int]:
    """Exit codes of the workers torchrun reports as failed (its summary lists every one that did not exit 0)."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", launcher_stderr)
    return {int(rank): int(code) for rank, code in found}


def leftovers(out: Path) -> list[str]:
    """``out`` itself and any hidden sibling an atomic write to it could leave (partial, lock, old)."""
    names = atomic._sibling_prefixes(out)
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(names))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def summary_of(logs: Path) -> dict:
    """The --json summary, printed by process 0 alone."""
    others = [p for p in logs.glob("*/attempt_0/*") if p.name != "0"]
    assert all((p / "stdout.log").read_text() == "" for p in others)
    return json.loads(worker_output(logs, 0)[0])


@pytest.fixture(scope="module")
def legacy_tp2(hf_preset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun") / "legacy-tp2"
    hf_to_megatron(hf_preset("tiny"), out, tp=2)
    return out


def test_hf_to_megatron_legacy_two_processes_bit_identical(hf_preset, tmp_path):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "one", tp=2, pp=2)
    logs = tmp_path / "logs"
    done = torchrun(logs, "hf-to-megatron", src, tmp_path / "two", "--tp", "2", "--pp", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert files(tmp_path / "two") == files(tmp_path / "one")
    s = summary_of(logs)
    assert s["processes"] == 2
    by_rank = {p["rank"]: p for p in s["per_process"]}
    assert by_rank[0]["files"][-2:] == [
        "release/mp_rank_00_000/model_optim_rng.pt",
        "release/mp_rank_00_001/model_optim_rng.pt",
    ]
    assert by_rank[1]["files"] == [
        "release/mp_rank_01_000/model_optim_rng.pt",
        "release/mp_rank_01_001/model_optim_rng.pt",
    ]
    assert sorted(by_rank[0]["files"] + by_rank[1]["files"]) == sorted(s["files"])
    assert by_rank[0]["bytes"] + by_rank[1]["bytes"] == s["bytes_written"]
    assert by_rank[0]["tensors"] + by_rank[1]["tensors"] == s["tensors"] == 118
    assert leftovers(tmp_path / "two") == ["two"]


def test_megatron_to_hf_two_processes_split_shards_bit_identical(legacy_tp2, tmp_path):
    megatron_to_hf(legacy_tp2, tmp_path / "out", max_shard_size="300KB")
    single = files(tmp_path / "out")
    (tmp_path / "out").rename(tmp_path / "one")
    (tmp_path / "spread").mkdir()
    logs = tmp_path / "logs"
    done = torchrun(
        logs, "megatron-to-hf", legacy_tp2, tmp_path / "spread" / "out", "--max-shard-size", "300KB", "--json"
    )
    assert done.returncode == 0, done.stderr
    assert files(tmp_path / "spread" / "out") == single  # the card names DST: same name in both runs
    s = summary_of(logs)
    shards = sorted(name for name in single if name.endswith(".safetensors"))
    assert len(shards) >= 4 and s["processes"] == 2
    by_rank = {p["rank"]: p for p in s["per_process"]}
    assert by_rank[1]["files"] == shards[1::2]  # every other shard; process 0 the rest, index, config, card
    assert [f for f in by_rank[0]["files"] if f.endswith(".safetensors")] == shards[0::2]
    assert "model.safetensors.index.json" in by_rank[0]["files"]


def test_reshard_to_torch_dist_two_writers_megatron_core_loads_it(legacy_tp2, tmp_path, dist_checkpointing):
    """Each process writes its own ``__{rank}_*.distcp`` files; process 0's ``.metadata`` indexes both.
    Same index entries (in the same order) and tensors as one process, and megatron-core loads it."""
    reshard(legacy_tp2, tmp_path / "one", tp=2, fmt="torch_dist")
    logs = tmp_path / "logs"
    done = torchrun(logs, "reshard", legacy_tp2, tmp_path / "two", "--tp", "2", "--format", "torch_dist", "--json")
    assert done.returncode == 0, done.stderr
    assert summary_of(logs)["processes"] == 2
    one, two = TorchDistReader(tmp_path / "one" / "release"), TorchDistReader(tmp_path / "two" / "release")
    data = sorted(p.name for p in (tmp_path / "two" / "release").glob("*.distcp"))
    assert {name.split("_")[2] for name in data} == {"0", "1"}, data  # "__{rank}_{n}_0.distcp"
    assert two.keys() == one.keys()
    for key in one.keys():
        assert torch.equal(two.load([key])[key], one.load([key])[key]), key
    assert two.common == one.common
    entries = [
        pickle.loads((tmp_path / d / "release" / ".metadata").read_bytes()).state_dict_metadata for d in ("one", "two")
    ]
    assert list(entries[0].items()) == list(entries[1].items())
    others = [{k: v for k, v in files(tmp_path / d).items() if "/release/" not in "/" + k} for d in ("one", "two")]
    assert others[0] == others[1]  # tracker, hf_assets

    dims = ParallelPlan(preset_config("tiny"), 2, 1).dims
    legacy = LegacyCheckpoint(legacy_tp2)
    for r in range(2):
        req, expected = megatron_requests(legacy.model(r, 0), r, 2, dims)
        loaded = dist_checkpointing.load(
            {"model": req}, str(tmp_path / "two" / "release"), validate_access_integrity=False
        )
        for key, tensor in expected.items():
            assert torch.equal(loaded["model"][key], tensor), key


def test_one_process_under_torchrun_is_byte_identical(hf_preset, tmp_path):
    """torchrun with N=1 takes the group path (one gloo rank) and writes exactly what a plain run writes,
    torch_dist data files included (only ``.metadata``'s random save id differs between any two runs)."""
    src = hf_preset("tiny-mup")
    hf_to_megatron(src, tmp_path / "one", tp=2, fmt="torch_dist")
    logs = tmp_path / "logs"
    done = torchrun(
        logs, "hf-to-megatron", src, tmp_path / "two", "--tp", "2", "--format", "torch_dist", "--json", nproc=1
    )
    assert done.returncode == 0, done.stderr
    assert summary_of(logs)["processes"] == 1
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert set(one) == set(two)
    assert {k: v for k, v in one.items() if not k.endswith(".metadata")} == {
        k: v for k, v in two.items() if not k.endswith(".metadata")
    }
    metadata = [pickle.loads(d[k]) for d in (one, two) for k in d if k.endswith(".metadata")]
    for m in metadata:
        m.storage_meta = None
    assert metadata[0] == metadata[1]


def break_tensor(iter_dir: Path, key: str) -> None:
    """Points ``key``'s bytes in the DCP index past the end of its data file: only reading it fails."""
    path = iter_dir / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn == key:
            info.offset += 1 << 40
    path.write_bytes(pickle.dumps(metadata))


def test_failure_in_one_process_fails_all_and_leaves_nothing(legacy_tp2, tmp_path):
    """A real input error that only process 1 meets (one tensor it reads is unreadable): its error line, process
    0 stops at its next shard with that line too, both exit non-zero, and neither DST nor a partial remains."""
    megatron_to_hf(legacy_tp2, tmp_path / "reference", max_shard_size="300KB")
    index = json.loads((tmp_path / "reference" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert shards.index(index["lm_head.weight"]) % 2 == 1  # written by process 1
    reshard(legacy_tp2, tmp_path / "dist", tp=2, fmt="torch_dist")
    break_tensor(tmp_path / "dist" / "release", "output_layer.weight")

    out = tmp_path / "out"
    logs = tmp_path / "logs"
    done = torchrun(logs, "megatron-to-hf", tmp_path / "dist", out, "--max-shard-size", "300KB")
    assert done.returncode != 0
    exits = worker_exits(done.stderr)  # whichever exits second may be ended by torchrun's SIGTERM
    assert set(exits) == {0, 1} and all(exits.values()), done.stderr
    errors = [worker_output(logs, rank)[1] for rank in (0, 1)]
    assert re.fullmatch(
        rf"error: {tmp_path / 'dist' / 'release'}/__0_1_0\.distcp \(bytes .*past the end.*\n", errors[1]
    )
    assert errors[0] == "error: process 1 of 2 failed, so this one stopped too: " + errors[1][len("error: ") :]
    assert leftovers(out) == []


@pytest.fixture(scope="module")
def bigger_hf(tmp_path_factory) -> Path:
    """~130 MB: each process takes a noticeable time over its rank file, so a kill lands inside the run."""
    out = tmp_path_factory.mktemp("torchrun") / "hf"
    make_tiny(out, "3b", seed=3, num_hidden_layers=64, mamba_n_groups=2, max_shard_size="50MB")
    return out


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the workers torchrun started (read from their environment)."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(re.search(r"PPid:\s*(\d+)", status).group(1))
        if parent != launcher.pid:
            continue
        for var in environ:
            if var.startswith(b"RANK="):
                pids[int(var[5:])] = int(entry.name)
    return pids


def wait_for(condition, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.005)
    raise AssertionError("timed out")


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_fails_the_group_and_leaves_nothing(bigger_hf, tmp_path, victim):
    """SIGKILL one worker in the middle of its share (the other frozen meanwhile, so the run cannot finish
    first): torchrun ends the survivor, which exits non-zero; nothing is left at DST, not even process 0's
    partial and lock when process 0 is the one killed (the survivor removes them, once the lock is free)."""
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        torchrun_command(tmp_path / "logs", "hf-to-megatron", bigger_hf, out, "--tp", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        partial = wait_for(lambda: next((p for p in tmp_path.iterdir() if ".partial-" in p.name), None))
        pids = worker_pids(launcher)
        survivor = 1 - victim
        if victim == 1:
            os.kill(pids[1], signal.SIGSTOP)  # before it can report its share written
        else:  # process 1 is inside its share: its rank file exists
            wait_for(lambda: (partial / "release" / "mp_rank_01" / "model_optim_rng.pt").exists())
            os.kill(pids[1], signal.SIGSTOP)
        os.kill(pids[victim], signal.SIGKILL)
        if victim == 0:
            os.kill(pids[1], signal.SIGCONT)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    exits = worker_exits(stderr)
    assert exits.get(victim) == -signal.SIGKILL and exits.get(survivor, 0) != 0, stderr
    assert leftovers(out) == [], stderr
    assert "Traceback" not in worker_output(tmp_path / "logs", survivor)[1]


def test_other_commands_refuse_to_run_several_times(hf_preset, tmp_path):
    """Only the converting commands split their work: ``verify`` started twice by torchrun says so (exit 2)
    instead of printing its report twice (here the environment alone, as torchrun sets it)."""
    torchrun_env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    env = {**os.environ, **torchrun_env}
    src = hf_preset("tiny")
    done = subprocess.run(
        [sys.executable, "-m", "cli", "verify", src, src], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: h1bridge verify runs in one process") and "hf-to-megatron" in done.stderr
