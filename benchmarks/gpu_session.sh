#!/usr/bin/env bash
# What a short GPU lease should measure for the training target (docs/performance.md, 7d), in
# one command of about 8 minutes on an H200 (an estimate: the script has not run on a GPU yet):
#   1. the output head alone on new and then seen answer counts, eager, compiled and bucketed,
#      each in a fresh process (gpu_head_counts.py): does the compiled head pay per new count?
#   2. long runs at the Qwen2-0.5B shape, one fresh process per run (gpu_long_run.py): TRL's
#      SFTTrainer and minorsft's default over 120 steps of new rows, two rounds, and minorsft
#      with bucketed answer counts and with an eager head once;
#   3. the same at the Qwen2-1.5B shape, TRL and minorsft, one round of 100 steps.
#   OUT=results bash benchmarks/gpu_session.sh
#   OUT=smoke SMOKE=1 bash benchmarks/gpu_session.sh    # toy sizes on a CPU (~2 min)
# Results: $OUT/head_counts.md, $OUT/r05/long_run.{md,json}, $OUT/r15/long_run.{md,json}, each
# run's stderr (TORCH_LOGS=recompiles) as $OUT/r05/<trainer>_round<n>.log, and $OUT/session.log.
# Picture: python benchmarks/gpu_long_run.py --plot $OUT/r05/long_run.json -o long_run.png
# TRL: where it does not import and .whl/ holds wheels (trl, datasets, dill, multiprocess; made
# elsewhere with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`), they
# are installed into a temporary folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_session_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "import trl" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d)"  # not under $OUT: what is there is copied back
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
head=() r05=(--steps 120) r15=(--steps 100)
if [ "${SMOKE:-0}" = 1 ]; then
  head=(--device cpu --vocab 8192 --hidden 64 --counts 4)
  r05=(--device cpu --small --steps 6 --warmup 2) r15=("${r05[@]}")
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  started=$(date +%s)
  timeout 100 python3 benchmarks/gpu_head_counts.py "${head[@]}" | tee "$OUT/head_counts.md"
  echo "head: $(( $(date +%s) - started )) s"
  TORCH_LOGS=recompiles timeout 320 python3 benchmarks/gpu_long_run.py --out "$OUT/r05" \
    "${r05[@]}" --rounds 2 --once \
    --trainers trl,minorsft,minorsft-bucketed,minorsft-eager-head
  echo "0.5B: $(( $(date +%s) - started )) s"
  timeout 150 python3 benchmarks/gpu_long_run.py --out "$OUT/r15" --shape 1.5b "${r15[@]}" \
    --rounds 1 --trainers trl,minorsft
  echo "all: $(( $(date +%s) - started )) s"
} 2>&1 | tee "$OUT/session.log"
