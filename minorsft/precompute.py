"""Stage 1: data -> scoring engine -> cache, in resumable, shardable parts.

The input's rows are numbered from 0 and cut into parts of `part_rows` rows; part k holds rows
[k * part_rows, (k + 1) * part_rows). Each part is scored in windows of `window_rows` accepted
rows (the engine may reorder within a window for efficient batches), written to its own Parquet
file atomically, and only then recorded in the manifest (see `minorsft.cache`). So:

- after a crash or `kill -9`, the same command skips the finished parts and the result equals,
  row for row, that of an uninterrupted run (a part's batches do not depend on what ran before);
- a changed input file (content hash) or setting is refused, naming what changed, rather than
  mixed into the cache (`--overwrite` starts over);
- `--shard I/N` scores only the parts k with k % N == I; N processes writing into one directory
  (or into several, combined with `minorsft cache merge`) make the same cache as one process.

Every input row ends up either cached or in the rejects file: input rows = cached + rejected.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import math
import re
import shutil
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

from minorsft import __version__, tools
from minorsft.cache import (
    FORMAT_VERSION,
    PARTS_FORMAT,
    REJECTS_DIR,
    CacheError,
    CacheWriter,
    atomic_write_text,
    collect_parts,
    diff_settings,
    input_change,
    is_own_name,
    is_single_file_cache,
    left_out_of,
    load_manifests,
    looks_like_cache,
    manifest_name,
    missing_pieces,
    part_name,
    read_metadata,
    update_metadata,
    write_manifest,
    write_rejects,
)
from minorsft.chat_templates import read_chat_template, template_notes
from minorsft.conversations import count_left_out, holds_something, left_out_note
from minorsft.data import (
    TRUNCATION_RULE,
    DataError,
    Example,
    FieldSpec,
    Rejection,
    classify_rows,
    data_label,
    resolve_data,
)
from minorsft.engines import make_engine
from minorsft.folder_lock import folder_lock
from minorsft.models import (
    QUANTIZATION_4BIT,
    check_dtype,
    context_length,
    context_note,
    fingerprint,
    load_tokenizer,
    read_model_config,
    refuse_lengths_past_learned_positions,
    resolve_model,
)
from minorsft.progress import progress
from minorsft.read_ahead import read_ahead
from minorsft.row_reading import read_rows, utf8_lines
from minorsft.row_workers import RowWorkers, auto_workers
from minorsft.verify import DEFAULT_PRECOMPUTE_SAMPLE, format_report, precompute_drift_check

# Metadata that decides the cached numbers: a resumed run or another shard must match all of it.
# (--on-bad is not among them: finished parts are the same whether later bad rows stop or skip.)
SETTINGS_KEYS = ("fingerprint", "max_length", "truncation", "dtype", "engine", "engine_version",
                 "minorsft_version", "fields", "part_rows", "window_rows", "max_batch_tokens",
                 "shards", "quantization")


@dataclass
class PrecomputeConfig:
    """Settings of `minorsft precompute` (the CLI's options, one place for their defaults)."""

    model: str
    data: str | list[str]  # several: a pattern the shell expanded (data.resolve_data)
    out: str
    prompt_field: str | None = None
    response_field: str | None = None
    system_field: str = "system"
    train_turns: str = "all"  # which assistant turns of a chat are answer (data.FieldSpec)
    # a built-in name, a .jinja file or a model folder (chat_templates.py); None: the model's
    chat_template: str | None = None
    max_length: int | None = 2048
    dtype: str = "auto"
    # --load-in-4bit: scored under the model in 4-bit NF4, as `train --load-in-4bit` (QLoRA)
    # starts from it
    load_in_4bit: bool = False
    engine: str = "auto"
    device: str = "auto"
    max_batch_tokens: int | None = None  # None: the engine's default for its device
    window_rows: int = 1024
    on_bad: str = "error"
    tokenize_workers: int | None = None  # None: row_workers.auto_workers
    # vLLM engine only (None: vLLM's default or minorsft's, see engines/vllm_engine.py)
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    # The drift check at the end (verify.py): rows recomputed by the trainer's engine, 0 = skip.
    verify_sample: int = DEFAULT_PRECOMPUTE_SAMPLE
    verify_dtype: str = "auto"  # the dtype training will use
    verify_beta: float = 0.04
    part_rows: int = 4096
    shard: str | None = None  # "I/N", I counted from 0
    overwrite: bool = False

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("--max-length must be at least 2 (0: no limit)")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError("--max-batch-tokens must be positive")
        if self.verify_sample < 0:
            raise ValueError("--verify-sample must be 0 (skip) or positive")
        if self.part_rows < 1:
            raise ValueError("--part-rows must be positive")
        if self.window_rows < 1:
            raise ValueError("window_rows must be positive")
        if self.tokenize_workers is not None and self.tokenize_workers < 0:
            raise ValueError("--tokenize-workers must be 0 (none) or positive")
        # vLLM's own options, checked whichever engine runs: vLLM would find them only after
        # the model's weights are loaded
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise ValueError("--tensor-parallel-size must be positive")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("--gpu-memory-utilization must lie in (0, 1]: the share of the "
                             "GPU's memory vLLM may take")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("--max-model-len must be at least 2")
        # checks them before any work
        FieldSpec(self.prompt_field, self.response_field, self.system_field,
                  train_turns=self.train_turns)
        if self.chat_template is not None and not self.chat_template.strip():
            # (an unset shell variable): silently the model's own template otherwise
            raise ValueError("--chat-template is empty: give a built-in name (chatml, plain), a "
                             ".jinja file or a model folder, or leave the option out")
        if self.on_bad not in {"error", "skip"}:
            raise ValueError(f"--on-bad must be 'error' or 'skip', got {self.on_bad!r}")
        parse_shard(self.shard)
        check_dtype(self.dtype, "--dtype")
        check_dtype(self.verify_dtype, "--verify-dtype")

    @property
    def shard_spec(self) -> tuple[int, int] | None:
        return parse_shard(self.shard)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`"I/N"` -> (I, N), refusing anything but 0 <= I < N."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise ValueError(f"--shard {text}: N, the number of shards, must be at least 1")
    if index >= count:
        raise ValueError(f"--shard {text}: I counts from 0, so with N={count} it is one of "
                         f"0/{count} .. {count - 1}/{count}")
    return index, count


@dataclass
class PrecomputeSummary:
    cache_path: str
    rows_in: int
    rows_cached: int
    rows_rejected: int
    answer_tokens: int
    seconds: float
    rejects_path: str | None
    parts_written: int = 0
    parts_skipped: int = 0
    complete: bool = True
    waiting_for: str = ""  # what is missing when this shard is done but the cache is not
    rows_truncated: int = 0  # cached rows that --max-length cut
    # column -> cached rows with text there that their reading left out (count_left_out's)
    left_out: dict = field(default_factory=dict)


# Tokenize in a background thread (read_ahead.py); off only to measure what it saves
# (benchmarks/bench_read_ahead.py).
READ_AHEAD = True


def _no_rows(data_files: list[Path]) -> ValueError:
    """The error for input that holds no row: empty files, or only blank lines."""
    one = len(data_files) == 1
    if all(path.suffix == ".parquet" for path in data_files):  # (a table of 0 rows)
        what = "file is a table of no rows" if one else "files are tables of no rows"
    elif any(path.suffix == ".parquet" for path in data_files):
        what = "files hold only blank lines or tables of no rows"
    elif any(path.stat().st_size for path in data_files):  # (blank lines were "the file is empty")
        what = "file holds only blank lines" if one else "files hold only blank lines"
    else:
        what = "file is empty" if one else "files are empty"
    return ValueError(f"{data_label(data_files)}: no rows (the {what})")


def _has_a_row(path: Path) -> bool:
    """Whether the file holds a row (a line that is not blank), good or bad: reads up to the
    first. A file the reader cannot open counts as having one (the reader says what is wrong
    where it always has)."""
    try:
        with contextlib.closing(read_rows(path)) as rows:
            return next(rows, None) is not None
    except DataError:
        return True


def _count_rows(files: list[Path]) -> int | None:
    """Input rows, for the progress bar's total (None where counting means parsing)."""
    counts = [_count_file_rows(path) for path in files]
    return None if None in counts else sum(counts)


def _count_file_rows(path: Path) -> int | None:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException):  # the reader names the problem with its line
            return None
    if suffix not in {".jsonl", ".ndjson"}:
        return None
    with path.open("rb") as handle:  # (a byte-order mark alone is blank, as data.py reads)
        try:
            lines, _ = utf8_lines(path, handle)
            return sum(1 for line in lines if line.removeprefix(codecs.BOM_UTF8).strip())
        except DataError:  # UTF-32, or UTF-16 cut off: the reader says so, with the line
            return None


def input_fingerprint(files: list[Path]) -> dict:
    """Content hash and size of the input: what a resumed run must find unchanged. For several
    files, the hash of their hashes in order, and their count."""
    digests = []
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        digests.append(digest.hexdigest())
    sizes = [path.stat().st_size for path in files]
    if len(files) == 1:
        return {"sha256": digests[0], "bytes": sizes[0]}
    combined = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    # (names only for messages: the same files spelled another way are the same input)
    return {"sha256": combined, "bytes": sum(sizes), "files": [
        {"name": path.name, "sha256": digest, "bytes": size}
        for path, digest, size in zip(files, digests, sizes, strict=True)]}


def run_precompute(config: PrecomputeConfig, console: Console | None = None) -> PrecomputeSummary:
    console = console or Console(stderr=True)
    started = time.perf_counter()
    data_files = resolve_data(config.data)
    template = read_chat_template(config.chat_template) if config.chat_template else None
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path, chat_template=template)
    for note in template_notes(tokenizer, template) if template else ():
        console.print(f"note: {note}", highlight=False, markup=False)
    spec = FieldSpec(config.prompt_field, config.response_field, config.system_field,
                     train_turns=config.train_turns)
    out = Path(config.out)
    for data_path in data_files:
        if out.resolve() == data_path.resolve():
            raise CacheError(f"--out {out} is the input data file: choose another --out")
        if data_path.resolve().is_relative_to(out.resolve()):
            raise CacheError(f"--data {data_path} lies inside --out {out}, the folder the cache "
                             "is written to: choose an --out outside the input's folder")
    if len(data_files) > 1:
        names = [path.name for path in data_files]
        if len(set(names)) < len(names):  # (two folders' train.jsonl read as "x, x")
            names = [str(path) for path in data_files]
        if len(names) > 6:  # (a data set of 500 shards: the first and last few say the order)
            names = [*names[:3], f"... {len(names) - 5} more ...", *names[-2:]]
        console.print(f"reading {len(data_files)} files in this order: {', '.join(names)}",
                      highlight=False, markup=False)
    model_config = read_model_config(model_path)
    refuse_lengths_past_learned_positions(config.max_length, config.model, model_config)
    if not any(map(_has_a_row, data_files)):  # (said after a 0/0 progress line before)
        raise _no_rows(data_files)
    if config.on_bad == "error" and config.shard_spec is None:
        # A file of the wrong shape (a JSON array, other columns) fails on its first row: say so
        # now, not after loading the model (minutes for a 7B one). Reads the first row only.
        _, first = next(classify_rows(data_files, tokenizer, spec, config.max_length,
                                      batch_rows=1), (0, None))
        if isinstance(first, Rejection) and first.error is not None:
            raise first.error
    first_record = None  # (read only for the notes below)
    if spec.system_field != FieldSpec.system_field or spec.prompt_field:
        first_row = next(read_rows(data_files[0]), None)
        first_record = first_row.record if first_row is not None else None
    if spec.system_field != FieldSpec.system_field and first_record is not None \
            and spec.system_field not in first_record:
        # The column is optional per row, so a mistyped name would silently give no row one.
        console.print(f"note: the first row has no {spec.system_field!r} column "
                      f"(--system-field); rows without it get no system message from it "
                      f"(its columns: {', '.join(sorted(first_record))})",
                      highlight=False, markup=False)
    if spec.prompt_field and first_record is not None and (definitions := [
            column for column in tools.DEFINITION_COLUMNS
            if holds_something(first_record.get(column))]):
        # (a tools column beside named ones may be anything; if it is the prompt's tools, the
        # answers would be trained without them: say so rather than leave it unseen)
        console.print(f"note: the rows' {definitions[0]!r} column is not given to the chat "
                      "template with --prompt-field/--response-field; for tool calling, give "
                      "the rows as chats (a 'messages' column beside 'tools')",
                      highlight=False, markup=False)
    shard = config.shard_spec
    created = not out.exists()
    if not out.is_file():  # (a file is prepare_output's to refuse or replace)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:  # a file in the folder's path
            raise CacheError(f"--out {out}: cannot create its folder ({error.strerror})") \
                from error
    lock_was_there = (out / _shard_lock_name(shard)).exists()
    # (the workers first: forked later, they would hold the lock's file, and keep it held if
    # this process were killed)
    with (_row_workers(config, tokenizer, console) as row_workers,
          _shard_lock(out, shard) as lock):
        try:
            prepare_output(out, config.overwrite)
            return _precompute_into(config, out, shard, data_files, model_path, model_config,
                                    tokenizer, spec, started, console, row_workers)
        except BaseException:
            if out.is_dir() and not load_manifests(out):  # no finished part
                if created:
                    _remove_if_unused(out, lock)  # leave nothing behind
                elif not lock_was_there:  # a folder refused as the user's: as it was
                    lock.unlink(missing_ok=True)
            raise


def _remove_if_unused(out: Path, lock: Path) -> None:
    """Remove a cache folder this run created and failed in before finishing a part, unless a
    shard running beside it (sharing `out`) has put something there: only empty folders go."""
    lock.unlink(missing_ok=True)
    for folder in (out / REJECTS_DIR, out):
        with contextlib.suppress(OSError):  # not empty: another shard's files
            folder.rmdir()


def _shard_lock_name(shard) -> str:
    return f".{manifest_name(shard)}.lock"


@contextlib.contextmanager
def _shard_lock(out: Path, shard):
    """Hold this shard's lock in `out` for the run; refuse if another process holds it.

    Two processes scoring the same shard into one directory would write the same parts and
    manifest. The lock is an flock on an empty file, so it goes with its process, even after
    kill -9, and the next run resumes.
    """
    lock_name = _shard_lock_name(shard)
    with folder_lock(out, lock_name, wait=False) as held:
        if not held:
            what = f"shard {shard[0]}/{shard[1]} of " if shard else ""
            raise CacheError(f"{out}: another precompute is writing {what}this cache (it holds "
                             f"{lock_name}); let it finish, or stop it and run this command "
                             "again to resume")
        yield out / lock_name


def _model_len_for(config: PrecomputeConfig, model_config) -> int | None:
    """vLLM's max_model_len where --max-model-len is not given: what --max-length needs (a
    sample plus the one token vLLM generates), up to the model's own limit + 1 (a sample of the
    model's full length; the engine lets vLLM take that one more). vLLM otherwise reserves room
    for the model's whole context (128k tokens for Llama-3.1), whose KV cache alone may not fit
    a GPU beside the weights. With no --max-length (0), the model's limit + 1 as well: vLLM's
    own default, the limit, would refuse a row of exactly the model's context. The limit is
    the context vLLM derives, RoPE scaling included."""
    limit = context_length(model_config)  # (None: no config; scaled as vLLM scales it)
    if config.max_length is None:
        return limit + 1 if limit else None
    wanted = config.max_length + 1
    return min(wanted, limit + 1) if limit else wanted


def _row_workers(config: PrecomputeConfig, tokenizer, console: Console,
                 ) -> contextlib.AbstractContextManager:
    """The processes that render and tokenize rows (none: a null context), to be made before
    the engine starts CUDA, threads or processes of its own and before any file is opened that
    they should not inherit (row_workers.py). Where processes cannot be made (a container
    without shared memory for their semaphores), rows are tokenized here, with a note."""
    count = config.tokenize_workers
    if count is None:
        import torch

        count = auto_workers(on_gpu=config.device != "cpu" and torch.cuda.is_available())
    if not count:
        return contextlib.nullcontext()
    try:
        return RowWorkers(count, tokenizer)
    except (OSError, ImportError, NotImplementedError, BrokenProcessPool) as error:
        console.print(f"note: no tokenize workers ({type(error).__name__}: {error}); rows are "
                      "tokenized in this process", highlight=False, markup=False)
        return contextlib.nullcontext()


def _precompute_into(config: PrecomputeConfig, out: Path, shard, data_files: list[Path],
                     model_path: str, model_config, tokenizer, spec: FieldSpec, started: float,
                     console: Console, row_workers: RowWorkers | None) -> PrecomputeSummary:
    source = input_fingerprint(data_files)
    # What an earlier run's manifest must match that is known before the model loads (minutes
    # for a 7B model): a resume with another input or settings is refused first.
    settings = {
        "fingerprint": fingerprint(model_path, tokenizer).as_dict(),
        "max_length": config.max_length,
        "truncation": TRUNCATION_RULE,
        "minorsft_version": __version__,
        "fields": asdict(spec),
        "part_rows": config.part_rows,
        "window_rows": config.window_rows,
        "shards": shard[1] if shard else 1,
        # (None for caches before 0.9.1 too: a resume with --load-in-4bit is refused)
        "quantization": QUANTIZATION_4BIT if config.load_in_4bit else None,
    }
    names = _names_as_recorded(refuse_other_settings(out, settings, source), data_files)
    engine = make_engine(config.engine, model_path, config.dtype, config.device,
                         config.max_batch_tokens, settings["quantization"],
                         tensor_parallel_size=config.tensor_parallel_size,
                         gpu_memory_utilization=config.gpu_memory_utilization,
                         max_model_len=config.max_model_len or _model_len_for(config, model_config))
    vllm_only = [option for option, value in (
        ("--tensor-parallel-size", config.tensor_parallel_size),
        ("--gpu-memory-utilization", config.gpu_memory_utilization),
        ("--max-model-len", config.max_model_len)) if value is not None]
    # (vLLM refuses such rows itself: its max_model_len stops at the model's limit)
    if engine.name != "vllm" and (
            note := context_note(config.max_length, config.model, model_config)):
        console.print(f"note: {note}", highlight=False, markup=False)
    if vllm_only and engine.name != "vllm":
        verb = "apply" if len(vllm_only) > 1 else "applies"
        console.print(f"note: {', '.join(vllm_only)} {verb} to the vLLM engine; the "
                      f"{engine.name} engine scores this run and ignores them", highlight=False)
    metadata = {
        "model": config.model,
        "model_path": model_path,
        **settings,
        "dtype": engine.precision,
        "engine": engine.name,
        "engine_version": engine.version,
        "engine_settings": engine.describe(),
        "source": (names[str(data_files[0])] if len(data_files) == 1
                   else data_label([Path(name) for name in names.values()])),
        **({"source_files": list(names.values())} if len(data_files) > 1 else {}),
        # train, verify and eval render and fingerprint with it (the fingerprint has its hash)
        **({"chat_template": {"given": config.chat_template, "text": tokenizer.chat_template}}
           if config.chat_template else {}),
        # The budget in effect (the engine's default for its device when none was given), so
        # that an explicit --max-batch-tokens equal to the default resumes the same cache.
        "max_batch_tokens": engine.max_batch_tokens,
    }
    manifest = open_manifest(out, shard, metadata, source)
    done = finished_parts(out, manifest)
    mine = lambda k: (shard is None or k % shard[1] == shard[0]) and k not in done  # noqa: E731
    _remove_stale_temps(out, mine, manifest_name(shard))
    if manifest.get("parts_total") is not None and not any(
            mine(k) for k in range(manifest["parts_total"])):
        console.print(f"{out}: all parts of this run were already done; nothing to score",
                      markup=False)
        summary = _summarise(out, shard, started, len(done), 0)
        # A run stopped between its last part and the drift check left no drift: measure it now.
        _check_drift(config, out, summary, engine, model_path, console)
        engine.close()
        return summary

    bar = progress(
        console,
        (TextColumn("[bold]scoring"), BarColumn(),
         TextColumn("{task.completed} rows read, {task.fields[scored]} scored"),
         TextColumn("{task.fields[rows_s]:.1f} rows/s  {task.fields[tok_s]:.0f} tok/s"),
         TimeElapsedColumn()),
        # rows read: every input row passes by, also those of other shards and of parts
        # already done; scored: the rows this run scores
        lambda task: (f"scoring: {task['completed']:.0f}/{task['total'] or '?'} rows read, "
                      f"{task['scored']} scored  "
                      f"{task['rows_s']:.1f} rows/s  {task['tok_s']:.0f} tok/s"),
    )
    counters = {"rows": 0, "tokens": 0, "parts": 0}  # scored by this run
    joined: dict = {}  # rows whose first answer token holds prompt text: count, first
    runs_on: dict = {}  # rows whose last answer token holds text after the answer: the same
    part: _PartBuilder | None = None
    input_rows = None
    rows_total = 0
    try:
        with bar:
            task = bar.add_task("score", total=_count_rows(data_files), rows_s=0.0, tok_s=0.0,
                                scored=0)

            def scored(rows: int, tokens: int) -> None:
                counters["rows"] += rows
                counters["tokens"] += tokens
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.update(task, rows_s=counters["rows"] / elapsed,
                           tok_s=counters["tokens"] / elapsed, scored=counters["rows"])

            def finish(builder: _PartBuilder) -> None:
                manifest["parts"][str(builder.index)] = builder.close()
                write_manifest(out, manifest)  # the part counts as done from here on
                counters["parts"] += 1

            input_rows = classify_rows(data_files, tokenizer, spec, config.max_length,
                                       lambda i: mine(i // config.part_rows),
                                       workers=row_workers)
            if READ_AHEAD:  # the next window is tokenized while this one is scored
                input_rows = read_ahead(input_rows, depth=config.window_rows)
            for index, item in input_rows:
                if index != rows_total:  # every row, in order: a part must never miss one
                    raise RuntimeError(f"minorsft bug: row {rows_total} of the input is "
                                       f"missing from the tokenized rows (next: row {index})")
                rows_total = index + 1
                bar.update(task, advance=1)
                if part is not None and index // config.part_rows != part.index:
                    finish(part)
                    part = None
                if item is None:
                    continue
                if part is None:
                    part = _PartBuilder(out, index // config.part_rows, index, metadata, names,
                                        config.window_rows, engine, scored)
                if isinstance(item, Rejection):
                    if config.on_bad == "error":
                        raise item.error
                    part.reject(item, index)
                    continue
                for kept, counts in ((item.prompt_joined is not None, joined),
                                     (item.runs_on is not None, runs_on)):
                    if kept:
                        counts["first"] = counts.get("first", item)
                        counts["rows"] = counts.get("rows", 0) + 1
                part.add(item, index)
            if part is not None:
                finish(part)
                part = None
    except BaseException:
        try:
            if input_rows is not None:  # stops the read-ahead thread now, not when collected
                input_rows.close()
        finally:
            if part is not None:
                part.abort()
        raise
    if rows_total == 0:
        raise _no_rows(data_files)
    manifest.update(input_rows=rows_total, parts_total=math.ceil(rows_total / config.part_rows))
    write_manifest(out, manifest)
    if joined:
        console.print(_prompt_joined_note(joined["rows"], joined["first"], tokenizer),
                      highlight=False, markup=False)
    if runs_on:
        first = runs_on["first"]
        token = tokenizer.decode([first.input_ids[first.runs_on]])
        console.print(f"note: {runs_on['rows']} cached row(s) have an answer whose last token "
                      f"also holds text the template writes after it (first: {first.file}, "
                      f"line {first.line}: {token!r}), as when its end-of-turn marker is text "
                      "the tokenizer fuses with what follows: the model learns to write the "
                      "start of that too; a template whose markers are the tokenizer's special "
                      "tokens, or with a line break after them, keeps answers apart",
                      highlight=False, markup=False)
    summary = _summarise(out, shard, started, len(done), counters["parts"])
    # (every row's, where the note before scoring looked at the first; the whole cache's once
    # it is complete, else this shard's)
    if left_out := summary.left_out:
        console.print(left_out_note(left_out, bool(spec.prompt_field), "cached",
                                    "the cache does not hold"), highlight=False, markup=False)
    _check_drift(config, out, summary, engine, model_path, console)
    engine.close()
    return summary


def _prompt_joined_note(rows: int, first: Example, tokenizer) -> str:
    """What to say of rows whose first answer token also holds the end of the generation prompt
    (`answer_spans.prompt_joined`): they are cached as they are, but trained on a token that
    generation from that prompt would not write."""
    token = tokenizer.decode([first.input_ids[first.prompt_joined]])
    return (f"note: {rows} cached row(s) have an answer whose first token also holds the "
            f"end of the prompt (first: {first.file}, line {first.line}: {token!r}), as when "
            "an answer starts with a space or newline, or a prompt ends with one: the model "
            "learns that token after a prompt cut short, not the answer generation writes "
            "after the whole prompt; strip the answers' leading (or the prompts' trailing) "
            "whitespace to train them as generated")


def _check_drift(config: PrecomputeConfig, out: Path, summary: PrecomputeSummary, engine,
                 model_path: str, console: Console) -> None:
    """The drift check (verify.py) once the cache is whole, stored in the cache's metadata.

    Runs once per cache: a cache that has its figures keeps them (a rerun of a finished cache,
    or the second of two shards that finished together and both found the cache whole; the
    lock makes that one wait for the first's figures instead of measuring again).
    """
    if not (config.verify_sample and summary.complete):
        return
    with folder_lock(out, "._drift.lock"):
        if "drift" in read_metadata(out):
            return
        report = precompute_drift_check(out, engine, model_path, config.verify_sample,
                                        config.verify_dtype, config.device, config.verify_beta,
                                        config.max_batch_tokens)
        console.print(format_report(report), highlight=False, markup=False)
        update_metadata(out, {"drift": report.as_dict()})


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to write over an old single-file cache or into a folder of other files; with
    `overwrite`, clear a previous cache.

    Only minorsft's own files (`cache.is_own_name`) are removed from a directory, never anything
    else in it; a folder that holds other files and no cache is refused, with or without
    `overwrite`, so that a cache never mixes with (or is taken for) the user's files.
    """
    if out.is_file():
        if not is_single_file_cache(out):  # never delete what minorsft did not write
            raise CacheError(f"{out} is a file and not a minorsft cache; precompute writes a "
                             "directory of parts at --out: choose another --out")
        if not overwrite:
            raise CacheError(f"{out} is a single-file cache of an earlier minorsft; precompute "
                             "writes a directory of parts: pass --overwrite to replace it, or "
                             "choose another --out")
        out.unlink()
    elif out.is_dir():
        # (hidden files such as .DS_Store do not count: never read, never deleted)
        foreign = sorted(path.name for path in out.iterdir()
                         if not (is_own_name(path.name) or path.name.startswith(".")))
        if foreign and not looks_like_cache(out):
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                              if len(foreign) > 3 else "")
            raise CacheError(f"{out} is a folder of other files ({shown}), not a minorsft "
                             "cache: give --out a new or empty folder")
        if overwrite:
            for path in out.iterdir():
                if not is_own_name(path.name) or path.name.endswith(".lock"):
                    continue  # the user's files; the locks (held by this and other runs)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def refuse_other_settings(out: Path, settings: dict, source: dict) -> list[dict]:
    """The manifests in `out`, after checking that each was written with `settings` (all of
    SETTINGS_KEYS, or some of them, checked before the model loads) from the input `source`."""
    manifests = load_manifests(out)
    for manifest in manifests:
        changes = diff_settings({key: manifest["settings"].get(key) for key in settings},
                                settings)
        if change := input_change(manifest["input"], source):
            changes.insert(0, change)
        if "fingerprint" in settings and (manifest["settings"].get("fingerprint") or {}).get(
                "chat_template") != settings["fingerprint"]["chat_template"]:
            given = (manifest.get("metadata", {}).get("chat_template") or {}).get("given")
            changes.append("the chat template differs from the cache's, which was "
                           + (f"--chat-template {given}" if given else "the model's own"))
        if changes:
            old = manifest["settings"].get("minorsft_version")
            resume = ("Run the original command to resume it"
                      if "minorsft_version" not in settings or old == settings["minorsft_version"]
                      # (an upgrade mid-cache: the same command runs the new version)
                      else f"Finish it with minorsft {old}, which started it (parts scored by "
                      "two versions could differ)")
            raise CacheError(
                f"{out} already holds a cache ({manifest['_file']}) made from another input or "
                "with other settings, and mixing them would give a wrong cache:\n  "
                + "\n  ".join(changes) + f"\n{resume}, pass --overwrite to start over, or "
                "choose another --out.")
    return manifests


def _names_as_recorded(manifests: list[dict], data_files: list[Path]) -> dict[str, str]:
    """Each input file's name (as this run spells it) -> its name in the cache's rows and
    metadata. A resumed run, or another shard, may name the same files otherwise (an absolute
    path where the first run gave a relative one; their contents were checked to be the same,
    in the same order): it writes the names the cache has, so that a resumed cache is the one
    an uninterrupted run writes, its `file` column of one spelling."""
    names = {str(path): str(path) for path in data_files}
    for manifest in manifests:
        recorded = manifest.get("metadata") or {}
        spelled = recorded.get("source_files") or (
            [recorded["source"]] if len(data_files) == 1 and "source" in recorded else [])
        if len(spelled) == len(data_files):
            return dict(zip(names, spelled, strict=True))
    return names


def open_manifest(out: Path, shard: tuple[int, int] | None, metadata: dict,
                  source: dict) -> dict:
    """This process's manifest: the one found (after checking it matches) or a new one.

    Every manifest already in `out` (other shards' too) must have been written with the same
    settings and the same input, else the run is refused with what changed.
    """
    settings = {key: metadata[key] for key in SETTINGS_KEYS}
    own = None
    for manifest in refuse_other_settings(out, settings, source):
        if manifest["_file"] == manifest_name(shard):
            own = manifest
    if own is None:
        own = {"format": PARTS_FORMAT, "format_version": FORMAT_VERSION,
               "settings": settings, "input": source, "metadata": metadata,
               "shard": list(shard) if shard else None, "parts": {},
               "input_rows": None, "parts_total": None}
    own["metadata"] = dict(metadata, **{k: v for k, v in own["metadata"].items()
                                        if k not in metadata})
    return own


def finished_parts(out: Path, manifest: dict) -> set[int]:
    """Parts recorded as done whose file is still there with the recorded row count."""
    import pyarrow.parquet as pq

    done = set()
    for index, entry in list(manifest["parts"].items()):
        file = out / entry["file"]
        try:
            ok = file.exists() and pq.read_metadata(file).num_rows == entry["rows_cached"]
        except Exception:  # an unreadable part is simply redone
            ok = False
        # its rejected rows are half of its record: a part without them is redone too
        ok = ok and not (entry["rejects"] and not (out / entry["rejects"]).exists())
        if ok:
            done.add(int(index))
        else:
            del manifest["parts"][index]
    return done


def _remove_stale_temps(out: Path, mine, own_manifest: str) -> None:
    """Delete temporary files a killed run left, but only this process's own (shards share)."""
    for folder in (out, out / REJECTS_DIR):
        for temp in folder.glob(".*.tmp"):
            match = re.match(r"\.part-(\d+)\.", temp.name)
            if (match and mine(int(match[1]))) or temp.name.startswith(f".{own_manifest}."):
                temp.unlink(missing_ok=True)


class _PartBuilder:
    """One part in the making: its Parquet file (written window by window) and its rejects."""

    def __init__(self, out: Path, index: int, first_row: int, metadata: dict,
                 names: dict[str, str], window_rows: int, engine, on_scored):
        self.out, self.index, self.window_rows = out, index, window_rows
        self.names = names  # each input file's name as the cache has it
        self.engine, self.on_scored = engine, on_scored
        self.rows_start = self.rows_stop = first_row
        self.file = out / part_name(index)
        self.rejects_file = out / REJECTS_DIR / f"part-{index:05d}.jsonl"
        self.rejects_file.unlink(missing_ok=True)  # left by an earlier try of this part
        self.writer = CacheWriter(self.file, dict(metadata, part=index))
        self.window: list[Example] = []
        self.rejections: list[str] = []
        self.answer_tokens = 0
        self.lines = [None, None]
        self.left_out: dict = {}  # conversations.count_left_out's, for the manifest

    def _seen(self, index: int, line: int) -> None:
        self.rows_stop = index + 1
        self.lines = [self.lines[0] or line, line]

    def reject(self, rejection: Rejection, index: int) -> None:
        self._seen(index, rejection.line)
        record = rejection.as_dict()
        record["file"] = self.names.get(record["file"], record["file"])
        for spelled, name in self.names.items():  # ("duplicate id 'r0' (first on a.jsonl, ...")
            if spelled != name:
                record["reason"] = record["reason"].replace(f"{spelled}, line",
                                                            f"{name}, line")
        self.rejections.append(json.dumps(record, ensure_ascii=False))

    def add(self, example: Example, index: int) -> None:
        self._seen(index, example.line)
        count_left_out(self.left_out, example, self.names.get(example.file, example.file))
        self.window.append(example)
        if len(self.window) >= self.window_rows:
            self.flush()

    def flush(self) -> None:
        if not self.window:
            return
        window, self.window = self.window, []
        scores = self.engine.score(window)
        self.writer.write({
            "id": [e.id for e in window],
            "file": [self.names.get(e.file, e.file) for e in window],
            "line": [e.line for e in window],
            "input_ids": [e.input_ids for e in window],
            "answer_mask": [e.answer_mask for e in window],
            "num_tokens": [e.num_tokens for e in window],
            "ref_logps": scores,
            "truncated": [e.truncated for e in window],
        })
        self.answer_tokens += sum(e.num_tokens for e in window)
        self.on_scored(len(window), sum(len(e.input_ids) for e in window))

    def close(self) -> dict:
        """Score what is left, put the files in place, and return the part's manifest entry."""
        self.flush()
        rows_in = self.rows_stop - self.rows_start
        rows_rejected = len(self.rejections)
        if self.writer.rows + rows_rejected != rows_in:  # every row cached or rejected
            raise AssertionError(f"part {self.index}: {rows_in} rows in, {self.writer.rows} "
                                 f"cached + {rows_rejected} rejected")
        if self.rejections:
            self.rejects_file.parent.mkdir(exist_ok=True)
            atomic_write_text(self.rejects_file, "\n".join(self.rejections) + "\n")
        self.writer.close({"rows_in": rows_in, "rows_rejected": rows_rejected,
                           "answer_tokens": self.answer_tokens})
        return {"file": self.file.name, "rows_start": self.rows_start,
                "rows_stop": self.rows_stop, "lines": self.lines, "rows_in": rows_in,
                "rows_cached": self.writer.rows, "rows_rejected": rows_rejected,
                "answer_tokens": self.answer_tokens,
                "rejects": f"{REJECTS_DIR}/{self.rejects_file.name}" if self.rejections else None,
                **({"left_out": self.left_out} if self.left_out else {})}

    def abort(self) -> None:
        self.writer.abort()


def _summarise(out: Path, shard, started: float, skipped: int, written: int) -> PrecomputeSummary:
    """Totals of the whole cache when it is complete (writing its rejects list), else this run's."""
    manifests = load_manifests(out)
    parts = collect_parts(out, manifests)
    problems = missing_pieces(manifests, parts)
    if not problems:
        entries = [parts[k] for k in sorted(parts)]
    else:
        own = next(m for m in manifests if m["_file"] == manifest_name(shard))
        entries = [own["parts"][k] for k in sorted(own["parts"], key=int)]
    rows_cached = sum(e["rows_cached"] for e in entries)
    rows_rejected = sum(e["rows_rejected"] for e in entries)
    rejects_path = None
    if not problems:
        rejects_path = write_rejects(out, entries)  # first: the error below points to it
        if rows_cached == 0:
            raise ValueError(f"{out}: no usable rows (all {rows_rejected} rejected; see "
                             f"{rejects_path})")
    # (a bool column per part: cheap; the summary did not say rows were cut at all)
    truncated = sum(pc.sum(pq.read_table(out / e["file"], columns=["truncated"])["truncated"])
                    .as_py() or 0 for e in entries if e["rows_cached"])
    return PrecomputeSummary(
        cache_path=str(out), rows_in=rows_cached + rows_rejected, rows_cached=rows_cached,
        rows_truncated=truncated,
        rows_rejected=rows_rejected, answer_tokens=sum(e["answer_tokens"] for e in entries),
        seconds=time.perf_counter() - started, rejects_path=rejects_path,
        parts_written=written, parts_skipped=skipped, complete=not problems,
        waiting_for="; ".join(problems), left_out=left_out_of(entries))
