"""Input data: every row of the input files either as an :class:`Example` (token ids and an
answer mask) or as a :class:`Rejection` naming its file, line and field, so nothing is lost
silently (`iter_examples`, `classify_rows`).

The steps, each in its own module: :mod:`minorsft.data_files` (which files `--data` names),
:mod:`minorsft.row_reading` (a file's rows), :mod:`minorsft.conversations` (a row's format and
turns), :mod:`minorsft.answer_spans` (the rendered template, the token ids and the answer mask).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from minorsft import tools
from minorsft.answer_spans import (
    SystemNotRendered,
    answer_runs_on,
    answer_tokens,
    prompt_joined,
    refuse_answer_probe,
    refuse_special_tokens,
    render_conversation,
    special_token_pattern,
)
from minorsft.conversations import FieldSpec, read_conversation, unread_columns
from minorsft.data_errors import DataError, type_name
from minorsft.data_files import (  # noqa: F401  (re-exported: callers read input via data)
    BUILTIN_DATA,
    data_label,
    data_source,
    resolve_data,
)
from minorsft.row_reading import RawRow, read_rows

if TYPE_CHECKING:
    from minorsft.row_workers import RowWorkers

TRUNCATION_RULE = "right"  # keep the first max_length tokens


@dataclass
class Example:
    """One tokenized sample: the ids and which of them are answer tokens."""

    id: str
    line: int
    input_ids: list[int]
    answer_mask: list[bool]
    truncated: bool = False
    file: str = ""  # the input file the row came from
    # the first answer token that also holds text of the generation prompt (`prompt_joined`)
    prompt_joined: int | None = field(default=None, compare=False)
    # the first answer token that also holds text after the answer (`answer_runs_on`)
    runs_on: int | None = field(default=None, compare=False)
    # columns of the row that hold text its reading left out (`conversations.unread_columns`:
    # alpaca's `input` beside `prompt`/`response`, tool definitions beside named columns);
    # precompute counts them in a note
    left_out: tuple[str, ...] = field(default=(), compare=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.answer_mask)


# The rejects report keeps a rejected row's text whole, so that it can be fixed and fed again;
# only a line beyond this many characters (not a plausible SFT row: a binary file read as text,
# say) is cut, and then marked `raw_truncated`.
REJECT_RAW_LIMIT = 1 << 20


@dataclass
class Rejection:
    """A row that did not make it into the cache, and why."""

    path: str
    line: int
    field: str | None
    reason: str
    raw: str = ""
    error: DataError | None = field(default=None, repr=False, compare=False)
    # A line that is not UTF-8 as it was: `raw` has replacement characters in its bad bytes
    raw_bytes: bytes | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        record = {"file": self.path, "line": self.line, "field": self.field,
                  "reason": self.reason, "raw": self.raw[:REJECT_RAW_LIMIT]}
        if len(self.raw) > REJECT_RAW_LIMIT:
            record["raw_truncated"] = True
        if self.raw_bytes is not None and len(self.raw_bytes) <= REJECT_RAW_LIMIT:
            record["raw_base64"] = base64.b64encode(self.raw_bytes).decode("ascii")
        return record


def row_id(record: dict, spec: FieldSpec, path: str = "", line: int | None = None) -> str:
    """The row's `id` column if it has one, else a hash of its content (stable across runs)."""
    value = record.get(spec.id_field)
    if isinstance(value, float) and math.isnan(value):
        value = None  # pandas writes a missing value of an integer column as NaN: no id
    if value is not None:
        if isinstance(value, float) and value.is_integer():
            # pandas stores an integer column with missing values as float64 (3 -> 3.0)
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            shown = f" {value!r}" if isinstance(value, float) else ""
            raise DataError(path, line, spec.id_field,
                            f"expected a string or integer id, got {type_name(value)}{shown}")
        if not str(value).strip():
            raise DataError(path, line, spec.id_field, "empty id")
        return str(value)
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:20]


# Rows whose texts go to the tokenizer in one call: a fast tokenizer encodes a batch on all
# cores, outside the GIL (docs/performance.md 6c).
TOKENIZE_BATCH_ROWS = 64


def classify_rows(
    paths: Path | list[Path],
    tokenizer,
    spec: FieldSpec | None = None,
    max_length: int | None = None,
    select: Callable[[int], bool] | None = None,
    batch_rows: int = TOKENIZE_BATCH_ROWS,
    workers: RowWorkers | None = None,
) -> Iterator[tuple[int, Example | Rejection | None]]:
    """Every row of the input files as (index, Example or Rejection); None for rows `select`
    leaves out.

    `index` counts rows from 0 in file order, across the files in their order (blank JSONL
    lines are not rows). Rows that `select(index)` declines are read for their id, so that
    duplicate ids are found across the whole input whichever part of it a process works on,
    but they are neither checked further nor tokenized. Ids are unique across the input: the
    first row that carries an id keeps it, and any later row with the same id is rejected, even
    if the first row was rejected for another reason (so the outcome of a row never depends on
    how the input was split). Rows are rendered and tokenized `batch_rows` at a time (1: each
    as soon as it is read), here or in the processes of `workers` (made with `tokenizer`):
    the same items in the same order either way. An error reading the input comes after the
    rows before it.
    """
    spec = spec or FieldSpec()
    batches = _identified_batches(paths, spec, select, batch_rows)
    if workers is not None:
        if workers.tokenizer is not tokenizer:
            raise ValueError("classify_rows: the workers were made with another tokenizer")
        yield from workers.run(batches, spec, max_length)
        return
    special = special_token_pattern(tokenizer)
    for batch in batches:
        yield from render_and_tokenize(batch, tokenizer, spec, special, max_length)


@dataclass
class _Identified:
    """A row that has an id and is to be checked, rendered and tokenized."""

    example_id: str
    row: RawRow
    path: str
    duplicate_of: tuple[str, int] | None  # (file, line) of the first row with this id


Batch = list[tuple[int, _Identified | Rejection | None]]


def _identified_batches(paths: Path | list[Path], spec: FieldSpec,
                        select: Callable[[int], bool] | None, batch_rows: int,
                        ) -> Iterator[Batch]:
    """The rows of the input files `batch_rows` at a time, each with its index and id (see
    `classify_rows`): what needs the whole input in order (ids and their repeats), so that the
    rest can be done a batch at a time anywhere. A file cut off gives its rows read so far as
    a batch, then its error."""
    files = [paths] if isinstance(paths, Path) else list(paths)
    seen_ids: dict[str, tuple[str, int]] = {}  # id -> (file, line) of its first row
    # Repeats of a row without an id are numbered by line, and by file where there are several
    # (by name, or by path where two files share a name), so that ids stay unique.
    names = [path.name for path in files]
    labels = {str(path): "" if len(files) == 1 else
              f"{path.name if names.count(path.name) == 1 else path}:" for path in files}
    index = -1
    pending: Batch = []
    for path in files:
        path_str = str(path)
        rows = read_rows(path)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except Exception:  # (a file cut off: its rows so far first, then the error)
                if pending:
                    yield pending
                raise
            index += 1
            pending.append((index, _identify_row(row, path_str, spec, seen_ids,
                                                 labels[path_str], select, index)))
            if len(pending) >= batch_rows:
                yield pending
                pending = []
    if pending:
        yield pending


def _identify_row(row: RawRow, path_str: str, spec: FieldSpec,
                  seen_ids: dict[str, tuple[str, int]], file_label: str,
                  select: Callable[[int], bool] | None,
                  index: int) -> _Identified | Rejection | None:
    try:
        if row.error is not None:
            raise row.error
        example_id = row_id(row.record, spec, path_str, row.line)
        duplicate_of = seen_ids.get(example_id)
        if duplicate_of is None:
            seen_ids[example_id] = (path_str, row.line)
        elif row.record.get(spec.id_field) is None:
            # Identical rows without ids (a null id is none: a Parquet id column holds nulls
            # where rows have none) are legitimate up-sampling: number the repeats.
            example_id = f"{example_id}#{file_label}{row.line}"
            duplicate_of = None
        if select is not None and not select(index):
            return None
        return _Identified(example_id, row, path_str, duplicate_of)
    except DataError as error:
        if select is not None and not select(index):
            return None
        return _rejection(row, path_str, error)


def _rejection(row: RawRow, path_str: str, error: DataError) -> Rejection:
    return Rejection(path_str, row.line, error.field, error.reason, row.text, error,
                     row.raw_bytes)


def render_and_tokenize(batch: Batch, tokenizer, spec: FieldSpec, special: re.Pattern | None,
                        max_length: int | None,
                        ) -> Iterator[tuple[int, Example | Rejection | None]]:
    """The rows of `batch` in order, checked and rendered one by one and tokenized (their
    texts in one call)."""
    return _tokenize([(index, _render_row(item, tokenizer, spec, special)
                       if isinstance(item, _Identified) else item) for index, item in batch],
                     tokenizer, max_length)


@dataclass
class _Rendered:
    """A row that passed its checks, rendered, waiting for the tokenizer."""

    example_id: str
    row: RawRow
    path: str
    text: str
    spans: list[tuple[int, int, int]]  # (start, stop, generation prompt's end) per answer
    answer_field: str
    left_out: tuple[str, ...] = ()  # (Example's)


def _tokenize(pending: list[tuple[int, Example | Rejection | _Rendered | None]], tokenizer,
              max_length: int | None) -> Iterator[tuple[int, Example | Rejection | None]]:
    """The rows of `pending` in order, those rendered tokenized (their texts in one call)."""
    rendered = [item for _, item in pending if isinstance(item, _Rendered)]
    if rendered:
        encoded = tokenizer([item.text for item in rendered], add_special_tokens=False,
                            return_offsets_mapping=True)
        # only ids and offsets are kept: the rest of the batch's encoding is freed now
        tokens = iter(list(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)))
        del encoded
    for index, item in pending:
        if isinstance(item, _Rendered):
            input_ids, offsets = next(tokens)
            input_ids, answer_mask, truncated = answer_tokens(input_ids, offsets, item.spans,
                                                              max_length)
            if not any(answer_mask):
                error = DataError(item.path, item.row.line, item.answer_field,
                                  f"answer truncated to zero tokens by --max-length "
                                  f"{max_length} (the prompt alone has {len(input_ids)}+ tokens)")
                item = _rejection(item.row, item.path, error)
            else:
                joined = prompt_joined(offsets, item.spans)
                runs_on = answer_runs_on(offsets, item.spans)
                item = Example(
                    item.example_id, item.row.line, input_ids, answer_mask, truncated, item.path,
                    prompt_joined=joined if joined is not None and joined < len(input_ids)
                    else None,
                    runs_on=runs_on if runs_on is not None and runs_on < len(input_ids) else None,
                    left_out=item.left_out)
        yield index, item


def _render_row(item: _Identified, tokenizer, spec: FieldSpec,
                special: re.Pattern | None) -> _Rendered | Rejection:
    row, path_str = item.row, item.path
    try:
        conversation = read_conversation(row.record, spec, path_str, row.line)
        refuse_special_tokens(conversation.texts, special, path_str, row.line)
        if item.duplicate_of is not None:
            first_file, first_line = item.duplicate_of
            first = (f"line {first_line}" if first_file == path_str
                     else f"{first_file}, line {first_line}")
            raise DataError(path_str, row.line, spec.id_field,
                            f"duplicate id {item.example_id!r} (first on {first})")
        refuse_answer_probe(conversation.texts, path_str, row.line)
        try:
            text, spans = render_conversation(tokenizer, conversation.messages, special,
                                              conversation.trained, conversation.tools)
        except ValueError as error:  # the template's, about the conversation as a whole
            field_name = conversation.fields
            if isinstance(error, tools.DefinitionsNotRendered):
                field_name = next(column for column in tools.DEFINITION_COLUMNS
                                  if column in conversation.texts)
            elif isinstance(error, SystemNotRendered):
                field_name = next((name for name, text in conversation.texts.items()
                                   if text.strip() == error.text), field_name)
            raise DataError(path_str, row.line, field_name, str(error)) from error
        return _Rendered(item.example_id, row, path_str, text, spans,
                         conversation.answer_fields[0],
                         tuple(unread_columns(row.record, conversation)))
    except DataError as error:
        return _rejection(row, path_str, error)


def iter_examples(
    path: Path | list[Path],
    tokenizer,
    spec: FieldSpec | None = None,
    max_length: int | None = None,
    on_bad: str = "error",
) -> Iterator[Example | Rejection]:
    """Every row of the input file(s) as an Example or (with on_bad="skip") a Rejection;
    never dropped.

    With on_bad="error" the first bad row raises a DataError naming file, line and field.
    """
    if on_bad not in {"error", "skip"}:
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    for _, item in classify_rows(path, tokenizer, spec, max_length):
        if isinstance(item, Rejection) and on_bad == "error":
            raise item.error
        yield item
