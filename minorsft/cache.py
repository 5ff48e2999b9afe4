"""The reference cache: one Parquet file of scored samples plus the metadata that makes it valid.

Schema (one row per sample, in input order):

=============  ===============  =========================================================
column         type             meaning
=============  ===============  =========================================================
id             string           the row's `id` column, else a content hash
file           string           the input file the row came from (not in caches before 0.7)
line           int64            line (JSONL) or row (Parquet) of that file, 1-based
input_ids      list<int32>      prompt + answer token ids, exactly as the model saw them
answer_mask    list<bool>       true for answer tokens (the ones the losses sum over)
num_tokens     int32            m, the number of answer tokens
ref_logps      float64          log pi_ref(y|x): the answer's summed reference log-prob
truncated      bool             whether --max-length cut the sequence
=============  ===============  =========================================================

The file's key-value metadata ``minorsft`` holds a JSON object: model name and fingerprints,
max length and truncation rule, dtype, engine and its version, package version, row count.
This module knows no model: it stores and checks what it is given.

Two layouts are read alike (`read_metadata`, `iter_rows`, `validate_cache`):

- a single Parquet file (format of minorsft 0.1, still readable);
- a parts directory, what `minorsft precompute` writes::

      ref.parquet/                      a directory, whatever its name
        _manifest.json                  or _manifest.shard-I-of-N.json, one per shard
        part-00000.parquet              input rows [0, part_rows), cached ones, in input order
        part-00001.parquet              ...
        _rejects/part-00001.jsonl       rejected rows of part 1, with reasons (if any)
        _rejects.jsonl                  all rejected rows, written once the cache is complete

  Every file is written to a hidden temporary name and renamed into place, and a part enters a
  manifest only after its file is in place: a killed process leaves finished parts and nothing
  half-written. Names starting with ``_`` or ``.`` are skipped by Parquet dataset readers, so
  ``pyarrow.parquet.read_table("ref.parquet")`` reads the rows (polars: ``ref.parquet/*.parquet``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

METADATA_KEY = b"minorsft"
FORMAT_VERSION = 1

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("file", pa.string(), nullable=False),
    pa.field("line", pa.int64(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("answer_mask", pa.list_(pa.bool_()), nullable=False),
    pa.field("num_tokens", pa.int32(), nullable=False),
    pa.field("ref_logps", pa.float64(), nullable=False),
    pa.field("truncated", pa.bool_(), nullable=False),
])

# Columns a cache written by an earlier minorsft may lack, and what its rows read as instead.
LATER_COLUMNS = {"file": None}

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
        honour_umask(self._temp)
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
        _fsync(self._temp)
        os.replace(self._temp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._temp.unlink(missing_ok=True)


def read_metadata(path: Path) -> dict:
    """The cache's metadata (with `rows`), from a single file or a complete parts directory."""
    return open_cache(path).metadata


def iter_rows(path: Path, batch_rows: int = 256) -> Iterator[dict]:
    """Stream the cache row by row, in input order, without loading it whole."""
    for file in open_cache(path).files:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
        missing = {name: value for name, value in LATER_COLUMNS.items() if name not in names}
        columns = [name for name in SCHEMA.names if name not in missing]
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            for row in batch.to_pylist():
                yield row | missing if missing else row


# Per fingerprint field: what differs, and how to fix it.
FIX_HINTS = {
    "fingerprint.weights": (
        "the reference log-probs were scored with other weights than the policy this run "
        "starts from. Train with `--model` set to the model the cache was written with, or "
        "re-run `minorsft precompute --model <the policy's starting model>`."),
    "fingerprint.tokenizer": (
        "the tokenizer differs, so the cached token ids would mean other text to this model. "
        "Re-run `minorsft precompute` with this model."),
    "fingerprint.chat_template": (
        "the chat template differs, so prompts were rendered differently. Re-run "
        "`minorsft precompute` with this model's tokenizer."),
    "fingerprint.tensors": (
        "a tensor of the weights differs (the sampled `weights` may not see it: a change to some "
        "layers only). Train with `--model` set to the model the cache was written with, or "
        "re-run `minorsft precompute --model <the policy's starting model>`."),
    "fingerprint.tokenization": (
        "the tokenizer splits text into other ids (same vocabulary; other merges or "
        "pre-tokenizer settings), so the cached ids are not what this model's tokenizer makes "
        "of the data, and a model trained on them learns ids it will never be given. Re-run "
        "`minorsft precompute` with this model."),
}


def check_compatible(metadata: dict, expected: dict, path: Path) -> None:
    """Refuse a cache whose fingerprints or settings differ from what the run expects.

    `expected` maps a metadata key (e.g. "fingerprint.weights", "max_length") to the run's value.
    The message names every field that differs, both values, and how to fix it.
    """
    problems = []
    for key, want in expected.items():
        have = _lookup(metadata, key)
        if have != want:
            hint = FIX_HINTS.get(key, "re-run `minorsft precompute` with this run's settings.")
            problems.append(f"  {key}: cache has {have!r}, this run has {want!r}\n    -> {hint}")
    if problems:
        raise CacheError(
            f"{path} (written for model {metadata.get('model')!r}) does not match this run:\n"
            + "\n".join(problems) + "\n"
            "Pass --allow-mismatch only if you know the difference does not matter."
        )


def check_model_matches(metadata: dict, model_path: str, tokenizer, path: Path) -> None:
    """Refuse a cache written with another model than `model_path` and its tokenizer (every
    fingerprint field the cache has; see `models.comparable_fields`)."""
    from minorsft.models import comparable_fields, fingerprint

    run = comparable_fields(metadata.get("fingerprint"),
                            fingerprint(model_path, tokenizer).as_dict())
    check_compatible(metadata, {f"fingerprint.{k}": v for k, v in run.items()}, path)


def _lookup(metadata: dict, key: str):
    have = metadata
    for part in key.split("."):
        have = have.get(part) if isinstance(have, dict) else None
    return have


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _current_umask() -> int:
    """The process's umask, read from /proc where Linux shows it: `os.umask` can only read it by
    setting it, which for a moment would give other threads' new files no umask at all."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # elsewhere: set it and put it straight back
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a file or folder from mkstemp/mkdtemp (always private, 0600/0700) the permissions
    an ordinary file or folder would get, so that a cache on a shared file system is readable
    by whoever the user's umask allows."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~_current_umask())


def readable_weights(folder: Path) -> None:
    """The permissions the umask gives to the .safetensors files in `folder`: safetensors
    (0.8.1 on) writes them through a private temporary file, so they were 0600 whatever the
    umask (safetensors issue 782) where config.json beside them is 0644: a model trained here
    could not be served by another user (a vLLM server's, say)."""
    for file in Path(folder).glob("*.safetensors"):
        honour_umask(file)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a hidden temporary file beside `path`, then rename it into place."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        honour_umask(Path(temp_name))
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


# --- the parts directory ------------------------------------------------------------------------

PARTS_FORMAT = "minorsft-parts"
MANIFEST_PREFIX = "_manifest"
REJECTS_DIR = "_rejects"
REJECTS_FILE = "_rejects.jsonl"
MANIFEST_KEYS = ("settings", "input", "metadata", "parts")


# Every name precompute writes in a parts directory: parts, manifests, the rejects file and
# folder, and hidden temporary and lock files. Anything else there is the user's, never touched.
OWN_NAME = re.compile(r"part-\d{5,}\.parquet|_manifest(\.shard-\d+-of-\d+)?\.json"
                      r"|_rejects\.jsonl|_rejects|\..+\.(tmp|lock)")


def is_own_name(name: str) -> bool:
    """Whether a file or folder name in a parts directory is one that precompute writes."""
    return OWN_NAME.fullmatch(name) is not None


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def manifest_name(shard: tuple[int, int] | None) -> str:
    if shard is None:
        return f"{MANIFEST_PREFIX}.json"
    return f"{MANIFEST_PREFIX}.shard-{shard[0]}-of-{shard[1]}.json"


def load_manifests(directory: Path) -> list[dict]:
    """Every manifest in a parts directory (one per shard, or one), each with its `_file`."""
    manifests = []
    for file in sorted(Path(directory).glob(f"{MANIFEST_PREFIX}*.json")):
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise CacheError(f"{file}: unreadable manifest ({error})") from error
        if not isinstance(manifest, dict) or manifest.get("format") != PARTS_FORMAT:
            raise CacheError(f"{file}: not a minorsft manifest")
        if missing := [key for key in MANIFEST_KEYS if key not in manifest]:
            raise CacheError(f"{file}: damaged manifest (no {', '.join(missing)}); run the "
                             "precompute again with --overwrite")
        manifest["_file"] = file.name
        manifests.append(manifest)
    return manifests


def write_manifest(directory: Path, manifest: dict) -> None:
    body = {k: v for k, v in manifest.items() if k != "_file"}
    atomic_write_text(Path(directory) / manifest_name(_shard(manifest)),
                      json.dumps(body, indent=1, sort_keys=True))


def _shard(manifest: dict) -> tuple[int, int] | None:
    shard = manifest.get("shard")
    return None if shard is None else (int(shard[0]), int(shard[1]))


def diff_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every key whose value differs (keys of either side); where both
    values are dicts, their keys that differ (`fields.train_turns: 'all' -> 'last'`)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += diff_settings(before, after, f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changes


def input_change(old: dict, new: dict) -> str | None:
    """What differs between the input a cache was made from and this run's, or None."""
    if (old["sha256"], old["bytes"]) == (new["sha256"], new["bytes"]):
        return None
    old_files, new_files = old.get("files") or [], new.get("files") or []
    if not (old_files and new_files):
        return f"input content: {_describe_input(old)} -> {_describe_input(new)}"
    old_hashes = [entry["sha256"] for entry in old_files]
    new_hashes = [entry["sha256"] for entry in new_files]
    if sorted(old_hashes) == sorted(new_hashes):
        return ("input files: the same files in another order: "
                f"{_names(old_files)} -> {_names(new_files)}")
    removed = [entry for entry in old_files if entry["sha256"] not in new_hashes]
    added = [entry for entry in new_files if entry["sha256"] not in old_hashes]
    changed = sorted({entry["name"] for entry in removed} & {entry["name"] for entry in added})
    removed = [entry for entry in removed if entry["name"] not in changed]
    added = [entry for entry in added if entry["name"] not in changed]
    return "input files: " + "; ".join(f"{what}: {_names(entries)}" for what, entries in (
        ("changed", [{"name": name} for name in changed]), ("added", added),
        ("removed", removed)) if entries)


def _names(entries: list[dict]) -> str:
    names = [entry["name"] for entry in entries]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _describe_input(source: dict) -> str:
    files = f"{len(source['files'])} files, " if source.get("files") else ""
    return f"{files}sha256 {source['sha256'][:12]}..., {source['bytes']} bytes"


@dataclass
class CacheLayout:
    """A cache as found on disk: its files in row order and its combined metadata."""

    path: Path
    kind: str  # "file" or "parts"
    metadata: dict
    files: list[Path]
    manifests: list[dict] = field(default_factory=list)
    parts: dict[int, dict] = field(default_factory=dict)


def collect_parts(directory: Path, manifests: list[dict]) -> dict[int, dict]:
    """Finished parts of all manifests by index; refuses shards that disagree."""
    first = manifests[0]
    parts: dict[int, dict] = {}

    def where(manifest: dict) -> Path:  # merged manifests come from several directories
        return Path(manifest.get("_dir", directory)) / manifest["_file"]

    for manifest in manifests:
        for key in ("settings", "input", "part_rows"):
            # (first's value before the arrow, as first is named first)
            if key == "input":  # the same content under other file names is the same input,
                # as precompute's resume check takes it
                what = input_change(first[key], manifest[key])
            elif manifest.get(key) == first.get(key):
                what = None
            elif key == "settings":
                what = "; ".join(diff_settings(first[key], manifest[key]))
                versions = {m[key].get("minorsft_version") for m in (first, manifest)}
                if len(versions) > 1:  # (an upgrade between shards)
                    what += ("; score every shard with one minorsft version (parts scored by "
                             "two could differ)")
            else:
                what = f"{key}: {first.get(key)!r} -> {manifest.get(key)!r}"
            if what:
                raise CacheError(
                    f"{where(first)} and {where(manifest)} were written with different {key} "
                    f"and cannot form one cache: {what}")
        for index, entry in manifest["parts"].items():
            parts.setdefault(int(index), entry)
    return parts


def missing_pieces(manifests: list[dict], parts: dict[int, dict]) -> list[str]:
    """What keeps a parts directory from being a complete cache (empty list: complete)."""
    problems = []
    counts = {(_shard(m) or (0, 1))[1] for m in manifests}
    if len(counts) > 1:
        problems.append(f"manifests of different shard counts {sorted(counts)}; merge or "
                        "re-run with one --shard I/N scheme")
        return problems
    count = counts.pop()
    present = {(_shard(m) or (0, 1))[0]: m for m in manifests}
    for shard in range(count):
        manifest = present.get(shard)
        label = "the run" if count == 1 else f"shard {shard}/{count}"
        if manifest is None:
            problems.append(f"{label} has not started here (no {manifest_name((shard, count))})")
        elif manifest.get("parts_total") is None:
            problems.append(f"{label} has not finished (run the same precompute command again "
                            "to resume it)")
    totals = {m["parts_total"] for m in manifests if m.get("parts_total") is not None}
    if len(totals) > 1:
        problems.append(f"shards disagree on the number of parts: {sorted(totals)}")
    elif totals and not problems:
        missing = sorted(set(range(totals.pop())) - set(parts))
        if missing:
            problems.append(f"parts {missing[:20]} are missing")
    return problems


def looks_like_cache(path: str | Path | None) -> bool:
    """Whether `path` is laid out as a cache (a parts directory with a manifest, or a Parquet
    file), without checking it: for telling a cache from a model path. `open_cache` checks."""
    if not path:
        return False
    path = Path(path)
    if path.is_dir():
        return any(path.glob(f"{MANIFEST_PREFIX}*.json"))
    return path.suffix == ".parquet" and path.is_file()


def is_single_file_cache(path: Path) -> bool:
    """Whether `path` is a Parquet file that minorsft wrote (its metadata names minorsft)."""
    try:
        metadata = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowException):  # not a file, or not Parquet
        return False
    return METADATA_KEY in metadata


def open_cache(path: Path, require_complete: bool = True) -> CacheLayout:
    """Find a cache (file or parts directory), check its structure, and combine its metadata.

    Refuses a missing path, a Parquet file without minorsft metadata, columns of the wrong type,
    and (with `require_complete`) a parts directory with missing shards or parts, or part files
    that are missing or whose row count differs from the manifest.
    """
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no such cache (run `minorsft precompute` first)")
    if path.is_file():
        metadata = _file_metadata(path)
        return CacheLayout(path, "file", metadata, [path])
    manifests = load_manifests(path)
    if not manifests:
        raise CacheError(f"{path}: a directory without a minorsft manifest (_manifest*.json); "
                         "not a cache, or its precompute never finished a part")
    parts = collect_parts(path, manifests)
    if require_complete and (problems := missing_pieces(manifests, parts)):
        raise CacheError(f"{path}: incomplete cache: " + "; ".join(problems))
    merged_from = next((m["merged_from"] for m in manifests if m.get("merged_from")), None)
    # (a merged cache has no precompute command of its own: its shards' made it)
    again = ("run the same precompute command again to recompute it" if not merged_from else
             "recompute it where the shard was scored (the same precompute command) and merge "
             f"again (minorsft cache merge {' '.join(merged_from)} --out {path} --overwrite)")
    files = [_check_part(path, index, parts[index], again) for index in sorted(parts)]
    entries = [parts[index] for index in sorted(parts)]
    metadata = dict(manifests[0]["metadata"])
    for manifest in manifests[1:]:  # keys added later (e.g. drift) to one shard's manifest
        for key, value in manifest["metadata"].items():
            metadata.setdefault(key, value)
    metadata.update(
        format_version=FORMAT_VERSION, layout="parts", parts=len(entries),
        shards=(_shard(manifests[0]) or (0, 1))[1],
        rows=sum(e["rows_cached"] for e in entries),
        rows_in=sum(e["rows_in"] for e in entries),
        rows_rejected=sum(e["rows_rejected"] for e in entries),
        answer_tokens=sum(e["answer_tokens"] for e in entries),
    )
    if left_out := left_out_of(entries):
        metadata["left_out"] = left_out
    return CacheLayout(path, "parts", metadata, files, manifests, parts)


def _check_part(folder: Path, index: int, entry: dict, again: str) -> Path:
    """The file of part `index` (its manifest `entry`) in `folder`, after checking that it is
    there whole, with the rows the manifest says, and its rejects list beside it. `again`: how
    to make it anew."""
    file = folder / entry["file"]
    if not file.exists():
        raise CacheError(f"{file}: part {index} is listed in the manifest but missing; {again}")
    try:
        file_metadata = pq.read_metadata(file)
    except (OSError, pa.ArrowException) as error:
        raise CacheError(f"{file}: part {index} is damaged ({error}); {again}") from error
    rows = file_metadata.num_rows
    if rows != entry["rows_cached"]:
        raise CacheError(f"{file}: has {rows} rows, the manifest says {entry['rows_cached']}; "
                         "the part was replaced or damaged")
    _check_schema(file, file_metadata.schema.to_arrow_schema())
    rejects = entry.get("rejects")
    if rejects and not (folder / rejects).exists():
        raise CacheError(f"{folder / rejects}: the rejected rows of part {index} are listed in "
                         f"the manifest but missing; {again}")
    return file


def left_out_of(entries: list[dict]) -> dict:
    """The columns with text their rows' reading left out, over the parts of manifest
    `entries` in row order (each part's as conversations.count_left_out counts them; parts
    written before 0.9.3 count none): rows summed, the first part's first row kept."""
    total: dict = {}
    for entry in entries:
        for column, tally in (entry.get("left_out") or {}).items():
            kept = total.setdefault(column, {"rows": 0, "first": tally["first"]})
            kept["rows"] += tally["rows"]
    return total


# Where a cache was expected and something else came, it is most often the input data.
_INPUT_HINT = "; if it is SFT data, `minorsft precompute --data` turns it into a cache"


def _starts_like_parquet(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"PAR1"
    except OSError:
        return False


def _file_metadata(path: Path) -> dict:
    try:
        file_metadata = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as error:
        if path.name.startswith(MANIFEST_PREFIX) and path.suffix == ".json":
            raise CacheError(f"{path}: a cache's manifest, not a cache; give its folder, "
                             f"{path.parent}") from error
        hint = "" if _starts_like_parquet(path) else _INPUT_HINT  # else a damaged cache, perhaps
        raise CacheError(f"{path}: not a readable Parquet file ({error}){hint}") from error
    raw = (file_metadata.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise CacheError(f"{path}: a Parquet file, but not a minorsft cache (no metadata)"
                         f"{_INPUT_HINT}")
    _check_schema(path, file_metadata.schema.to_arrow_schema())
    metadata = json.loads(raw)
    if "part" in metadata:  # one part of a parts directory holds only some of its rows
        raise CacheError(f"{path}: this is part {metadata['part']} of the cache in "
                         f"{path.parent}, not a whole cache: give the folder {path.parent}")
    metadata["layout"] = "file"
    return metadata


def _check_schema(path: Path, schema: pa.Schema) -> None:
    problems = []
    for expected in SCHEMA:
        if expected.name not in schema.names:
            if expected.name in LATER_COLUMNS:
                continue
            problems.append(f"column {expected.name!r} is missing")
        elif (found := schema.field(expected.name).type) != expected.type:
            problems.append(f"column {expected.name!r} is {found}, expected {expected.type}")
    if problems:
        raise CacheError(f"{path}: not the minorsft cache schema: " + "; ".join(problems)
                         + ". Re-run `minorsft precompute` with this version of minorsft.")


VALUE_CHECK_COLUMNS = ["id", "line", "ref_logps", "num_tokens", "input_ids", "answer_mask"]


def input_place(row: dict) -> str:
    """Where a cache row came from in the input, for messages: its file (caches since 0.7
    have it) and line."""
    return f"input {row['file']}, line {row['line']}" if row.get("file") else \
        f"input line {row['line']}"


def validate_values(path: Path, batch_rows: int = 8192) -> str:
    """Refuse rows the losses would silently get wrong, naming the first one of each kind.

    Non-finite reference log-probs; no answer tokens; a `num_tokens` (the losses' m) that is not
    the number of answer-mask entries set; token ids and answer mask of different lengths; and an
    answer mask set at position 0 (no position predicts a row's first token, so it is never
    scored). Reads everything but the text once, at start-up, `batch_rows` rows at a time (a
    large part or an old single-file cache is never held whole, on any rank).
    Returns the cache's `content_hash`, taken in the same pass.
    """
    digests = _content_digests()
    for problem in value_problems(open_cache(path).files, batch_rows, digests):
        raise CacheError(problem)
    return _content_hex(digests)


# The metadata key under which train keeps `content_hash` (in checkpoints and run_config.json).
CONTENT_HASH = "content_hash"


def content_hash(path: Path, batch_rows: int = 65536) -> str:
    """A hash of what training takes from the cache's rows, in order: reference log-probs and
    answer lengths. A cache of other data, another --max-length or another model differs in
    it even where the row count and the model's fingerprint agree, so a resumed run cannot
    silently go on with other rows (scoring the same rows again elsewhere may differ in the
    last bits, and differ too). `validate_values` returns it from its own pass; this reads
    only those two columns, for a cache that is not validated (a finished run's)."""
    digests = _content_digests()
    for file in open_cache(path).files:
        parquet = pq.ParquetFile(file)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(CONTENT_COLUMNS)):
            _hash_content(digests, batch)
    return _content_hex(digests)


# The columns `content_hash` takes, each hashed apart (so batch sizes do not change it).
CONTENT_COLUMNS = {"ref_logps": "<f8", "num_tokens": "<i8"}


def _content_digests() -> dict:
    return {name: hashlib.sha256() for name in CONTENT_COLUMNS}


def _hash_content(digests: dict, batch: pa.RecordBatch) -> None:
    """Add a batch's reference log-probs and answer lengths to `digests` (`content_hash`)."""
    for name, dtype in CONTENT_COLUMNS.items():
        values = batch.column(name).to_numpy(zero_copy_only=False)
        digests[name].update(values.astype(dtype).tobytes())


def _content_hex(digests: dict) -> str:
    return hashlib.sha256("".join(digest.hexdigest() for digest in digests.values())
                          .encode()).hexdigest()[:16]


def value_problems(files: list[Path], batch_rows: int = 8192,
                   digests: dict | None = None) -> Iterator[str]:
    """`validate_values`'s findings as messages, the first kind of each file (none: all well);
    with `digests` (`_content_digests`), the rows' `content_hash` is taken on the way."""
    for file in files:
        counts: dict[str, int] = {}
        first_rows: dict[str, dict] = {}
        parquet = pq.ParquetFile(file)
        columns = VALUE_CHECK_COLUMNS + ["file"] * ("file" in parquet.schema_arrow.names)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            if digests is not None:
                _hash_content(digests, batch)
            for mask, what in _value_checks(batch):
                count = pc.sum(mask).as_py() or 0
                if count:
                    counts[what] = counts.get(what, 0) + count
                    if what not in first_rows:
                        first_rows[what] = batch.slice(pc.index(mask, True).as_py(),
                                                       1).to_pylist()[0]
        if first_rows:  # the first kind found
            what, row = next(iter(first_rows.items()))
            yield (f"{file}: {counts[what]} row(s) where {what}, first id {row['id']!r} "
                   f"({input_place(row)}, ref_logps/num_tokens {row['ref_logps']!r}/"
                   f"{row['num_tokens']!r}). The cache is corrupt or was written by a broken "
                   "engine: re-run `minorsft precompute --overwrite`.")


def _value_checks(batch: pa.RecordBatch) -> list[tuple[pa.Array, str]]:
    """(bad-row mask, what is wrong) for each check of `validate_values`, in its order."""
    masks = batch.column("answer_mask")
    mask_lengths = pc.list_value_length(masks)
    # Per-row sums and first entries of the flattened masks, from the rows' offsets.
    lengths = mask_lengths.to_numpy(zero_copy_only=False)
    starts = np.cumsum(lengths) - lengths
    flat = pc.list_flatten(masks).to_numpy(zero_copy_only=False)
    set_before = np.concatenate([[0], np.cumsum(flat)])
    mask_sums = pa.array(set_before[starts + lengths] - set_before[starts])
    first_set = pa.array(np.where(lengths > 0, flat[np.minimum(starts, len(flat) - 1)], False)
                         if len(flat) else np.zeros(len(lengths), bool))
    num_tokens = batch.column("num_tokens")
    return [
        (pc.invert(pc.is_finite(batch.column("ref_logps"))), "ref_logps is not finite"),
        (pc.less(num_tokens, 1), "num_tokens is below 1"),
        (pc.not_equal(pc.list_value_length(batch.column("input_ids")), mask_lengths),
         "input_ids and answer_mask differ in length"),
        (first_set, "answer_mask is set at the first token"),
        (pc.not_equal(pc.cast(num_tokens, pa.int64()), mask_sums),
         "num_tokens is not the number of answer tokens in answer_mask"),
    ]


def write_rejects(out: Path, entries: list[dict]) -> str | None:
    """Concatenate the parts' rejects, in input order, into one file (None if there are none)."""
    target = Path(out) / REJECTS_FILE
    texts = []
    for entry in entries:
        if entry["rejects"]:
            piece = Path(out) / entry["rejects"]
            if not piece.exists():
                raise CacheError(f"{piece}: rejected rows listed in the manifest are missing; "
                                 "run the same precompute command again to recompute that part")
            texts.append(piece.read_text(encoding="utf-8"))
    if not texts:
        target.unlink(missing_ok=True)
        return None
    atomic_write_text(target, "".join(texts))
    return str(target)


def merge_caches(sources: list[Path], out: Path, overwrite: bool = False) -> CacheLayout:
    """Combine parts directories (e.g. one per shard, from different machines) into one cache.

    The sources must hold parts made from the same input with the same settings and together
    cover every part; the result is one unsharded parts directory, written beside `out` under a
    hidden name and renamed into place. Part files are hard-linked where the file system allows,
    else copied; the sources are left as they are.
    """
    out, sources = Path(out), [Path(s) for s in sources]
    if any(s.resolve() == out.resolve() for s in sources):
        raise CacheError(f"{out}: the merged cache must go to a new --out, not a source")
    if len({s.resolve() for s in sources}) < len(sources):
        raise CacheError("a source is given twice: " + " ".join(str(s) for s in sources))
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        # (--overwrite would move the working folder aside: "Device or resource busy")
        raise CacheError(f"--out {out} is the working folder or holds it; give a new folder "
                         "for the merged cache")
    manifests, origin, twice = [], {}, []
    for source in sources:
        if not source.exists():
            raise CacheError(f"{source}: no such directory")
        if not source.is_dir():
            raise CacheError(f"{source}: not a parts directory (only those can be merged)")
        found = load_manifests(source)
        if not found:
            raise CacheError(f"{source}: no minorsft manifest in it")
        for manifest in found:
            manifest["_dir"] = str(source)
            for index in manifest["parts"]:
                if origin.setdefault(int(index), source) != source:
                    twice.append(f"part {index} is in {origin[int(index)]} and in {source}")
        manifests.extend(found)
    parts = collect_parts(sources[0], manifests)  # refuses sources of other settings
    if twice:
        raise CacheError(f"{twice[0]}: is a shard given twice? Give each shard once")
    if problems := missing_pieces(manifests, parts):
        raise CacheError("the sources do not make a complete cache: " + "; ".join(problems))
    if out.exists():
        if not overwrite:
            raise CacheError(f"{out} exists: pass --overwrite to replace it")
        if out.is_dir() and any(out.iterdir()) and not load_manifests(out):
            raise CacheError(f"{out} is a directory that is not a cache; refusing to replace it")
        if out.is_file() and not is_single_file_cache(out):
            raise CacheError(f"{out} is a file and not a minorsft cache; refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where a folder of the path should be
        raise CacheError(f"--out {out}: cannot create its folder ({error.strerror})") from error
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    honour_umask(staging)
    placed = False
    try:
        (staging / REJECTS_DIR).mkdir()
        for index, entry in parts.items():
            # each part checked where it is, so that a damaged one is named in its source
            _check_part(origin[index], index, entry, "re-run the precompute command that "
                        "wrote it to recompute it, then merge")
            for name in (entry["file"], entry["rejects"]):
                if name:
                    _link_or_copy(origin[index] / name, staging / name)
        first = manifests[0]
        settings = dict(first["settings"], shards=1)
        metadata = dict(first["metadata"], shards=1)
        for manifest in manifests[1:]:
            for key, value in manifest["metadata"].items():
                metadata.setdefault(key, value)
        merged = {"format": PARTS_FORMAT, "format_version": FORMAT_VERSION,
                  "settings": settings, "input": first["input"], "metadata": metadata,
                  "shard": None, "parts": {str(k): parts[k] for k in sorted(parts)},
                  "input_rows": sum(e["rows_in"] for e in parts.values()),
                  "parts_total": len(parts), "merged_from": [str(s) for s in sources]}
        write_manifest(staging, merged)
        write_rejects(staging, [parts[k] for k in sorted(parts)])
        # Read back before anything of `out` is touched: a damaged part (a copy cut short on
        # its way from another machine) must not cost the cache --overwrite would replace.
        open_cache(staging)
        if out.is_dir():
            # As precompute --overwrite does, only minorsft's own files go; the user's stay.
            # The old cache goes aside whole, the new one takes its place in one rename, and
            # the user's files move back: they are never inside `staging`, which a failure
            # deletes (a failure while moving them back leaves them in the folder aside).
            aside = out.parent / f".{out.name}.replaced-{staging.name}"
            os.replace(out, aside)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(aside, out)
                raise
            placed = True  # staging is now `out`: nothing is left to clean up
            try:
                for path in aside.iterdir():
                    if not is_own_name(path.name):
                        os.replace(path, out / path.name)
            except OSError as error:
                raise CacheError(f"{out}: the merged cache is in place, but moving your own "
                                 f"files back from the old cache's folder failed "
                                 f"({error.strerror}: {error.filename}); they are in {aside}, "
                                 "move them yourself") from error
            shutil.rmtree(aside)
        else:
            if out.exists():
                out.unlink()
            os.replace(staging, out)
    except BaseException:
        if not placed:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return open_cache(out)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def cache_stats(path: Path) -> dict:
    """What `minorsft cache info` shows: layout, schema, metadata and column statistics.

    An incomplete parts directory (a shard still running, or not started here) is shown too,
    for what it holds so far: `incomplete` lists what is missing (empty for a whole cache).
    """
    layout = open_cache(path, require_complete=False)
    incomplete = (missing_pieces(layout.manifests, layout.parts) if layout.kind == "parts"
                  else [])
    tables = [pq.read_table(f, columns=["num_tokens", "ref_logps", "truncated"])
              for f in layout.files]
    # (parts may differ in a column's nullability, which the schema check leaves alone, as
    # train does: a rewritten part's)
    table = pa.concat_tables(tables, promote_options="default") if tables else None
    schema = pq.read_schema(layout.files[0]) if layout.files else SCHEMA
    info = {
        "path": str(path), "layout": layout.kind, "files": len(layout.files),
        "incomplete": incomplete,
        "schema": ", ".join(f"{f.name}: {f.type}" for f in schema if f.name in SCHEMA.names),
        "metadata": layout.metadata, "rows": 0 if table is None else table.num_rows,
    }
    if table is None or table.num_rows == 0:
        if incomplete:
            raise CacheError(f"{path}: incomplete cache with no rows yet: "
                             + "; ".join(incomplete))
        if not _lookup(layout.metadata, "rows_rejected"):
            raise CacheError(f"{path}: the cache has no rows")
        # every input row rejected: what the cache says of them (train refuses it)
        return {**info, "num_tokens": None, "ref_logps_per_token": None, "truncated": 0,
                "problems": []}
    num_tokens = table["num_tokens"].cast(pa.float64())
    per_token = pc.divide(table["ref_logps"], num_tokens)
    # token counts are whole numbers: "nearest" quantiles, min and max are shown as integers
    quantiles = [int(q) for q in pc.quantile(num_tokens, q=[0.1, 0.5, 0.9],
                                             interpolation="nearest").to_pylist()]
    return {
        **info,
        "num_tokens": {"mean": pc.mean(num_tokens).as_py(),
                       "min": int(pc.min(num_tokens).as_py()),
                       "p10": quantiles[0], "p50": quantiles[1], "p90": quantiles[2],
                       "max": int(pc.max(num_tokens).as_py())},
        "ref_logps_per_token": {"mean": pc.mean(per_token).as_py(),
                                "min": pc.min(per_token).as_py(),
                                "max": pc.max(per_token).as_py()},
        "truncated": pc.sum(table["truncated"]).as_py() or 0,
        # what train, eval and verify would refuse (a NaN log-prob made the means nan unflagged)
        "problems": list(value_problems(layout.files)),
    }


def update_metadata(path: Path, extra: dict) -> dict:
    """Add or replace metadata keys of a finished cache (e.g. `drift`, measured after scoring).

    For a parts directory every manifest is rewritten atomically; a single-file cache is
    rewritten whole (temporary file + rename). Keys that decide the cached numbers (a
    manifest's `settings`) are not touched, so resuming and merging are unaffected.
    """
    path = Path(path)
    layout = open_cache(path)
    if layout.kind == "parts":
        for manifest in layout.manifests:
            manifest["metadata"] = dict(manifest["metadata"], **extra)
            write_manifest(path, manifest)
    else:
        table = pq.read_table(path)
        metadata = dict(_file_metadata(path), **extra)
        metadata.pop("layout", None)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)
        os.close(handle)
        try:
            honour_umask(Path(temp_name))
            pq.write_table(table, temp_name, compression="zstd")
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
    return open_cache(path).metadata
