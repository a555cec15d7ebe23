"""Logits parity: transformers' model on an HF folder vs the family's forward on TP shards.

A bit-exact round trip only shows the converter can undo itself; it cannot show the shards hold
what Megatron needs where Megatron looks. Here the Megatron side is computed from the legacy rank
files as stored (each rank from its own shard), and compared with transformers on the same random
tokens, in fp32.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bridge.engine.gather import SavedRanks, megatron_plan
from bridge.engine.info import megatron_info
from bridge.engine.plan import ParallelPlan
from bridge.engine.source import (
    MegatronCheckpoint,
    ReadOptions,
    megatron_hf_config,
    open_megatron,
)
from bridge.errors import InputError
from bridge.formats.detect import HF, LEGACY, detect_format
from bridge.plumbing.progress import progress as progress_bar

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass
class ParityReport:
    hf_dir: str
    megatron_dir: str
    source: str
    tp: int
    pp: int
    ranks: int
    layout: str
    tokens: int
    batch: int
    seed: int
    atol: float
    max_abs: float
    mean_abs: float
    max_logit: float
    top1_agreement: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol and self.top1_agreement == 1.0

    @property
    def verdict(self) -> str:
        """One line, OK or FAIL; the same text as to_dict()["verdict"]."""
        word = "OK" if self.ok else "FAIL"
        cmp = "<=" if self.max_abs <= self.atol else ">"
        return (
            f"{word}: max|Δ logits| {self.max_abs:.2e} {cmp} atol {self.atol:g}, "
            f"top-1 agreement {self.top1_agreement:.2%}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "verdict": self.verdict}

    def format(self) -> str:
        return "\n".join(
            [
                f"parity {self.hf_dir} (transformers fp32) vs {self.megatron_dir} "
                f"({self.source}, layout {self.layout}, "
                f"{self.ranks} ranks computed): {self.batch}x{self.tokens} random tokens, seed {self.seed}",
                f"  max|Δ| {self.max_abs:.3e}  mean|Δ| {self.mean_abs:.3e}  max|logit| {self.max_logit:.3e}  "
                f"top-1 {self.top1_agreement:.2%}",
                self.verdict,
            ]
        )


def _canonical(name: str, pp_rank: int, plan: ParallelPlan) -> str:
    """Bridge-layout name with the global layer number: stages merge by layer, layouts by renaming."""
    spec = plan.family.layouts[plan.layout]
    for canonical, renamed in spec.renames.items():
        for alias in renamed:
            if name.endswith("." + alias):
                name = name[: -len(alias)] + canonical
    local = _LAYER.match(name)
    if local is None:
        return name
    layer = pp_rank * plan.layers_per_stage + int(local.group(1)) // len(spec.pattern)
    return f"decoder.layers.{layer}." + name[local.end() :]


def rank_weights(meg: MegatronCheckpoint, plan: ParallelPlan, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's tensors from all its pipeline stages, in fp32, as the forward expects them."""
    out = {}
    for pp_rank in range(plan.pp):
        for name, tensor in meg.model(tp_rank, pp_rank).items():
            out[_canonical(name, pp_rank, plan)] = tensor.float()
    return out


@torch.no_grad()
def _hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import (
        AutoModelForCausalLM,  # ~2 s of imports, paid only by parity
    )

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model(ids).logits


def _expect(path: Path, fmt: str) -> None:
    found = detect_format(path)
    if found != fmt:
        raise InputError(f"{path}: is {found}, expected {fmt}")


def parity(
    hf_dir: Path,
    megatron_dir: Path,
    tokens: int = 32,
    seed: int = 0,
    batch: int = 2,
    atol: float = 1e-5,
    options: ReadOptions = ReadOptions(),
    progress: bool = False,
) -> ParityReport:
    """Compares logits of transformers on ``hf_dir`` with the Megatron forward on ``megatron_dir``'s shards.

    ``progress`` steps (minutes each on a large model): the transformers forward, each TP rank's
    weights, the Megatron forward."""
    hf_dir, megatron_dir = Path(hf_dir), Path(megatron_dir)
    _expect(hf_dir, HF)
    _expect(megatron_dir, LEGACY)
    meg = open_megatron(megatron_dir, options)
    cfg, sidecar = megatron_hf_config(meg, options)
    plan, _ = megatron_plan(meg, cfg)
    info = megatron_info(meg, sidecar, plan)
    ranks, plan = saved_ranks(meg, plan)
    ids = torch.randint(cfg.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    with progress_bar(plan.tp + 2, "parity", progress, unit="step") as bar:
        ref = _hf_logits(hf_dir, ids)
        bar.update()
        weights = []
        for r in range(plan.tp):
            weights.append(rank_weights(ranks, plan, r))
            bar.update()
        # plan.hf_config is the model the shards hold, as Megatron runs it (e.g. with --expand-groups' groups)
        got = plan.family.forward(ids, weights, plan.hf_config)
        bar.update()
    if ref.shape != got.shape:
        raise InputError(
            f"{megatron_dir}: logits {tuple(got.shape)} vs {tuple(ref.shape)} from {hf_dir}; "
            "the checkpoints describe different models"
        )
    delta = (ref - got).abs()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    return ParityReport(
        str(hf_dir),
        str(megatron_dir),
        info.describe(),
        plan.tp,
        plan.pp,
        plan.tp * plan.pp,
        plan.layout,
        tokens,
        batch,
        seed,
        atol,
        float(delta.max()),
        float(delta.mean()),
        float(ref.abs().max()),
        float(top1),
    )


def saved_ranks(meg: MegatronCheckpoint, plan: ParallelPlan):
    """The ranks that saved the checkpoint and their plan: legacy files as they are; torch_dist sliced
    per rank at the TP/PP it was saved at (``args`` / ``run_config.yaml``), else as one TP=1 rank."""
    tp, pp = meg.saved_parallelism()
    if (meg.tp, meg.pp) != (1, 1) or not tp or not pp or (tp, pp) == (1, 1):
        return meg, plan
    saved = ParallelPlan(plan.hf_config, tp, pp, plan.divisible_by, plan.layout, padded_vocab=plan.dims.padded_vocab)
    return SavedRanks(meg, saved), saved
