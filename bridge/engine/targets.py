"""What each training stack's loader needs beside the weights, with its default settings.

* ``megatron-lm``: ``args`` that pass ``check_checkpoint_args`` and ``--use-checkpoint-args``,
  ``checkpoint_version`` 3.0, and ``release/`` with tracker ``release`` (or ``iter_N``, N >= 1:
  some Megatron-LM versions assert ``iteration > 0 or release`` on the tracker). Legacy or torch_dist.
* ``megatron-bridge``: torch_dist only; ``_extra_state`` objects for every Transformer Engine module
  of its Falcon-H1 spec (a missing requested key fails the default ``assume_ok_unexpected`` load);
  ``run_config.yaml`` (the provider); ``train_state.pt`` and ``latest_train_state.pt`` (its loader
  finds the iteration through their ``step``, which has no "release" value, and its ``read_metadata``
  refuses a tracker of 0, so the default iteration is 1); ``tokenizer/``; the vocabulary unpadded
  (``should_pad_vocab: false``) whenever TP divides it.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch

from bridge.errors import UnsupportedError
from bridge.families import ModelFamily
from bridge.formats.iterations import LATEST_TRAIN_STATE, RELEASE, TRAIN_STATE
from bridge.formats.run_config import RUN_CONFIG, run_config_yaml
from bridge.plumbing.atomic import torch_save
from bridge.plumbing.safe_files import copy_regular
from mappings import padded_vocab_size

MEGATRON_LM = "megatron-lm"
MEGATRON_BRIDGE = "megatron-bridge"
TARGETS = (MEGATRON_LM, MEGATRON_BRIDGE)
DEFAULT_TARGET = MEGATRON_LM
MB_TOKENIZER = "tokenizer"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class Target:
    """One stack's requirements, resolved against the user's options."""

    name: str
    fmt: str
    iteration: int | str

    @property
    def is_bridge(self) -> bool:
        return self.name == MEGATRON_BRIDGE

    def padded_vocab(self, vocab: int, divisible_by: int, tp: int) -> int:
        """Megatron-Bridge keeps the vocabulary as it is when every TP rank gets whole rows."""
        if self.is_bridge and vocab % tp == 0:
            return vocab
        return padded_vocab_size(vocab, divisible_by, tp)

    def extra_args(self) -> dict:
        """``args`` fields Megatron-LM's ``check_checkpoint_args`` / ``load_args_from_checkpoint`` read
        that a plain conversion would not otherwise record."""
        return {
            "ckpt_format": "torch" if self.fmt == "legacy" else "torch_dist",
            "tokenizer_type": "HuggingFaceTokenizer",
            "data_parallel_random_init": False,
        }


def resolve_target(
    name: str,
    fmt: str | None,
    layout: str,
    iteration: int | str | None,
    default_layout: str = "bridge",
    spec: str = "Falcon-H1",
) -> Target:
    """Checks the options against the stack and fills in its defaults (see the module docstring)."""
    if name not in TARGETS:
        raise UnsupportedError(f"--target {name!r}: expected one of {', '.join(TARGETS)}")
    if iteration is not None and iteration != RELEASE and (not isinstance(iteration, int) or iteration < 1):
        raise UnsupportedError(
            f"--iteration {iteration}: expected N >= 1 or 'release' (Megatron refuses a tracker of 0)"
        )
    if name == MEGATRON_LM:
        return Target(name, fmt or "legacy", RELEASE if iteration is None else iteration)
    if fmt not in (None, "torch_dist"):
        raise UnsupportedError(f"--target {MEGATRON_BRIDGE} loads only torch_dist checkpoints, not --format {fmt}")
    if layout != default_layout:
        raise UnsupportedError(
            f"--target {MEGATRON_BRIDGE} needs --layout {default_layout} (its current {spec} spec), not {layout}"
        )
    if iteration == RELEASE:
        raise UnsupportedError(
            f"--target {MEGATRON_BRIDGE}: latest_train_state.pt cannot name a release "
            "checkpoint; pass --iteration N (N >= 1)"
        )
    return Target(name, "torch_dist", 1 if iteration is None else iteration)


def extra_state_objects(family: ModelFamily, num_layers: int) -> dict[str, object]:
    """The ``_extra_state`` ShardedObjects of the family's Megatron-Bridge model, as TE saves them when
    no FP8 state exists (an empty uint8 tensor); megatron-core's own linear saves None."""
    te, plain = family.extra_state_modules(num_layers)
    objects: dict[str, object] = {f"{m}._extra_state": torch.empty(0, dtype=torch.uint8) for m in te}
    objects.update((f"{m}._extra_state", None) for m in plain)
    return objects


def train_state(step: int) -> dict[str, torch.Tensor]:
    """Megatron-Bridge's ``TrainState.state_dict()`` as its ``train_state_finalize_fn`` saves it."""
    return {
        "step": torch.tensor(step, dtype=torch.int64),
        "consumed_train_samples": torch.tensor(0, dtype=torch.int64),
        "skipped_train_samples": torch.tensor(0, dtype=torch.int64),
        "consumed_valid_samples": torch.tensor(0, dtype=torch.int64),
        "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float32),
        "do_train": torch.tensor(False),
        "do_valid": torch.tensor(False),
        "do_test": torch.tensor(False),
    }


def write_bridge_files(
    family: ModelFamily,
    root: Path,
    iter_dir: Path,
    args: Namespace,
    *,
    save: str,
    init_method_std: float,
    iteration: int,
    assets: list[Path],
) -> None:
    """run_config.yaml, train_state.pt and tokenizer/ in the iteration; latest_train_state.pt at the root."""
    model = family.provider_fields(vars(args), init_method_std=init_method_std)
    tokenizer = [p for p in assets if p.name in _TOKENIZER_FILES]
    (iter_dir / RUN_CONFIG).write_text(run_config_yaml(model, save=save, with_tokenizer=bool(tokenizer)))
    torch_save(train_state(iteration), iter_dir / TRAIN_STATE)
    torch_save(train_state(iteration), root / LATEST_TRAIN_STATE)
    if tokenizer:
        (iter_dir / MB_TOKENIZER).mkdir()
        for path in tokenizer:
            copy_regular(path, iter_dir / MB_TOKENIZER / path.name)
