"""The peer the benchmark compares with: a whole-model converter, as most conversion scripts are. It loads
every HF tensor into memory, splits each for TP with the same mapping table, and ``torch.save`` s each
rank's dict, so memory holds the model plus a rank file. Usage: whole_model.py HF_DIR OUT_DIR TP"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from bridge.engine.config import load_hf_config
from bridge.engine.plan import ParallelPlan, hf_name


def main(src: Path, dst: Path, tp: int) -> None:
    cfg = load_hf_config(src)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    plan = ParallelPlan(cfg, tp, 1, 128, "bridge")
    for tp_rank, pp_rank in plan.ranks():
        model = {}
        for param, layer, local in plan.stage_entries(pp_rank):
            tensor = param.rule.shard([state[hf_name(k, layer)] for k in param.hf], plan.dims, tp, tp_rank).clone()
            model.update((name, tensor) for name in plan.megatron_names(param, local))
        path = dst / "release" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model": model, "checkpoint_version": 3.0, "iteration": 0}, path)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
