"""Reading a Megatron checkpoint in HF key space: the plan of an existing checkpoint (layout detected,
every rank's keys, shapes and dtypes checked) and the gatherer that merges rank shards into HF
tensors one entry at a time (export, re-sharding, verify)."""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path

import torch

from bridge.engine.layout import (
    check_float_dtypes,
    check_megatron_layers,
    check_tensor_set,
    expected_hf_shapes,
    expected_rank_shapes,
    hf_index,
)
from bridge.engine.plan import ParallelPlan
from bridge.engine.source import MegatronCheckpoint
from bridge.errors import InputError
from bridge.families import family_of
from bridge.features.groups import collapse, expanded_config
from bridge.formats.hf import LazyTensors
from bridge.plumbing.fake import holds_data
from bridge.plumbing.recycled import RecycledMemory
from mappings.rules import allocating


def _groups_factor(meg: MegatronCheckpoint, cfg) -> int:
    """How many times ``--expand-groups`` replicated each Mamba group in this checkpoint."""
    if meg.args is None or not hasattr(meg.args, "expanded_from_groups"):
        return 1
    return meg.args.mamba_num_groups // cfg.mamba_n_groups


def _detect_layout(meg: MegatronCheckpoint, cfg, hf_shapes, divisible_by: int, padded: int | None) -> ParallelPlan:
    """The layout whose key names match rank 0 of the first stage; then every rank is checked fully."""
    found = set(meg.model(0, 0))
    for name in family_of(cfg).layouts:
        plan = ParallelPlan(cfg, meg.tp, meg.pp, divisible_by, name, padded_vocab=padded)
        if set(expected_rank_shapes(plan, hf_shapes, 0)) == found:
            return plan
    default = next(iter(family_of(cfg).layouts))
    return ParallelPlan(cfg, meg.tp, meg.pp, divisible_by, default, padded_vocab=padded)


def megatron_plan(meg: MegatronCheckpoint, cfg) -> tuple[ParallelPlan, dict[str, torch.Size]]:
    """Plan of an existing checkpoint, with every rank's keys and shapes validated against it, and the
    HF shapes of the model it holds. With expanded groups the plan describes the shards (more groups)."""
    check_megatron_layers(str(meg.rank_file(0, 0)), cfg, [meg.tensor_meta(0, pp) for pp in range(meg.pp)])
    hf_model_shapes = expected_hf_shapes(cfg)
    factor = _groups_factor(meg, cfg)
    if factor > 1:
        cfg = expanded_config(cfg, factor)
    hf_shapes = expected_hf_shapes(cfg)
    args = vars(meg.args) if meg.args is not None else {}
    divisible_by = args.get("make_vocab_size_divisible_by", 128)
    emb = meg.tensor_meta(0, 0).get("embedding.word_embeddings.weight")
    padded = args.get("padded_vocab_size") or (emb[0][0] * meg.tp if emb is not None else None)
    plan = _detect_layout(meg, cfg, hf_shapes, divisible_by, padded)
    for tp_rank, pp_rank in plan.ranks():
        meta = meg.tensor_meta(tp_rank, pp_rank)
        check_tensor_set(
            str(meg.rank_file(tp_rank, pp_rank)),
            {k: shape for k, (shape, _) in meta.items()},
            expected_rank_shapes(plan, hf_shapes, pp_rank),
        )
        check_float_dtypes(str(meg.rank_file(tp_rank, pp_rank)), {k: dtype for k, (_, dtype) in meta.items()})
    return plan, hf_model_shapes


class MegatronToHF:
    """Gathers HF tensors from rank shards; remembers the last merged entry (q/k/v share one merge) and
    gives back the rank files' pages every ``release_bytes`` read, so memory stays bounded on any model
    size. Shards merged more than ``in_flight`` entries ago are read for the last time: their bytes
    leave the page cache then (a merge may be a view of its shards while a writer still copies it)."""

    release_bytes = 64 * 2**20
    in_flight = 4

    def __init__(self, meg: MegatronCheckpoint, plan: ParallelPlan, dtype: torch.dtype | None):
        self.meg, self.plan, self.out_dtype = meg, plan, dtype
        self.index = hf_index(plan)
        original = getattr(meg.args, "expanded_from_groups", None) if meg.args is not None else None
        self.groups_factor = plan.hf_config.mamba_n_groups // original if original else 1
        self._last: tuple[tuple[object, int | None], list[torch.Tensor]] | None = None
        self._since_release = 0
        self.memory = RecycledMemory()
        self._merged: collections.deque[list[tuple[int, int, str]]] = collections.deque()  # shards, by merge

    def _stage(self, param, layer) -> tuple[int, int | None]:
        if layer is not None:
            return self.plan.stage_of_layer(layer)
        return (0 if param.stage == "first" else self.plan.pp - 1), None

    def merged(self, key: str) -> torch.Tensor:
        param, layer, pos = self.index[key]
        if self._last is None or self._last[0] != (param, layer):
            pp_rank, local = self._stage(param, layer)
            name, *copies = self.plan.megatron_names(param, local)
            shards = [self._read(t, pp_rank, name, copies) for t in range(self.plan.tp)]
            self._since_release += sum(t.numel() * t.element_size() for t in shards)
            try:
                # Merged into reused memory (fresh pages are dear); a dry run's fake shards as they are.
                with (
                    allocating(self.memory.empty, self.meg.copied)
                    if holds_data(shards[0])
                    else contextlib.nullcontext()
                ):
                    outs = param.rule.merge(shards, self.plan.dims)
            except ValueError as e:
                raise InputError(f"{self.meg.iter_dir}: {name}: {e}") from None
            del shards
            self._merged.append([(t, pp_rank, n) for t in range(self.plan.tp) for n in (name, *copies)])
            if self._since_release > self.release_bytes:  # pages read so far count as resident: give them back
                self._since_release = 0
                self._release(keep=self.in_flight)
            self._last = ((param, layer), outs)
        outs = self._last[1]
        if len(outs) == 1:  # nothing else shares this merge: the caller's reference is the only one
            self._last = None
        out = outs[pos]
        return collapse(out, key, self.plan.dims, self.groups_factor) if self.groups_factor > 1 else out

    def _release(self, keep: int) -> None:
        done = []
        while len(self._merged) > keep:
            done += self._merged.popleft()
        self.meg.release(done)

    def release(self) -> None:
        """Reading is over: every shard read leaves memory and the page cache."""
        self._last = None
        self._release(keep=0)

    def _read(self, tp_rank: int, pp_rank: int, name: str, copies: list[str]) -> torch.Tensor:
        model = self.meg.model(tp_rank, pp_rank)
        tensor = model[name]
        for copy in copies:
            if model[copy] is not tensor and not torch.equal(model[copy], tensor):
                raise InputError(
                    f"{self.meg.rank_file(tp_rank, pp_rank)}: {copy} differs from {name}; "
                    "they hold the same shared norm"
                )
        return tensor

    get = merged  # a Megatron checkpoint read as an HF source (re-sharding)

    def tensor(self, key: str) -> torch.Tensor:
        """One HF tensor in the output dtype, contiguous but possibly a view of the merged shards (a
        row block, the vocabulary without padding): the safetensors writer reads it where it lies, a
        copy would only cost fresh memory."""
        merged = self.merged(key)
        return (merged if self.out_dtype is None else merged.to(self.out_dtype)).contiguous()

    def tensors(self, keys: list[str]) -> LazyTensors:
        return LazyTensors(keys, self.tensor)

    def dtype(self, key: str) -> torch.dtype:
        """What ``get(key)`` returns: the stored dtype (rank 0's)."""
        param, layer, _ = self.index[key]
        pp_rank, local = self._stage(param, layer)
        return self.meg.tensor_meta(0, pp_rank)[self.plan.megatron_name(param, local)][1]


class SavedRanks:
    """A checkpoint of global tensors (torch_dist) seen as the TP x PP ranks that saved it, each rank's
    tensors sliced from the global ones as megatron-core's sharded load hands them out
    (``Rule.saved_slice``) and named with stage-local layer numbers, as in legacy rank files.
    ``plan``: the saved TP/PP."""

    def __init__(self, meg: MegatronCheckpoint, plan: ParallelPlan):
        self.meg, self.plan = meg, plan
        self.tp, self.pp, self.iter_dir = plan.tp, plan.pp, meg.iter_dir
        self._global = ParallelPlan(
            plan.hf_config, plan.tp, 1, plan.divisible_by, plan.layout, padded_vocab=plan.dims.padded_vocab
        )
        self._stored = set(meg.tensor_meta(0, 0))

    def _global_name(self, param, layer: int | None) -> str:
        name = self._global.megatron_name(param, layer)
        if name not in self._stored and param.when == "tied_pp":  # tied head: stored once, as the embedding
            return "embedding.word_embeddings.weight"
        return name

    def model(self, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for param, layer, local in self.plan.stage_entries(pp_rank):
            full = self.meg.model(0, 0)[self._global_name(param, layer)]
            shard = param.rule.saved_slice(full, self.plan.dims, self.tp, tp_rank)
            out.update((name, shard) for name in self.plan.megatron_names(param, local))
        return out

    def rank_file(self, tp_rank: int, pp_rank: int) -> Path:
        return self.iter_dir
