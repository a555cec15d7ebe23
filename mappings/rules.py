"""Tensor-parallel rules: pure functions between HF tensors and Megatron per-rank shards.

Each rule answers two questions and nothing else:

* ``pieces(hf, dims, tp, rank)`` -- which tensor does TP rank ``rank`` hold, given the HF
  tensors of one table entry (in the entry's ``hf`` key order)? Answered as views of the inputs
  whose concatenation on dim 0 is the shard, so a writer can copy them straight into its output
  buffer; ``shard`` concatenates them.
* ``merge(shards, dims)`` -- which HF tensors do the ``tp`` rank shards come from?

``to_megatron`` / ``to_hf`` are the all-ranks forms. Rules work on any device, including
``meta``, which is how the planner learns per-rank shapes without touching data.
Returned shards may be views of the input; callers that persist them must ``clone()``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .dims import FalconH1Dims

Tensor = torch.Tensor


class ShardError(ValueError):
    """A tensor does not have the shape a rule expects (wrong config, TP or file)."""


def _chunk(t: Tensor, tp: int, dim: int, what: str) -> tuple[Tensor, ...]:
    if t.shape[dim] % tp:
        raise ShardError(f"{what}: size {t.shape[dim]} on dim {dim} is not divisible by TP={tp}")
    return t.chunk(tp, dim)


Empty = Callable[[torch.Size, torch.dtype], Tensor]
Copied = Callable[[Tensor], None]
_MEMORY: contextvars.ContextVar[tuple[Empty, Copied | None] | None] = contextvars.ContextVar("memory", default=None)


@contextmanager
def allocating(empty: Empty, copied: Copied | None = None) -> Iterator[None]:
    """Merges in this thread build their results in memory from ``empty(shape, dtype)`` (a pool of
    reused buffers: fresh pages are dear) instead of ``torch.empty``, copying shard after shard and
    calling ``copied(shard)`` once each is in (so that a memory-mapped shard's pages can go before the
    next is read: a merge then holds its result and one shard, not every shard); the rules stay pure."""
    token = _MEMORY.set((empty, copied))
    try:
        yield
    finally:
        _MEMORY.reset(token)


def _cat_into(parts: Sequence[Tensor], dim: int, out: Tensor | None = None) -> Tensor:
    """``torch.cat`` into ``out`` (a contiguous view) or into memory from ``allocating``."""
    if out is None:
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        out = _empty_like(parts[0], torch.Size(shape))
    memory = _MEMORY.get()
    if memory is None or memory[1] is None:
        return torch.cat(list(parts), dim, out=out)
    offset = 0
    for part in parts:
        out.narrow(dim, offset, part.shape[dim]).copy_(part)
        offset += part.shape[dim]
        memory[1](part)
    return out


def _empty_like(t: Tensor, shape: torch.Size) -> Tensor:
    memory = _MEMORY.get()
    return t.new_empty(shape) if memory is None else memory[0](shape, t.dtype)  # a fake or meta t gives its kind


def _cat(shards: Sequence[Tensor], dim: int) -> Tensor:
    """The shards joined on ``dim``; a single shard is returned as it is (TP=1, torch_dist: no copy)."""
    return shards[0] if len(shards) == 1 else _cat_into(shards, dim)


def _cat_rows(parts: Sequence[Tensor]) -> Tensor:
    """``torch.cat(parts, 0)``. Meta tensors (the planner's per-rank shapes) of one dtype and matching
    trailing dims are joined by their shapes alone: torch's meta ``cat`` is a Python reference whose
    first call imports ``torch._dynamo`` and sympy (~0.5 s), which nothing else in a conversion needs."""
    first = parts[0]
    if first.dim() and all(p.is_meta and p.dtype == first.dtype and p.shape[1:] == first.shape[1:] for p in parts):
        return first.new_empty((sum(p.shape[0] for p in parts), *first.shape[1:]))
    return torch.cat(list(parts), 0)


def _identical(shards: Sequence[Tensor]) -> bool:
    """Replicas agree; the same object is its own replica (a dry run's data-less tensors are shared)."""
    return all(s is shards[0] or (s.shape == shards[0].shape and torch.equal(s, shards[0])) for s in shards[1:])


class Rule:
    """Base: ``to_megatron`` and ``to_hf`` are derived from ``shard`` and ``merge``."""

    name = "rule"

    def pieces(self, hf: Sequence[Tensor], dims: FalconH1Dims, tp: int, rank: int) -> list[Tensor]:
        raise NotImplementedError

    def shard(self, hf: Sequence[Tensor], dims: FalconH1Dims, tp: int, rank: int) -> Tensor:
        parts = self.pieces(hf, dims, tp, rank)
        return parts[0] if len(parts) == 1 else _cat_rows(parts)

    def merge(self, shards: Sequence[Tensor], dims: FalconH1Dims) -> list[Tensor]:
        raise NotImplementedError

    def saved_slice(self, full: Tensor, dims: FalconH1Dims, tp: int, rank: int) -> Tensor:
        """What megatron-core's sharded load hands TP rank ``rank`` of the global (TP=1) Megatron tensor
        as torch_dist stores it: a contiguous chunk on the TP axis (dim 0 unless the rule says)."""
        return _chunk(full, tp, 0, self.name)[rank]

    def to_megatron(self, hf: Sequence[Tensor], dims: FalconH1Dims, tp: int) -> list[Tensor]:
        return [self.shard(hf, dims, tp, rank) for rank in range(tp)]

    def to_hf(self, shards: Sequence[Tensor], dims: FalconH1Dims) -> list[Tensor]:
        return self.merge(shards, dims)

    def __repr__(self) -> str:
        return self.name


class Replicated(Rule):
    """Every rank holds the full tensor (norms, row-parallel biases)."""

    name = "replicated"

    def pieces(self, hf, dims, tp, rank):
        return [hf[0]]

    def saved_slice(self, full, dims, tp, rank):
        return full

    def merge(self, shards, dims):
        if not _identical(shards):
            raise ShardError("replicated tensor differs between TP ranks")
        return [shards[0]]


@dataclass(frozen=True, repr=False)
class Split(Rule):
    """Contiguous split on one dim: dim 0 = column parallel, dim 1 = row parallel."""

    dim: int

    @property
    def name(self) -> str:  # type: ignore[override]
        return {0: "column", 1: "row"}.get(self.dim, f"split{self.dim}")

    def pieces(self, hf, dims, tp, rank):
        return [_chunk(hf[0], tp, self.dim, self.name)[rank]]

    def saved_slice(self, full, dims, tp, rank):
        return _chunk(full, tp, self.dim, self.name)[rank]

    def merge(self, shards, dims):
        return [_cat(shards, self.dim)]


class VocabSplit(Rule):
    """Embedding / output layer: pad rows to Megatron's padded vocab, split on dim 0; trim on export."""

    name = "vocab"

    def pieces(self, hf, dims, tp, rank):
        t = hf[0]
        if t.shape[0] > dims.padded_vocab:
            raise ShardError(f"vocab: {t.shape[0]} rows exceed padded vocab {dims.padded_vocab}")
        if dims.padded_vocab % tp:
            raise ShardError(f"vocab: padded size {dims.padded_vocab} is not divisible by TP={tp}")
        rows = dims.padded_vocab // tp
        begin, end = rank * rows, (rank + 1) * rows
        real = t[min(begin, t.shape[0]) : min(end, t.shape[0])]
        pad = rows - real.shape[0]  # only the rank(s) past the real vocabulary hold zero rows
        return [real] if not pad else [p for p in (real, t.new_zeros((pad, *t.shape[1:]))) if p.shape[0]]

    def merge(self, shards, dims):
        full = _cat(shards, 0)
        if full.shape[0] < dims.vocab:
            raise ShardError(f"vocab: {full.shape[0]} rows, fewer than vocab_size {dims.vocab}")
        return [full[: dims.vocab]]


@dataclass(frozen=True, repr=False)
class Blockwise(Rule):
    """Several row blocks, each split across ranks on its own, concatenated per rank.

    One rule serves three fused Megatron tensors: Mamba ``in_proj`` (z|x|B|C|dt, from one HF
    tensor), ``conv1d`` (x|B|C, one HF tensor) and SwiGLU ``linear_fc1`` (gate|up, two HF
    tensors). A plain chunk of the fused tensor would hand rank 0 all of z and none of dt.
    """

    label: str
    blocks: Callable[[FalconH1Dims], list[int]]
    fused_hf: bool  # True: the blocks are rows of a single HF tensor
    dist_keys: tuple[str, ...] = ()  # torch_dist stores these blocks under separate keys (MambaMixer)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    def _hf_blocks(self, hf, dims):
        sizes = self.blocks(dims)
        if not self.fused_hf:
            return list(hf)
        if hf[0].shape[0] != sum(sizes):
            raise ShardError(f"{self.name}: {hf[0].shape[0]} rows, expected {sum(sizes)} = {sizes}")
        return list(hf[0].split(sizes, 0))

    def pieces(self, hf, dims, tp, rank):
        return [_chunk(b, tp, 0, self.name)[rank] for b in self._hf_blocks(hf, dims)]

    def saved_slice(self, full, dims, tp, rank):
        """Each block chunked on its own (MambaMixer's split factories; SwiGLU's two fragments)."""
        return torch.cat([_chunk(b, tp, 0, self.name)[rank] for b in full.split(self.blocks(dims), 0)], 0)

    def merge(self, shards, dims):
        tp = len(shards)
        local = [s // tp for s in self.blocks(dims)]
        per_rank = []
        for s in shards:
            if s.shape[0] != sum(local):
                raise ShardError(f"{self.name}: rank shard has {s.shape[0]} rows, expected {sum(local)}")
            per_rank.append(s.split(local, 0))
        if tp == 1:  # the one shard already is the fused tensor, its blocks are views of it
            return [shards[0]] if self.fused_hf else list(per_rank[0])
        if not self.fused_hf:
            return [_cat_into([r[i] for r in per_rank], 0) for i in range(len(local))]
        fused = _empty_like(shards[0], torch.Size([sum(self.blocks(dims)), *shards[0].shape[1:]]))
        for i, block in enumerate(fused.split(self.blocks(dims), 0)):  # each block's rank pieces, in place
            _cat_into([r[i] for r in per_rank], 0, out=block)
        return [fused]


class QKVInterleave(Rule):
    """GQA: Megatron stores [q heads of group g | k_g | v_g] for each query group g, split by rows.

    With ``num_query_groups >= tp`` each rank holds whole groups; with fewer groups than ranks
    (megatron-core's ``num_query_groups < world_size`` path) a group spans several ranks.
    """

    name = "qkv"

    @staticmethod
    def _group_rows(dims):
        q_per_group = dims.n_heads // dims.n_kv_heads
        return [q_per_group * dims.head_dim, dims.head_dim, dims.head_dim]

    def pieces(self, hf, dims, tp, rank):
        """Rows [rank * n, (rank + 1) * n) of the interleaved tensor, cut from the q/k/v group slices
        they overlap; nothing else is built."""
        g = dims.n_kv_heads
        per_group = [t.reshape(g, -1, *t.shape[1:]) for t in hf]  # q, k, v as [group, rows, ...]
        group_rows = sum(t.shape[1] for t in per_group)
        if g * group_rows % tp:
            raise ShardError(f"qkv: size {g * group_rows} on dim 0 is not divisible by TP={tp}")
        n = g * group_rows // tp
        begin, end, out, row = rank * n, (rank + 1) * n, [], 0
        for group in range(g):
            for t in per_group:
                size = t.shape[1]
                lo, hi = max(begin - row, 0), min(end - row, size)
                if lo < hi:
                    out.append(t[group, lo:hi])
                row += size
        return out

    def merge(self, shards, dims):
        rows = self._group_rows(dims)
        rest = shards[0].shape[1:]
        fused = _cat(shards, 0)
        if fused.shape[0] != dims.n_kv_heads * sum(rows):
            raise ShardError(f"qkv: {fused.shape[0]} rows, expected {dims.n_kv_heads * sum(rows)}")
        q, k, v = fused.reshape(dims.n_kv_heads, sum(rows), *rest).split(rows, 1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


REPLICATED = Replicated()
COLUMN = Split(0)
ROW = Split(1)
VOCAB = VocabSplit()
QKV = QKVInterleave()
MAMBA_IN_PROJ = Blockwise("mamba_in_proj[z|x|B|C|dt]", lambda d: d.in_proj_blocks, True, ("z", "x", "B", "C", "dt"))
MAMBA_CONV1D = Blockwise("mamba_conv1d[x|B|C]", lambda d: d.conv_blocks, True, ("x", "B", "C"))
GATED_MLP = Blockwise("gated_mlp[gate|up]", lambda d: d.mlp_blocks, fused_hf=False)
