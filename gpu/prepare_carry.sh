#!/usr/bin/env bash
# Prepares, on a machine with network, what gpu/run_parity.sh needs on the (offline) GPU machine:
#   .whl/                     megatron-core 0.16.1 wheel (cp312, manylinux x86-64)
#   gpu_carry/mamba_<tag>/    mamba-ssm's Triton kernels as plain Python (no CUDA build), with a
#                             mamba_ssm/__init__.py that imports nothing compiled
#   gpu_carry/ckpt/           the checkpoints (gpu/make_shards.sh)
# Both folders must be git-ignored (this repo lists them in .git/info/exclude) and carried.
# MAMBA_REPO: a git clone of https://github.com/state-spaces/mamba (default: the session mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
MAMBA_REPO=${MAMBA_REPO:-/work/.mirror/state-spaces+mamba/repo}
. .venv/bin/activate
rm -rf .whl && python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
rm -rf gpu_carry/mamba_* gpu_carry/pylib
for tag in v2.3.2.post1 v2.2.6.post3; do
  d=gpu_carry/mamba_$tag
  mkdir -p "$d"
  git -C "$MAMBA_REPO" archive "$tag" mamba_ssm/ops/__init__.py mamba_ssm/ops/triton mamba_ssm/utils | tar -x -C "$d"
  rm -rf "$d/mamba_ssm/ops/triton/mamba3"
  echo "__version__ = \"${tag#v}\"  # stub: Triton kernels only, no compiled selective_scan_cuda" > "$d/mamba_ssm/__init__.py"
done
gpu/make_shards.sh
du -sh .whl gpu_carry
