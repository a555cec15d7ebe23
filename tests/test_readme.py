"""The README's Python blocks marked ``<!-- runnable ... -->`` run as written, in an empty folder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"<!-- runnable[^>]*-->\n```python\n(.*?)```", README.read_text(), flags=re.S)
SESSIONS = re.findall(r"<!-- runnable[^>]*-->\n```text\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_marks_blocks():
    assert len(BLOCKS) >= 2 and len(SESSIONS) >= 1


@pytest.mark.parametrize("index", range(len(SESSIONS)))
def test_readme_session_runs(index, tmp_path, monkeypatch):
    """Each ``$ h1bridge ...`` line of a marked terminal session, in order, exits 0."""
    from click.testing import CliRunner

    import cli

    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line[2:])[1:] for line in SESSIONS[index].splitlines() if line.startswith("$ h1bridge ")]
    assert commands
    for args in commands:
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 0, (args, result.output)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
