"""Reading an input file's rows: JSONL (plain, gzip-compressed, UTF-16 with a BOM) and Parquet
(streamed in batches), each row a parsed object or the :class:`DataError` that says why it is
not one (`read_rows`). What the rows mean is :mod:`minorsft.conversations`'s business.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import shlex
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minorsft.data_errors import DataError, type_name
from minorsft.jsonl import (
    RepeatedKeyError,
    malformed_json_reason,
    object_without_repeated_keys,
)


@dataclass
class RawRow:
    line: int
    record: dict | None = None
    error: DataError | None = None
    # the line as read; None for a Parquet row, whose JSON is made only if it is rejected
    # (not for every row read, nor sent to the tokenize workers with it)
    raw: str | None = None
    extra: dict = field(default_factory=dict)
    raw_bytes: bytes | None = None  # the line as read, where it is not UTF-8

    @property
    def text(self) -> str:
        """The row as the rejects report shows it: its line, or a Parquet row as JSON."""
        if self.raw is not None:
            return self.raw
        return "" if self.record is None else json.dumps(self.record, default=str)


def read_rows(path: Path) -> Iterator[RawRow]:
    """Rows of a JSONL or Parquet file, with their 1-based line (JSONL) or row (Parquet) number."""
    compressed = path.suffix.lower() == ".gz"
    suffix = Path(path.stem).suffix.lower() if compressed else path.suffix.lower()
    if suffix in {".jsonl", ".json", ".ndjson"}:
        yield from _read_jsonl(path, compressed)
    elif suffix == ".parquet" and not compressed:
        yield from _read_parquet(path)
    else:
        given = "".join(path.suffixes[-2:]) if compressed else path.suffix
        raise DataError(str(path), None, None,
                        f"unknown file type {given!r}: use .jsonl, .jsonl.gz or .parquet")


def _read_jsonl(path: Path, compressed: bool = False) -> Iterator[RawRow]:
    # Read line by line (not polars' ndjson reader) so that a bad line can be named and skipped.
    try:
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as handle:
            lines, utf16 = utf8_lines(path, handle)
            yield from _jsonl_rows(path, lines, utf16)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # not gzip, or cut off
        raise DataError(str(path), None, None,
                        f"not a readable gzip file ({error or type(error).__name__})") from None


GZIP_MAGIC = b"\x1f\x8b"
# Files that start so are not text: what they are, and what to do (a .jsonl that holds one).
NOT_TEXT = [
    (GZIP_MAGIC, "a gzip-compressed file", "name it .jsonl.gz, which is read as it is"),
    (b"PAR1", "a Parquet file", "name it .parquet, which is read as it is"),
    (b"PK\x03\x04", "a zip archive", "unzip it and give the .jsonl inside"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file", "decompress it (zstd -d)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it (xz -d)"),
    (b"BZh", "a bzip2-compressed file", "decompress it (bunzip2)"),
]


def utf8_lines(path: Path, handle) -> tuple[Iterator[bytes], bool]:
    """The lines of a JSON Lines file open as `handle` (binary), as UTF-8 bytes, and whether
    they were decoded from UTF-16 (a file that starts with its byte-order mark). A UTF-32 file
    is refused, naming it."""
    start = handle.peek(6)[:6]
    for magic, what, hint in NOT_TEXT:
        if start.startswith(magic):  # (read as text, it said "not valid UTF-8" at line 1)
            if magic == GZIP_MAGIC and isinstance(handle, gzip.GzipFile):
                hint = "it is compressed twice: decompress it once (gunzip) and name it .jsonl.gz"
            raise DataError(str(path), None, None,
                            f"not JSON Lines text: {what} (it starts with the bytes "
                            f"{magic.hex(' ')}); {hint}")
    if start[:4] in (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE):  # (before UTF-16's: FF FE)
        raise DataError(str(path), None, None, "starts with UTF-32's byte-order mark; UTF-8 "
                        "and UTF-16 are read: save it as UTF-8 (PowerShell: Out-File "
                        "-Encoding utf8)")
    if start[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return _utf16_as_utf8_lines(path, handle), True
    return handle, False


def _utf16_as_utf8_lines(path: Path, handle) -> Iterator[bytes]:
    """The lines of a UTF-16 file with its byte-order mark (as Windows PowerShell's `>` and
    `Out-File` write), as UTF-8 bytes, for the reader of UTF-8 lines. Half of a surrogate pair
    passes through as bytes that are not UTF-8, so that its row is rejected with its line."""
    # (newline="\n": lines end at LF only, as UTF-8 files' do; a CR is the line's text)
    text = io.TextIOWrapper(handle, encoding="utf-16", errors="surrogatepass", newline="\n")
    lines = 0
    try:
        for line in text:
            lines += 1
            yield line.encode("utf-8", "surrogatepass")
    except UnicodeDecodeError as error:  # an odd number of bytes: the file is cut off
        raise DataError(str(path), None, None, f"not valid UTF-16 after line {lines} "
                        f"({error.reason}); the file starts with UTF-16's byte-order "
                        "mark") from None


def _jsonl_rows(path: Path, handle, utf16: bool = False) -> Iterator[RawRow]:
    """The rows of lines of UTF-8 bytes (`utf16`: re-encoded from a UTF-16 file, whose half
    surrogate pairs come as bytes that are not UTF-8)."""
    for line_no, raw_bytes in enumerate(handle, start=1):
        # A byte-order mark is legal UTF-8 that json.loads refuses: drop it (before the
        # blank test, so that a line holding only the mark is blank, not a row). Not only on
        # line 1: `cat a.jsonl b.jsonl` puts b's mark at the start of a later line.
        as_read, raw_bytes = raw_bytes, raw_bytes.removeprefix(codecs.BOM_UTF8)
        if not raw_bytes.strip():
            continue
        try:
            text = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as error:
            line_bytes = raw_bytes.rstrip(b"\r\n")  # as the other rows' `raw`
            if utf16:  # (the bytes are not the file's: no raw_base64)
                text = line_bytes.decode("utf-8", "surrogatepass")
                column, half = next((i, c) for i, c in enumerate(text, 1) if SURROGATE.match(c))
                yield RawRow(line_no, raw=line_bytes.decode("utf-8", "replace"),
                             error=DataError(str(path), line_no, None, (
                                 f"half of a UTF-16 surrogate pair (U+{ord(half):04X}) at "
                                 f"column {column}, no character; repair the text or drop "
                                 "the row")))
                continue
            reason = _not_utf8_reason(raw_bytes, error)
            yield RawRow(line_no, raw=line_bytes.decode("utf-8", "replace"),
                         raw_bytes=as_read.rstrip(b"\r\n"),  # mark and all
                         error=DataError(str(path), line_no, None, reason))
            continue
        # Without its line ending, so that json's column is the column in the line (with it,
        # a cut-off line ends at "line 2, column 1").
        yield _parse_line(path, line_no, text.rstrip("\r\n"))


def _not_utf8_reason(raw_bytes: bytes, error: UnicodeDecodeError) -> str:
    # Counted in characters from 1, as json's columns are (the bytes before the bad one decode).
    column = len(raw_bytes[: error.start].decode("utf-8")) + 1
    return f"not valid UTF-8 (byte 0x{raw_bytes[error.start]:02x} at column {column})"


def _parse_line(path: Path, line_no: int, text: str) -> RawRow:
    def bad(reason: str, field_name: str | None = None) -> RawRow:
        if _looks_like_a_json_document(line_no, text):
            # (a pretty-printed object got the array's command, which fails on an object)
            array = text.strip().startswith("[")
            reason += (f"; {path.name} looks like one JSON document ("
                       f"{'an array' if array else 'pretty-printed objects'}), but the data "
                       "must be JSON Lines: one JSON object per line (convert with "
                       f"jq -c {shlex.quote('.[]') if array else '.'} {path.name} > "
                       f"{lines_file_name(path)})")
        if "\x00" in text:  # (UTF-16 without its byte-order mark reads as UTF-8 with NULs)
            reason += ("; the line holds NUL characters: is the file UTF-16 without a "
                       "byte-order mark? Convert it with iconv -f UTF-16LE -t UTF-8 "
                       f"{path.name} > {path.stem}.utf8.jsonl (UTF-16BE for a big-endian one)")
        if _looks_like_cr_line_endings(text):
            reason += ("; the line holds a carriage return followed by '{': the file uses CR "
                       f"line endings; convert with tr '\\r' '\\n' < {path.name} > "
                       f"{path.stem}.lf.jsonl")
        return RawRow(line_no, error=DataError(str(path), line_no, field_name, reason), raw=text)

    try:
        record = json.loads(text, object_pairs_hook=object_without_repeated_keys)
    except RepeatedKeyError as error:
        return bad(f"the key {error.key!r} appears twice in one JSON object (JSON readers "
                   "silently keep one of the values)", error.key)
    except json.JSONDecodeError as error:
        return bad(malformed_json_reason(error, text))
    except ValueError as error:  # a valid number that Python refuses (over 4300 digits)
        return bad(f"unreadable JSON ({str(error).split('; use sys.')[0]})")
    except RecursionError:  # e.g. 100,000 nested brackets
        return bad("unreadable JSON (nested deeper than Python's JSON reader allows)")
    if not isinstance(record, dict):
        return bad(f"expected a JSON object, got {type_name(record)}")
    # Only a \u escape makes a surrogate (the bytes were valid UTF-8): most rows skip the walk.
    if "\\u" in text and (found := _unpaired_surrogate(record)) is not None:
        return bad(*found)
    return RawRow(line_no, record=record, raw=text)


def lines_file_name(path: Path) -> str:
    """A name for the JSON Lines copy of `path` that is not `path` itself (a shell redirect to
    the file jq reads would empty it first)."""
    return f"{path.stem}{'.lines' if path.suffix == '.jsonl' else ''}.jsonl"


def _looks_like_cr_line_endings(text: str) -> bool:
    """Rows split by bare carriage returns (old Mac line endings) read as one long line."""
    return re.search(r"\r\s*\{", text) is not None


SURROGATE = re.compile("[\ud800-\udfff]")


def _unpaired_surrogate(record: dict) -> tuple[str, str | None] | None:
    """(reason, field) for the first string in the row holding half of a UTF-16 pair, if any.

    JSON's \\ud800 escapes (common in scraped text) decode to such a half, which is no character:
    the tokenizer and the content hash would fail on it with neither file nor line. The walk uses
    its own stack, as a row may nest as deep as json.loads allows.
    """
    stack: list[tuple[str | None, object]] = [(None, record)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if match := SURROGATE.search(value):
                return (f"contains an unpaired surrogate ({_escaped(match.group())}), half of a "
                        "UTF-16 pair and no character; repair the text or drop the row", where)
        elif isinstance(value, dict):
            if (key := next((k for k in value if SURROGATE.search(k)), None)) is not None:
                return (f"a key holds an unpaired surrogate: '{_escaped(key)}', half of a "
                        "UTF-16 pair and no character; repair the text or drop the row", where)
            stack.extend((key if where is None else f"{where}.{key}", item)
                         for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def _escaped(text: str) -> str:
    """`text` with surrogates as \\udXXX escapes: the rejects file and the terminal take UTF-8."""
    return SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _looks_like_a_json_document(line_no: int, text: str) -> bool:
    """Line 1 of a JSON array, or of a pretty-printed object, rather than of JSON Lines."""
    start = text.strip()
    return line_no == 1 and (start.startswith("[") or start == "{")


# Rows of a Parquet file read at a time: the file is streamed, not loaded whole (a multi-GB
# data set would otherwise cost its size in RAM before the first row is scored).
PARQUET_BATCH_ROWS = 4096


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_no = 0
    try:
        # pyarrow reads a batch at a time, without pre-buffering (so a row group's column chunks
        # are not all held at once; polars' own streaming reader took as much memory as a
        # whole-file read: docs/performance.md 6b); polars turns the batch into the Python
        # values a whole-file polars read gave (row ids hash them), but for date64 columns
        # (dates, not datetimes) and 128-bit integers (refused)
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in pl.from_arrow(batch).iter_rows(named=True):
                row_no += 1
                yield RawRow(row_no, record=record)
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError,
            pl.exceptions.PanicException) as error:  # not Parquet, cut off, an odd type
        where = f" (after row {row_no})" if row_no else ""
        raise DataError(str(path), None, None,  # (one line: pyarrow's have newlines)
                        f"cannot read Parquet{where}: {' '.join(str(error).split())}") from error
