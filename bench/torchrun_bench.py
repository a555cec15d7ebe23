"""Benchmark: one conversion spread over N processes by torchrun, against the plain one-process run.

A random bf16 checkpoint of a released Falcon-H1 shape is generated (``h1bridge make-tiny --full``),
then each conversion runs plain and under ``torchrun --standalone --nproc-per-node N`` for every N,
``--repeat`` times, interleaved (plain, N=2, ..., plain, N=2, ...) so that a noisy machine slows all
alike. Reported per run: wall time of the whole command (interpreter start, imports and, under
torchrun, the launcher and the gloo rendezvous included) and the ``seconds`` of its ``--json``
summary (the conversion proper: source opened to output renamed into place). The source stays in
the page cache (warm). The work is split so that every process has some: legacy TP=2 x PP=4 (eight
rank files), torch_dist by parameter, safetensors in 128 MB shards.

Run from the repository root:
    .venv/bin/python bench/torchrun_bench.py --preset 0.5b --procs 2 --repeat 3
    python bench/torchrun_bench.py --preset 1.5b --procs 2,4,8 --out /big/disk/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERSIONS = {
    "hf-to-megatron legacy TP=2 PP=4": ["hf-to-megatron", "{hf}", "{out}", "--tp", "2", "--pp", "4"],
    "hf-to-megatron torch_dist TP=2": ["hf-to-megatron", "{hf}", "{out}", "--tp", "2", "--format", "torch_dist"],
    "megatron-to-hf 128MB shards": ["megatron-to-hf", "{meg}", "{out}", "--max-shard-size", "128MB"],
}


def command(procs: int, args: list[str]) -> list[str]:
    cli = [sys.executable, "-m", "cli"]
    if procs == 1:
        return [*cli, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    return [*launcher, "-m", "cli", *args]


def timed(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, json.loads(done.stdout)["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="0.5b")
    parser.add_argument("--procs", default="2", help="comma-separated process counts besides the plain run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    opts = parser.parse_args()
    counts = [1, *(int(n) for n in opts.procs.split(","))]
    with tempfile.TemporaryDirectory(dir=opts.out) as tmp:
        work = Path(tmp)
        hf, meg = work / "hf", work / "meg"
        make = [sys.executable, "-m", "cli", "make-tiny", str(hf), "--preset", opts.preset, "--full"]
        subprocess.run([*make, "--dtype", "bf16", "--set", "mamba_n_groups=2", "-q"], cwd=ROOT, check=True)
        convert = [sys.executable, "-m", "cli", "hf-to-megatron", str(hf), str(meg), "--tp", "2", "-q"]
        subprocess.run(convert, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        size = sum(p.stat().st_size for p in hf.rglob("*") if p.is_file())
        print(f"{opts.preset}: {size / 2**30:.2f} GiB bf16; median of {opts.repeat} (wall s / conversion s)")
        for name, template in CONVERSIONS.items():
            args = [a.format(hf=hf, meg=meg, out=work / "out") for a in template] + ["--json", "--force"]
            times: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
            for _ in range(opts.repeat):
                for n in counts:
                    times[n].append(timed(command(n, args)))
            medians = {
                n: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for n, t in times.items()
            }
            cells = [f"N={n}: {w:.1f} / {c:.1f}" for n, (w, c) in medians.items()]
            speedups = [f"x{medians[1][1] / medians[n][1]:.2f}" for n in counts[1:]]
            print(f"  {name:36s} " + "  ".join(cells) + f"  (conversion speed-up {' '.join(speedups)})")


if __name__ == "__main__":
    main()
