"""How fast precompute reads and tokenizes rows (`data.classify_rows`: the chat template, the
tokenizer, the answer mask): as 0.7.0 does it (texts tokenized 64 rows to a call, the answer
mask in one pass) against each change undone, alternating. Usage:

    python benchmarks/bench_tokenizing.py --data ../gsm8k/train.jsonl \
        --prompt-field question --response-field answer --rows 2000 --repeats 3

A fast tokenizer encodes a batch of texts on all cores, outside the GIL; the chat template
renders row by row on one. On a GPU, scoring a small model can outrun one core tokenizing
(docs/performance.md, 6c), so this is the rate precompute's read-ahead thread has to keep up
with.
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


def every_span(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """The answer mask as minorsft found it until 0.7.0: every span tested for every token."""
    return [start < stop and any(start < span_stop and stop > span_start
                                 for span_start, span_stop in spans)
            for start, stop in offsets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, rows=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import minorsft.data as data
    from minorsft.models import load_tokenizer, resolve_model

    one_pass = data._overlaps
    methods = {  # name: (rows per tokenizer call, answer mask)
        "0.7.0: 64 rows a call, mask in one pass": (data.TOKENIZE_BATCH_ROWS, one_pass),
        "a row a call, mask in one pass": (1, one_pass),
        "before 0.7.0: a row a call, every span per token": (1, every_span),
    }
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    masks: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as scratch:
        rows_file = Path(scratch) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(r, default=str) + "\n"
                                     for r in read_records(args.data, args.rows)))
        tokenizer = load_tokenizer(resolve_model(args.model))
        spec = data.FieldSpec(args.prompt_field, args.response_field)
        try:
            for _ in range(args.repeats):
                for name, (batch_rows, overlaps) in methods.items():
                    data._overlaps = overlaps
                    started = time.perf_counter()
                    items = [item for _, item in data.classify_rows(
                        rows_file, tokenizer, spec, args.max_length, batch_rows=batch_rows)]
                    seconds[name].append(time.perf_counter() - started)
                    masks[name] = [getattr(item, "answer_mask", None) for item in items]
        finally:
            data._overlaps = one_pass
    first, *others = masks.values()
    if any(other != first for other in others):
        raise SystemExit("the methods gave different answer masks")
    rows = len(first)
    answer_tokens = sum(sum(mask) for mask in first if mask is not None)
    print(f"{machine()}\n{args.model}, {rows} rows ({answer_tokens} answer tokens) of "
          f"{args.data}, {args.repeats} runs each, alternating; the same masks every way\n")
    print(table(["classify_rows", "median s", "runs s", "rows/s", "answer tokens/s"], [
        [name, f"{statistics.median(runs):.2f}", " ".join(f"{s:.2f}" for s in runs),
         f"{rows / statistics.median(runs):,.0f}",
         f"{answer_tokens / statistics.median(runs):,.0f}"]
        for name, runs in seconds.items()]))


if __name__ == "__main__":
    main()
