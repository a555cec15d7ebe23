"""torch_dist: bit-exact round trips, re-sharding, and megatron-core's own loader reading our output."""

import pytest
import torch
from test_roundtrip import assert_bit_exact, load_hf

from bridge.checks.inspect import inspect_checkpoint
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.engine.plan import ParallelPlan
from bridge.engine.reshard import reshard
from bridge.formats.legacy import LegacyCheckpoint
from bridge.tiny import preset_config
from mappings import FALCON_H1
from mappings.rules import COLUMN, QKV, REPLICATED, ROW, VOCAB, Blockwise

pytestmark = pytest.mark.filterwarnings("ignore:`load_state_dict` is deprecated:FutureWarning")


def test_hf_torch_dist_hf_bit_exact(hf_preset, tmp_path):
    src = hf_preset("tiny")
    s = hf_to_megatron(src, tmp_path / "dist", tp=2, fmt="torch_dist")
    assert s.format == "torch_dist"
    iter_dir = tmp_path / "dist" / "release"
    assert {"metadata.json", "common.pt", ".metadata"} <= {p.name for p in iter_dir.iterdir()}
    assert (tmp_path / "dist" / "latest_checkpointed_iteration.txt").read_text() == "release"
    megatron_to_hf(tmp_path / "dist", tmp_path / "back")
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))
    assert (tmp_path / "back" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    info = inspect_checkpoint(tmp_path / "dist")
    assert info["format"] == "torch_dist" and info["layout"] == "bridge"


@pytest.mark.parametrize("preset", ["tiny", "tiny-bias-tied"])
def test_torch_dist_legacy_torch_dist_chain(hf_preset, tmp_path, preset):
    src = hf_preset(preset)
    hf_to_megatron(src, tmp_path / "d2", tp=2, fmt="torch_dist")
    reshard(tmp_path / "d2", tmp_path / "l42", tp=2 if preset == "tiny-bias-tied" else 4, pp=2, fmt="legacy")
    assert LegacyCheckpoint(tmp_path / "l42").pp == 2
    reshard(tmp_path / "l42", tmp_path / "d1", tp=1, fmt="torch_dist")
    megatron_to_hf(tmp_path / "d1", tmp_path / "back")
    assert_bit_exact(load_hf(src), load_hf(tmp_path / "back"))


def test_reshard_equals_going_through_hf(hf_preset, tmp_path):
    src = hf_preset("tiny-mup")
    hf_to_megatron(src, tmp_path / "l2", tp=2, pp=2)
    reshard(tmp_path / "l2", tmp_path / "l4", tp=4, layout="mlm-conv1d")
    hf_to_megatron(src, tmp_path / "direct", tp=4, layout="mlm-conv1d")
    a, b = LegacyCheckpoint(tmp_path / "l4"), LegacyCheckpoint(tmp_path / "direct")
    for r in range(4):
        ma, mb = a.model(r, 0), b.model(r, 0)
        assert ma.keys() == mb.keys()
        assert all(torch.equal(ma[k], mb[k]) for k in ma)


def _axis(rule):
    if rule is REPLICATED:
        return None
    return 1 if rule is ROW else 0


def megatron_requests(legacy_rank: dict, r: int, tp: int, dims):
    """What a TP rank's sharded_state_dict asks megatron-core's loader for, built from the table."""
    from megatron.core.dist_checkpointing import ShardedTensor

    by_suffix = sorted(((p.megatron.rsplit("{L}.", 1)[-1], p) for p in FALCON_H1), key=lambda sp: -len(sp[0]))
    req, expected = {}, {}
    for key, local in legacy_rank.items():
        param = next(p for s, p in by_suffix if key == s or key.endswith("." + s))
        rule = param.rule
        if isinstance(rule, Blockwise) and rule.dist_keys:  # MambaMixer: one key per block
            sizes = [s // tp for s in rule.blocks(dims)]
            for name, block in zip(rule.dist_keys, local.split(sizes), strict=False):
                req[f"{key}.{name}"] = ShardedTensor.from_rank_offsets(
                    f"{key}.{name}", torch.empty_like(block), (0, r, tp), replica_id=0
                )
                expected[f"{key}.{name}"] = block
        elif isinstance(rule, Blockwise):  # SwiGLU fc1: gate at fragment r, up at tp + r of 2 tp
            for i, half in enumerate(local.chunk(2)):
                req[f"{key}#{i}"] = ShardedTensor.from_rank_offsets(
                    key, torch.empty_like(half), (0, i * tp + r, 2 * tp), replica_id=0
                )
                expected[f"{key}#{i}"] = half
        else:
            axis = _axis(rule)
            offsets = [] if axis is None else [(axis, r, tp)]
            req[key] = ShardedTensor.from_rank_offsets(key, torch.empty_like(local), *offsets, replica_id=0)
            expected[key] = local
        assert rule in (COLUMN, ROW, REPLICATED, VOCAB, QKV) or isinstance(rule, Blockwise)
    return req, expected


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_loader_reads_our_torch_dist(hf_preset, tmp_path, dist_checkpointing, tp):
    src = hf_preset("tiny")
    dims = ParallelPlan(preset_config("tiny"), tp, 1).dims
    hf_to_megatron(src, tmp_path / "dist", tp=tp, fmt="torch_dist")
    hf_to_megatron(src, tmp_path / "legacy", tp=tp)
    legacy = LegacyCheckpoint(tmp_path / "legacy")
    for r in range(tp):
        req, expected = megatron_requests(legacy.model(r, 0), r, tp, dims)
        loaded = dist_checkpointing.load(
            {"model": req}, str(tmp_path / "dist" / "release"), validate_access_integrity=False
        )
        for k, t in expected.items():
            assert torch.equal(loaded["model"][k], t), k
        assert loaded["args"].tensor_model_parallel_size == tp


def test_verify_and_parity_read_torch_dist(hf_preset, tmp_path):
    from bridge.checks.parity import parity
    from bridge.checks.verify import verify

    src = hf_preset("tiny-mup")
    hf_to_megatron(src, tmp_path / "dist", tp=2, fmt="torch_dist")
    assert verify(src, tmp_path / "dist").ok
    report = parity(src, tmp_path / "dist", tokens=16)
    assert report.max_abs <= 1e-5 and report.top1_agreement == 1.0
