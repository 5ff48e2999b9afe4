#!/usr/bin/env bash
# The whole pipeline on one GPU, from the CLI, with nothing but torch + transformers + pyarrow +
# typer + rich + pytest installed (no pip install of the project: PYTHONPATH; pytest because the
# tokenizer comes from tests/conftest.py). A random model with Qwen2-0.5B's shape (152k
# vocabulary) is built from a config, so no hub is needed.
#   OUT=/some/folder bash scripts/gpu_pipeline_check.sh          # GPU: bf16 auto, about 2 min
#   OUT=smoke SMALL=1 bash scripts/gpu_pipeline_check.sh        # CPU smoke test of the script
#   QUICK=1: precompute, one training run with the defaults, reload and generate
#   KEEP=1: keep the temporary folder of models and caches (several GB), else removed at exit
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_pipeline_out}"; mkdir -p "$OUT"
missing="$(python -c "import importlib.util as u
print(' '.join(m for m in ('torch', 'transformers', 'pyarrow', 'typer', 'rich', 'pytest')
               if u.find_spec(m) is None))")"
if [ -n "$missing" ]; then
  echo "gpu_pipeline_check: needs the Python package(s) $missing: pip install $missing" >&2
  exit 1
fi
work="$(mktemp -d)"
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work (KEEP=1)" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
{
python - "$work/model" <<'PY'
import os, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
sys.path.insert(0, "tests")
from conftest import build_tiny_tokenizer
small = os.environ.get("SMALL") == "1"
tokenizer = build_tiny_tokenizer()
config = Qwen2Config(
    vocab_size=151936, hidden_size=128 if small else 896, intermediate_size=256 if small else 4864,
    num_hidden_layers=2 if small else 24, num_attention_heads=4 if small else 14,
    num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    bos_token_id=tokenizer.bos_token_id)
torch.manual_seed(0)
model = Qwen2ForCausalLM(config)
model.save_pretrained(sys.argv[1]); tokenizer.save_pretrained(sys.argv[1])
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")
PY
python -m minorsft precompute --model "$work/model" --data demo --out "$work/ref.parquet"
python -m minorsft cache info "$work/ref.parquet"
if [ "${QUICK:-0}" = 1 ]; then  # QUICK=1: precompute, one default train, reload (~1.5 min)
  python -m minorsft train --cache "$work/ref.parquet" --output "$work/minorsft" \
      --batch-size 16 --micro-batch-size 8 --epochs 3
  cp "$work/minorsft/metrics.jsonl" "$OUT/metrics-minorsft.jsonl"
else
python -m minorsft verify --cache "$work/ref.parquet" --sample 16 || echo "verify exit $?"
for loss in minorsft sft; do  # packed by default (per-sample SDPA, or flash-attn varlen)
  python -m minorsft train --cache "$work/ref.parquet" --output "$work/$loss" --loss $loss \
      --batch-size 16 --micro-batch-size 8 --epochs 3
  cp "$work/$loss/metrics.jsonl" "$OUT/metrics-$loss.jsonl"
done
python -m minorsft train --cache "$work/ref.parquet" --output "$work/padded" --no-packing \
    --batch-size 16 --micro-batch-size 8 --epochs 3
cp "$work/padded/metrics.jsonl" "$OUT/metrics-padded.jsonl"
# bf16 trains through fp32 master weights by default; pure bf16 for the memory comparison
python -m minorsft train --cache "$work/ref.parquet" --output "$work/pure-bf16" \
    --no-master-weights --batch-size 16 --micro-batch-size 8 --epochs 3
cp "$work/pure-bf16/metrics.jsonl" "$OUT/metrics-pure-bf16.jsonl"
# --compile (the default on CUDA with Triton; on a CPU this asks for it)
python -m minorsft train --cache "$work/ref.parquet" --output "$work/compiled" --compile \
    --batch-size 16 --micro-batch-size 8 --epochs 3
cp "$work/compiled/metrics.jsonl" "$OUT/metrics-compiled.jsonl"
fi
python - "$work/minorsft" <<'PY'
import json, os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2 plus 3"}],
    add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
print("reloaded and generated:", model.generate(**prompt, max_new_tokens=5, do_sample=False).shape)
for loss in ("minorsft", "sft", "padded", "pure-bf16", "compiled"):  # pure-bf16: no master weights
    if not os.path.exists(f"{folder}/../{loss}/metrics.jsonl"):  # QUICK=1 ran one
        continue
    rows = [json.loads(l) for l in open(f"{folder}/../{loss}/metrics.jsonl")]
    print(loss, "step0 m_theta %.3e coef %.4f" % (rows[0]["m_theta"], rows[0]["coefficient"]),
          "median step s %.3f" % sorted(r["step_seconds"] for r in rows[1:])[len(rows[1:]) // 2],
          "tok/s %.0f" % (sum(r["tokens"] for r in rows[1:]) / sum(r["step_seconds"] for r in rows[1:])),
          "peak GiB", rows[-1].get("peak_memory_gib"))
PY
} 2>&1 | tee "$OUT/gpu_pipeline.log"
