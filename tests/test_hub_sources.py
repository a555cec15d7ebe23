"""Hub ids as HF sources (``org/name``: fake Hub, pre-populated cache with HF_HUB_OFFLINE=1), and the
provenance card written at conversion and kept by a later push."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from bridge.checks.verify import verify
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.hub import push
from bridge.hub_source import resolve_hf_source

TOKEN = "hf_SECRETtoken123"
REPO = "acme/falcon-h1-src"
CARD = "---\nlicense: apache-2.0\nbase_model: tiiuae/Falcon-H1-0.5B-Base\n---\n# Source model\n"
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def published(hub, hf_preset, tmp_path, monkeypatch):
    """A tiny Falcon-H1 with a card, pushed to the fake Hub; the cache is empty and private to the test."""
    src = tmp_path / "src"
    shutil.copytree(hf_preset("tiny"), src)
    (src / "README.md").write_text(CARD)
    push(src, REPO, token=TOKEN, endpoint=hub.url)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return src


def _run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_hub_id_converts_from_the_hub_then_offline_from_the_cache(published, hub, tmp_path, monkeypatch):
    code, _, err = _run("hf-to-megatron", REPO, tmp_path / "online", "--tp", "2", "--json")
    assert code == 0, err
    assert verify(published, tmp_path / "online").ok
    requests = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run("hf-to-megatron", REPO, tmp_path / "offline", "--tp", "2", "--json")
    assert code == 0, err
    assert len(hub.requests) == requests  # served from the cache alone
    assert verify(published, tmp_path / "offline").ok


def test_offline_and_not_cached_is_one_line(published, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run("hf-to-megatron", REPO, tmp_path / "out", "--tp", "2")
    assert code == 3 and err.count("\n") == 1 and "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()


def test_unknown_repo_and_revision(published, tmp_path):
    code, _, err = _run("inspect", "acme/no-such-model")
    assert code == 3 and "no such model repo" in err and TOKEN not in err
    code, _, err = _run("inspect", REPO, "--revision", "v9")
    assert code == 3 and "no revision 'v9'" in err


def test_hub_ids_for_checks_and_references(published, tmp_path):
    hf_to_megatron(published, tmp_path / "meg", tp=2)
    for args in (
        ("verify", REPO, tmp_path / "meg"),
        ("parity", REPO, tmp_path / "meg", "--tokens", "4"),
        ("megatron-to-hf", tmp_path / "meg", tmp_path / "back", "--hf-config", REPO, "--hf-reference", REPO),
    ):
        code, _, err = _run(*args)
        assert code == 0, (args, err)


def test_a_path_wins_over_an_id_of_the_same_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "local").mkdir(parents=True)
    assert resolve_hf_source("acme/local") == Path("acme/local")


def test_card_written_at_conversion_survives_a_later_push(hub, hf_preset, tmp_path, monkeypatch):
    """torch_dist TP=4 -> HF: the folder's own card names the source, and a push without provenance keeps it."""
    src = tmp_path / "src"
    shutil.copytree(hf_preset("tiny"), src)
    (src / "README.md").write_text(CARD)
    hf_to_megatron(src, tmp_path / "dist", tp=4, fmt="torch_dist")
    megatron_to_hf(tmp_path / "dist", tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    for text in (
        "license: apache-2.0",
        "base_model: tiiuae/Falcon-H1-0.5B-Base",
        "# Source model",
        "| Source format | torch_dist |",
        "| Tensor parallel (TP) | 4 |",
    ):
        assert text in card, card
    push(tmp_path / "hf", "acme/converted", token=TOKEN, endpoint=hub.url)
    pushed = hub.repos["acme/converted"].files("main")["README.md"].decode()
    for text in (
        "license: apache-2.0",
        "base_model: tiiuae/Falcon-H1-0.5B-Base",
        "| Source format | torch_dist |",
        "| Tensor parallel (TP) | 4 |",
    ):
        assert text in pushed, pushed
