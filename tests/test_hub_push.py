"""``bridge.hub``: validation, model card and push, against the in-process fake Hub (no internet)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from bridge.hub import (
    HubPushError,
    HubValidationError,
    build_model_card,
    push,
    tool_version,
    validate_hf_folder,
)

TOKEN = "hf_SECRETtoken123"
REPO = "acme/falcon-h1-tiny"
# huggingface_hub's LFS PUT passes a file object as `data=`, which httpx2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

PROVENANCE = {
    "base_model": "tiiuae/Falcon-H1-0.5B-Base",
    "license": "other",
    "source_format": "megatron-legacy",
    "tp": 4,
    "pp": 2,
    "dtype": "bf16",
    "mup_policy": "folded",
    "bitnet_packing": "none",
    "verification": {"tensors": 37, "max_abs_diff": 0.0},
    "hub_token": TOKEN,  # a careless caller's argument dict: must be dropped, never rendered
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Falcon-H1 saved in 50 KB shards, so it comes with an index (built once)."""
    import torch
    from transformers import FalconH1Config, FalconH1ForCausalLM

    cfg = FalconH1Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=64,
        mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, vocab_size=128, intermediate_size=96,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "falcon-h1-tiny"
    FalconH1ForCausalLM(cfg).save_pretrained(folder, max_shard_size="50KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


@pytest.fixture
def folder(tiny_model, tmp_path) -> Path:
    """A private copy tests may break."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file_byte_identical(hub, folder, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}
    result = push(folder, REPO, token=TOKEN, endpoint=hub.url, provenance=PROVENANCE, private=True)

    repo = hub.repos[REPO]
    assert repo.visibility == "private"
    remote, local = repo.files("main"), local_files(folder)
    assert set(remote) == set(local) | {"README.md", ".gitattributes"}
    assert {p: sha256(remote[p]) for p in local} == {p: sha256(b) for p, b in local.items()}
    shards = {p for p in local if p.endswith(".safetensors")}
    assert shards <= repo.commits[repo.refs["main"]].lfs_paths  # went through LFS batch + PUT + verify
    assert result.commit_oid == repo.refs["main"] and not result.dry_run and result.pr_url is None
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")} == before  # folder untouched
    assert {r.authorization for r in hub.requests if not r.path.startswith("/_lfs/")} == {f"Bearer {TOKEN}"}

    # and a standard client can download it back from the fake
    shard = sorted(shards)[0]
    got = huggingface_hub.hf_hub_download(REPO, shard, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    assert Path(got).read_bytes() == local[shard]


def test_model_card_front_matter_and_provenance(hub, folder):
    push(folder, REPO, token=TOKEN, endpoint=hub.url, provenance=PROVENANCE)
    card = ModelCard(hub.repos[REPO].files("main")["README.md"].decode())

    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "tiiuae/Falcon-H1-0.5B-Base"
    assert card.data.license == "other"
    assert {"falcon-h1", "falcon-h1-bridge"} <= set(card.data.tags)
    for row in (
        "| Source format | megatron-legacy |",
        "| Tensor parallel (TP) | 4 |",
        "| Pipeline parallel (PP) | 2 |",
        "| dtype | bf16 |",
        "| µP policy | folded |",
        "| BitNet packing | none |",
        "| Verification | tensors: 37; max_abs_diff: 0.0 |",
        f"| falcon-h1-bridge version | {tool_version()} |",
    ):
        assert row in card.text
    assert "token" not in card.text.lower()


def test_existing_readme_is_completed_not_replaced(folder):
    (folder / "README.md").write_text("---\nlicense: mit\ntags: [mine]\n---\n# My model\n\nHand-written notes.\n")
    card = build_model_card(folder, {"tp": 2})
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.tags == ["mine", "falcon-h1", "falcon-h1-bridge"]
    assert "Hand-written notes." in card.text and "| Tensor parallel (TP) | 2 |" in card.text

    (folder / "README.md").write_text(str(card))  # as downloaded from an earlier push
    again = build_model_card(folder, {"tp": 8})
    assert again.text.count("## Conversion provenance") == 1 and "| Tensor parallel (TP) | 8 |" in again.text


def test_revision_lands_on_branch_not_main(hub, folder):
    result = push(folder, REPO, token=TOKEN, endpoint=hub.url, revision="conversion-v2")
    repo = hub.repos[REPO]
    assert set(repo.files("main")) == {".gitattributes"}
    assert "config.json" in repo.files("conversion-v2")
    assert result.commit_oid == repo.refs["conversion-v2"]

    # pushing again to an existing branch works (create_branch exist_ok)
    push(folder, REPO, token=TOKEN, endpoint=hub.url, revision="conversion-v2")
    assert repo.commits[repo.refs["conversion-v2"]].parent == result.commit_oid


def test_create_pr_opens_pull_request(hub, folder):
    result = push(folder, REPO, token=TOKEN, endpoint=hub.url, create_pr=True, commit_message="Add tiny H1")
    repo = hub.repos[REPO]
    assert result.pr_url == f"{hub.url}/{REPO}/discussions/1"
    assert repo.pull_requests[1] == {"target": "main", "title": "Add tiny H1"}
    assert "config.json" in repo.files("refs/pr/1") and set(repo.files("main")) == {".gitattributes"}


def _missing_shard(folder: Path) -> str:
    (folder / "model-00003-of-00010.safetensors").unlink()
    return "names shard 'model-00003-of-00010.safetensors', which does not exist"


def _other_model_type(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    return "config.json: model_type is 'gpt2'"


def _unknown_model_type(folder: Path) -> str:
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    return "config.json: model_type is 'no-such-model', expected one of 'falcon_h1', 'llama'"


def _no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return "config.json: missing"


def _index_names_absent_tensor(folder: Path) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00010.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "'model.ghost.weight' is mapped to 'model-00001-of-00010.safetensors' but that shard does not hold it"


def _drop_from_index(folder: Path, key: str) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_tensor_not_in_index(folder: Path) -> str:
    _drop_from_index(folder, "model.layers.0.feed_forward.up_proj.weight")  # shard 2 also holds gate_proj
    return "model-00002-of-00010.safetensors: tensor 'model.layers.0.feed_forward.up_proj.weight' is not listed"


def _shard_not_in_index(folder: Path) -> str:
    _drop_from_index(folder, "model.embed_tokens.weight")  # the only tensor of shard 1
    return "missing tensor 'model.embed_tokens.weight'"


def _truncated_shard(folder: Path) -> str:
    path = folder / "model-00002-of-00010.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return "model-00002-of-00010.safetensors: not a readable safetensors file"


@pytest.mark.parametrize(
    "damage",
    [_missing_shard, _other_model_type, _unknown_model_type, _no_config, _index_names_absent_tensor,
     _shard_tensor_not_in_index, _shard_not_in_index, _truncated_shard],
)  # fmt: skip
def test_invalid_folder_refused_before_any_request(hub, folder, damage):
    expected = damage(folder)
    with pytest.raises(HubValidationError) as info:
        push(folder, REPO, token=TOKEN, endpoint=hub.url)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert isinstance(info.value, ValueError)
    assert hub.requests == []


@pytest.mark.parametrize("where", ["commit", "lfs-upload"])
def test_interrupted_upload_can_be_rerun(hub, folder, where):
    shards = sorted(p for p in folder.glob("*.safetensors"))
    if where == "commit":  # the commit POST is not retried by huggingface_hub: the push fails
        hub.fail_once("POST", r"/commit/")
        with pytest.raises(HubPushError, match=r"failed at commit: .*500"):
            push(folder, REPO, token=TOKEN, endpoint=hub.url)
        assert set(hub.repos[REPO].files("main")) == {".gitattributes"}  # nothing half-published
        assert len(hub.lfs) == len(shards)  # ... but the shards were stored
    else:  # LFS PUTs go through http_backoff: a single 500 is retried after ~1 s and the push goes on
        hub.fail_once("PUT", r"^/_lfs/")

    push(folder, REPO, token=TOKEN, endpoint=hub.url)

    remote = hub.repos[REPO].files("main")
    assert all(remote[p.name] == p.read_bytes() for p in folder.iterdir() if p.is_file())
    puts = [line for line in hub.request_lines() if line.startswith("PUT ")]
    assert len(puts) == len(shards) + (where == "lfs-upload")  # the re-run sent no shard twice


def test_token_never_leaks(hub, folder, capfd, monkeypatch):
    seen: list[str] = []
    result = push(folder, REPO, token=TOKEN, endpoint=hub.url, provenance=PROVENANCE)
    seen += [repr(result), str(result.plan.lines()), result.plan.card_text]

    hub.fail_once("POST", r"/commit/", status=401)
    with pytest.raises(HubPushError) as info:
        push(folder, REPO, token=TOKEN, endpoint=hub.url)
    seen += [str(info.value), repr(info.value)]

    with pytest.raises(HubValidationError) as info:  # the token value under an innocent key
        push(folder, REPO, token=TOKEN, endpoint=hub.url, provenance={"note": TOKEN})
    seen += [str(info.value)]

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # discovered by huggingface_hub, not passed
    seen += [repr(push(folder, REPO, endpoint=hub.url))]

    out, err = capfd.readouterr()
    for text in seen + [out, err]:
        assert TOKEN not in text
    assert hub.requests[-1].authorization == f"Bearer {TOKEN}"  # it was used, just never shown


def test_no_token_refused_before_any_request(hub, folder):
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        push(folder, REPO, endpoint=hub.url)
    assert hub.requests == []


def test_dry_run_lists_files_and_sends_nothing(hub, folder):
    (folder / "stale-model.safetensors").write_bytes((folder / "model-00001-of-00010.safetensors").read_bytes())
    result = push(folder, REPO, endpoint=hub.url, dry_run=True, provenance=PROVENANCE)  # no token needed

    assert hub.requests == [] and result.dry_run and result.commit_oid is None
    plan = result.plan
    sizes = {f.path: f.size for f in plan.files}
    assert sizes == {**{p: len(b) for p, b in local_files(folder).items()}, "README.md": len(plan.card_text.encode())}
    assert plan.total_bytes == sum(sizes.values())
    lines = plan.lines()
    assert lines[0].startswith(f"{len(sizes)} files") and lines[0].endswith(f"{REPO}@main")
    assert all(any(line.endswith(f"  {path}") for line in lines[1:]) for path in sizes)
    assert any("stale-model.safetensors: not referenced" in w for w in plan.warnings)
    assert any("no tokenizer" in w for w in plan.warnings)
    assert not (folder / "README.md").exists()


def test_tokenizer_present_means_no_warning(folder):
    (folder / "tokenizer.json").write_text("{}")
    assert validate_hf_folder(folder) == []


def test_cli_megatron_to_hf_push_to(hub, hf_preset, tmp_path, monkeypatch, capsys):
    """The CLI path users run: convert Megatron -> HF and publish, token from the environment."""
    from click.testing import CliRunner

    import cli
    from bridge.engine.convert import hf_to_megatron

    hf_to_megatron(hf_preset("tiny"), tmp_path / "meg", tp=4, pp=2, fmt="torch_dist")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = CliRunner().invoke(
        cli.main,
        [
            "megatron-to-hf",
            str(tmp_path / "meg"),
            str(tmp_path / "hf"),
            "--push-to",
            REPO,
            "--revision",
            "converted",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    files = hub.repos[REPO].files("converted")
    for path in (tmp_path / "hf").iterdir():
        assert files[path.name] == path.read_bytes()
    card = files["README.md"].decode()
    for row in ("| Source format | torch_dist |", "| Tensor parallel (TP) | 4 |", "| Pipeline parallel (PP) | 2 |"):
        assert row in card, card
    assert json.loads(result.stdout)["push"]["revision"] == "converted"
