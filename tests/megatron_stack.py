"""Write a Megatron-training-style torch_dist checkpoint with megatron-core's OWN writer.

Test helper, not a test: a one-rank gloo group plays every (pp, tp) rank at once, so the files
are exactly what ``megatron.core.dist_checkpointing.save`` produces for the importable
megatron-core (0.16.x writes ``common.pt``; 0.19.x stores the common state as a ``common_state``
ShardedObject inside the shards), including optimizer state, RNG state and TE ``_extra_state``.

The writer starts a ``spawn`` multiprocessing Manager once per process (~4 s; later saves take
tens of ms), so a plain script calling this needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import random
import socket
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

#: Row-parallel weights: megatron splits them over TP on the input (last) axis.
ROW_PARALLEL = ("linear_proj.weight", "out_proj.weight", "linear_fc2.weight")
#: What the training loop's ``_build_sharded_state_dict_metadata`` records (group handles dropped).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
#: Optimizer state kinds in the order ``optimizer_copies`` enables them (Adam moments, fp32 master).
OPTIMIZER_KINDS = ("exp_avg", "exp_avg_sq", "fp32_param")


def _replicated(key: str) -> bool:
    """1-D norm weights / row-parallel biases: every TP rank holds the whole tensor."""
    if key.endswith(("layer_norm_weight", "layer_norm_bias", "linear_proj.bias", "linear_fc2.bias", "out_proj.bias")):
        return True
    return "norm.weight" in key and "mamba_mixer.norm.weight" not in key  # Mamba's gated norm is TP-split


def _fragments(key: str, tensor: torch.Tensor, tp: int) -> list[tuple[torch.Tensor, tuple, tuple[int, ...]]]:
    """``(local, rank_offsets, replica_id)`` for every TP rank, as megatron's layers shard ``key``."""
    if _replicated(key):
        return [(tensor, (), (0, r, 0)) for r in range(tp)]
    if key.endswith("linear_fc1.weight"):  # SwiGLU factory: gate part r and up part r -> 2*tp chunks
        parts = tensor.chunk(2 * tp, dim=0)
        return [(parts[i * tp + r], ((0, i * tp + r, 2 * tp),), (0, 0, 0)) for r in range(tp) for i in range(2)]
    axis = 1 if any(s in key for s in ROW_PARALLEL) else 0
    return [(t, ((axis, r, tp),), (0, 0, 0)) for r, t in enumerate(tensor.chunk(tp, dim=axis))]


@contextlib.contextmanager
def cpu_writer() -> Iterator[None]:
    """The writer calls ``torch.cuda.synchronize()`` and builds flags on ``current_device()``."""
    sync, cur = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = sync, cur  # type: ignore[assignment]


@contextlib.contextmanager
def gloo_group() -> Iterator[None]:
    """A one-rank gloo group unless one exists (as tests/conftest.py's ``dist_checkpointing``)."""
    owned = not dist.is_initialized()
    if owned:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


def _rng_state(seed: int) -> dict[str, Any]:
    """One entry of ``get_rng_state``'s list (CPU: cuda/tracker states are empty stand-ins)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "random_rng_state": random.Random(seed).getstate(),
        "np_rng_state": np.random.RandomState(seed).get_state(),
        "torch_rng_state": gen.get_state(),
        "cuda_rng_state": gen.get_state(),
        "rng_tracker_states": {"model-parallel-rng": gen.get_state()},
    }


def save_training_checkpoint(
    iter_dir: Path,
    model: dict[str, torch.Tensor],
    *,
    tp: int,
    pp: int,
    iteration: int,
    optimizer_copies: int = 2,
    extra_state_prefixes: Iterable[str] = (),
    common: dict[str, Any] | None = None,
    seed: int = 0,
) -> None:
    """Save ``model`` (torch_dist key -> GLOBAL tensor) as the tp x pp ranks of a training run would.

    Optimizer state is fp32, ``optimizer_copies`` (<= 3) global tensors per parameter keyed
    ``optimizer.state.<kind>.<model key>`` (megatron's ``make_sharded_optimizer_tensor``), laid
    out as ``Float16OptimizerWithFloat16Params.sharded_state_dict``; ``common`` is merged into
    the top-level (non-sharded) entries, a ``content_metadata`` entry there goes to ``save``.
    """
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed"
        warnings.simplefilter("ignore")
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
        from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
        from megatron.core.dist_checkpointing.optimizer import (
            make_sharded_optimizer_tensor,
        )
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
    if not 0 <= optimizer_copies <= len(OPTIMIZER_KINDS):
        raise ValueError(f"optimizer_copies must be 0..{len(OPTIMIZER_KINDS)}")
    gen = torch.Generator().manual_seed(seed)

    model_sd: dict[str, Any] = {}
    sharded: dict[str, list[Any]] = {}  # model key -> its ShardedTensors (same order as fragments)
    for key, tensor in model.items():
        for i, (local, offsets, rid) in enumerate(_fragments(key, tensor, tp)):
            sh = ShardedTensor.from_rank_offsets(key, local.contiguous(), *offsets, replica_id=rid)
            model_sd[f"{key}#{i}"] = sh
            sharded.setdefault(key, []).append(sh)
    for prefix in extra_state_prefixes:  # TE modules: one object per TP rank, main replica at tp 0
        for r in range(tp):
            model_sd[f"{prefix}._extra_state#{r}"] = make_sharded_object_for_checkpoint(
                torch.empty(0, dtype=torch.uint8), f"{prefix}._extra_state", replica_id=(0, r, 0)
            )

    state_dict: dict[str, Any] = {"checkpoint_version": 3.0, "iteration": iteration, "model": model_sd}
    kinds = OPTIMIZER_KINDS[:optimizer_copies]
    if kinds:
        state: dict[Any, Any] = {}  # param id (here: one per fragment) -> {kind: ShardedTensor}
        fp32_params: list[Any] = []
        for key, shards in sharded.items():
            glob = {
                k: model[key].float() if k == "fp32_param" else torch.randn(model[key].shape, generator=gen)
                for k in kinds
            }
            if "exp_avg_sq" in glob:
                glob["exp_avg_sq"] = glob["exp_avg_sq"].square()
            frags = {k: [f[0].contiguous() for f in _fragments(key, g, tp)] for k, g in glob.items()}
            for i, sh in enumerate(shards):
                opt = {k: make_sharded_optimizer_tensor(sh, frags[k][i], prefix=f"optimizer.state.{k}") for k in kinds}
                if "fp32_param" in opt:
                    fp32_params.append(opt.pop("fp32_param"))
                state[len(state)] = opt
        group = {
            "lr": 1e-4,
            "betas": (0.9, 0.95),
            "eps": 1e-8,
            "weight_decay": 0.1,
            "params": LocalNonpersistentObject(list(range(len(state)))),
        }
        state["common_step"] = iteration
        state_dict["optimizer"] = {"optimizer": {"state": state, "param_groups": [group]}}
        if fp32_params:
            state_dict["optimizer"]["fp32_from_fp16_params"] = [fp32_params]
        state_dict["opt_param_scheduler"] = {"max_lr": 1e-4, "num_steps": iteration}
    state_dict["rng_state"] = [  # get_rng_state(ckpt_format="torch_dist") of every (pp, tp) rank
        ShardedObject("rng_state", [_rng_state(seed + p * tp + r)], (pp, tp), (p, r), replica_id=0)
        for p in range(pp)
        for r in range(tp)
    ]
    extra = dict(common or {})
    content_metadata = extra.pop("content_metadata", CONTENT_METADATA)
    state_dict.update(extra)

    iter_dir = Path(iter_dir)
    iter_dir.mkdir(parents=True, exist_ok=True)
    with gloo_group(), cpu_writer(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_checkpointing.save(state_dict, str(iter_dir), content_metadata=content_metadata)
