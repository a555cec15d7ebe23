"""Error types with the exit codes the CLI promises (documented in the README)."""

from __future__ import annotations

import os
import re
import unicodedata


class BridgeError(Exception):
    """A problem the user can fix; the message is one line naming the file/key and the expectation."""

    exit_code = 3


class InputError(BridgeError):
    """The input checkpoint is missing, malformed or inconsistent."""

    exit_code = 3


class OutputError(BridgeError):
    """The output location is unusable: exists without --force, inside the input, not writable."""

    exit_code = 4


class UnsupportedError(BridgeError):
    """The request is well-formed but Megatron (or this tool) cannot do it, e.g. a TP that does not divide."""

    exit_code = 5


class VerificationFailed(BridgeError):
    """Two checkpoints differ beyond tolerance."""

    exit_code = 1


# ------------------------------------------------------------------------------ one-line messages

_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """A value (a ``--token``) that ``redact`` must hide, like the tokens in the environment."""
    if value and len(value) >= 8:  # a short value would blank unrelated text, and is no credential
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with the active Hub token (``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``, ``--token``)
    and anything shaped like a Hub token (``hf_`` + 30 or more letters/digits) replaced."""
    active = {*_secrets, *(os.environ.get(name, "").strip() for name in _TOKEN_ENV)}
    for secret in sorted((s for s in active if len(s) >= 8), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _HUB_TOKEN.sub("hf_***", text)


def sanitize(text: str, limit: int = 200) -> str:
    """One printable line of at most ``limit`` characters, secrets redacted: for messages that may
    quote file content or an exception's text. Line breaks and tabs become spaces, other control
    and format characters (NUL, ESC, bidi overrides) are dropped -- before redacting, so they cannot
    split a token out of its pattern."""
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Zl", "Zp") or ch in "\t\n\r\v\f":
            kept.append(" ")
        elif category not in ("Cc", "Cf", "Cs"):
            kept.append(ch)
    line = " ".join(redact("".join(kept)).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
