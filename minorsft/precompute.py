"""Stage 1: data -> scoring engine -> cache.

Rows stream through in windows: each window is tokenized, scored by the engine (which may reorder
within it for efficient batches), and written in input order. Memory stays bounded by the window,
whatever the size of the corpus.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from minorsft import __version__
from minorsft.cache import CacheWriter
from minorsft.data import (
    TRUNCATION_RULE,
    Example,
    FieldSpec,
    Rejection,
    iter_examples,
    resolve_data,
)
from minorsft.engines import make_engine
from minorsft.models import dtype_name, fingerprint, load_tokenizer, resolve_model
from minorsft.verify import (
    DEFAULT_PRECOMPUTE_SAMPLE,
    DriftSample,
    format_report,
    precompute_drift_check,
)


@dataclass
class PrecomputeConfig:
    """Settings of `minorsft precompute` (the CLI's options, one place for their defaults)."""

    model: str
    data: str
    out: str
    prompt_field: str | None = None
    response_field: str | None = None
    max_length: int | None = 2048
    dtype: str = "auto"
    engine: str = "auto"
    device: str = "auto"
    max_batch_tokens: int = 8192
    window_rows: int = 1024
    on_bad: str = "error"
    # vLLM engine only (None: vLLM's default or minorsft's, see engines/vllm_engine.py)
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    # The drift check at the end (verify.py): rows recomputed by the trainer's engine, 0 = skip.
    verify_sample: int = DEFAULT_PRECOMPUTE_SAMPLE
    verify_dtype: str = "auto"  # the dtype training will use
    verify_beta: float = 0.04

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("--max-length must be at least 2")
        if self.max_batch_tokens < 1:
            raise ValueError("--max-batch-tokens must be positive")
        if self.verify_sample < 0:
            raise ValueError("--verify-sample must be 0 (skip) or positive")


@dataclass
class PrecomputeSummary:
    cache_path: str
    rows_in: int
    rows_cached: int
    rows_rejected: int
    answer_tokens: int
    seconds: float
    rejects_path: str | None


def rejects_path_for(out: Path) -> Path:
    return out.with_name(out.stem + ".rejects.jsonl")


def _count_lines(path: Path) -> int | None:
    if path.suffix.lower() != ".jsonl":
        return None
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def run_precompute(config: PrecomputeConfig, console: Console | None = None) -> PrecomputeSummary:
    console = console or Console(stderr=True)
    data_path = resolve_data(config.data)
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    spec = FieldSpec(config.prompt_field, config.response_field)
    engine = make_engine(config.engine, model_path, config.dtype, config.device,
                         config.max_batch_tokens, tensor_parallel_size=config.tensor_parallel_size,
                         gpu_memory_utilization=config.gpu_memory_utilization,
                         max_model_len=config.max_model_len)
    drift_sample = DriftSample(config.verify_sample)
    out = Path(config.out)
    metadata = {
        "model": config.model,
        "model_path": model_path,
        "fingerprint": fingerprint(model_path, tokenizer).as_dict(),
        "max_length": config.max_length,
        "truncation": TRUNCATION_RULE,
        "dtype": dtype_name(engine.dtype),
        "engine": engine.name,
        "engine_version": engine.version,
        "engine_settings": engine.describe(),
        "minorsft_version": __version__,
        "source": str(data_path),
        "fields": asdict(spec),
    }
    writer = CacheWriter(out, metadata)
    rejects_file = rejects_path_for(out)
    rejects_file.unlink(missing_ok=True)
    rejected = answer_tokens = 0
    started = time.perf_counter()
    total = _count_lines(data_path)
    progress = Progress(
        TextColumn("[bold]scoring"), BarColumn(), TextColumn("{task.completed} rows"),
        TextColumn("{task.fields[rows_s]:.1f} rows/s  {task.fields[tok_s]:.0f} tok/s"),
        TimeElapsedColumn(), console=console, transient=False,
    )
    try:
        with progress, _RejectLog(rejects_file) as reject_log:
            task = progress.add_task("score", total=total, rows_s=0.0, tok_s=0.0)
            window: list[Example] = []
            scored_tokens = 0

            def flush():
                nonlocal scored_tokens, answer_tokens
                if not window:
                    return
                scores = engine.score(window)
                drift_sample.offer(window, scores)
                writer.write({
                    "id": [e.id for e in window],
                    "line": [e.line for e in window],
                    "input_ids": [e.input_ids for e in window],
                    "answer_mask": [e.answer_mask for e in window],
                    "num_tokens": [e.num_tokens for e in window],
                    "ref_logps": scores,
                    "truncated": [e.truncated for e in window],
                })
                scored_tokens += sum(len(e.input_ids) for e in window)
                answer_tokens += sum(e.num_tokens for e in window)
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=len(window), rows_s=writer.rows / elapsed,
                                tok_s=scored_tokens / elapsed)
                window.clear()

            for item in iter_examples(data_path, tokenizer, spec, config.max_length,
                                      config.on_bad):
                if isinstance(item, Rejection):
                    rejected += 1
                    reject_log.write(item)
                    progress.update(task, advance=1)
                    continue
                window.append(item)
                if len(window) >= config.window_rows:
                    flush()
            flush()
        rows_cached = writer.rows
        if rows_cached == 0:
            raise ValueError(f"{data_path}: no usable rows (rejected {rejected}; see "
                             f"{rejects_file})")
        extra = {"rows_in": rows_cached + rejected, "rows_rejected": rejected,
                 "answer_tokens": answer_tokens}
        if config.verify_sample:
            report = precompute_drift_check(
                drift_sample, engine, model_path, metadata, config.verify_dtype, config.device,
                config.verify_beta, config.max_batch_tokens)
            console.print(format_report(report), highlight=False)
            extra["drift"] = report.as_dict()
        else:
            engine.close()
        writer.close(extra)
    except BaseException:
        writer.abort()
        raise
    return PrecomputeSummary(
        cache_path=str(out), rows_in=rows_cached + rejected, rows_cached=rows_cached,
        rows_rejected=rejected, answer_tokens=answer_tokens,
        seconds=time.perf_counter() - started,
        rejects_path=str(rejects_file) if rejected else None,
    )


class _RejectLog:
    """A JSONL report of rejected rows, created only if there is something to report."""

    def __init__(self, path: Path):
        self.path, self._handle = path, None

    def __enter__(self):
        return self

    def write(self, rejection: Rejection) -> None:
        if self._handle is None:
            self._handle = self.path.open("w", encoding="utf-8")
        self._handle.write(json.dumps(rejection.as_dict(), ensure_ascii=False) + "\n")

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.close()
