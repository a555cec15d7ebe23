"""``--expand-groups``: run a model with fewer Mamba groups than TP ranks, exactly.

megatron-core asserts ``mamba_num_groups % tp == 0``; the released Falcon-H1 models have one
group. Replicating each group's B and C rows (and their conv1d channels) ``k`` times gives
``G*k`` groups in which every head still reads the same B and C: head ``h`` uses group
``h // (H/(G*k))``, a copy of its original group ``h // (H/G)``. That is exact only without the
gated RMSNorm, which normalises per group of ``d_ssm / n_groups`` channels. On export the
replicas are checked identical and collapsed back.
"""

from __future__ import annotations

import copy

import torch

from bridge.errors import InputError, UnsupportedError
from mappings import FalconH1Dims

# HF tensors holding B and C rows: key suffix -> (block sizes of the tensor, indices of B and C).
_BC_TENSORS = {
    "mamba.in_proj.weight": (lambda d: d.in_proj_blocks, (2, 3)),
    "mamba.in_proj.bias": (lambda d: d.in_proj_blocks, (2, 3)),
    "mamba.conv1d.weight": (lambda d: d.conv_blocks, (1, 2)),
    "mamba.conv1d.bias": (lambda d: d.conv_blocks, (1, 2)),
}


def expansion_factor(cfg, tp: int) -> int:
    """How many times each group must be replicated for ``tp`` ranks (1: none needed)."""
    if not hasattr(cfg, "mamba_n_groups"):
        raise UnsupportedError(f"--expand-groups: a {cfg.model_type} model has no Mamba groups to expand")
    groups = cfg.mamba_n_groups
    if groups % tp == 0:
        return 1
    if tp % groups:
        raise UnsupportedError(f"--expand-groups: TP={tp} is not a multiple of mamba_n_groups={groups}")
    if cfg.mamba_rms_norm:
        raise UnsupportedError(
            "--expand-groups: mamba_rms_norm is on, and its gated RMSNorm normalises per group of "
            "d_ssm/n_groups channels; more groups would change the normalisation, so replication is not exact"
        )
    if cfg.mamba_n_heads % tp:
        raise UnsupportedError(f"--expand-groups: mamba_n_heads={cfg.mamba_n_heads} not divisible by {tp} groups")
    return tp // groups


def expanded_config(cfg, factor: int):
    out = copy.deepcopy(cfg)
    out.mamba_n_groups = cfg.mamba_n_groups * factor
    return out


def _bc_entry(key: str):
    return next((v for suffix, v in _BC_TENSORS.items() if key.endswith(suffix)), None)


def _regroup(t: torch.Tensor, key: str, dims: FalconH1Dims, fn) -> torch.Tensor:
    entry = _bc_entry(key)
    if entry is None:
        return t
    blocks_of, bc = entry
    blocks = list(t.split(blocks_of(dims), 0))
    for i in bc:
        blocks[i] = fn(blocks[i].reshape(dims.mamba_groups, dims.d_state, *t.shape[1:]))
    return torch.cat(blocks, 0)


def expand(t: torch.Tensor, key: str, dims: FalconH1Dims, factor: int) -> torch.Tensor:
    """``dims`` of the original model; each group's rows repeated ``factor`` times in place."""
    return _regroup(t, key, dims, lambda g: g.repeat_interleave(factor, 0).flatten(0, 1))


def collapse(t: torch.Tensor, key: str, dims: FalconH1Dims, factor: int) -> torch.Tensor:
    """``dims`` of the expanded model; refuses replicas that training made different."""

    def one(g):
        replicas = g.reshape(dims.mamba_groups // factor, factor, *g.shape[1:])
        if not torch.equal(replicas, replicas[:, :1].expand_as(replicas)):
            raise InputError(
                f"{key}: replicated Mamba B/C groups differ; cannot collapse "
                f"{dims.mamba_groups} groups back to {dims.mamba_groups // factor}"
            )
        return replicas[:, 0].flatten(0, 1)

    return _regroup(t, key, dims, one)


class ExpandedSource:
    """An HF source seen with its Mamba groups replicated."""

    def __init__(self, source, dims: FalconH1Dims, factor: int):
        self.source, self.dims, self.factor = source, dims, factor

    def get(self, key: str) -> torch.Tensor:
        return expand(self.source.get(key), key, self.dims, self.factor)

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(key)
