"""The Megatron checkpoint formats, by name. Adding one is a module implementing
``bridge.formats.base`` plus one line here."""

from __future__ import annotations

from pathlib import Path

from bridge.errors import InputError
from bridge.formats import legacy, torch_dist
from bridge.formats.base import MegatronFormat

# In Megatron-LM's detection order (``_get_checkpoint_format``): torch_dist, then legacy.
FORMATS: dict[str, MegatronFormat] = {f.name: f for f in (torch_dist.FORMAT, legacy.FORMAT)}


def format_of(iter_dir: Path) -> MegatronFormat:
    """The format of an iteration folder; a damaged torch_dist folder (``.metadata`` or ``common.pt``
    without ``metadata.json``) is reported as such."""
    for fmt in FORMATS.values():
        if fmt.recognizes(iter_dir):
            return fmt
    if (iter_dir / ".metadata").is_file() or (iter_dir / "common.pt").is_file():
        raise InputError(
            f"{iter_dir / 'metadata.json'}: missing; the directory holds torch_dist files "
            "(.metadata, common.pt) but a torch_dist checkpoint needs all three"
        )
    raise InputError(
        f"{iter_dir}: no mp_rank_* directories and no torch_dist metadata.json; not a Megatron iteration folder"
    )
