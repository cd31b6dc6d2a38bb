#!/usr/bin/env bash
# The GPU check: one script, under 6 minutes, run on a GPU machine (H100/H200, torch + CUDA, Triton 3.6,
# transformers 5.17, no network). GPU kernel tests (bf16, fp16, fp32 with exact dots), then the kernel,
# training and generation benchmarks; the last lines are the tables to record in benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
# The package maps kernels/ to coconut_engine.kernels; without network, install without dependencies,
# or fall back to a link for this run.
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
python -c "import coconut_engine.kernels.paged_attention" 2>/dev/null || {
  ln -sfn ../kernels coconut_engine/kernels; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
CLI="python -m coconut_engine.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"

echo "== GPU kernel tests"
timeout 150 python -m pytest -q -x tests/test_gpu_kernels.py 2>&1 | tail -5 | tee "$OUT/tests.txt"

echo "== kernels"
timeout 60 $CLI bench kernels --device cuda --out "$OUT" | tee "$OUT/kernels.txt"
echo "== train (gpt2, bf16 autocast, batch 32)"
# each point times itself in its own process (--no-interleave): a GPU's speed does not drift like this
# CPU's, and two fewer process starts per stage keep the step inside its time box
timeout 120 $CLI bench train --shape gpt2 --device cuda --batch 32 --stages 0,6 --reps 3 --no-interleave \
  --modes paged,multipass,transformers,floor --out "$OUT" | tee "$OUT/train.txt"
echo "== generate (smollm2-135m shape, batch 64)"
timeout 90 $CLI bench generate --shape smollm2-135m --device cuda --batch 64 --reps 2 --out "$OUT" | tee "$OUT/generate.txt"

echo; echo "==== summary ($(date -u +%Y-%m-%d))"
cat "$OUT/card.txt" "$OUT/tests.txt"
grep '^|' "$OUT/kernels.txt" "$OUT/train.txt" "$OUT/generate.txt" | sed 's/^[^:]*://'
