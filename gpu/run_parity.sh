#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, with .whl and gpu_carry carried (gpu/prepare_carry.sh).
#   gpu/run_parity.sh OUTDIR [TP ...]        (default TPs: 1 2 4)
# TP <= number of GPUs: torchrun + NCCL, one GPU per rank. TP > GPUs: NCCL is tried once
# (it refuses two ranks on one GPU), then gloo with the ranks sharing the GPUs.
set -u
OUTDIR=${1:?OUTDIR}; shift
TPS=${*:-1 2 4}
mkdir -p "$OUTDIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; uname -r
  echo "== python"; which python3; python3 -V
  python3 - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      "nccl", ".".join(map(str, torch.cuda.nccl.version())))
for m in ("triton", "transformers", "einops", "numpy", "packaging", "megatron.core", "mamba_ssm",
          "causal_conv1d", "transformer_engine", "apex", "kernels"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "NOT importable:", type(e).__name__, str(e)[:80])
PY
} 2>&1 | tee "$OUTDIR/env.txt"

export OMP_NUM_THREADS=2  # after the report: nproc honours it
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/megatron_core-*.whl || exit 3

# Pick the newest carried mamba-ssm whose Triton kernels compile and run here (MAMBA_DIRS overrides).
MAMBA=""
for d in ${MAMBA_DIRS:-$(ls -d gpu_carry/mamba_* | sort -rV)}; do
  if PYTHONPATH=/tmp/site:$PWD/$d timeout 300 python3 - <<'PY' 2>&1 | tee -a "$OUTDIR/env.txt"
import torch, mamba_ssm
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
from mamba_ssm.ops.triton.layernorm_gated import RMSNorm
b, l, h, p, g, n = 1, 300, 4, 8, 2, 8
x = torch.randn(b, l, h, p, device="cuda"); dt = torch.rand(b, l, h, device="cuda")
A = -torch.rand(h, device="cuda"); B = torch.randn(b, l, g, n, device="cuda"); C = torch.randn(b, l, g, n, device="cuda")
y = mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=torch.ones(h, device="cuda"), z=x, dt_bias=torch.zeros(h, device="cuda"), dt_softplus=True)
nrm = RMSNorm(h * p, eps=1e-5, group_size=p * h // g, norm_before_gate=False, device="cuda")
print("mamba_ssm", mamba_ssm.__version__, "Triton kernels OK:", tuple(y.shape), tuple(nrm(y.flatten(2), x.flatten(2)).shape))
PY
  then MAMBA=$d; break; fi
done
[ -n "$MAMBA" ] || { echo "no carried mamba-ssm Triton kernels work here"; exit 4; }
echo "using $MAMBA" | tee -a "$OUTDIR/env.txt"
export PYTHONPATH=/tmp/site:$PWD/$MAMBA

NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
C=gpu_carry/ckpt
rc=0
for tp in $TPS; do
  args=(--case "norm_on=$C/norm_on/hf,$C/norm_on/tp$tp" --case "norm_off=$C/norm_off/hf,$C/norm_off/tp$tp" --wrong)
  if [ "$tp" -le "$NGPU" ]; then
    echo "== TP=$tp NCCL ($NGPU GPUs)"
    timeout 280 torchrun --nproc_per_node="$tp" gpu/megatron_core_parity.py "${args[@]}" --backend nccl \
      --json "$OUTDIR/results.jsonl" 2>&1 | tee "$OUTDIR/tp$tp.log"; r=${PIPESTATUS[0]}
  else
    echo "== TP=$tp: only $NGPU GPU(s); trying NCCL with $tp ranks sharing them (expected to be refused)"
    NCCL_DEBUG=WARN timeout 120 torchrun --nproc_per_node="$tp" gpu/megatron_core_parity.py "${args[@]}" \
      --backend nccl > "$OUTDIR/tp${tp}_nccl_probe.log" 2>&1; r=$?
    grep -m4 -E "^\[rank0\]: [A-Za-z.]*(Error|Exception)|[Dd]uplicate GPU|ncclInvalidUsage" "$OUTDIR/tp${tp}_nccl_probe.log"
    echo "NCCL probe rc=$r"
    if [ "$r" -eq 0 ]; then
      timeout 280 torchrun --nproc_per_node="$tp" gpu/megatron_core_parity.py "${args[@]}" --backend nccl \
        --json "$OUTDIR/results.jsonl" 2>&1 | tee "$OUTDIR/tp$tp.log"; r=${PIPESTATUS[0]}
    else
      echo "== TP=$tp gloo, $tp ranks on $NGPU GPU(s)"
      timeout 280 torchrun --nproc_per_node="$tp" gpu/megatron_core_parity.py "${args[@]}" --backend gloo \
        --json "$OUTDIR/results.jsonl" 2>&1 | tee "$OUTDIR/tp$tp.log"; r=${PIPESTATUS[0]}
    fi
  fi
  echo "TP=$tp rc=$r"; [ "$r" -eq 0 ] || rc=1
done
exit $rc
