"""Opening a Megatron checkpoint as training left it: which iteration, which model config, which
tokenizer files. Every reader (megatron-to-hf, reshard, verify, parity, inspect) goes through here.

The model config comes from the first place that has one: our ``hf_assets/config.json`` sidecar
(exact round trip), ``args`` (Megatron-LM, legacy rank files or the torch_dist common state), then
Megatron-Bridge's ``run_config.yaml``. ``--hf-config DIR`` overrides all three.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bridge.engine.config import hf_config_from_json, load_hf_config
from bridge.errors import InputError
from bridge.families import family_for_args, family_for_provider, family_of
from bridge.formats.base import MegatronReader
from bridge.formats.hf import NOT_ASSETS, WEIGHT_SUFFIXES
from bridge.formats.iterations import is_iteration_dir, resolve_iteration_dir
from bridge.formats.legacy import HF_ASSETS
from bridge.formats.registry import format_of
from bridge.formats.run_config import RUN_CONFIG, args_from_run_config, read_run_config
from bridge.plumbing.safe_files import MAX_JSON_BYTES, carried_file, folder_files, read_text_capped

_log = logging.getLogger(__name__)
MegatronCheckpoint = MegatronReader
MB_TOKENIZER = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
REFERENCE_FILES = ("generation_config.json",)
CARD = "README.md"


@dataclass(frozen=True)
class ReadOptions:
    """What a user can say about a Megatron source: ``--iteration``, ``--hf-config``, ``--hf-reference``."""

    iteration: int | str | None = None
    hf_config: Path | None = None
    hf_reference: Path | None = None


def open_megatron(path: Path, options: ReadOptions = ReadOptions()) -> MegatronCheckpoint:
    """The chosen iteration of a Megatron checkpoint, in whichever registered format it is."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: {'does not exist' if not path.exists() else 'not a directory'}")
    if not any(path.iterdir()):
        raise InputError(f"{path}: empty directory")
    iter_dir = resolve_iteration_dir(path, options.iteration)
    meg = format_of(iter_dir).open(path, iter_dir)
    meg.run_config = read_run_config(meg.iter_dir)
    return meg


def hf_assets_dir(meg: MegatronCheckpoint) -> Path:
    """Our sidecar lives beside the iteration folders (or beside the given iteration folder)."""
    root = meg.root if not is_iteration_dir(meg.root) else meg.root.parent
    return root / HF_ASSETS


def _config_from_training(meg: MegatronCheckpoint):
    """The HF config rebuilt from ``args``, else from ``run_config.yaml``, by the family they name;
    (None, None) when neither exists."""
    if meg.args is not None:
        args, where, label = vars(meg.args), "args", "checkpoint args"
        family = family_for_args(args, label)
    elif meg.run_config is not None:
        where, label = RUN_CONFIG, str(meg.iter_dir / RUN_CONFIG)
        family = family_for_provider(str(meg.run_config["model"].get("_target_", "")), label)
        args = args_from_run_config(meg.run_config)
    else:
        return None, None
    cfg = family.from_args(args, label)
    if "expanded_from_groups" in args:  # --expand-groups (families with Mamba groups)
        cfg.mamba_n_groups = args["expanded_from_groups"]
    return cfg, where


def megatron_hf_config(meg: MegatronCheckpoint, options: ReadOptions = ReadOptions()):
    """(HF config, the config.json file to copy byte for byte or None): see the module docstring."""
    if options.hf_config is not None:
        return load_hf_config(Path(options.hf_config)), Path(options.hf_config) / "config.json"
    sidecar = hf_assets_dir(meg) / "config.json"
    rebuilt, where = _config_from_training(meg)
    if os.path.lexists(sidecar):  # a FIFO or a link out is refused, not skipped
        cfg = hf_config_from_json(read_text_capped(carried_file(sidecar, sidecar.parent), MAX_JSON_BYTES), str(sidecar))
        if rebuilt is not None:
            for name in family_of(cfg).compared_fields:
                if getattr(cfg, name, None) != getattr(rebuilt, name, None):
                    raise InputError(
                        f"{sidecar}: {name}={getattr(cfg, name, None)!r} but the checkpoint's {where} "
                        f"has {getattr(rebuilt, name, None)!r}; pass --hf-config DIR to choose"
                    )
        return cfg, sidecar
    if rebuilt is None:
        raise InputError(
            f"{meg.iter_dir}: no model config: no {HF_ASSETS}/config.json, no 'args' in the "
            f"checkpoint and no {RUN_CONFIG}; pass --hf-config DIR (a folder with config.json)"
        )
    return rebuilt, None


def _files(folder: Path, names=None) -> list[Path]:
    """The files of ``folder`` to carry (``names``, else every non-weight file but config.json and the
    card): each a regular file inside the folder, or its Hub cache ``blobs/``; anything else refused."""
    return folder_files(
        folder,
        lambda p: (
            p.name in names
            if names
            else p.name not in NOT_ASSETS | {"config.json"} and not p.name.endswith(WEIGHT_SUFFIXES)
        ),
    )


def carried_assets(meg: MegatronCheckpoint, options: ReadOptions = ReadOptions()) -> list[Path]:
    """Tokenizer, generation config and model card for the HF output: from our sidecar, else
    Megatron-Bridge's ``tokenizer/``, else ``--hf-reference``; one warning when no tokenizer results."""
    chosen: dict[str, Path] = {}
    reference = Path(options.hf_reference) if options.hf_reference else None
    for source in (hf_assets_dir(meg), meg.iter_dir / MB_TOKENIZER):
        found = _files(source)
        if found:
            chosen.update((p.name, p) for p in found)
            break
    if reference is not None:
        if not any(name in chosen for name in TOKENIZER_FILES):
            chosen.update((p.name, p) for p in _files(reference))
        chosen.update((p.name, p) for p in _files(reference, REFERENCE_FILES) if p.name not in chosen)
    if not any(name in chosen for name in TOKENIZER_FILES):
        _log.warning(
            "%s: no tokenizer found (looked in %s/, %s/ and --hf-reference); the HF output will have none",
            meg.iter_dir,
            HF_ASSETS,
            MB_TOKENIZER,
        )
    return sorted(chosen.values())


def config_origin(meg: MegatronCheckpoint, sidecar: Path | None) -> str:
    if sidecar is not None:
        return HF_ASSETS if sidecar.parent.name == HF_ASSETS else "--hf-config"
    return "args" if meg.args is not None else RUN_CONFIG


def source_card(meg: MegatronCheckpoint, options: ReadOptions = ReadOptions()) -> Path | None:
    """The model card of the HF model the checkpoint came from: carried in our sidecar by
    ``hf-to-megatron``, else ``--hf-reference``'s; its front matter (license, base_model) is kept."""
    for folder in (hf_assets_dir(meg), Path(options.hf_reference) if options.hf_reference else None):
        if folder is not None and os.path.lexists(folder / CARD):
            return carried_file(folder / CARD, folder)
    return None
