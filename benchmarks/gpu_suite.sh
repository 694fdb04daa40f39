#!/usr/bin/env bash
# One GPU session (about 10 minutes on an H100/H200): the whole test suite, tests/test_cuda.py
# included, then every benchmark's GPU mode. Results (JSON + Markdown tables) go to $OUT
# (default ./gpu-results). Nothing here is needed by CI.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PY:-python}
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }
run() { log "$*"; "$@" >>"$OUT/log.txt" 2>&1 || log "FAILED ($?): $*"; }

"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
run "$PY" -m pytest -q -x tests/test_cuda.py tests/test_distributed.py
run "$PY" -m pytest -q --maxfail=5
run "$PY" benchmarks/sparse_kernel.py --device cuda --dtype bfloat16 --batch 64 --no-progress --json "$OUT/sparse_kernel_bf16_b64.json"
run "$PY" benchmarks/tokens.py --bf16 --batch 256 --train-batch 64 --models vit_base_patch16_224 --no-progress --json "$OUT/tokens_bf16_eager.json"
run "$PY" benchmarks/tokens.py --bf16 --batch 256 --train-batch 64 --models vit_base_patch16_224 --rhos 0.7 0.5 --blocks 3 --compile max-autotune --no-progress --json "$OUT/tokens_bf16_max_autotune.json"
run "$PY" benchmarks/tokens.py --bf16 --batch 256 --skip-train --models vit_base_patch16_224 "vit_base_patch16_224:global_pool=avg" vit_base_patch16_siglip_224 eva02_base_patch14_224 beit_base_patch16_224 --rhos 0.7 0.5 --blocks 3 --no-progress --json "$OUT/tokens_families_bf16.json"
for b in 32 128; do
  run "$PY" benchmarks/training.py --bf16 --batches "$b" --rounds 2 --no-progress --json "$OUT/training_bf16_b$b.json"
done
run "$PY" benchmarks/selection.py --no-progress --json "$OUT/selection.json"
run "$PY" benchmarks/deltas.py --no-progress --json "$OUT/deltas.json"
run "$PY" benchmarks/serving.py --device cuda --dtype bfloat16 --batch 256 --rounds 3 --no-progress --json "$OUT/serving_bf16_b256.json"
log done
