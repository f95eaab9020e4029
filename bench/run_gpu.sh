#!/usr/bin/env bash
# The GPU variant of the benchmarks: the same scripts, fp32 and bf16, results as JSON under $OUT
# (or bench/results-gpu/). Run from the repository root on a machine with one CUDA GPU:
#
#   bash bench/run_gpu.sh                 # needs jax[cuda12]; PyTorch is compared when it sees CUDA
#   REPEATS=20 OUT=/tmp/gpu bash bench/run_gpu.sh
#
# "fraction_of_matmul_peak" in the JSON is then the model FLOPs utilisation against the measured
# bf16/fp32 matmul peak of that GPU (a large jnp.matmul), the same definition as on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results-gpu}"
REPEATS="${REPEATS:-10}"
mkdir -p "$OUT"

backend="$(python -c 'import jax; print(jax.default_backend())')"
if [[ "$backend" != "gpu" ]]; then
  echo "run_gpu.sh: JAX sees no GPU (backend: $backend); install jax[cuda12] on a CUDA machine" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
# PyTorch is compared only when it runs on the same GPU; a CPU-only torch build is left out.
TORCH_FLAG=""
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "run_gpu.sh: PyTorch sees no CUDA device: timing Flax alone (--no-torch)" >&2
  TORCH_FLAG="--no-torch"
fi

# Big matmuls decide the peak on a GPU; the per-case batch grows so the GPU has work to do.
PEAK=4096,8192
CASES=1x10,1x30,8x10,32x10
for dtype in float32 bfloat16; do
  python bench/infer.py --dtype "$dtype" --cases "$CASES" --repeats "$REPEATS" --warmup 3 \
    --peak-sizes "$PEAK" $TORCH_FLAG --json "$OUT/infer-$dtype.json"
  for batch in 4 16; do
    python bench/train.py --dtype "$dtype" --batch "$batch" --seconds 5 --repeats "$REPEATS" --warmup 3 \
      --peak-sizes "$PEAK" $TORCH_FLAG --json "$OUT/train-$dtype-b$batch.json"
  done
done
echo "results in $OUT"
