#!/usr/bin/env bash
# The step-0 guard's figures on a GPU (docs/reliability.md): a bf16 cache and a bf16 policy, and
# an fp32 cache with a bf16 policy. Prints the `step-0 check` lines; about a minute on one GPU.
#   scripts/gpu_step0_check.sh [MODEL]     (default: the built-in smollm2-135m-instruct)
set -euo pipefail
model="${1:-smollm2-135m-instruct}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for cache_dtype in bfloat16 float32; do
  python -m minorsft precompute --model "$model" --data demo --out "$work/ref-$cache_dtype" \
    --dtype "$cache_dtype" --device cuda 2>&1 | grep -E "wrote|error"
  python -m minorsft train --model "$model" --cache "$work/ref-$cache_dtype" \
    --output "$work/run-$cache_dtype" --dtype bfloat16 --device cuda --max-steps 1 \
    --batch-size 8 --micro-batch-size 8 2>&1 | grep -E "step-0|error" \
    | sed "s/^/cache $cache_dtype, policy bfloat16: /"
done
