"""The reference cache: one Parquet file of scored samples plus the metadata that makes it valid.

Schema (one row per sample, in input order):

=============  ===============  =========================================================
column         type             meaning
=============  ===============  =========================================================
id             string           the row's `id` column, else a content hash
line           int64            line (JSONL) or row (Parquet) of the input file, 1-based
input_ids      list<int32>      prompt + answer token ids, exactly as the model saw them
answer_mask    list<bool>       true for answer tokens (the ones the losses sum over)
num_tokens     int32            m, the number of answer tokens
ref_logps      float64          log pi_ref(y|x): the answer's summed reference log-prob
truncated      bool             whether --max-length cut the sequence
=============  ===============  =========================================================

The file's key-value metadata ``minorsft`` holds a JSON object: model name and fingerprints,
max length and truncation rule, dtype, engine and its version, package version, row count.
This module knows no model: it stores and checks what it is given.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"minorsft"
FORMAT_VERSION = 1

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("line", pa.int64(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("answer_mask", pa.list_(pa.bool_()), nullable=False),
    pa.field("num_tokens", pa.int32(), nullable=False),
    pa.field("ref_logps", pa.float64(), nullable=False),
    pa.field("truncated", pa.bool_(), nullable=False),
])

# What must match between a cache and a training run for the cached numbers to mean anything.
FINGERPRINT_FIELDS = ("weights", "tokenizer", "chat_template")


class CacheError(ValueError):
    """A cache that cannot be used; the message says why and what to do."""


class CacheWriter:
    """Writes rows to a temporary file next to `path` and renames it into place on `close()`.

    A crash leaves either the previous file or nothing at `path`, never a half-written cache.
    """

    def __init__(self, path: Path, metadata: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.metadata = dict(metadata, format_version=FORMAT_VERSION)
        handle, temp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                             dir=self.path.parent)
        os.close(handle)
        self._temp = Path(temp_name)
        self._writer = pq.ParquetWriter(self._temp, SCHEMA, compression="zstd")
        self.rows = 0

    def write(self, rows: dict[str, list]) -> None:
        """Append a batch given as columns (keys as in SCHEMA)."""
        for value in rows["ref_logps"]:
            if not math.isfinite(value):
                raise CacheError(f"refusing to write a non-finite reference log-prob ({value})")
        table = pa.Table.from_pydict(rows, schema=SCHEMA)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self, extra_metadata: dict | None = None) -> Path:
        """Finish the file with its metadata (row count included) and move it into place."""
        metadata = dict(self.metadata, **(extra_metadata or {}), rows=self.rows)
        self._writer.add_key_value_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        self._writer.close()
        os.replace(self._temp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._temp.unlink(missing_ok=True)


def read_metadata(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no such cache file (run `minorsft precompute` first)")
    try:
        file_metadata = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise CacheError(f"{path}: not a readable Parquet file ({error})") from error
    raw = (file_metadata.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise CacheError(f"{path}: a Parquet file, but not a minorsft cache (no metadata)")
    names = file_metadata.schema.to_arrow_schema().names
    missing = [f.name for f in SCHEMA if f.name not in names]
    if missing:
        raise CacheError(f"{path}: cache is missing columns {missing}")
    return json.loads(raw)


def iter_rows(path: Path, batch_rows: int = 256) -> Iterator[dict]:
    """Stream the cache row by row without loading it whole."""
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=SCHEMA.names):
        yield from batch.to_pylist()


def check_compatible(metadata: dict, expected: dict, path: Path) -> None:
    """Refuse a cache whose fingerprints or settings differ from what the run expects.

    `expected` maps a metadata key (e.g. "fingerprint.weights", "max_length") to the run's value.
    """
    problems = []
    for key, want in expected.items():
        have = metadata
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if have != want:
            problems.append(f"  {key}: cache has {have!r}, this run has {want!r}")
    if problems:
        raise CacheError(
            f"{path} does not match this run:\n" + "\n".join(problems) + "\n"
            "The cached reference log-probs were computed with a different model, tokenizer or "
            "setting. Re-run `minorsft precompute` with the policy's starting model, or pass "
            "--allow-mismatch if you know the difference does not matter."
        )
