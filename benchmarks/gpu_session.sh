#!/usr/bin/env bash
# What a short GPU lease should measure for the training target (docs/performance.md, 7d), in
# one command of about 7 minutes on an H200 (an estimate from section 7d's runs; the script has
# not run on a GPU yet): the output head alone, then minorsft's default (and at 0.5B its
# eager-head and bucketed variants) against TRL's SFTTrainer at the Qwen2-0.5B shape in three
# rounds and the 1.5B shape in two.
#   OUT=results bash benchmarks/gpu_session.sh
#   OUT=smoke SMOKE=1 bash benchmarks/gpu_session.sh    # toy sizes on a CPU (~30 s)
# Results (7 files): $OUT/head.md, $OUT/r05/gpu_check.{md,json,log}, $OUT/r15/gpu_check.{...}.
# Picture: python benchmarks/plot_gpu_check.py $OUT/r05/gpu_check.json $OUT/r15/gpu_check.json
# TRL: where it does not import and .whl/ holds wheels (trl, datasets, dill, multiprocess; made
# elsewhere with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`), they
# are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_session_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import trl" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
head=() check=(--steps 12)
if [ "${SMOKE:-0}" = 1 ]; then
  head=(--device cpu --positions 300 --vocab 8192 --hidden 64 --repeats 2)
  check=(--device cpu --small --steps 2)
fi
started=$(date +%s)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 90 python3 benchmarks/gpu_head_alignment.py \
  "${head[@]}" 2>&1 | tee "$OUT/head.md"
echo "head: $(( $(date +%s) - started )) s"
# compile-layers (eager head blocks) and bucketed (answer positions in multiples of 256) beside
# the default: in run 1 the compiled head cost about 30 ms a step on new lengths and saved 20 ms
# on seen ones; TORCH_LOGS=recompiles puts any recompiling into the log, table 5s says whether
# new-length steps are slow alike or in spikes.
TORCH_LOGS=recompiles GPU_CHECK_TIMEOUT=300 OUT="$OUT/r05" bash benchmarks/gpu_check.sh \
  --sections trl "${check[@]}" --variants default,compile-layers,bucketed --rounds 3 --profile-steps 2
echo "0.5B: $(( $(date +%s) - started )) s"
GPU_CHECK_TIMEOUT=120 OUT="$OUT/r15" bash benchmarks/gpu_check.sh --shape 1.5b --sections trl \
  "${check[@]}" --variants default --rounds 2
echo "all: $(( $(date +%s) - started )) s"
