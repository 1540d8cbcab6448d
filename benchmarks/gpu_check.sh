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
#   benchmarks/gpu_check.sh --scale      # instead of 3-6: the whole-step and integrity benchmarks (issue 6),
#                                        # SDXL 1024² / SD 1.5 512² on the GPU (~8 min); --scale --dry-run: tiny, CPU
set -uo pipefail

MODE=gpu
SCALE=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --prepare) MODE=prepare ;;
    --scale) SCALE=1 ;;
    *) echo "usage: $0 [--dry-run|--prepare|--scale]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

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
if "$PY" -c "import fastunlearn.kernels, sys; sys.exit(0 if fastunlearn.__file__.startswith('$ROOT') else 1)" 2>/dev/null; then
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

if [ "$SCALE" = 1 ]; then  # whole unlearning step vs plain fine-tuning, and cached vs naive integrity
  if [ "$MODE" = dry ]; then
    XL=(--arch tiny-sdxl --steps 1 --warmup 0 --no-csv); SD=(--arch tiny-sd --steps 1 --warmup 0 --no-csv)
    IN=(--pairs 2 --steps 2 --reps 1 --no-csv)
  else
    XL=(--arch sdxl --resolution 1024 --batch 1 --steps 5 --warmup 2); SD=(--arch sd15 --resolution 512 --batch 2 --steps 5 --warmup 2)
    IN=(--pairs 32 --steps 25 --reps 3)
  fi
  log "SDXL step: bf16, gradient checkpointing, ZeRO-2, full and attn2 (teacher copy / shared)"
  timeout 300 "$PY" benchmarks/bench_train_step.py "${XL[@]}" --precision bf16 --grad-ckpt on --zero 2 \
    --methods finetune,saddle --params full,attn2 --teacher copy,shared 2>&1 | grep -v "^train-step" | tee "$OUT_DIR/train_step_sdxl.log" | tail -8
  log "SD 1.5 step: bf16, ZeRO-2, checkpointing off/on, Saddle and OVW"
  timeout 150 "$PY" benchmarks/bench_train_step.py "${SD[@]}" --precision bf16 --grad-ckpt off,on --zero 2 \
    --methods finetune,saddle,ovw --params full 2>&1 | grep -v "^train-step" | tee "$OUT_DIR/train_step_sd15.log" | tail -14
  log "integrity: cached vs naive"
  timeout 100 "$PY" benchmarks/bench_integrity.py "${IN[@]}" 2>&1 | tail -3 | tee "$OUT_DIR/integrity.log"
  [ "$MODE" = gpu ] && cp -f benchmarks/results/*.csv "$OUT_DIR/" 2>/dev/null
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
  if ! timeout 300 "$PY" -c "from fastunlearn import _ext; _ext.load(cuda=True); print('  ops from', _ext._state['source'])" \
      2>&1 | tee "$OUT_DIR/build.log" | tail -3; then :; fi
  if ! "$PY" -c "from fastunlearn import _ext; _ext.load(cuda=True)" >/dev/null 2>&1; then
    log "JIT build failed (see build.log); trying setup.py build_ext --inplace"
    FASTUNLEARN_BUILD_CUDA=1 FASTUNLEARN_BUILD_STRICT=1 timeout 300 "$PY" setup.py -q build_ext --inplace \
      >"$OUT_DIR/build_setup.log" 2>&1 || log "setup.py build failed too (see build_setup.log)"
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

# 4. correctness and bandwidth -----------------------------------------------------------------
log "checking kernels against the reference"
timeout 240 "$PY" benchmarks/gpu_check.py "${CHECK_ARGS[@]}" --json "$OUT_DIR/gpu_check.json" >"$OUT_DIR/check.log" 2>&1
CHECK_RC=$?
grep -E "^(FAIL|device)" "$OUT_DIR/check.log" | head -20
tail -1 "$OUT_DIR/check.log"

# 5. benchmarks (rows appended to benchmarks/results/*.csv, copied to $OUT) --------------------
log "benchmark sweeps"
timeout 150 "$PY" benchmarks/bench_noise_loss.py "${BENCH_ARGS[@]}" ${NOISE_PROVIDERS[@]+"${NOISE_PROVIDERS[@]}"} >"$OUT_DIR/bench_noise_loss.log" 2>&1 \
  || log "bench_noise_loss stopped early (rc $?), see bench_noise_loss.log"
timeout 170 "$PY" benchmarks/bench_lpips.py "${BENCH_ARGS[@]}" ${LPIPS_PROVIDERS[@]+"${LPIPS_PROVIDERS[@]}"} >"$OUT_DIR/bench_lpips.log" 2>&1 \
  || log "bench_lpips stopped early (rc $?), see bench_lpips.log"
log "acceptance ratios (interleaved)"
CHECKS_CSV="$ROOT/benchmarks/results/checks.csv"
if [ "$MODE" = dry ]; then RATIO_ARGS=(--device cpu --reps 3 --no-csv); else RATIO_ARGS=(--device cuda --reps 50); fi
timeout 60 "$PY" benchmarks/bench_noise_loss.py --check "${RATIO_ARGS[@]}" 2>&1 | grep CHECK | tee "$OUT_DIR/ratios.log"
timeout 60 "$PY" benchmarks/bench_lpips.py --check "${RATIO_ARGS[@]}" 2>&1 | grep CHECK | tee -a "$OUT_DIR/ratios.log"
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
