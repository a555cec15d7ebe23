"""megatron-core ``torch_dist`` checkpoints in Falcon-H1 terms, on top of ``torch_dist_io``.

torch_dist stores every tensor once, GLOBAL (what a TP=1 rank holds) under its global layer
number, so it reads as a single TP=1, PP=1 rank. Two Mamba tensors are stored as separate
blocks, as ``MambaMixer.sharded_state_dict`` saves them: ``in_proj.weight.{z,x,B,C,dt}`` and
``conv1d.{weight,bias}.{x,B,C}`` (which blocks, and their names, come from the table's rules).
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from bridge.engine.hf_rewrite import materialize
from bridge.engine.plan import ParallelPlan, hf_name
from bridge.errors import InputError
from bridge.families import all_block_keys, all_model_roots
from bridge.formats.base import MegatronFormat
from bridge.formats.detect import is_torch_dist
from bridge.formats.hf import LazyTensors
from bridge.plumbing import distributed
from bridge.plumbing.progress import Progress
from mappings.rules import Blockwise

CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def _block_names(key: str) -> tuple[str, ...]:
    """The blocks torch_dist stores ``key`` as (``in_proj.weight.{z,x,B,C,dt}``), or () for a whole tensor."""
    for suffix, names in all_block_keys().items():
        if key.endswith("." + suffix):
            return names
    return ()


def global_tensors(source, plan: ParallelPlan, materialize, entries=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(sharded key, global tensor) pairs of a whole model (or of ``entries``, some of
    ``plan.stage_entries(0)``), one at a time, for ``write_torch_dist``."""
    for param, layer, _ in plan.stage_entries(0) if entries is None else entries:
        full = param.rule.shard([source.get(hf_name(k, layer)) for k in param.hf], plan.dims, 1, 0)
        for key in plan.megatron_names(param, layer):
            names = _block_names(key)
            if names:
                assert isinstance(param.rule, Blockwise)  # only Blockwise rules have dist_keys
                for name, block in zip(names, full.split(param.rule.blocks(plan.dims), 0), strict=False):
                    yield f"{key}.{name}", materialize(block)
            else:
                yield key, materialize(full)


def global_keys(plan: ParallelPlan) -> list[str]:
    """The keys ``global_tensors`` yields for the whole model, in its order, computed without a tensor."""
    return [
        f"{key}.{name}" if name else key
        for param, layer, _ in plan.stage_entries(0)
        for key in plan.megatron_names(param, layer)
        for name in _block_names(key) or ("",)
    ]


def write(
    iter_dir: Path,
    source,
    plan: ParallelPlan,
    *,
    dtype: torch.dtype | None,
    args: Namespace,
    iteration: int,
    objects: dict[str, object] | None = None,
    progress: bool = False,
) -> int:
    """Global tensors streamed through DCP one batch at a time; ``objects``: ShardedObject payloads
    by key (Transformer Engine ``_extra_state``). Under torchrun each process writes its share of the
    parameters (``distributed``)."""
    from bridge.formats.torch_dist_io import (
        write_torch_dist,  # DCP costs ~1 s of imports; only torch_dist pays it
    )

    whole = ParallelPlan(
        plan.hf_config, plan.tp, 1, plan.divisible_by, plan.layout, padded_vocab=plan.dims.padded_vocab
    )
    count = 0

    def counted():
        nonlocal count
        with Progress(unit="tensor", desc="→torch_dist", disable=not progress) as bar:
            mine = distributed.current().share(whole.stage_entries(0))
            for item in global_tensors(source, whole, lambda t: materialize(t, dtype), mine):
                count += 1
                bar.update()
                yield item
                del item

    common = {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "content_metadata": CONTENT_METADATA}
    write_torch_dist(iter_dir, counted(), common, objects=objects, order=global_keys(whole))
    return count


class TorchDistCheckpoint:
    """A torch_dist iteration, presented like ``LegacyCheckpoint`` with one TP=1, PP=1 rank. Only
    model tensors are listed (the families' model roots); optimizer and RNG state stay unread on disk."""

    run_config: dict | None = None  # Megatron-Bridge's run_config.yaml, set by megatron_source.open_megatron

    tp = pp = 1
    format = "torch_dist"

    def __init__(self, root: Path, iter_dir: Path):
        self.root, self.iter_dir = Path(root), Path(iter_dir)
        if not is_torch_dist(self.iter_dir):
            raise InputError(f"{self.iter_dir}: no metadata.json; not a torch_dist checkpoint")
        from bridge.formats.torch_dist_io import TorchDistReader  # see write_checkpoint

        self.reader = TorchDistReader(self.iter_dir)
        self.args = self.reader.common.get("args")
        if self.args is not None and not isinstance(self.args, Namespace):
            raise InputError(
                f"{self.iter_dir}: common state 'args' is a {type(self.args).__name__}, expected an argparse Namespace"
            )
        self.iteration = self.reader.common.get("iteration", 0)
        self.model_keys = [k for k in self.reader.keys() if k.split(".", 1)[0] in all_model_roots()]
        self._parts: dict[str, list[str]] = {}
        for key in self.model_keys:
            base, _, name = key.rpartition(".")
            if name in _block_names(base):
                self._parts.setdefault(base, []).append(key)
        for base, keys in self._parts.items():
            names = _block_names(base)
            if sorted(keys) != sorted(f"{base}.{n}" for n in names):
                raise InputError(f"{self.iter_dir}: {base} must be stored as blocks {', '.join(names)}")
            self._parts[base] = [f"{base}.{n}" for n in names]

    def _names(self) -> list[str]:
        whole = [k for k in self.model_keys if k.rpartition(".")[0] not in self._parts]
        return whole + list(self._parts)

    def tensor_meta(self, tp_rank: int, pp_rank: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
        meta = {}
        for name in self._names():
            parts = self._parts.get(name, [name])
            shape = self.reader.shape(parts[0])
            rows = sum(self.reader.shape(p)[0] for p in parts)
            meta[name] = (torch.Size([rows, *shape[1:]]), self.reader.dtype(parts[0]))
        return meta

    def _load(self, name: str) -> torch.Tensor:
        """One model tensor; stored blocks are read into the rows of one tensor (no concatenation)."""
        if name in self._parts:
            return self.reader.load_stacked(self._parts[name])
        return self.reader.load([name])[name]

    def model(self, tp_rank: int, pp_rank: int) -> LazyTensors:
        return LazyTensors(self._names(), self._load)

    def rank_file(self, tp_rank: int, pp_rank: int) -> Path:
        return self.iter_dir

    def saved_parallelism(self) -> tuple[int | None, int | None]:
        """torch_dist stores global tensors: only ``args`` or ``run_config.yaml`` remember the TP/PP."""
        fields = vars(self.args) if self.args is not None else (self.run_config or {}).get("model", {})
        tp, pp = fields.get("tensor_model_parallel_size"), fields.get("pipeline_model_parallel_size")
        return (tp if isinstance(tp, int) else None), (pp if isinstance(pp, int) else None)

    def copied(self, shard: torch.Tensor) -> None:
        """Nothing to give back: tensors live in reused anonymous memory (dropping its pages would zero it)."""

    def release(self, done: Iterable[tuple[int, int, str]] = ()) -> None:
        """Nothing is mapped: tensors are read on request, and their bytes leave the page cache then."""


FORMAT = MegatronFormat("torch_dist", is_torch_dist, TorchDistCheckpoint, write, takes_objects=True)
