"""Held-out numbers: NLL per answer token and the paper's m_theta (eq. 8) against the reference,
from summed log-probs. `minorsft eval` computes them once for a model; `minorsft train
--eval-cache` computes them every few steps for the policy being trained, on a cache of held-out
rows (precompute's: its reference log-probs are the m_theta baseline), into eval_metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from minorsft.cache import CacheError, iter_rows, open_cache, validate_values
from minorsft.models import comparable_fields

# What must match for token ids to mean the same text and to be the ids the model is given.
TOKENIZER_FIELDS = ("tokenizer", "tokenization", "chat_template")
# Evaluations over a run when --eval-every is not given (and one before the first step).
DEFAULT_EVALUATIONS = 10
# `train --eval-cache`'s records, one line per evaluation, in the run's --output folder
EVAL_METRICS = "eval_metrics.jsonl"


def heldout_metrics(policy_logps: list[float], ref_logps: list[float] | None,
                    num_tokens: list[int], truncated_rows: int = 0) -> dict:
    """NLL per token (token-weighted and sample mean) and, given reference log-probs, m_theta;
    `truncated_rows`: how many rows --max-length cut (the answer is scored up to the cut)."""
    metrics = {
        "rows": len(policy_logps),
        "truncated_rows": truncated_rows,
        "answer_tokens": sum(num_tokens),
        "nll_per_token": -sum(policy_logps) / sum(num_tokens),
        "mean_nll": sum(-p / m for p, m in zip(policy_logps, num_tokens, strict=True))
        / len(policy_logps),
    }
    if ref_logps is not None:
        # Summed in float64 in this order so that a model against itself gives exactly 0.
        ratios = [(p - r) / m for p, r, m in zip(policy_logps, ref_logps, num_tokens, strict=True)]
        metrics["m_theta"] = sum(ratios) / len(ratios)
    return metrics


def read_records(path: Path) -> list[dict]:
    """The records of an eval_metrics.jsonl (none where there is no file); a line that does not
    parse (a run killed while writing it) or is not a step's record is skipped."""
    records = []
    if Path(path).is_file():
        for text in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def eval_every(every: int | None, total_steps: int) -> int:
    """Steps between evaluations: `every`, or about DEFAULT_EVALUATIONS over the run."""
    return every or max(1, math.ceil(total_steps / DEFAULT_EVALUATIONS))


def is_eval_step(done: int, every: int, total_steps: int) -> bool:
    """Whether the policy is evaluated after `done` optimizer steps (0: before the first)."""
    return done % every == 0 or done == total_steps


def input_hashes(layout) -> set[str]:
    """The content hashes of the input files a cache was scored from (its manifests keep them;
    none known for a single-file cache)."""
    return {manifest["input"]["sha256"] for manifest in layout.manifests
            if isinstance(manifest.get("input"), dict) and "sha256" in manifest["input"]}


@dataclass
class HeldoutSet:
    """The first `limit` rows of a held-out cache: what the metrics need of them (reference
    log-probs, answer lengths) in memory, their token ids read from the cache at each
    evaluation (a large set's ids as Python lists would take ~40 bytes per token)."""

    path: Path
    limit: int | None
    ref_logps: list[float]
    num_tokens: list[int]
    truncated_rows: int
    set_hash: str  # the rows and their reference log-probs, hashed: another set differs

    def batches(self, rows: int = 256) -> Iterator[list[dict]]:
        stream = islice(iter_rows(self.path), self.limit)
        while batch := list(islice(stream, rows)):
            yield batch


def read_heldout(path: Path, training_cache: Path, limit: int | None
                 ) -> tuple[HeldoutSet, str | None]:
    """The first `limit` (None: all) rows of the held-out cache at `path`, and a note where its
    reference is not the training cache's (its m_theta then measures against another model).

    Refused: a cache tokenized otherwise than the training cache (its token ids would not be
    the ones the policy reads), one scored from the same input files (a copy or merge of the
    training cache), one with no rows, one with a value that is not finite.
    """
    label = f"--eval-cache {path}"
    training_layout = open_cache(training_cache)
    training_metadata = training_layout.metadata
    try:
        layout = open_cache(path)
        metadata = layout.metadata
    except (CacheError, OSError) as error:
        raise CacheError(f"{label}: {error}") from error
    if (same := input_hashes(layout)) and same == input_hashes(training_layout):
        raise CacheError(f"{label}: scored from the same input as the training cache "
                         f"{training_cache}: held-out numbers need rows the policy does not "
                         "train on")
    cached = metadata.get("fingerprint") or {}
    training = training_metadata.get("fingerprint") or {}
    # (the fields both caches have, as for a model against a cache: older caches lack some)
    for key in comparable_fields(cached, {key: training.get(key) for key in TOKENIZER_FIELDS
                                          if key in training}):
        if cached.get(key) != training.get(key):
            raise CacheError(f"{label}: tokenized with a different {key} than the training cache "
                             f"({training_metadata.get('model')}); its token ids do not apply. "
                             "Write it with the same model (and --chat-template) as the "
                             "training cache")
    try:
        validate_values(path)
    except CacheError as error:
        raise CacheError(f"{label}: {error}") from error
    held = HeldoutSet(path, limit, [], [], 0, "")
    digest = hashlib.sha256()
    for batch in held.batches():
        for row in batch:
            held.ref_logps.append(row["ref_logps"])
            held.num_tokens.append(row["num_tokens"])
            held.truncated_rows += bool(row.get("truncated"))
            digest.update(json.dumps([row["id"], row["input_ids"], row["ref_logps"]]).encode())
    held.set_hash = digest.hexdigest()[:16]
    if not held.ref_logps:
        raise CacheError(f"{label}: the cache has no rows (were they all rejected? see its "
                         "_rejects.jsonl): nothing to evaluate")
    note = None

    def precision(of: dict) -> str:  # (a 4-bit cache's: "float32, nf4")
        return ", ".join(filter(None, [of.get("dtype"), of.get("quantization")]))

    if cached.get("weights") != training.get("weights") or \
            precision(metadata) != precision(training_metadata):
        note = (f"{label} was scored under {metadata.get('model')} ({precision(metadata)}), "
                f"the training cache under {training_metadata.get('model')} "
                f"({precision(training_metadata)}): held-out m_theta measures against the "
                "former")
    return held, note


def evaluate(score, held: HeldoutSet, step: int) -> dict:
    """The held-out record after `step` optimizer steps: `score(rows)` gives the policy's
    summed log-probs of a batch of the rows' answers."""
    started = time.perf_counter()
    policy_logps = [logp for batch in held.batches() for logp in score(batch)]
    record = {"step": step, **heldout_metrics(policy_logps, held.ref_logps, held.num_tokens,
                                              held.truncated_rows),
              "heldout_set": held.set_hash, "seconds": time.perf_counter() - started}
    return record
