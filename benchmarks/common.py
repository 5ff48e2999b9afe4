"""Shared pieces of the benchmark scripts: data, honest peak memory, child processes, tables.

Peak memory on the CPU is the resident-set high-water mark (VmHWM) of a fresh child process
(optionally with glibc's malloc returning freed blocks at once, `RETURNING_MALLOC`).
Python-level tools (tracemalloc) do not see torch's allocations, and a parent process that ran
another configuration first would carry that one's peak. Linux lets a process reset its own
high-water mark (`echo 5 > /proc/self/clear_refs`), so a child reports both its whole-life peak
and the peak of the measured phase alone (after the models are loaded).
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from minorsft.data import (
    Example,
    FieldSpec,
    Rejection,
    iter_examples,
    read_rows,
    resolve_data,
)

HERE = Path(__file__).resolve().parent


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Resident high-water mark since start or since the last `reset_peak_rss()`, MiB."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):  # not Linux: the whole-life peak is all we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# glibc's malloc keeps freed blocks in its heap for reuse, and raises the size above which it
# maps blocks separately (returned to the system on free) up to 32 MiB as the program frees
# large blocks. The resident high-water mark then includes memory that was free at its moment,
# by an amount that varies between runs. With the threshold pinned at 128 KiB every larger
# block is unmapped when freed, so the resident size follows the memory actually in use (the
# CPU counterpart of torch.cuda.max_memory_allocated); it costs speed, so it is used only for
# the memory comparisons that need that precision.
RETURNING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def load_examples(data: str, tokenizer, rows: int, prompt_field: str | None,
                  response_field: str | None, max_length: int) -> list[Example]:
    """The first `rows` usable examples of `data`, tokenized by minorsft's own pipeline."""
    spec = FieldSpec(prompt_field, response_field)
    out = []
    for item in iter_examples(resolve_data(data), tokenizer, spec, max_length, on_bad="skip"):
        if isinstance(item, Rejection):
            continue
        out.append(item)
        if len(out) == rows:
            break
    if not out:
        raise SystemExit(f"no usable rows in {data}")
    return out


def read_records(data: str, rows: int) -> list[dict]:
    """The first `rows` readable raw records (for TRL, which tokenizes its own way)."""
    records = []
    for path in resolve_data(data):
        for row in read_rows(path):
            if row.record is not None:
                records.append(row.record)
            if len(records) == rows:
                return records
    return records


def to_chat(record: dict, prompt_field: str | None, response_field: str | None
            ) -> tuple[list[dict], list[dict]]:
    """(prompt messages, completion messages) of a record, TRL's conversational format."""
    if "messages" in record:
        messages = record["messages"]
        return messages[:-1], messages[-1:]
    prompt = record[prompt_field or "prompt"]
    response = record[response_field or "response"]
    return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}]


def run_child(script: Path, args: list[str], timeout: float = 900,
              env: dict[str, str] | None = None) -> dict:
    """Run `script --child ...` in a fresh interpreter; its last stdout line is a JSON result."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"child {' '.join(args)} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def make_cache(args, workdir: Path) -> str:
    """`minorsft precompute` (fp32, CPU) of the first `args.rows` records of `args.data`."""
    from minorsft.precompute import PrecomputeConfig, run_precompute

    data = workdir / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_records(args.data, args.rows)))
    cache = workdir / "ref.parquet"
    run_precompute(PrecomputeConfig(model=args.model, data=str(data), out=str(cache),
                                    prompt_field=args.prompt_field,
                                    response_field=args.response_field,
                                    max_length=args.max_length, dtype="float32", device="cpu"))
    return str(cache)


def emit(result: dict) -> None:
    """A child's result: one JSON line, last on stdout."""
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


def median(values):
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line naming the machine and versions (for the docs next to every table)."""
    import platform

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
            f"python {platform.python_version()}")


def add_data_arguments(parser, rows: int, max_length: int = 1024) -> None:
    """The model and data options every benchmark takes (the same data for every contender)."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--prompt-field")
    parser.add_argument("--response-field")
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--max-length", type=int, default=max_length)


def record_trl_steps(trainer, sync=lambda: None) -> tuple[list[float], list[int]]:
    """Seconds of each optimizer step of a TRL/transformers trainer, and tokens of each batch.

    Wraps the trainer's collator (real tokens: the attention mask's sum, or every token of a
    padding-free row) and adds a step timer; both lists fill as `trainer.train()` runs. The
    dataloader may collate a batch ahead, so keep `tokens[:len(seconds)]`. `sync` waits for
    the device (CUDA) so that a step's time is its own.
    """
    from transformers import TrainerCallback

    seconds, tokens, starts = [], [], []
    collator = trainer.data_collator

    def counting_collator(features):
        batch = collator(features)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            sync()
            starts.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            sync()
            seconds.append(time.perf_counter() - starts[-1])

    trainer.data_collator = counting_collator
    trainer.add_callback(StepTimer())
    return seconds, tokens


def with_live_reference(reference, rows: list[dict], pad_id: int, device) -> list[dict]:
    """The rows with `ref_logps` scored now by a reference model held in memory (no cache)."""
    from minorsft.logprobs import answer_logps, pad_batch

    with torch.inference_mode():
        tensors = pad_batch([r["input_ids"] for r in rows], [r["answer_mask"] for r in rows],
                            pad_id, device)
        live = answer_logps(reference, *tensors).tolist()
    return [dict(row, ref_logps=value) for row, value in zip(rows, live, strict=True)]
