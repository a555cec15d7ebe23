"""Push a converted Hugging Face folder to the Hub, with a model card that records how it was made.

All Hub traffic goes through ``huggingface_hub`` (endpoint, token discovery, retries, LFS/Xet).
The order is: validate the folder locally (no request is sent for a folder that would publish a
broken model), build the card in memory, then ``create_repo`` / ``create_branch`` /
``create_commit``. The user's folder is never written to: the card travels as bytes in the commit.

The token comes from the ``token`` argument or huggingface_hub's usual places (``HF_TOKEN``,
``hf auth login``). It is handed to ``HfApi`` only; it never appears in results, errors or the card.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    HFValidationError,
    filter_repo_objects,
    validate_repo_id,
)

from bridge.engine.layout import check_tensor_set, expected_hf_shapes
from bridge.errors import InputError, OutputError
from bridge.formats.hf import HFCheckpoint
from bridge.plumbing.safe_files import MAX_JSON_BYTES, carried_file, read_text_capped

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
CARD_TAGS = ["falcon-h1", "falcon-h1-bridge"]
# The provenance section is fenced so a later push of the same repo replaces it instead of stacking copies.
PROVENANCE_BEGIN = "<!-- falcon-h1-bridge:provenance -->"
PROVENANCE_END = "<!-- /falcon-h1-bridge:provenance -->"
# Provenance keys that could hold credentials are never rendered (a CLI may pass its whole argument dict).
_SECRET_KEY = re.compile(r"token|secret|password|credential|api[_-]?key", re.IGNORECASE)
# Keys that belong to the card's front matter rather than to the provenance table.
_FRONT_MATTER_KEYS = ("base_model", "license")
_LABELS = {
    "source_format": "Source format",
    "source": "Source checkpoint",
    "tp": "Tensor parallel (TP)",
    "pp": "Pipeline parallel (PP)",
    "iteration": "Iteration",
    "source_writer": "Written by",
    "dtype": "dtype",
    "mup_policy": "µP policy",
    "bitnet_packing": "BitNet packing",
    "tool_version": "falcon-h1-bridge version",
    "verification": "Verification",
}


class HubValidationError(InputError, ValueError):
    """The folder (or repo id) would publish a broken model; raised before any request is sent."""


class HubPushError(OutputError):
    """The Hub refused or dropped the push; the message is one line, names the step and never holds the token."""


@dataclass(frozen=True)
class PlannedFile:
    path: str  # path in the repo (POSIX, relative)
    size: int  # bytes
    local_path: Path | None  # None for the generated README.md


@dataclass
class PushPlan:
    """What ``push`` would send; ``--dry-run`` prints it and sends nothing."""

    folder: Path
    repo_id: str
    revision: str
    create_pr: bool
    private: bool
    files: list[PlannedFile]
    card_text: str = field(repr=False)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def lines(self) -> list[str]:
        """Human-readable listing: one header line, then ``size  path`` per file."""
        target = f"{self.repo_id}@{self.revision}" + (" (as a pull request)" if self.create_pr else "")
        head = f"{len(self.files)} files, {_human(self.total_bytes)} -> {target}"
        return [head] + [f"{_human(f.size):>10}  {f.path}" for f in self.files]


@dataclass
class PushResult:
    """Outcome of ``push``; for a dry run only ``plan`` is filled."""

    plan: PushPlan
    dry_run: bool
    repo_url: str | None = None
    commit_oid: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None


# --------------------------------------------------------------------------------------------- validation


def validate_hf_folder(folder: Path) -> list[str]:
    """Checks that ``folder`` loads as a Falcon-H1 transformers model; returns warnings, raises if it would not.

    The same strict reader the converter uses does the work (headers only, no tensor data read):
    config.json is a valid Falcon-H1 config, the index agrees with the shards key by key, and the
    tensor names and shapes are what transformers builds for that config. Shards nobody maps are
    refused (a stale conversion); a missing tokenizer only warns: the weights are still usable.
    """
    folder = Path(folder)
    if (folder / WEIGHTS_INDEX).is_file() and (folder / SINGLE_WEIGHTS).is_file():
        raise HubValidationError(f"{folder / SINGLE_WEIGHTS}: present next to {WEIGHTS_INDEX}; one is stale, remove it")
    try:
        ckpt = HFCheckpoint(folder)
        shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
        check_tensor_set(str(folder), shapes, expected_hf_shapes(ckpt.config))
    except InputError as e:
        raise HubValidationError(str(e)) from None
    warnings = _unreferenced_weights(folder, set(ckpt.key_to_file.values()))
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        warnings.append(f"{folder}: no tokenizer ({', '.join(TOKENIZER_FILES)}); AutoTokenizer will not load the repo")
    return warnings


def _unreferenced_weights(folder: Path, referenced: set[str]) -> list[str]:
    warnings = []
    for path in sorted(folder.rglob("*.safetensors")):
        if path.relative_to(folder).as_posix() in referenced:
            continue
        if path.parent != folder or not _SHARD_NAME.fullmatch(path.name):
            warnings.append(f"{path}: not referenced by the weights; uploaded but never loaded")
        else:  # a shard nobody maps: a stale conversion or a broken index
            raise HubValidationError(f"{path}: a weight shard that the index does not reference")
    return warnings


# --------------------------------------------------------------------------------------------- model card


def build_model_card(folder: Path, provenance: dict[str, Any], *, title: str | None = None) -> ModelCard:
    """The README.md for the repo: Hub metadata so the model is found and loads, and how it was converted.

    ``provenance`` is rendered as a table, whatever keys it holds (known ones get readable labels);
    ``base_model`` and ``license`` go to the front matter instead; keys that look like credentials
    are dropped. An existing ``README.md`` in ``folder`` is kept: its metadata is completed and the
    provenance section is appended, or replaced when one exists (kept as it is when ``provenance``
    says nothing: the conversion wrote it).
    """
    folder = Path(folder)
    provenance = {k: v for k, v in (provenance or {}).items() if not _SECRET_KEY.search(str(k))}
    provenance.setdefault("tool_version", tool_version())
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=provenance.get("base_model"),
        license=provenance.get("license"),
        tags=list(CARD_TAGS),
    )
    section = _provenance_section(folder, provenance)
    readme = folder / "README.md"
    if not os.path.lexists(readme):
        title = title or folder.resolve().name
        body = f"\n# {title}\n\nFalcon-H1 checkpoint in Hugging Face transformers format.\n\n{section}"
        return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card = ModelCard(read_text_capped(carried_file(readme, folder), MAX_JSON_BYTES), ignore_metadata_errors=True)
    for key, value in data.to_dict().items():
        if key == "tags":
            existing = list(card.data.get("tags") or [])
            card.data["tags"] = existing + [t for t in value if t not in existing]
        elif card.data.get(key) is None:
            card.data[key] = value
    fenced = re.compile(re.escape(PROVENANCE_BEGIN) + ".*?" + re.escape(PROVENANCE_END), re.DOTALL)
    if fenced.search(card.text) and set(provenance) <= {"tool_version"}:
        pass  # a push with nothing new to say keeps the provenance written at conversion
    elif fenced.search(card.text):
        card.text = fenced.sub(lambda _: section.strip(), card.text)
    else:
        card.text = card.text.rstrip() + "\n\n" + section
    return card


def _provenance_section(folder: Path, provenance: dict[str, Any]) -> str:
    weights = sorted(folder.rglob("*.safetensors"))
    rows = [("Weights", f"{len(weights)} safetensors file(s), {_human(sum(p.stat().st_size for p in weights))}")]
    rows += [
        (_LABELS.get(k, str(k).replace("_", " ").capitalize()), _cell(v))
        for k, v in provenance.items()
        if k not in _FRONT_MATTER_KEYS
    ]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    return (
        f"{PROVENANCE_BEGIN}\n## Conversion provenance\n\n"
        f"Converted with falcon-h1-bridge.\n\n| Field | Value |\n|---|---|\n{table}\n{PROVENANCE_END}\n"
    )


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, dict):
        text = "; ".join(f"{k}: {v}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    elif value is None:
        text = "-"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def tool_version() -> str:
    """falcon-h1-bridge's version: from the installed package, else from the source tree's pyproject.toml."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("falcon-h1-bridge")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        match = pyproject.is_file() and re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
        return match.group(1) if match else "unknown"


# --------------------------------------------------------------------------------------------- push


def plan_push(
    folder: Path,
    repo_id: str,
    *,
    revision: str | None = None,
    create_pr: bool = False,
    private: bool = False,
    provenance: dict[str, Any] | None = None,
) -> PushPlan:
    """Validates and lists what would be uploaded, without any network access (``--dry-run``)."""
    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubValidationError(f"repo id {repo_id!r}: {_first_line(e)}") from None
    uploads = _folder_files(folder)  # first: no file of the folder is read before this check
    warnings = validate_hf_folder(folder)
    card_text = str(build_model_card(folder, provenance or {}, title=repo_id.split("/")[-1]))
    files = [PlannedFile(rel, path.stat().st_size, path) for rel, path in uploads.items()]
    files.append(PlannedFile("README.md", len(card_text.encode("utf-8")), None))
    files.sort(key=lambda f: f.path)
    return PushPlan(folder, repo_id, revision or "main", create_pr, private, files, card_text, warnings)


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    provenance: dict[str, Any] | None = None,
    token: str | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Validates ``folder`` and uploads it, plus a generated model card as README.md, in one commit.

    Why one ``create_commit`` and not ``upload_folder``: the commit is atomic, so the branch never
    shows half a checkpoint (an index naming shards that are not there yet); the folder's files are
    referenced by path (``CommitOperationAdd(path_or_fileobj=path)``, nothing is copied) and the card
    is added as in-memory bytes, so the folder is untouched; and it is still resumable: after a failure,
    re-running sends no data twice (with Xet, uploaded chunks are deduplicated; over LFS, the batch
    endpoint skips objects already stored). ``upload_large_folder`` no longer exists in
    huggingface_hub 2.x; its multi-commit pipeline now lives inside ``upload_folder`` and would
    publish a checkpoint in several commits. A commit is limited to 25k LFS files and 1 GB of
    small (non-LFS) files, far above a converted checkpoint (tens of files, a few small JSONs).

    ``private`` only applies when the repo is created (otherwise the namespace default is kept).
    A ``revision`` other than main is created as a branch from main if missing; with
    ``create_pr`` the commit opens a pull request against ``revision`` (main by default).
    ``endpoint`` defaults to ``HF_ENDPOINT`` read now, then huggingface_hub's default. Large files
    go through Xet whenever ``hf_xet`` is installed (huggingface_hub decides client-side, the
    server is not asked); for a Hub-compatible server without Xet, start with ``HF_HUB_DISABLE_XET=1``
    to get plain LFS.
    """
    plan = plan_push(folder, repo_id, revision=revision, create_pr=create_pr, private=private, provenance=provenance)
    if dry_run:
        return PushResult(plan=plan, dry_run=True)
    token = token or get_token()
    if not token:
        raise HubPushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (pushing needs write access)")
    if len(token) >= 8 and token in plan.card_text:  # real tokens are ~37 characters
        raise HubValidationError("provenance: holds the Hub token; refusing to publish it in the model card")
    operations = [
        CommitOperationAdd(f.path, f.local_path if f.local_path else plan.card_text.encode("utf-8")) for f in plan.files
    ]
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    step = "create_repo"
    try:
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        repo_id = repo_url.repo_id  # canonical id: the Hub fills in the namespace if none was given
        if revision and revision != "main" and not revision.startswith("refs/"):
            step = "create_branch"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "commit"
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload Falcon-H1 checkpoint (falcon-h1-bridge {tool_version()})",
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as e:  # HfHubHTTPError, httpx transport errors, RuntimeError wrapping an LFS failure...
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = "; re-run to resume (data already uploaded is not sent again)" if status is None or status >= 500 else ""
        detail = _scrub(_describe(e), token)
        raise HubPushError(f"push to {repo_id}@{plan.revision} failed at {step}: {detail}{hint}") from None
    return PushResult(
        plan=plan,
        dry_run=False,
        repo_url=str(repo_url),
        commit_oid=info.oid,
        commit_url=str(info.commit_url),
        pr_url=info.pr_url,
    )


def _folder_files(folder: Path) -> dict[str, Path]:
    """Files to upload: everything but .git/ and huggingface_hub's .cache/; README.md is replaced by the card.
    Each must be a regular file inside ``folder`` (or its Hub cache ``blobs/``): a FIFO, device, socket,
    ``/proc`` file or a symlink out of the folder is refused before anything is sent."""
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if not p.is_dir()}
    kept = filter_repo_objects(list(files), ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    try:
        return {rel: carried_file(files[rel], folder) for rel in kept if rel != "README.md"}
    except InputError as e:
        raise HubValidationError(str(e)) from None


def _describe(exc: BaseException) -> str:
    """First line of an exception and of its causes (an LFS failure wraps the HTTP error)."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 3:
        line = _first_line(current)
        server_message = getattr(current, "server_message", None)
        if server_message and server_message not in line:
            line += f" ({_first_line(server_message)})"
        if not any(line in part for part in parts):  # HfHubHTTPError repeats its httpx cause
            parts.append(line)
        current = current.__cause__
    return ": ".join(parts)


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _first_line(e: object) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
