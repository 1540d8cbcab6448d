#!/usr/bin/env bash
# One-shot kernel check for a GPU machine (PyTorch + Triton + nvcc, no network), in under 8 minutes:
#   1. installs the wheels carried in .whl/ into /tmp/site (lpips, ninja, ...),
#   2. makes the checkout importable as `fastunlearn` (with kernels/ as fastunlearn.kernels),
#   3. JIT-builds the C++ and CUDA ops (falls back to `setup.py build_ext --inplace` without ninja),
#   4. checks the Triton and CUDA kernels against the reference (outputs and gradients, fp32/fp16/bf16),
#      and measures device-to-device copy bandwidth,
#   5. runs the GPU benchmark sweeps and the acceptance ratios,
#   6. prints a short table last. Results (CSV, JSON, logs) go to $OUT (or benchmarks/results/gpu_check).
#
# Usage (from anywhere):
#   benchmarks/gpu_check.sh              # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run    # CPU-side rehearsal of every step (cpu backend, tiny sweeps)
#   benchmarks/gpu_check.sh --prepare    # on the dev machine: fill .whl/ (ignored by git) to carry along
#   benchmarks/gpu_check.sh --scale      # only the whole-step and integrity parts (c, d below)
#   benchmarks/gpu_check.sh --no-steps   # everything but the SDXL steps (c): a rerun after a kernel fix
#
# In one call, in priority order so that a run cut off still leaves results (each part appends its CSV
# rows as soon as it finishes, and gets at most the time left of an 8-minute budget, GPU_CHECK_BUDGET_S):
#   (a) build, and conformance of the Triton and CUDA ops against the reference (fp32/bf16/fp16);
#   (b) the fused ops' speed against eager PyTorch and torch.compile, with achieved bandwidth;
#   (c) SDXL 1024² training steps: plain fine-tuning, Saddle full (ZeRO-2, bf16, gradient checkpointing),
#       Saddle attn2 with the shared teacher, Saddle LoRA r=16 (adapters-off teacher), each with its ratio;
#   (d) integrity, cached vs naive; then the LPIPS kernel sweep if time is left.
set -uo pipefail

MODE=gpu
SCALE=0
STEPS=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --prepare) MODE=prepare ;;
    --scale) SCALE=1 ;;
    --no-steps) STEPS=0 ;;
    *) echo "usage: $0 [--dry-run|--prepare|--scale|--no-steps]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
START=$(date +%s)
exec 3>&1  # the console: part() announces itself there even when its command's output is redirected
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" >&3; }
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
for arg in "$@"; do [ "$arg" = --dry-run ] && BUDGET="${GPU_CHECK_BUDGET_S:-1500}"; done  # the CPU rehearsal skips nothing
# part NAME MIN MAX CMD...: run CMD under a timeout of min(MAX, time left - 15 s); skip it if that is below MIN
part() {
  local name=$1 min=$2 max=$3; shift 3
  [ "$MODE" = dry ] && max=$(( max * 4 ))  # the CPU rehearsal is slower than the GPU, and skips nothing
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  local t=$(( left < max ? left : max ))
  if [ "$t" -lt "$min" ]; then log "SKIPPED $name: ${left}s left of the ${BUDGET}s budget"; return 0; fi
  log "$name (at most ${t}s)"
  timeout "$t" "$@"
  local rc=$?
  [ "$rc" -eq 0 ] || log "$name stopped early or failed (rc $rc)"
  return "$rc"
}

if [ "$MODE" = prepare ]; then
  mkdir -p .whl
  cp -f /work/shared/gpu-wheels/*.whl .whl/ 2>/dev/null || log "no /work/shared/gpu-wheels here"
  ls .whl/ninja-*.whl >/dev/null 2>&1 || "$PY" -m pip download -q ninja --only-binary=:all: --no-deps \
      --python-version 3.12 --platform manylinux2014_x86_64 -d .whl || log "could not download a ninja wheel"
  ls -1 .whl
  exit 0
fi

OUT_DIR="${OUT:-$ROOT/benchmarks/results/gpu_check}"
if [ "$MODE" = dry ]; then OUT_DIR="$(mktemp -d)/gpu_check"; fi
mkdir -p "$OUT_DIR"
WORK="${TMPDIR:-/tmp}/fastunlearn_gpu_check"
mkdir -p "$WORK"

# 1. carried wheels ---------------------------------------------------------------------------
if [ "$MODE" = gpu ] && ls .whl/*.whl >/dev/null 2>&1; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || log "WARNING: wheel install failed"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
elif [ "$MODE" = gpu ]; then
  log "no .whl/ in the checkout: lpips baseline and ninja may be missing (run --prepare before carrying)"
fi

# 2. the checkout as an importable package (kernels/ is fastunlearn.kernels only in an install) -
SHIM="$WORK/shim"
make_shim() {
  rm -rf "$SHIM"; mkdir -p "$SHIM/fastunlearn"
  for f in "$ROOT"/fastunlearn/*; do ln -s "$f" "$SHIM/fastunlearn/"; done
  ln -sfn "$ROOT/kernels" "$SHIM/fastunlearn/kernels"
}
# asked from / : the checkout's own folder on sys.path would make it look installed when it is not
if (cd / && "$PY" -c "import fastunlearn.kernels, sys; sys.exit(0 if fastunlearn.__file__.startswith('$ROOT') else 1)") 2>/dev/null; then
  log "fastunlearn is installed from this checkout"
else
  make_shim
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}"
export HF_HUB_OFFLINE=1
log "environment:"
"$PY" - <<'EOF'
import importlib, shutil, sys, torch
print(f"  python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}", end="")
print(f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
for mod in ("triton", "lpips", "ninja", "fastunlearn.kernels"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod}: {getattr(m, '__version__', 'ok')}")
    except Exception as exc:
        print(f"  {mod}: MISSING ({type(exc).__name__}: {exc})")
print(f"  nvcc: {shutil.which('nvcc')}, ninja binary: {shutil.which('ninja')}")
EOF

scale_parts() {  # (c) whole unlearning steps against plain fine-tuning, (d) cached vs naive integrity
  local XL SD IN
  if [ "$MODE" = dry ]; then
    XL=(--arch tiny-sdxl --steps 1 --warmup 0 --no-csv); IN=(--pairs 2 --steps 2 --reps 1 --no-csv)
  else
    XL=(--arch sdxl --resolution 1024 --batch 1 --steps 5 --warmup 2); IN=(--pairs 32 --steps 25 --reps 3)
  fi
  local COMMON=(--precision bf16 --grad-ckpt on --zero 2)
  if [ "$STEPS" = 1 ]; then
    part "(c1) SDXL step: fine-tuning vs Saddle full, teacher copy" 30 150 "$PY" benchmarks/bench_train_step.py "${XL[@]}" \
      "${COMMON[@]}" --methods finetune,saddle --params full --teacher copy 2>&1 | grep -v "^train-step" | tee "$OUT_DIR/train_step_sdxl.log" | tail -4
    part "(c2) SDXL step: Saddle attn2, shared teacher" 30 120 "$PY" benchmarks/bench_train_step.py "${XL[@]}" \
      "${COMMON[@]}" --methods finetune,saddle --params attn2 --teacher shared 2>&1 | grep -v "^train-step" | tee -a "$OUT_DIR/train_step_sdxl.log" | tail -4
    part "(c3) SDXL step: Saddle LoRA r=16, adapters-off teacher" 30 120 "$PY" benchmarks/bench_train_step.py "${XL[@]}" \
      "${COMMON[@]}" --methods finetune,saddle --params full --lora 16 2>&1 | grep -v "^train-step" | tee -a "$OUT_DIR/train_step_sdxl.log" | tail -4
  else
    log "SKIPPED (c): --no-steps"
  fi
  part "(d) integrity: cached vs naive" 20 90 "$PY" benchmarks/bench_integrity.py "${IN[@]}" 2>&1 | tail -3 | tee "$OUT_DIR/integrity.log"
  [ "$MODE" = gpu ] && cp -f benchmarks/results/*.csv "$OUT_DIR/" 2>/dev/null
  return 0
}

if [ "$SCALE" = 1 ]; then
  scale_parts
  log "done in $(( $(date +%s) - START ))s, results in $OUT_DIR"
  exit 0
fi

# 3. build the C++ / CUDA ops ------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null; then export CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")";
    elif [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  fi
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  log "building the C++ and CUDA ops (JIT, CUDA_HOME=${CUDA_HOME:-?}, arch $TORCH_CUDA_ARCH_LIST)"
  part "(a) JIT build" 60 240 "$PY" -c "from fastunlearn import _ext; _ext.load(cuda=True); print('  ops from', _ext._state['source'])" \
      2>&1 | tee "$OUT_DIR/build.log" | tail -3
  if ! "$PY" -c "from fastunlearn import _ext; _ext.load(cuda=True)" >/dev/null 2>&1; then
    log "JIT build failed (see build.log); trying setup.py build_ext --inplace"
    FASTUNLEARN_BUILD_CUDA=1 FASTUNLEARN_BUILD_STRICT=1 part "(a) setup.py build" 60 200 "$PY" setup.py -q build_ext --inplace \
      >"$OUT_DIR/build_setup.log" 2>&1
    [ -d "$SHIM" ] && make_shim
  fi
  CHECK_ARGS=(--device cuda --backends triton,cuda)
  BENCH_ARGS=(--device cuda)
  NOISE_PROVIDERS=()
  LPIPS_PROVIDERS=()
else
  log "dry run: building / loading the C++ CPU op"
  timeout 300 "$PY" -c "from fastunlearn import _ext; _ext.load(); print('  ops from', _ext._state['source'])"
  CHECK_ARGS=(--device cpu --backends cpu --quick)
  BENCH_ARGS=(--device cpu --quick --reps 2 --modes full --no-csv)
  NOISE_PROVIDERS=(--providers torch,cpu)
  LPIPS_PROVIDERS=(--providers lpips_pkg,cpu)
fi

# 4. (a) correctness, and copy bandwidth --------------------------------------------------------
part "(a) kernels against the reference" 30 150 "$PY" benchmarks/gpu_check.py "${CHECK_ARGS[@]}" --json "$OUT_DIR/gpu_check.json" \
  >"$OUT_DIR/check.log" 2>&1
CHECK_RC=$?
[ -f "$OUT_DIR/gpu_check.json" ] || CHECK_RC=1
grep -E "^(FAIL|device)" "$OUT_DIR/check.log" | head -20
tail -1 "$OUT_DIR/check.log"

# 5. (b) the fused ops' speed, (c, d) whole steps and integrity, then the LPIPS sweep -----------------
CHECKS_CSV="$ROOT/benchmarks/results/checks.csv"
if [ "$MODE" = dry ]; then RATIO_ARGS=(--device cpu --reps 3 --no-csv); else RATIO_ARGS=(--device cuda --reps 50); fi
part "(b) acceptance ratios (interleaved)" 15 60 "$PY" benchmarks/bench_noise_loss.py --check "${RATIO_ARGS[@]}" 2>&1 | grep CHECK | tee "$OUT_DIR/ratios.log"
part "(b) noise-loss sweep: eager, torch.compile, fused; bandwidth" 30 120 "$PY" benchmarks/bench_noise_loss.py "${BENCH_ARGS[@]}" \
  ${NOISE_PROVIDERS[@]+"${NOISE_PROVIDERS[@]}"} >"$OUT_DIR/bench_noise_loss.log" 2>&1
[ "$MODE" = gpu ] && cp -f benchmarks/results/*.csv "$OUT_DIR/" 2>/dev/null
scale_parts
part "LPIPS ratios" 15 45 "$PY" benchmarks/bench_lpips.py --check "${RATIO_ARGS[@]}" 2>&1 | grep CHECK | tee -a "$OUT_DIR/ratios.log"
part "LPIPS sweep" 30 120 "$PY" benchmarks/bench_lpips.py "${BENCH_ARGS[@]}" ${LPIPS_PROVIDERS[@]+"${LPIPS_PROVIDERS[@]}"} \
  >"$OUT_DIR/bench_lpips.log" 2>&1
[ "$MODE" = gpu ] && cp -f benchmarks/results/*.csv "$OUT_DIR/" 2>/dev/null

# 6. the short table, last -----------------------------------------------------------------------
if [ -f "$OUT_DIR/gpu_check.json" ]; then
  if [ "$MODE" = gpu ]; then "$PY" benchmarks/gpu_check.py --summary "$OUT_DIR/gpu_check.json" "$CHECKS_CSV";
  else "$PY" benchmarks/gpu_check.py --summary "$OUT_DIR/gpu_check.json"; fi
  cat "$OUT_DIR/ratios.log"
else
  log "no gpu_check.json: the check script failed before the end, see $OUT_DIR/check.log"; tail -20 "$OUT_DIR/check.log"
fi
log "done in $(( $(date +%s) - START ))s, results in $OUT_DIR"
exit $CHECK_RC
