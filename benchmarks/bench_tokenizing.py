"""How fast precompute reads and tokenizes rows (`data.classify_rows`: the chat template, the
tokenizer, the answer mask): as 0.8.0 does it on a GPU machine (batches of 64 rows rendered and
tokenized in worker processes, `--tokenize-workers`), and in one process as 0.7.0 does (texts
tokenized 64 rows to a call, the answer mask in one pass), against each change undone,
alternating. Usage:

    python benchmarks/bench_tokenizing.py --data ../gsm8k/train.jsonl \
        --prompt-field question --response-field answer --rows 2000 --repeats 3 --workers 2

`--turns N` joins N rows into one chat of N user and N assistant turns (every assistant turn
trained), whose every answer the template renders several times: multi-turn data. There 0.9.1
finds every answer's content from one render with a probe in each place, where earlier versions
rendered the whole chat once per answer for it (the row "0.9.1: one process" against "0.7.0").

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

from common import add_data_arguments, machine, read_records, table, to_chat  # noqa: E402


def every_span(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """The answer mask as minorsft found it until 0.7.0: every span tested for every token."""
    return [start < stop and any(start < span_stop and stop > span_start
                                 for span_start, span_stop, *_ in spans)
            for start, stop in offsets]


def joined(records: list[dict], turns: int, prompt_field: str | None,
           response_field: str | None) -> list[dict]:
    """Every `turns` records as one chat of `turns` user and assistant turns."""
    chats = []
    for first in range(0, len(records) - turns + 1, turns):
        messages = []
        for record in records[first:first + turns]:
            prompt, completion = to_chat(record, prompt_field, response_field)
            messages += [*prompt, *completion]
        chats.append({"messages": messages})
    return chats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, rows=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes for the first method (precompute's "
                             "--tokenize-workers); 0 leaves it out")
    parser.add_argument("--turns", type=int, default=1,
                        help="rows joined into one multi-turn chat")
    args = parser.parse_args()

    import minorsft.answer_spans as answer_spans
    import minorsft.data as data
    from minorsft.models import load_tokenizer, resolve_model
    from minorsft.row_workers import RowWorkers

    one_pass, one_render = answer_spans._overlaps, answer_spans._content_places

    def turn_by_turn(*_) -> dict:
        return {}  # (each answer's content found with a render of the whole chat of its own)

    batch = data.TOKENIZE_BATCH_ROWS
    methods = {  # name: (worker processes, rows per tokenizer call, answer mask, answer places)
        f"0.9.1: {args.workers} worker processes": (args.workers, batch, one_pass, one_render),
        "0.9.1: one process, contents found in one render": (0, batch, one_pass, one_render),
        "0.7.0: one process, 64 rows a call, mask in one pass": (0, batch, one_pass,
                                                                 turn_by_turn),
        "a row a call, mask in one pass": (0, 1, one_pass, turn_by_turn),
        "before 0.7.0: a row a call, every span per token": (0, 1, every_span, turn_by_turn),
    }
    if not args.workers:
        methods.pop(next(iter(methods)))
    if args.turns == 1:  # (a single answer is found the same both ways)
        methods.pop("0.9.1: one process, contents found in one render")
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    masks: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as scratch:
        rows_file = Path(scratch) / "rows.jsonl"
        records = read_records(args.data, args.rows * args.turns)
        spec = data.FieldSpec(args.prompt_field, args.response_field)
        if args.turns > 1:
            records = joined(records, args.turns, args.prompt_field, args.response_field)
            spec = data.FieldSpec()
        rows_file.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        tokenizer = load_tokenizer(resolve_model(args.model))
        # Made once, before the timing, as precompute makes them before the model loads.
        started = time.perf_counter()
        workers = RowWorkers(args.workers, tokenizer) if args.workers else None
        start_s = time.perf_counter() - started
        try:
            for _ in range(args.repeats):
                for name, (count, batch_rows, overlaps, places) in methods.items():
                    answer_spans._overlaps, answer_spans._content_places = overlaps, places
                    started = time.perf_counter()
                    items = [item for _, item in data.classify_rows(
                        rows_file, tokenizer, spec, args.max_length, batch_rows=batch_rows,
                        workers=workers if count else None)]
                    seconds[name].append(time.perf_counter() - started)
                    masks[name] = [getattr(item, "answer_mask", None) for item in items]
        finally:
            answer_spans._overlaps, answer_spans._content_places = one_pass, one_render
            if workers is not None:
                workers.close()
    first, *others = masks.values()
    if any(other != first for other in others):
        raise SystemExit("the methods gave different answer masks")
    rows = len(first)
    answer_tokens = sum(sum(mask) for mask in first if mask is not None)
    shape = f"chats of {args.turns} turns of" if args.turns > 1 else "rows"
    print(f"{machine()}\n{args.model}, {rows} {shape} ({answer_tokens} answer tokens) of "
          f"{args.data}, {args.repeats} runs each, alternating; the same masks every way"
          + (f"; {args.workers} workers started in {start_s:.2f} s" if workers else "") + "\n")
    print(table(["classify_rows", "median s", "runs s", "rows/s", "answer tokens/s"], [
        [name, f"{statistics.median(runs):.2f}", " ".join(f"{s:.2f}" for s in runs),
         f"{rows / statistics.median(runs):,.0f}",
         f"{answer_tokens / statistics.median(runs):,.0f}"]
        for name, runs in seconds.items()]))


if __name__ == "__main__":
    main()
