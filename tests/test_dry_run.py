"""--dry-run: the plan lists exactly the files and bytes the real run writes, reads no tensor data and
writes nothing; a real run refuses up front when the disk cannot hold the output."""

from __future__ import annotations

import mmap

import pytest
from conftest import evict, resident_pages

from bridge import api
from bridge.engine import dry_run
from bridge.engine.dry_run import file_sizes
from bridge.errors import OutputError
from bridge.plumbing import page_cache
from bridge.tiny import make_tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TO_MEGATRON = [
    dict(tp=2, pp=2),
    dict(tp=2, fmt="torch_dist"),
    dict(tp=2, target="megatron-bridge"),
    dict(tp=4, layout="mlm-parallel-hybrid", dtype="bf16"),
]


@pytest.mark.parametrize("options", TO_MEGATRON, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_hf_to_megatron_plan_is_the_output(hf_preset, tmp_path, options):
    src = hf_preset("tiny")
    planned = api.hf_to_megatron(src, tmp_path / "out", dry_run=True, **options)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # nothing written, no partial
    api.hf_to_megatron(src, tmp_path / "out", **options)
    assert planned.plan["files"] == file_sizes(tmp_path / "out")
    assert planned.plan["bytes"] == sum(file_sizes(tmp_path / "out").values())


@pytest.fixture(scope="module")
def megatron_sources(hf_preset, tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    out = {}
    for name, options in {"legacy": dict(tp=2, pp=2), "torch_dist": dict(tp=2, fmt="torch_dist")}.items():
        api.hf_to_megatron(hf_preset("tiny"), root / name, **options)
        out[name] = root / name
    return out


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("options", [dict(), dict(dtype="bf16", max_shard_size="300KB")], ids=["keep", "bf16-sharded"])
def test_megatron_to_hf_plan_is_the_output(megatron_sources, tmp_path, fmt, options):
    planned = api.megatron_to_hf(megatron_sources[fmt], tmp_path / "hf", dry_run=True, **options)
    assert list(tmp_path.iterdir()) == []
    api.megatron_to_hf(megatron_sources[fmt], tmp_path / "hf", **options)
    assert planned.plan["files"] == file_sizes(tmp_path / "hf")


@pytest.mark.parametrize(
    "fmt, options",
    [("legacy", dict(tp=1, pp=1, fmt="torch_dist")), ("torch_dist", dict(tp=4, pp=2, fmt="legacy"))],
)
def test_reshard_plan_is_the_output(megatron_sources, tmp_path, fmt, options):
    planned = api.reshard(megatron_sources[fmt], tmp_path / "r", dry_run=True, **options)
    assert list(tmp_path.iterdir()) == []
    api.reshard(megatron_sources[fmt], tmp_path / "r", **options)
    assert planned.plan["files"] == file_sizes(tmp_path / "r")


@pytest.mark.parametrize("fn", [api.fold_mup, api.unfold_mup])
def test_mup_plan_is_the_output(hf_preset, tmp_path, fn):
    src = hf_preset("tiny")
    if fn is api.unfold_mup:
        api.fold_mup(src, tmp_path / "folded")
        src = tmp_path / "folded"
    planned = fn(src, tmp_path / "out", dtype="bf16", dry_run=True)
    assert not (tmp_path / "out").exists()
    fn(src, tmp_path / "out", dtype="bf16")
    assert planned.plan["files"] == file_sizes(tmp_path / "out")


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_bitnet_plan_is_the_output(hf_preset, tmp_path, preset):
    planned = api.pack_checkpoint(hf_preset(preset), tmp_path / "packed", dry_run=True)
    assert list(tmp_path.iterdir()) == []
    api.pack_checkpoint(hf_preset(preset), tmp_path / "packed")
    assert planned.plan["files"] == file_sizes(tmp_path / "packed")
    planned = api.unpack_checkpoint(tmp_path / "packed", tmp_path / "plain", dtype="bf16", dry_run=True)
    api.unpack_checkpoint(tmp_path / "packed", tmp_path / "plain", dtype="bf16")
    assert planned.plan["files"] == file_sizes(tmp_path / "plain")


@pytest.mark.parametrize("direction", ["hf-to-megatron", "megatron-to-hf"])
def test_dry_run_reads_no_tensor_data(tmp_path, direction, monkeypatch):
    """Large tensors, their pages evicted: after a dry run almost none are back in the page cache (headers,
    indexes and the kernel's read-ahead around them only), where a real run reads every page (told to
    keep them cached, so that the check can see them)."""
    hf = tmp_path / "hf"
    make_tiny(hf, "tiny", hidden_size=1024, intermediate_size=4096, vocab_size=8192)
    src = hf
    if direction == "megatron-to-hf":
        src = tmp_path / "meg"
        api.hf_to_megatron(hf, src, tp=2)
    weights = [p for p in src.rglob("*") if p.suffix in (".safetensors", ".pt")]
    total = sum(-(-p.stat().st_size // mmap.PAGESIZE) for p in weights)
    evict(weights)
    run = api.hf_to_megatron if direction == "hf-to-megatron" else api.megatron_to_hf
    run(src, tmp_path / "out", dry_run=True)
    assert sum(resident_pages(p) for p in weights) < total / 10
    evict(weights)
    monkeypatch.setattr(page_cache, "forget", lambda fd, offset, length: None)
    run(src, tmp_path / "out")
    assert sum(resident_pages(p) for p in weights) > total / 2  # the check can see reads


def test_real_run_refuses_when_the_disk_is_too_small(hf_preset, tmp_path, monkeypatch):
    monkeypatch.setattr(dry_run, "disk_free", lambda dst: 1000)
    with pytest.raises(OutputError, match="needs .* but only 0.0 MiB are free"):
        api.hf_to_megatron(hf_preset("tiny"), tmp_path / "out", tp=2)
    assert list(tmp_path.iterdir()) == []
    planned = api.hf_to_megatron(hf_preset("tiny"), tmp_path / "out", tp=2, dry_run=True)
    assert planned.plan["fits"] is False and planned.plan["disk_free"] == 1000


def test_cli_dry_run_text_and_json(hf_preset, tmp_path):
    from click.testing import CliRunner

    import cli

    runner = CliRunner()
    text = runner.invoke(cli.main, ["hf-to-megatron", str(hf_preset("tiny")), str(tmp_path / "m"), "--dry-run"])
    assert text.exit_code == 0, text.output
    assert text.output.startswith("dry run, nothing written") and "release/mp_rank_00/model_optim_rng.pt" in text.output
    out = runner.invoke(cli.main, ["megatron-to-hf", str(tmp_path / "m"), str(tmp_path / "h"), "--dry-run"])
    assert out.exit_code == 3  # the source must exist: a dry run refuses what the real run refuses
    assert list(tmp_path.iterdir()) == []
