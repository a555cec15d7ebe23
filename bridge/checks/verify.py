"""Tensor-by-tensor comparison of two Falcon-H1 checkpoints in HF key space, whatever their formats.

Each side is read through the converter's own readers: HF tensors with ``HFCheckpoint.get``,
Megatron tensors gathered by ``MegatronToHF.merged`` once ``megatron_plan`` has checked every
rank. One tensor per side is in memory at a time, and differences are computed in chunks, so
the cost stays at one parameter even for the largest models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bridge.engine.gather import MegatronToHF, megatron_plan
from bridge.engine.info import megatron_info
from bridge.engine.source import ReadOptions, megatron_hf_config, open_megatron
from bridge.errors import InputError, UnsupportedError
from bridge.families import family_of
from bridge.formats.detect import HF, detect_format
from bridge.formats.hf import HFCheckpoint
from bridge.plumbing.progress import progress as progress_bar

# Fields that say how or by what a config was written, not what the model is.
IGNORED_CONFIG = {"transformers_version", "output_hidden_states", "output_attentions", "return_dict"}
PASSING = ("equal", "close")
_CHUNK = 1 << 24  # elements per difference chunk: bounds the extra memory of a comparison


@dataclass
class TensorResult:
    """One HF key: equal, close (within atol), differs, shape, dtype, missing, unexpected or error."""

    key: str
    status: str
    max_abs: float | None = None
    n_diff: int = 0
    first_diff: list[int] | None = None
    detail: str = ""


@dataclass
class ConfigDiff:
    field: str
    a: object
    b: object
    mup: bool


@dataclass
class VerifyReport:
    a: str
    b: str
    format_a: str
    format_b: str
    atol: float
    tensors: list[TensorResult] = field(default_factory=list)
    config: list[ConfigDiff] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[TensorResult]:
        return [t for t in self.tensors if t.status not in PASSING]

    @property
    def ok(self) -> bool:
        return not (self.errors or self.config or self.problems)

    @property
    def verdict(self) -> str:
        """One line, OK or FAIL; the same text as to_dict()["verdict"]."""
        n, close = len(self.tensors), sum(t.status == "close" for t in self.tensors)
        if self.ok:
            within = f" ({close} within atol={self.atol:g})" if close else ""
            return f"OK: {n} tensors match{within}, config identical"
        parts = [f"{len(self.errors)} unreadable"] if self.errors else []
        if self.problems:
            parts.append(f"{len(self.problems)} of {n} tensors differ (first: {self.problems[0].key})")
        if self.config:
            n_cfg = len(self.config)
            parts.append(
                f"{n_cfg} config field{'s' if n_cfg > 1 else ''} differ{'' if n_cfg > 1 else 's'} "
                f"(first: {self.config[0].field})"
            )
        return "FAIL: " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "verdict": self.verdict}

    def format(self) -> str:
        lines = [f"verify {self.a} ({self.format_a}) vs {self.b} ({self.format_b}), atol={self.atol:g}"]
        lines += [f"  error   {e}" for e in self.errors]
        if self.problems:
            width = max(len(t.key) for t in self.problems)
            lines.append(f"  {'status':<10} {'max|Δ|':>9}  {'tensor':<{width}}  detail")
            for t in self.problems:
                delta = "-" if t.max_abs is None else f"{t.max_abs:.2e}"
                lines.append(f"  {t.status:<10} {delta:>9}  {t.key:<{width}}  {t.detail}")
        for c in self.config:
            lines.append(f"  config{' µP' if c.mup else ''}  {c.field}: {c.a!r} vs {c.b!r}")
        lines.append(self.verdict)
        return "\n".join(lines)


@dataclass
class _Side:
    """One checkpoint seen in HF key space: config, keys, a tensor getter and where a key lives."""

    path: Path
    label: str
    config: object
    keys: set[str]
    get: Callable[[str], torch.Tensor]
    where: Callable[[str], str]
    error: str | None = None


def _open_hf(path: Path) -> _Side:
    ckpt = HFCheckpoint(path)
    return _Side(path, HF, ckpt.config, set(ckpt.keys()), ckpt.get, lambda k: ckpt.key_to_file[k])


def _open_megatron(path: Path, options: ReadOptions) -> _Side:
    meg = open_megatron(path, options)
    cfg, sidecar = megatron_hf_config(meg, options)
    try:
        plan, _ = megatron_plan(meg, cfg)
    except (InputError, UnsupportedError) as e:  # corrupt rank files: report them, still compare configs
        return _Side(path, meg.format, cfg, set(), _unreachable, _unreachable, error=str(e))
    info = megatron_info(meg, sidecar, plan)
    label = f"{info.describe()}, config from {info.config_from}"
    gather = MegatronToHF(meg, plan, None)

    def where(key: str) -> str:
        param, layer, _ = gather.index[key]
        pp_rank, local = gather._stage(param, layer)
        files = ", ".join(meg.rank_file(t, pp_rank).parent.name for t in range(meg.tp))
        return f"{plan.megatron_name(param, local)} in {files}"

    return _Side(path, label, cfg, set(gather.index), gather.merged, where)


def _unreachable(key: str):
    raise AssertionError(f"no tensors are read from a checkpoint that failed to load ({key})")


def _open(path: Path, options: ReadOptions) -> _Side:
    path = Path(path)
    return _open_hf(path) if detect_format(path) == HF else _open_megatron(path, options)


def _work_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """float32 holds every bf16/fp16/fp32 value exactly; anything else is compared in float64."""
    small = (torch.float32, torch.bfloat16, torch.float16)
    return torch.float32 if a in small and b in small else torch.float64


def _diff_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float, int | None]:
    """(elements that differ, max|Δ| among them, flat index of the first); NaN matches NaN."""
    work = _work_dtype(a.dtype, b.dtype)
    fa, fb = a.reshape(-1), b.reshape(-1)
    count, worst, first = 0, 0.0, None
    for start in range(0, fa.numel(), _CHUNK):
        x, y = fa[start : start + _CHUNK].to(work), fb[start : start + _CHUNK].to(work)
        ne = (x != y) & ~(x.isnan() & y.isnan())
        n = int(ne.sum())
        if not n:
            continue
        if first is None:
            first = start + int(ne.nonzero()[0])
        delta = (x[ne] - y[ne]).abs().nan_to_num(nan=float("inf"))
        count, worst = count + n, max(worst, float(delta.max()))
    return count, worst, first


def compare_tensors(key: str, a: torch.Tensor, b: torch.Tensor, atol: float) -> TensorResult:
    """Exact value equality first; a dtype or shape mismatch is a difference even when values agree."""
    if a.shape != b.shape:
        return TensorResult(key, "shape", detail=f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    n, worst, first = (0, 0.0, None) if torch.equal(a, b) else _diff_stats(a, b)
    index = None if first is None else [int(i) for i in torch.unravel_index(torch.tensor(first), a.shape)]
    detail = f"{n} of {a.numel()} elements differ, first at {tuple(index)}" if index is not None else ""
    if a.dtype != b.dtype:
        status, detail = "dtype", f"dtype {a.dtype} vs {b.dtype}" + (f"; {detail}" if detail else "")
    else:
        status = "equal" if n == 0 else "close" if worst <= atol else "differs"
    return TensorResult(key, status, worst if n else 0.0, n, index, detail)


def _compare_key(key: str, a: _Side, b: _Side, atol: float) -> TensorResult:
    if key not in b.keys:
        return TensorResult(key, "missing", detail=f"in {a.where(key)} only")
    if key not in a.keys:
        return TensorResult(key, "unexpected", detail=f"in {b.where(key)} only")
    tensors: list[torch.Tensor] = []
    for side in (a, b):
        try:
            tensors.append(side.get(key))
        except (InputError, RuntimeError) as e:
            return TensorResult(key, "error", detail=f"{side.where(key)}: {str(e).splitlines()[0]}")
    tensor_a, tensor_b = tensors
    result = compare_tensors(key, tensor_a, tensor_b, atol)
    if result.status not in PASSING:
        result.detail += f"; A: {a.where(key)}; B: {b.where(key)}"
    return result


def _plain(value):
    """JSON-like value with tuples as lists, so a tuple and a list of the same numbers compare equal."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_diffs(a, b) -> list[ConfigDiff]:
    """Fields of the two HF configs' ``to_dict()`` that differ (bookkeeping fields dropped)."""
    da, db = _plain(a.to_dict()), _plain(b.to_dict())
    names = sorted(k for k in set(da) | set(db) if k not in IGNORED_CONFIG and not k.startswith("_"))
    return [ConfigDiff(k, da.get(k), db.get(k), k in family_of(a).mup_fields) for k in names if da.get(k) != db.get(k)]


def verify(
    a: Path, b: Path, atol: float = 0.0, options: ReadOptions = ReadOptions(), progress: bool = False
) -> VerifyReport:
    """Compares two checkpoints (HF or Megatron legacy / torch_dist, any TP/PP) tensor by tensor and
    config by config; ``options`` apply to the Megatron side(s). ``progress``: one step per tensor."""
    side_a, side_b = _open(a, options), _open(b, options)
    report = VerifyReport(str(a), str(b), side_a.label, side_b.label, atol)
    report.config = config_diffs(side_a.config, side_b.config)
    report.errors = [s.error for s in (side_a, side_b) if s.error]
    if report.errors:
        return report
    keys = sorted(set(side_a.keys) | set(side_b.keys))
    with progress_bar(len(keys), "verify", progress, unit="tensor") as bar:
        for key in keys:
            report.tensors.append(_compare_key(key, side_a, side_b, atol))
            bar.update()
    return report
