#!/usr/bin/env bash
# The GPU check: one script for a fresh H100/H200 (torch + CUDA 13, Triton 3.6, transformers 5.17, Python 3.12,
# no network) that fits in 7 minutes, pip install included. Every part has its own time box (seconds, override
# with the variables below) and keeps what it printed when its box ends; the summary table comes last.
#   whole test suite (kernels interpreted, as on CPU) | GPU kernel tests (compiled: bf16, fp16, fp32 exact dots)
#   | kernel resources on the device | decode GB/s vs copy bandwidth and SDPA | prefill, one-token backward
#   | training table (gpt2, qwen2.5-0.5b) | generation tokens/s vs transformers
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
BOX_SUITE=${BOX_SUITE:-100} BOX_GPU_TESTS=${BOX_GPU_TESTS:-60} BOX_RESOURCES=${BOX_RESOURCES:-25}
BOX_KERNELS=${BOX_KERNELS:-60} BOX_TRAIN=${BOX_TRAIN:-50} BOX_GENERATE=${BOX_GENERATE:-35}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 )) s"; }
# The package maps kernels/ to coconut_engine.kernels; without network, install without dependencies,
# or fall back to a link for this run.
python -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.txt" 2>&1 \
  || echo "pip install -e . failed (its output: $OUT/pip.txt)"
python -c "import coconut_engine.kernels.paged_attention" 2>/dev/null || {
  echo "coconut_engine.kernels does not import: linking kernels/ for this run"
  ln -sfn ../kernels coconut_engine/kernels; trap 'rm -f coconut_engine/kernels' EXIT
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
CLI="python -m coconut_engine.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"

# Unbuffered output: what a part printed before its box ended is in its file, not lost in a buffer.
export PYTHONUNBUFFERED=1
part() {  # part NAME BOX COMMAND...: run COMMAND under its time box, output to $OUT/NAME.txt
  local name=$1 box=$2; shift 2
  echo "== $name (box ${box} s, at $(elapsed))"
  # SIGINT when the box ends: pytest then prints its "N passed, M failed" line for what ran, a script
  # stops with KeyboardInterrupt; SIGKILL 10 s later if it is still there (exit 137).
  timeout --signal=INT --kill-after=10 "$box" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  case "$rc" in
    124) echo "(time box of ${box} s ended)" | tee -a "$OUT/$name.txt";;
    137) echo "(killed: the time box of ${box} s ended and it did not stop within 10 s of SIGINT, or out of memory)" \
           | tee -a "$OUT/$name.txt";;
  esac
  echo "$name: exit $rc" >> "$OUT/status.txt"
}
: > "$OUT/status.txt"

# 1. the whole suite on the CUDA host: kernels in the interpreter (tests/triton_mode.py), GPU tests skipped here
part suite "$BOX_SUITE" python -m pytest -q -x -p no:cacheprovider tests
# 2. the GPU kernel tests with compiled kernels
part gpu_tests "$BOX_GPU_TESTS" env COCONUT_GPU_TESTS=1 python -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py
# 3. registers, spills and shared memory of every kernel as the real driver reports them
part resources "$BOX_RESOURCES" python -m coconut_engine.kernels.aot_check --device cuda
# 4. kernels vs SDPA and the torch backend
part kernels "$BOX_KERNELS" python benchmarks/gpu_kernels.py
# 5. training: paged vs multipass vs transformers vs floor, bf16 autocast, batch 32, stages 0 and 6
part train_gpt2 "$BOX_TRAIN" $CLI bench train --shape gpt2 --device cuda --batch 32 --stages 0,6 --reps 3 \
  --no-interleave --modes paged,multipass,transformers,floor --out "$OUT"
part train_qwen "$BOX_TRAIN" $CLI bench train --shape qwen2.5-0.5b --device cuda --batch 32 --stages 0,6 --reps 2 \
  --no-interleave --modes paged,multipass,transformers,floor --out "$OUT"
# 6. generation tokens/s in bf16 vs transformers
part generate "$BOX_GENERATE" $CLI bench generate --shape smollm2-135m --device cuda --batch 64 --reps 2 --out "$OUT"

echo; echo "==== summary ($(date -u +%Y-%m-%d), $(elapsed))"
cat "$OUT/card.txt" "$OUT/status.txt"
echo "suite:     $(grep -E '(passed|failed|error)' "$OUT/suite.txt" | tail -1)"
echo "gpu tests: $(grep -E '(passed|failed|error)' "$OUT/gpu_tests.txt" | tail -1)"
for name in resources kernels train_gpt2 train_qwen generate; do
  # tables, and the rows a cut part printed as it went (bench train / generate progress lines)
  echo; echo "-- $name"; grep -E '^\||copy:|^stage [0-9]|tok/s|time box' "$OUT/$name.txt"
done
