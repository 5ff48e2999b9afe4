"""Drift check: how far the cache's reference log-probs are from what the trainer computes.

The cache is written by an inference engine (vLLM, or transformers in some dtype); training
computes the policy's log-probs with transformers in the training dtype. At step 0 the policy IS
the reference model, so the log-ratio the trainer sees on a sample is pure engine drift:

    delta_r = log pi_trainer(y|x) - ref_logps(cache)        (summed over the m answer tokens)

It enters the loss as r, so it shifts MinorSFT's coefficient 2 sigmoid(-beta r) away from its
step-0 value of 1, and it is the m_theta = mean(delta_r / m) that training logs at step 0.
This module recomputes a sample of rows with the trainer's engine and reports:

- per-token mean and max |delta log-prob| (needs the cache engine's per-token values: precompute
  has them; `minorsft verify --rescore` recomputes them);
- the distribution of |delta_r| over the summed answers;
- the coefficient 2 sigmoid(-beta delta_r) at the chosen beta, and m_theta at step 0.

`measure_drift` takes cache rows (dicts with the cache's columns) and knows nothing of the cache
layout, so it serves `minorsft verify`, `precompute`'s built-in check and tests alike.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from minorsft.data import Example

DEFAULT_MAX_DELTA_R = 1.0  # nats; at beta 0.04 that moves the coefficient by up to 2 %
DEFAULT_PRECOMPUTE_SAMPLE = 16


@dataclass
class DriftReport:
    """What the drift check found on a sample of cache rows (JSON-ready through `as_dict`)."""

    rows: int
    answer_tokens: int
    beta: float
    reference: dict  # engine, version, dtype that wrote the cache
    trainer: dict  # engine and dtype that recomputed the rows (what training will use)
    delta_r_abs: dict  # |delta_r| summary over rows: mean, p50, p90, max
    delta_r_mean: float  # signed mean: a bias, where |delta_r| shows spread
    m_theta_step0: float  # mean(delta_r / m): the m_theta training logs at step 0 on these rows
    coefficient: dict  # 2 sigmoid(-beta delta_r): min, mean, max (1 everywhere without drift)
    coefficient_max_error: float  # max |2 sigmoid(-beta delta_r) - 1|
    token_abs_mean: float | None = None  # per answer token |delta log-prob|, when known
    token_abs_max: float | None = None
    reference_repeat_max: float | None = None  # |cache - same engine again|: non-determinism
    max_delta_r: float = DEFAULT_MAX_DELTA_R
    passed: bool = True
    # (id, delta_r, m, where in the input) of the largest |delta_r|
    worst_rows: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def rows_to_examples(rows: Sequence[dict]) -> list[Example]:
    return [Example(id=r["id"], line=r.get("line", 0), input_ids=list(r["input_ids"]),
                    answer_mask=[bool(x) for x in r["answer_mask"]], file=r.get("file") or "")
            for r in rows]


def sample_rows(rows: Iterable[dict], size: int, seed: int = 0) -> list[dict]:
    """A seeded uniform sample of `size` rows of a stream (reservoir sampling), in stream order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, dict]] = []
    for index, row in enumerate(rows):
        if len(reservoir) < size:
            reservoir.append((index, row))
        else:
            slot = rng.randrange(index + 1)
            if slot < size:
                reservoir[slot] = (index, row)
    return [row for _, row in sorted(reservoir, key=lambda item: item[0])]


def _quantile(sorted_values: list[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _coefficient(beta: float, r: float) -> float:
    """MinorSFT's gradient weight 2 sigmoid(-beta r) (eq. 7), 1 at r = 0; exact at any size of
    beta r (exp overflows past 709)."""
    x = beta * r
    if x >= 0:
        return 2.0 * math.exp(-x) / (1.0 + math.exp(-x))
    return 2.0 / (1.0 + math.exp(x))


def measure_drift(
    rows: Sequence[dict],
    trainer_engine,
    beta: float,
    reference: dict,
    max_delta_r: float = DEFAULT_MAX_DELTA_R,
    reference_token_logps: Sequence[Sequence[float]] | None = None,
) -> DriftReport:
    """Recompute `rows` with `trainer_engine` and compare with their cached `ref_logps`.

    Args:
        rows: cache rows (dicts with id, input_ids, answer_mask, num_tokens, ref_logps).
        trainer_engine: an engine with `score_tokens` (transformers, in the training dtype).
        beta: the beta training will use, for the coefficient figures.
        reference: what wrote the cache (engine, engine_version, dtype), for the report.
        max_delta_r: the check fails when any |delta_r| exceeds it (nats).
        reference_token_logps: the cache engine's per-answer-token log-probs of the same rows,
            if known; without them the per-token figures are None.
    """
    if not rows:
        raise ValueError("no rows to verify")
    examples = rows_to_examples(rows)
    trainer_tokens = trainer_engine.score_tokens(examples)
    deltas, token_deltas, repeats = [], [], []
    for index, (row, tokens) in enumerate(zip(rows, trainer_tokens, strict=True)):
        if len(tokens) != row["num_tokens"]:
            raise ValueError(f"row {row['id']}: {len(tokens)} answer tokens scored, cache says "
                             f"{row['num_tokens']}")
        deltas.append(math.fsum(tokens) - row["ref_logps"])
        if reference_token_logps is not None:
            reference_tokens = reference_token_logps[index]
            token_deltas.extend(abs(a - b) for a, b in zip(tokens, reference_tokens, strict=True))
            repeats.append(abs(math.fsum(reference_tokens) - row["ref_logps"]))
    # A NaN (or inf) delta is the worst drift there is: sorted last (sorted() leaves a NaN
    # wherever it happens to be, and the largest magnitude then looked finite) and a failure.
    from minorsft.cache import input_place  # (pyarrow: loaded only where a cache is read)

    magnitudes = sorted((abs(d) for d in deltas), key=_worst_last)
    coefficients = [_coefficient(beta, d) for d in deltas]
    order = sorted(range(len(rows)), key=lambda i: _worst_last(abs(deltas[i])),
                   reverse=True)[:5]
    report = DriftReport(
        rows=len(rows),
        answer_tokens=sum(row["num_tokens"] for row in rows),
        beta=beta,
        reference=reference,
        trainer={"engine": trainer_engine.name, "version": trainer_engine.version,
                 **trainer_engine.describe()},
        delta_r_abs={"mean": math.fsum(magnitudes) / len(magnitudes),
                     "p50": _quantile(magnitudes, 0.5), "p90": _quantile(magnitudes, 0.9),
                     "max": magnitudes[-1]},
        delta_r_mean=math.fsum(deltas) / len(deltas),
        m_theta_step0=math.fsum(d / row["num_tokens"] for d, row in zip(deltas, rows,
                                                                        strict=True)) / len(rows),
        coefficient={"min": min(coefficients), "mean": math.fsum(coefficients) / len(rows),
                     "max": max(coefficients)},
        coefficient_max_error=max(abs(c - 1.0) for c in coefficients),
        token_abs_mean=(math.fsum(token_deltas) / len(token_deltas)) if token_deltas else None,
        token_abs_max=max(token_deltas) if token_deltas else None,
        reference_repeat_max=max(repeats) if repeats else None,
        max_delta_r=max_delta_r,
        passed=all(map(math.isfinite, magnitudes)) and magnitudes[-1] <= max_delta_r,
        worst_rows=[[rows[i]["id"], deltas[i], rows[i]["num_tokens"], input_place(rows[i])]
                    for i in order],
    )
    return report


def _worst_last(magnitude: float) -> tuple[bool, float]:
    """Sort key for |delta_r|: ascending, with NaN after everything."""
    return (math.isnan(magnitude), 0.0 if math.isnan(magnitude) else magnitude)


def format_report(report: DriftReport) -> str:
    """A few plain lines for the terminal."""
    ref, trn = report.reference, report.trainer
    q = report.delta_r_abs
    lines = [
        f"drift check on {report.rows} rows ({report.answer_tokens} answer tokens): cache by "
        f"{ref.get('engine')} {ref.get('engine_version', '')} ({ref.get('dtype')}"
        f"{', 4-bit ' + ref['quantization'] if ref.get('quantization') else ''}) vs trainer "
        f"{trn['engine']} ({trn['dtype']}"
        f"{', 4-bit ' + trn['quantization'] if trn.get('quantization') else ''})",
    ]
    if report.token_abs_mean is not None:
        # Against a fresh rescoring, not against the cache: batching can move the cached sums
        # a little (the "own engine again" line below), so this can be 0 where |d r| is not.
        lines.append(f"  per-token |d log-prob|, trainer vs the cache's engine rescoring these "
                     f"rows now: mean {report.token_abs_mean:.2e}, max "
                     f"{report.token_abs_max:.2e} nats")
    else:
        lines.append("  per-token |d log-prob|: not measured (use --rescore to recompute the "
                     "sample with the cache's engine)")
    lines += [
        f"  |d r| per answer, trainer vs the cached sums: mean {q['mean']:.2e}, median "
        f"{q['p50']:.2e}, p90 "
        f"{q['p90']:.2e}, max {q['max']:.2e} nats; signed mean {report.delta_r_mean:+.2e}",
        f"  step-0 m_theta on these rows: {report.m_theta_step0:+.2e} (0 without drift)",
        f"  MinorSFT coefficient 2*sigmoid(-beta*r) at beta {report.beta}: min "
        f"{report.coefficient['min']:.5f}, max {report.coefficient['max']:.5f} (1 without "
        f"drift; worst error {100 * report.coefficient_max_error:.3f} %)",
    ]
    if (repeat := report.reference_repeat_max) is not None:
        # (batching moves a sum by float rounding, hundredths of a nat in bf16 at most; past
        # a nat, or the threshold, the values are not the engine's for these rows: edited,
        # damaged, or scored from other weights)
        why = ("batching non-determinism" if repeat <= min(report.max_delta_r, 1.0) else
               "more than batching moves them: the cached values are not what that engine "
               "computes for these rows now")
        lines.append(f"  cache vs its own engine again: max {repeat:.2e} nats ({why})")
    verdict = "OK" if report.passed else "ABOVE THRESHOLD"
    lines.append(f"  {verdict}: max |d r| {q['max']:.3g} vs --max-delta-r {report.max_delta_r}")
    if not report.passed and report.worst_rows:
        row_id, delta, tokens, *place = report.worst_rows[0]
        lines.append(f"  worst row: id {row_id!r}{f' ({place[0]})' if place else ''}, d r "
                     f"{delta:+.3g} over {tokens} answer tokens (--json lists the 5 worst)")
    return "\n".join(lines)


# --- minorsft verify ----------------------------------------------------------------------------


@dataclass
class VerifyConfig:
    """Settings of `minorsft verify`."""

    cache: str
    model: str | None = None  # None: the model that wrote the cache
    sample: int = 64
    seed: int = 0
    beta: float = 0.04
    dtype: str = "auto"  # the dtype training will use
    device: str = "auto"
    max_batch_tokens: int | None = None
    max_delta_r: float = DEFAULT_MAX_DELTA_R
    rescore: bool = False  # recompute the sample with the cache's engine for per-token figures
    allow_mismatch: bool = False
    # write the figures into the cache's metadata, as precompute's check does (`cache info`)
    store: bool = False

    def __post_init__(self):
        if self.store and self.allow_mismatch:
            raise ValueError("--store writes the figures into the cache as its own; with "
                             "--allow-mismatch they may be another model's: drop one of them")
        if self.sample < 1:
            raise ValueError("--sample must be positive")
        if not (math.isfinite(self.beta) and self.beta > 0):  # (nan gave nan and "OK")
            raise ValueError("--beta must be a positive number")
        if not self.max_delta_r >= 0:  # nan too; inf stays: never fail
            raise ValueError("--max-delta-r must be a number, not negative")


def reference_of(metadata: dict) -> dict:
    """What wrote the cache, for the report (and "quantization" where it was scored in 4-bit)."""
    quantized = ("quantization",) if metadata.get("quantization") else ()
    return {key: metadata.get(key) for key in ("engine", "engine_version", "dtype", *quantized)}


def run_verify(config: VerifyConfig, console: Console | None = None) -> DriftReport:
    """Sample the cache, recompute with the trainer's engine, report (see `measure_drift`)."""
    from minorsft.cache import check_model_matches, iter_rows, read_metadata, validate_values
    from minorsft.engines import make_engine
    from minorsft.engines.hf import TransformersEngine
    from minorsft.models import load_cache_model

    console = console or Console(stderr=True)
    cache = Path(config.cache)
    validate_values(cache)  # (a NaN reference log-prob was reported as a nan drift)
    metadata = read_metadata(cache)
    _, model_path, tokenizer = load_cache_model(config.model, metadata, cache)
    if not config.allow_mismatch:
        check_model_matches(metadata, model_path, tokenizer, cache)
    rows = sample_rows(iter_rows(cache), config.sample, config.seed)
    if len(rows) < config.sample:  # (it checked fewer rows than asked without a word)
        console.print(f"note: the cache has {len(rows)} rows, fewer than --sample "
                      f"{config.sample}: all of them are checked", highlight=False)
    reference_tokens = None
    if config.rescore:
        # The cache's engine first, closed before the trainer's loads: both may need the GPU.
        # vLLM as it ran then: a cache scored over several GPUs, or with a shorter
        # max_model_len, would not fit one GPU's memory otherwise.
        recorded = metadata.get("engine_settings") or {}
        vllm_settings = {key: recorded.get(key) for key in (
            "tensor_parallel_size", "gpu_memory_utilization", "max_model_len")}
        import torch

        if recorded.get("device") not in (None, "cuda" if torch.cuda.is_available() else "cpu"):
            # a share of a GPU's memory is no share of RAM (vLLM's CPU build refuses 0.9), nor
            # the other way round: the engine's default for this device
            vllm_settings["gpu_memory_utilization"] = None
        engine = make_engine(metadata.get("engine", "transformers"), model_path,
                             metadata.get("dtype", "auto"), config.device,
                             config.max_batch_tokens, metadata.get("quantization"),
                             **vllm_settings)
        try:
            reference_tokens = engine.score_tokens(rows_to_examples(rows))
        finally:
            engine.close()
    # (a cache scored in 4-bit is for a QLoRA run, whose policy starts from that model)
    trainer = TransformersEngine(model_path, dtype=config.dtype, device=config.device,
                                 max_batch_tokens=config.max_batch_tokens,
                                 quantization=metadata.get("quantization"))
    report = measure_drift(rows, trainer, config.beta, reference_of(metadata),
                           config.max_delta_r, reference_tokens)
    trainer.close()
    console.print(format_report(report), highlight=False, markup=False)
    if config.store:
        from minorsft.cache import update_metadata

        update_metadata(cache, {"drift": report.as_dict()})
        console.print(f"stored in {cache}'s metadata (`minorsft cache info` shows it)",
                      highlight=False, markup=False)
    return report


# --- the check that precompute runs --------------------------------------------------------------


def precompute_drift_check(cache: Path, engine, model_path: str, sample: int,
                           train_dtype: str = "auto", device: str = "auto", beta: float = 0.04,
                           max_batch_tokens: int | None = None, seed: int = 0) -> DriftReport:
    """The drift check at the end of precompute, on `sample` random rows of the finished cache.

    Takes the scoring engine's own per-token values for those rows (the cache keeps only sums),
    closes that engine (a vLLM engine holds most of the GPU), then recomputes the rows with
    transformers in the training dtype. A transformers engine already in that dtype is reused.
    """
    from minorsft.cache import iter_rows, read_metadata
    from minorsft.engines.hf import TransformersEngine
    from minorsft.models import pick_device, pick_precision, precision_name

    metadata = read_metadata(cache)
    rows = sample_rows(iter_rows(cache), sample, seed)
    reference_tokens = engine.score_tokens(rows_to_examples(rows))
    if isinstance(engine, TransformersEngine) and engine.precision == precision_name(
            *pick_precision(train_dtype, pick_device(device))):
        trainer = engine
    else:
        engine.close()
        trainer = TransformersEngine(model_path, dtype=train_dtype, device=device,
                                     max_batch_tokens=max_batch_tokens,
                                     quantization=metadata.get("quantization"))
    report = measure_drift(rows, trainer, beta, reference_of(metadata),
                           reference_token_logps=reference_tokens)
    trainer.close()
    return report
