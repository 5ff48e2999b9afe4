"""Precompute with rows tokenized in a background thread (the default) vs one after the other.

`minorsft precompute` reads and tokenizes rows (Jinja and the tokenizer, one CPU core) and scores
them (the engine). Since 0.7.0 a thread tokenizes the next window while the engine scores this
one (`minorsft/read_ahead.py`). This runs the same precompute both ways, alternating, each in a
fresh cache, and reports wall seconds and rows/s, with the time tokenizing alone takes (the most
the thread can hide). Usage:

    python benchmarks/bench_read_ahead.py --data ../gsm8k/train.jsonl \
        --prompt-field question --response-field answer --rows 1000 --repeats 3

On a GPU the engine mostly waits for CUDA, which releases the GIL, so the hidden share is
larger than on a CPU, where the engine's own threads want the cores the tokenizer uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_data_arguments, machine, read_records, table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, rows=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--engine", default="transformers")
    args = parser.parse_args()

    import minorsft.precompute as precompute
    from minorsft.data import FieldSpec, classify_rows
    from minorsft.models import load_tokenizer, resolve_model

    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "rows.jsonl"
        data.write_text("".join(json.dumps(r, default=str) + "\n"
                                for r in read_records(args.data, args.rows)))
        tokenizer = load_tokenizer(resolve_model(args.model))
        spec = FieldSpec(args.prompt_field, args.response_field)
        started = time.perf_counter()
        rows = answer_tokens = 0
        for _, item in classify_rows(data, tokenizer, spec, args.max_length):
            rows += 1
            answer_tokens += getattr(item, "num_tokens", 0)
        tokenize_s = time.perf_counter() - started

        seconds: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(args.repeats):
            for read_ahead in (False, True):
                precompute.READ_AHEAD = read_ahead
                out = Path(scratch) / f"cache-{read_ahead}-{repeat}"
                started = time.perf_counter()
                precompute.run_precompute(precompute.PrecomputeConfig(
                    model=args.model, data=str(data), out=str(out), engine=args.engine,
                    prompt_field=args.prompt_field, response_field=args.response_field,
                    max_length=args.max_length, device=args.device, dtype=args.dtype,
                    on_bad="skip", verify_sample=0))
                seconds[read_ahead].append(time.perf_counter() - started)

    print(f"{machine()}\n{args.model}, {rows} rows ({answer_tokens} answer tokens) of "
          f"{args.data}, engine {args.engine}, {args.repeats} runs each, alternating\n")
    print(f"tokenizing alone (data.classify_rows, one thread): {tokenize_s:.2f} s, "
          f"{rows / tokenize_s:,.0f} rows/s, {answer_tokens / tokenize_s:,.0f} answer tokens/s\n")
    plain = statistics.median(seconds[False])
    print(table(["precompute", "median s", "runs s", "rows/s", "x one after the other"], [
        [name, f"{statistics.median(seconds[mode]):.2f}",
         " ".join(f"{s:.2f}" for s in seconds[mode]),
         f"{rows / statistics.median(seconds[mode]):.1f}",
         f"{plain / statistics.median(seconds[mode]):.3f}"]
        for name, mode in (("one after the other", False), ("read ahead (default)", True))]))


if __name__ == "__main__":
    main()
