"""``torch.load`` that never runs code from a checkpoint: weights_only plus a narrow allow-list.

Checkpoints legitimately pickle a few non-tensor types: Megatron's ``args`` Namespace (with
PosixPath / Signals fields) and Transformer Engine extra state (BytesIO). When a pickle names
``megatron.*`` types (real Megatron-LM ``args`` hold enums such as ``AttnBackend``), megatron-core's
own allow-list -- exactly what its loader accepts -- is added; that needs megatron-core installed.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import re
import signal
import types
from pathlib import Path

import torch

from bridge.errors import InputError

SAFE_GLOBALS = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, signal.Signals, io.BytesIO]


def _allow_list(src: Path | io.BytesIO) -> list:
    allowed = list(SAFE_GLOBALS)
    if any(n.startswith("megatron.") for n in torch.serialization.get_unsafe_globals_in_checkpoint(src)):
        from megatron.core.safe_globals import SAFE_GLOBALS as MEGATRON_SAFE_GLOBALS

        allowed += MEGATRON_SAFE_GLOBALS
    if isinstance(src, io.BytesIO):
        src.seek(0)
    # safe_globals() un-registers on exit everything it was given, even globals registered before
    # (``import megatron.core`` registers its list process-wide): pass only the new ones.
    registered = torch.serialization.get_safe_globals()
    return [g for g in allowed if g not in registered]


def safe_torch_load(src: Path | io.BytesIO, name: str, *, mmap: bool = False, error: type = InputError) -> object:
    """Loads ``src``; any refusal or corruption becomes one ``error`` line naming ``name``."""
    try:
        with torch.serialization.safe_globals(_allow_list(src)):
            return torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise error(f"{name}: missing") from None
    except ImportError as e:
        raise error(f"{name}: names megatron types; install megatron-core to read it ({e})") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"disallowed global {found.group(1)}" if found else "content outside the allow-list"
        raise error(f"{name}: refused to load: pickle contains {what} (only tensors and args allowed)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise error(f"{name}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
