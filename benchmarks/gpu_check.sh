#!/usr/bin/env bash
# One-GPU performance check (see benchmarks/gpu_check.py). Needs only torch + transformers:
#   OUT=/some/folder bash benchmarks/gpu_check.sh            # GPU, about 2-4 minutes
#   OUT=smoke bash benchmarks/gpu_check.sh --device cpu --small   # CPU smoke test
# Results: $OUT/gpu_check.md (tables), $OUT/gpu_check.json, $OUT/gpu_check.log.
# Picture of section 5 (here, with matplotlib): python benchmarks/plot_gpu_check.py $OUT/gpu_check.json -o gpu_trl.png
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  # The whole check must finish inside the timeout (330 s unless GPU_CHECK_TIMEOUT says); tables are written as they finish
  # (section 5's after each run, marked unfinished), so a timeout keeps what finished.
  timeout "${GPU_CHECK_TIMEOUT:-330}" python benchmarks/gpu_check.py --out "$OUT" "$@"
} 2>&1 | tee "$OUT/gpu_check.log"
