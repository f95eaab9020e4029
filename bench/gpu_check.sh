#!/usr/bin/env bash
# The GPU check: every GPU figure of the project in one run, one table printed last.
#
#   bash bench/gpu_check.sh             # on a CUDA machine: base size, ~8 minutes
#   bash bench/gpu_check.sh --dry-run   # anywhere (CPU): the same stages at tiny size, a few seconds each
#   STAGES="train demo" bash bench/gpu_check.sh      # a subset, in that order: demo verify infer train profile
#                                                      # loader transcribe pretrain variants (ABLATE="" skips the ablations;
#                                                      # TRAIN_ABLATE= adds ablations to the big train step)
#   OUT=/tmp/gpu bash bench/gpu_check.sh
#
# Needs only the repository and the wheels it names: JAX with CUDA, PyTorch with CUDA and transformers
# (preinstalled on the lent machines), and soundfile, soxr, jiwer (+ cffi, pycparser, rapidfuzz), which
# are installed from ./.gpu-wheels (no network) when they are missing. Fetch those wheels beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux2014_x86_64 --platform any -d .gpu-wheels soundfile cffi pycparser soxr jiwer rapidfuzz
# Each stage runs under its own time limit; a failed stage is reported in the table, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-bench/results-gpu}"
STAGES="${STAGES:-demo verify infer train profile loader transcribe pretrain}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in one process: JAX allocates on demand instead of taking 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# the real speech: ../shared/speech beside the checkout, or a copy carried into the repository
if [[ -z "${D2V_SHARED_SPEECH:-}" && ! -d ../shared/speech && -d .gpu-speech ]]; then export D2V_SHARED_SPEECH="$PWD/.gpu-speech"; fi

if ! "$PY" -c "import soundfile, soxr, jiwer" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links .gpu-wheels soundfile soxr jiwer rapidfuzz cffi pycparser \
    || { echo "gpu_check: soundfile/soxr/jiwer missing and not installable from .gpu-wheels" >&2; exit 1; }
fi
backend="$("$PY" -c 'import jax; print(jax.default_backend())')"
if [[ "$backend" != "gpu" && $DRY == 0 ]]; then
  echo "gpu_check: JAX sees no GPU (backend: $backend); use --dry-run to check the script on a CPU" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>/dev/null \
  || echo "name
$backend (dry run)" > "$OUT/gpu.csv"
"$PY" -c 'import importlib.metadata as m, jax, torch, transformers; print("jax", jax.__version__, "torch", torch.__version__,
"transformers", transformers.__version__, *(f"{p} {m.version(p)}" for p in ("flax", "optax", "orbax-checkpoint")),
"devices", jax.devices())' | tee "$OUT/versions.txt"

if [[ $DRY == 1 ]]; then
  SIZE=tiny; CASES=1x2,2x2; REPEATS=2; TB=2; TS=2; SB=2; SS=2; LB=5; ASR=25; PEAK=256; LIMIT=300
  PB=2; PS=1; CLONES=2; PTB=2; PTS=1  # PTB x PTS = PB x PS: the 1.0 step compiles once (cache below)
  WORKERS=1,2
else
  SIZE=base; CASES=1x10,8x10,32x10; REPEATS="${REPEATS:-10}"; TB=64; TS=10; SB=16; SS=5; LB=60; ASR=120; PEAK=4096,8192; LIMIT=240
  PTB=64; PTS=10; PB=16; PS=10; CLONES=8  # 2.0 against 1.0 on the same audio: 16 x 10 s (2.0's student sees 8 copies of each clip)
  WORKERS="1,4,$(nproc)"
fi
ABLATE="${ABLATE-ctc_sum,no_dropout,no_optimizer,xla_attention,no_attention,no_feature_encoder}"

stage() {  # stage NAME LIMIT_S CMD...: run one stage with its log under $OUT
  local name=$1 limit=$2; shift 2
  echo "== $name" >&2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log" >&2
  echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt" >&2
}

run_demo() {
  if [[ $DRY == 1 ]]; then
    "$PY" -c "
import torch, transformers, sys
sys.path.insert(0, 'tests'); from conftest import tiny_hf_kwargs
torch.manual_seed(0)
transformers.Data2VecAudioForCTC(transformers.Data2VecAudioConfig(**tiny_hf_kwargs())).save_pretrained('$OUT/tiny-hf')"
    stage demo $LIMIT "$PY" -m flax_d2v.cli verify "$OUT/tiny-hf"
  else
    stage demo $LIMIT "$PY" -m flax_d2v.cli demo --out "$OUT/demo"
  fi
}
model_for_verify() {  # the demo's checkpoint, built here if the demo stage did not run
  if [[ $DRY == 1 ]]; then [[ -d "$OUT/tiny-hf" ]] || run_demo >/dev/null 2>&1; echo "$OUT/tiny-hf"; return; fi
  if [[ ! -d "$OUT/demo/flax" ]]; then
    "$PY" -c "from pathlib import Path; from flax_d2v.commands.demo import build_base_checkpoint as b
b(Path('$OUT/demo/hf-base'), 0)" >/dev/null 2>&1
    echo "$OUT/demo/hf-base"; return
  fi
  echo "$OUT/demo/flax"
}
run_verify() {
  local model; model="$(model_for_verify)"
  for p in default bf16; do
    stage "verify-$p" $LIMIT "$PY" -m flax_d2v.cli verify "$model" --precision "$p" --report "$OUT/verify-$p.md"
  done
}
run_infer() {
  stage infer-bfloat16 $((LIMIT + 120)) "$PY" bench/infer.py --size $SIZE --dtype bfloat16 --cases "$CASES" \
    --repeats $REPEATS --warmup 2 --peak-sizes $PEAK --torch-compile --json "$OUT/infer-bfloat16.json"
  stage infer-float32 $LIMIT "$PY" bench/infer.py --size $SIZE --dtype float32 --cases "$CASES" \
    --repeats $REPEATS --warmup 2 --peak-sizes $PEAK --json "$OUT/infer-float32.json"
}
run_train() {
  stage train-big $LIMIT "$PY" bench/train.py --size $SIZE --dtype bfloat16 --batch $TB --seconds $TS --scan-layers \
    --repeats $REPEATS --warmup 2 --peak-sizes $PEAK ${TRAIN_ABLATE:+--ablate "$TRAIN_ABLATE"} \
    --json "$OUT/train-bf16-b$TB.json"
  stage train-small $LIMIT "$PY" bench/train.py --size $SIZE --dtype bfloat16 --batch $SB --seconds $SS \
    --scan-layers --repeats $REPEATS --warmup 2 --peak-sizes $PEAK ${ABLATE:+--ablate "$ABLATE"} \
    --json "$OUT/train-bf16-b$SB.json"
}
run_variants() {  # layouts and PRNGs to choose defaults by (Flax alone; the train stage has PyTorch beside it)
  stage train-noscan $LIMIT "$PY" bench/train.py --size $SIZE --dtype bfloat16 --batch $TB --seconds $TS \
    --no-scan-layers --no-torch --repeats $REPEATS --warmup 2 --peak-sizes $PEAK --json "$OUT/train-bf16-b$TB-noscan.json"
  stage train-rbg $LIMIT "$PY" bench/train.py --size $SIZE --dtype bfloat16 --batch $SB --seconds $SS --scan-layers \
    --prng rbg --no-torch --repeats $REPEATS --warmup 2 --peak-sizes $PEAK --json "$OUT/train-bf16-b$SB-rbg.json"
}
run_profile() {
  stage profile $LIMIT "$PY" bench/profile_step.py --size $SIZE --dtype bfloat16 --batch $TB --seconds $TS \
    --scan-layers --json "$OUT/profile.json"
}
run_loader() {
  stage loader $LIMIT "$PY" bench/loader.py --workers "$WORKERS" --batches $LB --target 9000 --json "$OUT/loader.json"
}
run_transcribe() {
  # twice with one persistent compilation cache (as `d2v` keeps it): a first and a second invocation
  rm -rf "$OUT/jax-cache"
  stage transcribe $LIMIT "$PY" bench/transcribe.py --seconds $ASR --compilation-cache "$OUT/jax-cache" \
    --json "$OUT/transcribe.json"
  stage transcribe-cached $LIMIT "$PY" bench/transcribe.py --seconds $ASR --compilation-cache "$OUT/jax-cache" \
    --json "$OUT/transcribe-cached.json"
  rm -rf "$OUT/jax-cache"
}
run_pretrain() {
  # 1.0 alone at the CTC step's big batch (its MFU target), then 1.0 and 2.0 (clone 8, decoder) on the same audio.
  # No PyTorch side: transformers has no data2vec pretraining objective and 2.0's is fairseq's only (the JSON says so).
  rm -rf "$OUT/jax-cache-pretrain"
  stage pretrain-v1 $LIMIT "$PY" bench/pretrain_v2.py --size $SIZE --dtype bfloat16 --archs data2vec --batch $PTB \
    --seconds $PTS --repeats $REPEATS --warmup 2 --peak-sizes $PEAK --compilation-cache "$OUT/jax-cache-pretrain" \
    --json "$OUT/pretrain-v1-b$PTB.json"
  stage pretrain-v2 $LIMIT "$PY" bench/pretrain_v2.py --size $SIZE --dtype bfloat16 --batch $PB --seconds $PS \
    --clone-batch $CLONES --repeats $REPEATS --warmup 2 --peak-sizes $PEAK --compilation-cache "$OUT/jax-cache-pretrain" \
    --json "$OUT/pretrain-v1-v2-b$PB.json"
  rm -rf "$OUT/jax-cache-pretrain"
}
for s in $STAGES; do
  if declare -F "run_$s" >/dev/null; then "run_$s"; else echo "gpu_check: unknown stage $s" >&2; fi
done
"$PY" bench/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
