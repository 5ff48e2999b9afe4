#!/usr/bin/env bash
# The whole job on the built-in defaults, on the CPU: set up, score the demo set under
# SmolLM2-135M-Instruct, then train with MinorSFT and, for comparison, raw SFT.
# A few minutes on 2 cores. Outputs in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
source .venv/bin/activate
# --overwrite: a rerun scores afresh, also over a demo cache left by another minorsft version.
minorsft precompute --data demo --out runs/demo/ref.parquet --overwrite
minorsft cache info runs/demo/ref.parquet
# Held-out rows of the same kind, scored once too: the runs measure their deviation on them.
minorsft precompute --data demo-heldout --out runs/demo/heldout.parquet --overwrite \
    --verify-sample 0
# train's --overwrite: a rerun replaces the demo's earlier runs (without it, train refuses).
minorsft train --cache runs/demo/ref.parquet --output runs/demo/minorsft --loss minorsft \
    --batch-size 16 --micro-batch-size 4 --epochs 2 --overwrite \
    --eval-cache runs/demo/heldout.parquet
minorsft train --cache runs/demo/ref.parquet --output runs/demo/sft --loss sft \
    --batch-size 16 --micro-batch-size 4 --epochs 2 --overwrite \
    --eval-cache runs/demo/heldout.parquet
# The paper's Figure 1 for these two runs: m_theta, NLL, loss, coefficient, reward, lr by step,
# and m_theta and NLL on the held-out rows.
minorsft plot runs/demo/minorsft runs/demo/sft -o runs/demo/curves.png
echo "done: models and metrics.jsonl in runs/demo/minorsft and runs/demo/sft; curves in runs/demo/curves.png"
