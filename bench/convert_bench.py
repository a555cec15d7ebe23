"""Benchmark: h1bridge's streaming conversions against `cp -r`, at the released Falcon-H1 shapes.

For each preset a random bf16 checkpoint is generated (``h1bridge make-tiny --full``), then every
operation runs once, in its own child process: wall time, bytes written and peak RSS (``ru_maxrss``
from ``os.wait4``). The reference is ``cp -r`` of the source plus an fsync of the copy, because
every h1bridge output is fsynced before it is renamed into place (``bridge/atomic.py``); plain
``cp -r`` is listed too. When ``/proc/sys/vm/drop_caches`` is writable the page cache is dropped
before each operation (all cold); otherwise the source is read once up front (all warm).

Every operation starts ``SETTLE_S`` seconds after the drop. On a VM that hands freed memory back to
its host (virtio free page reporting, as on the machine the README numbers come from), memory
freed by the drop is returned within ~2 s and touching it again costs ~2 s per GB; a ``cp``
started at once reuses it while still backed (measured: 1.5B ``cp -r`` 3.1 s right after the
drop, 7.1 s five seconds later), and h1bridge needs ~2.5 s of imports first. Settling puts every
operation, ``cp`` included, in the same state.

Mamba groups: released shapes have one group and megatron-core needs groups % TP == 0, so a preset
is generated with groups = the largest TP in {2, 4, 8} its heads allow (3B: 10 attention heads, so
TP <= 2; 7B: 12 heads, so TP <= 4). ``reshard`` goes TP=2 -> TP=4, or TP=2 -> TP=1 where 4 is not
possible. Unless ``--keep``, at most two full-size checkpoints are on disk at once.

Run from the repository root (free disk: about 5 GB per 1B parameters of the largest preset):
    .venv/bin/python bench/convert_bench.py                 # 0.5b,1.5b,3b -> bench/out/results.{md,json}
    .venv/bin/python bench/convert_bench.py --presets 0.5b --json
    .venv/bin/python bench/convert_bench.py --with-7b --out /big/disk/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

H1 = str(Path(sys.executable).with_name("h1bridge"))
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
GiB = 2**30
REFERENCE = "cp -r + fsync"
SETTLE_S = 8


def can_drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3")
        return True
    except OSError:
        return False


# Run in a child: importing torch here would raise every child's ru_maxrss to this process's RSS
# (exec keeps the pre-exec hiwater mark of the forked copy).
_ALLOWED_TP = """
import json, sys
from bridge.errors import UnsupportedError
from bridge.engine.plan import check_parallel_sizes
from bridge.tiny import preset_config
allowed = []
for tp in (2, 4, 8):
    try:
        check_parallel_sizes(preset_config(sys.argv[1], full=True, mamba_n_groups=tp), tp, 1)
        allowed.append(tp)
    except UnsupportedError:
        pass
print(json.dumps(allowed))
"""


def tp_sizes(preset: str) -> tuple[int, int]:
    """(largest TP in 2/4/8 the preset allows with groups = TP, reshard target: 4 or else 1)."""
    allowed = json.loads(subprocess.check_output([sys.executable, "-c", _ALLOWED_TP, preset]))
    if 2 not in allowed:
        raise SystemExit(f"{preset}: TP=2 is not possible; nothing to compare")
    return max(allowed), 4 if 4 in allowed else 1


def largest_tensors(hf_dir: Path, n: int = 2) -> int:
    """Bytes of the ``n`` largest tensors, from the safetensors headers."""
    sizes = []
    for path in hf_dir.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        sizes += [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]
    return sum(sorted(sizes)[-n:])


def files_of(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def run_child(argv: list[str], cold: bool) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one child process; raises with its stderr if it fails."""
    if cold:
        os.sync()
        DROP_CACHES.write_text("3")
        time.sleep(SETTLE_S)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def rss_budget(kind: str, largest_file: int, two_tensors: int) -> int | None:
    """The issue's memory targets: legacy 1.5 x largest file + 0.5 GiB; safetensors/torch_dist
    1 GiB + the two largest tensors."""
    if kind == "legacy":
        return int(1.5 * largest_file + 0.5 * GiB)
    if kind in ("safetensors", "torch_dist"):
        return GiB + two_tensors
    return None


def bench_preset(preset: str, root: Path, cold: bool, keep: bool) -> dict:
    tree = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    ).stdout.strip()
    tp_max, tp_reshard = tp_sizes(preset)
    work = root / preset
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, legacy = work / "hf", work / "legacy-tp2"
    gen_s, _ = run_child(
        [
            H1,
            "make-tiny",
            str(src),
            "--preset",
            preset,
            "--full",
            "--dtype",
            "bf16",
            "--set",
            f"mamba_n_groups={tp_max}",
            "--json",
        ],
        cold=False,
    )
    two_tensors = largest_tensors(src)
    if not cold:
        for p in files_of(src):
            with open(p, "rb") as f:
                while f.read(64 * 2**20):
                    pass
    ops = [  # (op, output kind, argv, output dir, keep it for later ops)
        ("cp -r", "copy", ["cp", "-r", src, work / "cp"], work / "cp", False),
        (REFERENCE, "copy", ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', src, work / "cp"], work / "cp", False),
        (
            "hf-to-megatron torch_dist TP=2",
            "torch_dist",
            [H1, "hf-to-megatron", src, work / "dist", "--tp", "2", "--format", "torch_dist"],
            work / "dist",
            False,
        ),
        *(
            [
                (
                    f"hf-to-megatron legacy TP={tp_max}",
                    "legacy",
                    [H1, "hf-to-megatron", src, work / "legacy-max", "--tp", str(tp_max)],
                    work / "legacy-max",
                    False,
                )
            ]
            if tp_max != 2
            else []
        ),
        ("hf-to-megatron legacy TP=2", "legacy", [H1, "hf-to-megatron", src, legacy, "--tp", "2"], legacy, True),
        (
            "megatron-to-hf (legacy TP=2)",
            "safetensors",
            [H1, "megatron-to-hf", legacy, work / "hf-out"],
            work / "hf-out",
            False,
        ),
        (
            f"reshard legacy TP=2 -> TP={tp_reshard}",
            "legacy",
            [H1, "reshard", legacy, work / "reshard", "--tp", str(tp_reshard)],
            work / "reshard",
            False,
        ),
    ]
    rows = []
    for op, kind, argv, out, keep_out in ops:
        argv = [str(a) for a in argv] + (["--json"] if argv[0] == H1 else [])
        seconds, rss = run_child(argv, cold)
        sizes = [p.stat().st_size for p in files_of(out)]
        rows.append(
            dict(
                op=op,
                kind=kind,
                seconds=round(seconds, 2),
                output_bytes=sum(sizes),
                largest_file=max(sizes),
                peak_rss=rss,
                load_1min=round(os.getloadavg()[0], 2),
                rss_budget=rss_budget(kind, max(sizes), two_tensors),
            )
        )
        if not (keep or keep_out):
            shutil.rmtree(out)
        if out == legacy and not keep:
            shutil.rmtree(src)  # only the legacy checkpoint is read from here on
    if not keep:
        shutil.rmtree(work)
    ref = next(r["seconds"] for r in rows if r["op"] == REFERENCE)
    for r in rows:
        r["gb_per_s"] = round(r["output_bytes"] / r["seconds"] / 1e9, 3)
        r["ratio_to_cp"] = round(ref / r["seconds"], 3)
        r["rss_per_largest_file"] = round(r["peak_rss"] / r["largest_file"], 2)
    return dict(
        preset=preset,
        tree=tree,
        mamba_n_groups=tp_max,
        tp_max=tp_max,
        make_tiny_seconds=round(gen_s, 1),
        two_largest_tensors=two_tensors,
        rows=rows,
    )


def targets(results: list[dict]) -> list[str]:
    """The issue's three targets, checked on what was measured."""
    lines = []
    big = results[-1]
    slow = [r for r in big["rows"] if r["kind"] != "copy" and r["ratio_to_cp"] < 0.8]
    lines.append(
        f"throughput >= 0.8x `{REFERENCE}` on {big['preset']}: "
        + ("met" if not slow else "MISSED by " + ", ".join(f"{r['op']} ({r['ratio_to_cp']}x)" for r in slow))
    )
    over = [(p["preset"], r) for p in results for r in p["rows"] if r["rss_budget"] and r["peak_rss"] > r["rss_budget"]]
    lines.append(
        "peak RSS within budget: "
        + (
            "met"
            if not over
            else "MISSED by "
            + ", ".join(f"{p} {r['op']} ({r['peak_rss'] / GiB:.2f} > {r['rss_budget'] / GiB:.2f} GiB)" for p, r in over)
        )
    )
    tp8 = [(p["preset"], r) for p in results for r in p["rows"] if r["op"] == "hf-to-megatron legacy TP=8"]
    if len(tp8) < 2:
        lines.append("RSS flat (<= 1.2x) across presets at TP=8: not measurable (fewer than two presets allow TP=8)")
    else:
        low, high = min(r["peak_rss"] for _, r in tp8), max(r["peak_rss"] for _, r in tp8)
        each = ", ".join(
            f"{p}: {r['peak_rss'] / GiB:.2f} GiB (rank file {r['largest_file'] / GiB:.2f})" for p, r in tp8
        )
        lines.append(
            f"RSS flat (<= 1.2x) across presets at TP=8 ({each}): "
            + ("met" if high <= 1.2 * low else f"MISSED ({high / low:.2f}x)")
        )
    return lines


def markdown(results: list[dict], cold: bool) -> str:
    cache = (
        f"cold: page cache dropped before every operation, which starts {SETTLE_S} s later"
        if cold
        else "warm: drop_caches not permitted; the source was read once before timing"
    )
    out = [
        (
            f"# h1bridge conversion benchmark\n\nPage cache {cache}. One run per operation; bf16; "
            f"GB/s = output bytes (1e9) / s; x cp = `{REFERENCE}` seconds / op seconds; RSS in GiB; "
            "load = 1-minute load average after the op (the machine is shared).\n"
        ),
        (
            "| preset | op | s | GB/s | x cp | out GB | largest file GB | peak RSS | RSS / largest file "
            "| RSS budget | load |"
        ),
        "|" + "---|" * 11,
    ]
    for p in results:
        for r in p["rows"]:
            budget = (
                ""
                if r["rss_budget"] is None
                else (f"{r['rss_budget'] / GiB:.2f} {'ok' if r['peak_rss'] <= r['rss_budget'] else 'OVER'}")
            )
            out.append(
                f"| {p['preset']} | {r['op']} | {r['seconds']:.1f} | {r['gb_per_s']:.3f} "
                f"| {r['ratio_to_cp']:.2f} | {r['output_bytes'] / 1e9:.2f} | {r['largest_file'] / 1e9:.2f} "
                f"| {r['peak_rss'] / GiB:.2f} "
                f"| {r['rss_per_largest_file']:.2f} | {budget} | {r['load_1min']} |"
            )
    out.append(
        "\nSources: "
        + "; ".join(
            f"{p['preset']} (tree `{p['tree']}`) mamba_n_groups={p['mamba_n_groups']}, two largest tensors "
            f"{p['two_largest_tensors'] / GiB:.2f} GiB, make-tiny {p['make_tiny_seconds']} s"
            for p in results
        )
        + ".\n"
    )
    out += ["## Targets\n", *(f"- {line}" for line in targets(results))]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="0.5b,1.5b,3b", help="comma-separated family presets")
    parser.add_argument("--with-7b", action="store_true", help="add the 7b preset (~15 GB per checkpoint)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="work and results directory")
    parser.add_argument("--keep", action="store_true", help="keep the generated and converted checkpoints")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    args = parser.parse_args()
    presets = args.presets.split(",") + (["7b"] if args.with_7b else [])
    args.out.mkdir(parents=True, exist_ok=True)
    cold = can_drop_caches()
    start = time.perf_counter()
    results = []
    for preset in presets:
        results.append(bench_preset(preset, args.out, cold, args.keep))
        print(f"{preset} done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    report = dict(
        cold_cache=cold, total_seconds=round(time.perf_counter() - start, 1), presets=results, targets=targets(results)
    )
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, cold) + f"\nTotal: {report['total_seconds']} s.\n")
    print(json.dumps(report, indent=2) if args.json else (args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
