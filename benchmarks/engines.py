"""Tokens/s of the scoring engines on the same data, in one run.

    python benchmarks/engines.py --rows 256 --dtype float32
    python benchmarks/engines.py --model Qwen/Qwen2-7B-Instruct --data sft.jsonl --dtype bfloat16

Data: `--data` (any input minorsft reads, e.g. GSM8K's JSONL with --prompt-field question
--response-field answer), else the built-in demo set repeated to `--rows`. Every engine scores
the same tokenized examples; start-up (model load, vLLM's engine start) is timed apart from
scoring, and tokens/s counts every token of every sequence (prompt + answer) once. The script
also prints the largest per-row difference between the engines' summed answer log-probs.

Run it where vLLM is installed (on a CPU: `.venv-vllm/bin/python benchmarks/engines.py`); the
`if __name__ == "__main__":` guard is needed because vLLM starts its engine in a spawned process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

from minorsft.data import FieldSpec, Rejection, iter_examples, resolve_data
from minorsft.engines import make_engine
from minorsft.models import load_tokenizer, resolve_model


def load_examples(args) -> list:
    model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    spec = FieldSpec(args.prompt_field, args.response_field)
    examples = []
    while len(examples) < args.rows:
        before = len(examples)
        for item in iter_examples(resolve_data(args.data), tokenizer, spec, args.max_length,
                                  "skip"):
            if not isinstance(item, Rejection):
                examples.append(item)
            if len(examples) == args.rows:
                break
        if len(examples) == before:
            raise SystemExit(f"{args.data}: no usable rows")
    return examples


def bench(name: str, args, model_path: str, examples: list) -> dict:
    started = time.perf_counter()
    options = {}
    if name == "vllm":
        options = {"gpu_memory_utilization": args.gpu_memory_utilization,
                   "max_model_len": args.max_model_len,
                   "tensor_parallel_size": args.tensor_parallel_size}
    engine = make_engine(name, model_path, args.dtype, "auto", args.max_batch_tokens, **options)
    start_s = time.perf_counter() - started
    engine.score(examples[: min(4, len(examples))])  # warm-up: first-call allocations
    started = time.perf_counter()
    scores = engine.score(examples)
    score_s = time.perf_counter() - started
    tokens = sum(len(e.input_ids) for e in examples)
    result = {"engine": name, "version": engine.version, "dtype": str(engine.dtype),
              "rows": len(examples), "tokens": tokens, "start_s": round(start_s, 1),
              "score_s": round(score_s, 2), "tokens_per_s": round(tokens / score_s, 1),
              "scores": scores}
    engine.close()
    del engine
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--prompt-field")
    parser.add_argument("--response-field")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="default: the engine's (transformers: 1024 on a CPU; vLLM: 8192)")
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--tensor-parallel-size", type=int)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    model_path = resolve_model(args.model)
    examples = load_examples(args)
    results = [bench(name, args, model_path, examples) for name in args.engines.split(",")]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs visible"
    try:
        import torch

        if torch.cuda.is_available():
            machine += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    print(f"model {args.model}, {len(examples)} rows, "
          f"{sum(len(e.input_ids) for e in examples)} tokens, dtype {args.dtype}; {machine}")
    for r in results:
        print(f"{r['engine']:>12} {r['version']:<10} start {r['start_s']:7.1f} s   scoring "
              f"{r['score_s']:8.2f} s   {r['tokens_per_s']:9.1f} tokens/s")
    if len(results) > 1:
        diffs = [abs(a - b) for a, b in zip(results[0]["scores"], results[1]["scores"],
                                             strict=True)]
        print(f"max |{results[0]['engine']} - {results[1]['engine']}| summed answer log-prob "
              f"per row: {max(diffs):.2e} nats (mean {sum(diffs) / len(diffs):.2e})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine, "args": vars(args),
                       "results": [{k: v for k, v in r.items() if k != "scores"}
                                   for r in results]}, handle, indent=2)


if __name__ == "__main__":
    main()
