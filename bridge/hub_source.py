"""HF sources given as Hub ids (``org/name``), as Megatron-Bridge and transformers accept them.

An id is resolved to a local snapshot with huggingface_hub's ``snapshot_download``: only the files a
conversion reads (weights, index, config, tokenizer, generation config, card), into the user's cache
(``HF_HUB_CACHE`` / ``HF_HOME``), offline when ``HF_HUB_OFFLINE`` is set, from ``HF_ENDPOINT`` when set.
The environment is read at
call time, so a caller (or a test) that sets it after import is honoured. A path that exists always
wins over an id of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bridge.errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "README.md",
]
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(spec: str | Path) -> bool:
    """``org/name`` that is not an existing path (``./org/name`` is always a path)."""
    text = str(spec)
    return not Path(text).exists() and bool(HUB_ID.match(text)) and not text.startswith(".")


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def resolve_hf_source(spec: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """The local folder for ``spec``: the path itself, or the snapshot of Hub repo ``spec`` at
    ``revision``. Errors are one line naming the id and never the token."""
    if not is_hub_id(spec):
        return Path(spec)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or constants.HF_HUB_OFFLINE
    where = f"{spec}" + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(
            str(spec),
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            cache_dir=_cache_dir(),
            local_files_only=offline,
            token=token,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except GatedRepoError:
        raise InputError(f"{where}: gated repo; accept its terms on the Hub and pass --token") from None
    except RepositoryNotFoundError:
        raise InputError(f"{where}: no such model repo on the Hub, or no access to it (pass --token)") from None
    except RevisionNotFoundError:
        raise InputError(f"{where}: the repo has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        cache = _cache_dir() or constants.HF_HUB_CACHE
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise InputError(f"{where}: not in the Hugging Face cache ({cache}) and {reason}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{where}: download failed ({detail[:200]})") from None
    return Path(folder)
