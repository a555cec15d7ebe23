#!/usr/bin/env bash
# Builds, on the CPU machine, the checkpoints that gpu/megatron_core_parity.py checks on the GPU
# machine: two tiny random Falcon-H1 models (gated RMSNorm on / off; µP multipliers all 1) and
# their legacy Megatron shards at TP=1, 2 and 4, written by the project's own converter.
# Output: gpu_carry/ckpt/ (git-ignored through .git/info/exclude; carried with `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUTDIR=gpu_carry/ckpt
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
h1bridge make-tiny "$OUTDIR/norm_on/hf" --preset tiny
h1bridge make-tiny "$OUTDIR/norm_off/hf" --preset tiny --set mamba_rms_norm=false
for c in norm_on norm_off; do
  for tp in 1 2 4; do
    h1bridge hf-to-megatron "$OUTDIR/$c/hf" "$OUTDIR/$c/tp$tp" --tp "$tp"
  done
  # The shards must round-trip exactly before they are worth checking against megatron-core.
  h1bridge megatron-to-hf "$OUTDIR/$c/tp2" "/tmp/h1b_rt_$c" --force >/dev/null
  h1bridge verify "$OUTDIR/$c/hf" "/tmp/h1b_rt_$c"
done
du -sh "$OUTDIR"
