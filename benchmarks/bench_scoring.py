"""Reference scoring throughput: minorsft's engine vs TRL's DPO pre-computation vs a plain loop.

All three score the same rows with the same model weights in one process, interleaved round
after round (the machine may be shared, so no method gets a quiet or a busy slot to itself):

- minorsft: `TransformersEngine.score` (length-sorted batches under a token budget, inference
  mode, hidden states only at answer positions, output head in vocabulary blocks);
- plain: fixed-size batches in input order, right-padded, full [B, T, V] logits,
  log-softmax, gather (what a short script would do), under `torch.no_grad`;
- trl: `DPOTrainer._precompute_ref_logps`, the loop behind `precompute_ref_log_probs=True`
  (TRL 1.16). DPO data are pairs, so each row's answer is given as both chosen and rejected;
  TRL scores both, and both are counted as scored answer tokens.

Throughput = answer tokens scored / seconds. Usage:

    python benchmarks/bench_scoring.py --data gsm8k.jsonl --prompt-field question \
        --response-field answer --rows 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from minorsft.engines.hf import TransformersEngine
from minorsft.logprobs import pad_batch, sequence_logps
from minorsft.models import load_model, load_tokenizer, resolve_model

from common import add_data_arguments, load_examples, machine, median, read_records, table, to_chat


def plain_scores(model, examples, batch_size: int, pad_id: int) -> list[float]:
    scores = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            input_ids, attention_mask, answer_mask = pad_batch(
                [e.input_ids for e in batch], [e.answer_mask for e in batch], pad_id,
                torch.device("cpu"))
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).logits
            scores += sequence_logps(logits, input_ids, answer_mask).tolist()
    return scores


def make_trl(model_path: str, tokenizer, records, args, workdir: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = []
    for record in records:
        prompt, completion = to_chat(record, args.prompt_field, args.response_field)
        rows.append({"prompt": prompt, "chosen": completion, "rejected": completion})
    config = DPOConfig(output_dir=workdir, per_device_train_batch_size=args.batch_size,
                       precompute_ref_batch_size=args.batch_size, max_length=args.max_length,
                       report_to="none", use_cpu=True, dataloader_num_workers=0,
                       # fp32 like the others: TRL's default bf16=True scores under bf16 autocast
                       bf16=False,
                       precompute_ref_log_probs=False)  # we time the pre-computation ourselves
    model = load_model(model_path, torch.float32, torch.device("cpu"))
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    dataset = trainer.train_dataset
    answer_tokens = sum(len(c) + len(r) for c, r in zip(dataset["chosen_ids"],
                                                        dataset["rejected_ids"], strict=True))
    return trainer, dataset, answer_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, rows=64)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per batch for the plain loop and TRL")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="minorsft's padded-token budget per batch (default: the engine's, "
                             "1024 on a CPU)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default="minorsft,plain,trl")
    args = parser.parse_args()
    methods = args.methods.split(",")

    model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    examples = load_examples(args.data, tokenizer, args.rows, args.prompt_field,
                             args.response_field, args.max_length)
    answer_tokens = sum(e.num_tokens for e in examples)
    all_tokens = sum(len(e.input_ids) for e in examples)
    engine = TransformersEngine(model_path, dtype="float32", device="cpu",
                                max_batch_tokens=args.max_batch_tokens)
    pad_id = tokenizer.pad_token_id
    workdir = tempfile.mkdtemp(prefix="bench-scoring-")
    if "trl" in methods:
        trainer, trl_dataset, trl_tokens = make_trl(model_path, tokenizer,
                                                    read_records(args.data, args.rows), args,
                                                    workdir)

    seconds = {m: [] for m in methods}
    results = {}
    for round_index in range(args.rounds):
        for method in methods:
            started = time.perf_counter()
            if method == "minorsft":
                results[method] = engine.score(examples)
            elif method == "plain":
                results[method] = plain_scores(engine.model, examples, args.batch_size, pad_id)
            elif method == "trl":
                # A new fingerprint each round, or TRL would read its own cached file back.
                dataset = trl_dataset.add_column("round", [round_index] * len(trl_dataset))
                scored = trainer._precompute_ref_logps(dataset, f"bench{round_index}",
                                                       args.batch_size)
                results[method] = scored["ref_chosen_logps"]
            seconds[method].append(time.perf_counter() - started)

    tokens = {"minorsft": answer_tokens, "plain": answer_tokens}
    if "trl" in methods:
        tokens["trl"] = trl_tokens
    base = answer_tokens / median(seconds["plain"]) if "plain" in methods else None
    rows = []
    for method in methods:
        rate = tokens[method] / median(seconds[method])
        agree = max(abs(a - b) for a, b in zip(results[method], results["minorsft"],
                                               strict=True))
        rows.append([method, tokens[method], " / ".join(f"{s:.1f}" for s in seconds[method]),
                     rate, rate / base if base else float("nan"), f"{agree:.2e}"])
    print(f"\nReference scoring, {len(examples)} rows, {all_tokens} tokens, {answer_tokens} "
          f"answer tokens, fp32, rounds interleaved: {args.rounds}\nmachine: {machine()}\n")
    print(table(["method", "answer tokens scored", "seconds per round",
                 "answer tokens/s (median)", "x plain", "max abs diff vs minorsft"], rows))


if __name__ == "__main__":
    main()
