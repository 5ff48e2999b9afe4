#!/usr/bin/env bash
# Repeats a two-process CPU training run (torchrun, gloo) and reports the first one that does
# not exit within 60 s, with every thread's native stack (gdb, where installed). It is how the
# hang at exit fixed in minorsft/distributed.py (`barrier`) was found and checked.
#
#   bash scripts/ddp_exit_check.sh CACHE [RUNS] [STRATEGY]
#
# CACHE: a minorsft cache of a small model (the tests' tiny model takes about 5 s per run).
set -uo pipefail
cd "$(dirname "$0")/.."
cache=$1; runs=${2:-40}; strategy=${3:-ddp}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
for run in $(seq 1 "$runs"); do
    out="$work/run-$run"
    OMP_NUM_THREADS=1 "$python" -m torch.distributed.run --nproc-per-node 2 \
        --master-port $((30000 + RANDOM % 20000)) -m minorsft train --cache "$cache" \
        --output "$out" --strategy "$strategy" --micro-batch-size 2 --batch-size 8 \
        --max-steps 3 --no-step0-check > "$out.log" 2>&1 &
    launcher=$!
    for _ in $(seq 1 60); do
        sleep 1
        kill -0 "$launcher" 2>/dev/null || break
    done
    if kill -0 "$launcher" 2>/dev/null; then
        echo "run $run of $runs did not exit within 60 s (log: $out.log)"
        for pid in $(pgrep -f -- "-m minorsft train --cache $cache --output $out "); do
            [ "$pid" = "$launcher" ] && continue
            echo "== process $pid"
            command -v gdb > /dev/null && gdb -p "$pid" -batch -ex "thread apply all bt 20" \
                2>/dev/null | grep -E '^(#|Thread)' | cut -c1-160
        done
        pkill -P "$launcher"; kill "$launcher"
        exit 1
    fi
    wait "$launcher" || { echo "run $run failed (log: $out.log)"; exit 1; }
done
echo "all $runs runs exited ($strategy)"
rm -rf "$work"
