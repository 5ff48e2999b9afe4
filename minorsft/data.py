"""Input data: read rows, turn each into chat messages, then into token ids and an answer mask.

Formats, detected per row by the columns it fills (a row that fills two formats' columns is
rejected as ambiguous):

- ``--prompt-field`` / ``--response-field`` given: those two columns (e.g. GSM8K's
  ``question`` / ``answer``), whatever other columns the row has;
- ``messages``: a list of ``{role, content}`` with roles system (or developer), user,
  assistant; every assistant turn is answer (multi-turn chats train on all of them) unless its
  OpenAI-style ``weight`` is 0 or axolotl's ``training``/``train`` is false; content is a
  string or a list of text parts;
- ShareGPT's ``conversations``: ``{from, value}`` turns (human, gpt, system), read as a chat;
- ``prompt`` + ``response``;
- TRL's ``prompt`` + ``completion``: strings (one turn), or lists of messages (the prompt's
  turns are context, the completion's assistant turns the answer);
- alpaca: ``instruction`` + optional ``input`` + ``output``.

Tool calling (a ``tools`` column, assistant turns' ``tool_calls``, ``tool`` turns) is passed to
the template as transformers takes it (see :mod:`minorsft.tools`); a calling turn is answer, and
a row whose calls, results or definitions the template leaves out is refused. Reasoning in its
own key, which minorsft does not pass on, is refused too, not dropped.

A ``system`` column (``--system-field``), where present and not empty, becomes the system
message (in a chat, the first message; a chat that has a system message of its own and a
``system`` column is rejected).

The tokenizer's chat template renders the conversation once; answer tokens are those whose text
lies inside an assistant turn's content up to and including the end-of-turn token.

Truncation rule ("right"): with ``--max-length N`` a sequence keeps its first N tokens; answer
tokens past N are dropped (and counted out of m). A row whose first answer token lies past N is
rejected rather than trained on with nothing to learn.

Every row ends up either as an :class:`Example` or as a :class:`Rejection` naming its file,
line and field, so nothing is lost silently.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from minorsft import tools
from minorsft.data_errors import DataError, type_name
from minorsft.data_files import (  # noqa: F401  (re-exported: callers read input via data)
    BUILTIN_DATA,
    data_label,
    data_source,
    resolve_data,
)
from minorsft.jsonl import malformed_json_reason

if TYPE_CHECKING:
    from minorsft.row_workers import RowWorkers

TRUNCATION_RULE = "right"  # keep the first max_length tokens
TRAIN_TURNS = ("all", "last")


@dataclass
class FieldSpec:
    """Which columns hold the prompt and the answer, when they are not a known format."""

    prompt_field: str | None = None
    response_field: str | None = None
    system_field: str = "system"
    id_field: str = "id"
    # Which assistant turns of a chat are answer: "all" (those not marked otherwise), or "last"
    # (the last of them; the earlier ones are prompt, as LLaMA-Factory's mask_history does).
    train_turns: str = "all"

    def __post_init__(self):
        if self.train_turns not in TRAIN_TURNS:
            raise ValueError(f"--train-turns must be one of {', '.join(TRAIN_TURNS)}, got "
                             f"{self.train_turns!r}")
        # One named column without the other is an option mistake, not a fault of every row.
        if bool(self.prompt_field) != bool(self.response_field):
            raise ValueError("--prompt-field and --response-field must be given together")
        if self.system_field in (self.prompt_field, self.response_field):
            raise ValueError(f"--system-field {self.system_field!r} is also the prompt or the "
                             "answer column; give each its own column")
        # The same column twice would train the model to repeat its prompt as the answer.
        if self.prompt_field and self.prompt_field == self.response_field:
            raise ValueError(f"--prompt-field and --response-field name the same column "
                             f"{self.prompt_field!r}; give the prompt and the answer columns")


@dataclass
class Example:
    """One tokenized sample: the ids and which of them are answer tokens."""

    id: str
    line: int
    input_ids: list[int]
    answer_mask: list[bool]
    truncated: bool = False
    file: str = ""  # the input file the row came from

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


@dataclass
class RawRow:
    line: int
    record: dict | None = None
    error: DataError | None = None
    raw: str = ""
    extra: dict = field(default_factory=dict)
    raw_bytes: bytes | None = None  # the line as read, where it is not UTF-8


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


def utf8_lines(path: Path, handle) -> tuple[Iterator[bytes], bool]:
    """The lines of a JSON Lines file open as `handle` (binary), as UTF-8 bytes, and whether
    they were decoded from UTF-16 (a file that starts with its byte-order mark). A UTF-32 file
    is refused, naming it."""
    start = handle.peek(4)[:4]
    if start in (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE):  # (before UTF-16's: FF FE)
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
        record = json.loads(text, object_pairs_hook=_object_without_repeated_keys)
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


class RepeatedKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _object_without_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object builder, refusing a key given twice (it would keep the last value)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        raise RepeatedKeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return record


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
                yield RawRow(row_no, record=record, raw=json.dumps(record, default=str))
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError,
            pl.exceptions.PanicException) as error:  # not Parquet, cut off, an odd type
        where = f" (after row {row_no})" if row_no else ""
        raise DataError(str(path), None, None,  # (one line: pyarrow's have newlines)
                        f"cannot read Parquet{where}: {' '.join(str(error).split())}") from error


def _require_text(record: dict, key: str, path: str, line: int, allow_empty=False) -> str:
    if key not in record or record[key] is None:
        raise DataError(path, line, key, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(path, line, key, f"expected a string, got {type_name(value)}")
    if not allow_empty and not value.strip():
        raise DataError(path, line, key, "empty")
    return value


# The known formats and the columns each needs (alpaca's `input` is optional).
FORMATS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt/response": ("prompt", "response"),
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}

# Role names of a `messages` chat (OpenAI's `developer` is its newer name for `system`), and of
# a ShareGPT one (`from`: human, gpt), mapped to the template's.
# A tool's result is a `tool` turn, whichever name the data gives it (see `minorsft.tools`);
# ShareGPT's `function_call` turn is an assistant turn that calls a tool.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user",
              "assistant": "assistant", **dict.fromkeys(tools.TOOL_RESULT_ROLES, "tool")}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "function_call": "assistant",
                  **dict.fromkeys(tools.TOOL_RESULT_ROLES, "tool")}
# A message key the template would render but minorsft does not pass on: refused, not dropped.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# Booleans that mark a turn as trained or not, as axolotl reads them (its
# `message_field_training`: `training` in its docs, `train` in other tools' files); besides
# OpenAI's `weight`. Spans within a turn (axolotl's `train_detail`) are refused.
TRAIN_FLAG_KEYS = ("training", "train")
TRAIN_DETAIL_KEYS = ("train_detail", "training_detail")


@dataclass
class Conversation:
    """A row as chat messages, with what the checks and the answer mask need to know."""

    messages: list[dict]  # {role, content}, as the template takes them
    texts: dict[str, str]  # the text fields they were made of: field name -> text
    trained: list[bool]  # per message: an assistant turn that is answer
    answer_fields: list[str]  # the fields of the trained answers, in order
    fields: str  # what a template refusal names: `messages`, or `system, prompt, response`
    tools: list[dict] | None = None  # the tool definitions the template is given


def read_conversation(record: dict, spec: FieldSpec, path: str, line: int) -> Conversation:
    """The row as a :class:`Conversation`.

    The text fields are what later checks name (`response`, `messages[1].content`): one message
    may join two of them (alpaca's instruction and input).
    """
    texts: dict[str, str] = {}

    def text(key: str) -> str:
        texts[key] = _require_text(record, key, path, line)
        return texts[key]

    system = record.get(spec.system_field)
    if system is not None and not isinstance(system, str):
        raise DataError(path, line, spec.system_field, "expected a string")
    # an empty, null or blank `system` is none: the template's default system prompt applies
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    if head:
        texts[spec.system_field] = system

    def one_turn(prompt: str, answer_key: str) -> Conversation:
        messages = head + _single_turn(prompt, text(answer_key))
        return Conversation(messages, texts, [False] * (len(messages) - 1) + [True],
                            [answer_key], ", ".join(texts), defined)

    def single_turn(prompt_key: str, answer_key: str) -> Conversation:
        return one_turn(text(prompt_key), answer_key)

    # Named columns (both, FieldSpec checks) win over any known format's columns the row also
    # has (a `tools` column among them is not this prompt's).
    named = bool(spec.prompt_field or spec.response_field)
    defined = None if named else tools.read_tools(record.get("tools"), path, line)
    if defined:
        texts["tools"] = tools.as_text(defined)
    if named:
        return single_turn(spec.prompt_field, spec.response_field)
    row_format = _row_format(record, path, line)
    if row_format in ("chat", "sharegpt"):
        column = FORMATS[row_format][0]
        turns = _chat_messages(record[column], path, line, column,
                               CHAT_ROLES if row_format == "chat" else SHAREGPT_ROLES)
        return _chat_conversation(head, [turns], spec, texts, path, line, column, defined)
    if row_format == "prompt/completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            # TRL's conversational form: the prompt's turns are context, the completion's
            # assistant turns are the answer.
            turns = [_chat_messages(prompt, path, line, "prompt", CHAT_ROLES, answers=False),
                     _chat_messages(completion, path, line, "completion", CHAT_ROLES)]
            return _chat_conversation(head, turns, spec, texts, path, line,
                                      "prompt, completion", defined)
        return single_turn("prompt", "completion")
    if row_format == "prompt/response":
        return single_turn("prompt", "response")
    instruction = text("instruction")
    if extra := _alpaca_input(record, path, line):
        texts["input"] = extra
    return one_turn(f"{instruction}\n\n{extra}" if extra.strip() else instruction, "output")


@dataclass
class _Turns:
    """Messages of one chat column, as `_chat_messages` read them."""

    messages: list[dict]
    trained: list[bool]
    # each message's field: its content (`messages[1].content`), or the calls of a turn that
    # has only calls (`messages[1].tool_calls`)
    fields: list[str]
    texts: dict[str, str] = field(default_factory=dict)  # contents and calls, by field


def _chat_conversation(head: list[dict], parts: list[_Turns], spec: FieldSpec,
                       texts: dict[str, str], path: str, line: int,
                       fields: str, defined: list[dict] | None) -> Conversation:
    chat = [message for part in parts for message in part.messages]
    trained = [flag for part in parts for flag in part.trained]
    message_fields = [name for part in parts for name in part.fields]
    for part in parts:
        texts.update(part.texts)
    messages = _with_system_column(head, chat, message_fields, spec.system_field, path, line)
    if spec.train_turns == "last":
        trained = _last_turn_only(trained)
    # Only an answer must say something: an empty turn that is prompt (marked weight 0, in a
    # TRL prompt, or before the last with --train-turns last) is context like any other.
    for message, name, flag in zip(chat, message_fields, trained, strict=True):
        if flag and not message.get("tool_calls") and not message["content"].strip():
            raise DataError(path, line, name, "empty answer")
    answer_fields = [name for name, flag in zip(message_fields, trained, strict=True) if flag]
    return Conversation(messages, texts, [False] * len(head) + trained, answer_fields, fields,
                        defined)


def _last_turn_only(trained: list[bool]) -> list[bool]:
    """With `--train-turns last`, the last trained turn is the only answer: the earlier ones
    stay, as prompt (and are not checked against the prompt that generation would start them
    from: Qwen3.5's template writes earlier turns without the thinking block its generation
    prompt opens)."""
    last = max(index for index, flag in enumerate(trained) if flag)
    return [index == last for index in range(len(trained))]


def _alpaca_input(record: dict, path: str, line: int) -> str:
    """Alpaca's optional `input`: missing, null or "" mean none; 0 or false are no text."""
    extra = record.get("input")
    if extra is None:
        return ""
    if not isinstance(extra, str):
        raise DataError(path, line, "input", f"expected a string, got {type_name(extra)}")
    return extra


def _single_turn(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _row_format(record: dict, path: str, line: int) -> str:
    """The one known format whose columns the row fills (a null column is not filled).

    A row that fills the columns of two formats is rejected: which one was meant is a guess, and
    guessing would silently train on one half of the row.
    """
    filled = [name for name, columns in FORMATS.items()
              if all(record.get(column) is not None for column in columns)]
    if len(filled) > 1:
        both = " and ".join(_columns_text(name) for name in filled)
        raise DataError(path, line, None,
                        f"ambiguous format: the row has {both}; keep the columns of one format, "
                        "or name the two columns to use with --prompt-field/--response-field")
    if filled:
        return filled[0]
    if (partial := _partial_format(record)) is not None:
        missing = next(c for c in FORMATS[partial] if record.get(c) is None)
        given = [repr(c) for c in FORMATS[partial] if record.get(c) is not None]
        reason = "missing"
        if given:
            reason += f" (the row has {', '.join(given)}, so it reads as the {partial} format)"
            if partial == "prompt/response" and missing == "response":
                reason += "; with a 'completion' column it reads as prompt/completion"
        raise DataError(path, line, missing, reason)
    columns = ", ".join(sorted(record)) or "none"
    raise DataError(path, line, None,
                    f"unknown format (columns: {columns}); expected 'messages', "
                    "'conversations', 'prompt'+'response', 'prompt'+'completion', "
                    "'instruction'+'output', or name the columns with "
                    "--prompt-field/--response-field")


def _partial_format(record: dict) -> str | None:
    """The format the row has most columns of, when that names one format: then the error can
    say which column is missing. Filled columns decide first; else columns that are null. A
    lone `prompt` reads as prompt/response, the format the docs name first."""
    def score(name: str) -> tuple[int, int]:
        columns = FORMATS[name]
        return (sum(record.get(c) is not None for c in columns),
                sum(c in record for c in columns))

    best = max(score(name) for name in FORMATS)
    if best == (0, 0):
        return None
    tied = [name for name in FORMATS if score(name) == best]
    if set(tied) == {"prompt/response", "prompt/completion"}:
        return "prompt/response"
    return tied[0] if len(tied) == 1 else None


def _columns_text(format_name: str) -> str:
    return "+".join(repr(column) for column in FORMATS[format_name])


def _with_system_column(head: list[dict], chat: list[dict], fields: list[str],
                        system_field: str, path: str, line: int) -> list[dict]:
    """The chat with the row's system column as its first message, unless it has its own."""
    own = next((i for i, message in enumerate(chat) if message["role"] == "system"), None)
    if head and own is not None:
        # Which of the two prompts was meant is anyone's guess; neither is dropped silently.
        where = fields[own].rsplit(".", 1)[0]
        raise DataError(path, line, system_field,
                        f"the chat has its own system message ({where}); "
                        "give the system prompt in one place")
    return head + chat


def _chat_messages(messages, path: str, line: int, column: str, roles: dict[str, str],
                   answers: bool = True) -> _Turns:
    """The turns of chat column `column` (`answers`: its assistant turns are answer, unless a
    turn is marked otherwise: see `_turn_trained`)."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type_name(messages)
        raise DataError(path, line, column,
                        f"expected a non-empty list of {{role, content}}, got {got}")
    turns = _Turns([], [], [])
    for index, message in enumerate(messages):
        where = f"{column}[{index}]"
        if not isinstance(message, dict):
            raise DataError(path, line, where, "expected an object with role and content")
        # ShareGPT's turns are {from, value}; some of its files use {role, content}
        # (a Parquet column of both kinds holds all four keys, the other kind's null)
        role_key, content_key = (("from", "value") if roles is SHAREGPT_ROLES
                                 and message.get("from") is not None else ("role", "content"))
        role = message.get(role_key)
        if role is None:
            raise DataError(path, line, f"{where}.{role_key}", "missing")
        if not isinstance(role, str):
            raise DataError(path, line, f"{where}.{role_key}",
                            f"expected a string, got {type_name(role)}")
        if role not in roles:
            raise DataError(path, line, f"{where}.{role_key}",
                            f"unknown role {role!r}; expected one of {', '.join(roles)}")
        for key in REASONING_KEYS:
            if message.get(key):
                raise DataError(path, line, f"{where}.{key}", _unpassed_key_reason(key))
        read = _read_message(message, role, roles[role], content_key, path, line, where)
        # (a TRL prompt's turns are context whatever their marks, as in TRL)
        trained = answers and _turn_trained(message, read["role"], path, line, where)
        turns.messages.append(read)
        turns.trained.append(trained)
        content_field = message_field = f"{where}.{content_key}"
        turns.texts[content_field] = read["content"]
        if calls := read.get("tool_calls"):
            # (ShareGPT's call turn holds its call in its value)
            calls_field = (content_field if role == "function_call"
                           else f"{where}.{tools.calls_key(message)}")
            turns.texts[calls_field] = tools.as_text(calls)
            if not read["content"]:
                message_field = calls_field
        for key in tools.TOOL_RESULT_KEYS:  # (a result's; written into the prompt)
            if key in read:
                turns.texts[f"{where}.{key}"] = read[key]
        turns.fields.append(message_field)
    if answers and not any(m["role"] == "assistant" for m in turns.messages):
        raise DataError(path, line, column, "no assistant turn: nothing to train on")
    if answers and not any(turns.trained):
        raise DataError(path, line, column,
                        "every assistant turn is marked not to be trained (weight 0, or "
                        "training/train false): nothing to train on")
    return turns


def _read_message(message: dict, given_role: str, role: str, content_key: str, path: str,
                  line: int, where: str) -> dict:
    """One turn as the template takes it: role and content, an assistant's tool calls, a
    tool result's name and call id (see `minorsft.tools`)."""
    if given_role == "function_call":  # ShareGPT's call turn: the value is the call
        return {"role": role, "content": "", "tool_calls": tools.read_sharegpt_call(
            message.get(content_key), path, line, f"{where}.{content_key}")}
    if role != "assistant" and (key := tools.calls_key(message)):
        raise DataError(path, line, f"{where}.{key}",
                        f"a {role} turn with tool calls: only assistant turns call tools")
    calls = tools.read_tool_calls(message, path, line, where) if role == "assistant" else []
    # A turn that calls tools may say nothing else (its content null or "").
    content = ("" if calls and not message.get(content_key) else
               _message_text(message.get(content_key), path, line, f"{where}.{content_key}"))
    read = {"role": role, "content": content}
    if calls:
        read["tool_calls"] = calls
    if role == "tool":
        for key in tools.TOOL_RESULT_KEYS:
            if (value := message.get(key)) is not None:
                if not isinstance(value, str):
                    raise DataError(path, line, f"{where}.{key}",
                                    f"expected a string, got {type_name(value)}")
                read[key] = value
    return read


def _unpassed_key_reason(key: str) -> str:
    return (f"reasoning in its own key is not supported (it would be dropped): write it into "
            "the content as the model's template expects (e.g. <think>...</think>), or drop "
            f"the {key!r} key")


def _message_text(content, path: str, line: int, field_name: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's `[{type: text, text}]`),
    joined."""
    if content is None:
        raise DataError(path, line, field_name, "missing")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a part of type {kind!r}" if kind else f"a {type_name(part)}"
                raise DataError(path, line, f"{field_name}[{index}]",
                                f"expected a string or a list of text parts "
                                f"({{type: text, text}}), got {what}")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(path, line, field_name, f"expected a string or a list of text parts, got "
                    f"{'an empty list' if isinstance(content, list) else type_name(content)}")


def _turn_trained(message: dict, role: str, path: str, line: int, where: str) -> bool:
    """Whether a turn is answer: an assistant turn unless marked otherwise. OpenAI's `weight` 0
    or axolotl's `training`/`train` false leaves it out of the answer (it stays in the prompt
    of later turns); 1, true or no mark keeps it. Another role marked to be trained is refused:
    minorsft's answers are assistant turns."""
    for key in TRAIN_DETAIL_KEYS:
        if message.get(key):
            raise DataError(path, line, f"{where}.{key}",
                            "spans of a turn to train on are not supported (a turn is trained "
                            f"whole or not at all); drop the {key!r} key, or mark the whole "
                            "turn with training: true/false")
    marks = {}
    for key in TRAIN_FLAG_KEYS:
        if (value := message.get(key)) is not None:
            if value not in (True, False):  # (1 and 0 too, as for `weight`)
                raise DataError(path, line, f"{where}.{key}",
                                f"expected true or false, got {value!r}")
            marks[key] = bool(value)
    weight = message.get("weight")
    if weight is not None:
        if isinstance(weight, bool) or weight not in (0, 1):
            raise DataError(path, line, f"{where}.weight",
                            f"expected 0 (not trained on) or 1, got {weight!r}")
        marks["weight"] = weight == 1
    if role != "assistant":
        if marked := [key for key, value in marks.items() if value]:
            raise DataError(path, line, f"{where}.{marked[0]}",
                            f"a {role} turn marked to be trained: minorsft trains assistant "
                            "turns only (the answer whose log-ratio the loss weighs); drop the "
                            "mark or the row")
        return False
    if len(set(marks.values())) > 1:
        raise DataError(path, line, where, "the turn's marks disagree on whether it is "
                        f"trained ({', '.join(f'{k}: {message[k]!r}' for k in marks)}); "
                        "keep one")
    return all(marks.values())


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """The tokenizer's special tokens (`<|im_end|>`, ...) as one pattern, longest first.

    The rendered conversation is tokenized with special tokens parsed (the template's own markers
    must become control tokens), so the same text inside a row's content would too: a response
    holding "<|im_end|>\\n<|im_start|>user" would train on a fake user turn. Built once per
    tokenizer and file; rows then cost one regex search per text field.
    """
    tokens = {str(token) for token in getattr(tokenizer, "all_special_tokens", None) or ()}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens |= {token.content for token in added.values() if token.special}
    tokens.discard("")
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def refuse_special_tokens(texts: dict[str, str], special: re.Pattern | None, path: str,
                          line: int) -> None:
    """A DataError for the first text field (name -> text) holding a special token."""
    if special is None:
        return
    for field_name, text in texts.items():
        if match := special.search(text):
            raise DataError(path, line, field_name,
                            f"contains the tokenizer's special token {match.group()!r}, which "
                            "would be read as that control token, not as text; remove it or "
                            "drop the row")


def refuse_answer_probe(texts: dict[str, str], path: str, line: int) -> None:
    """A DataError for the first text field holding :data:`ANSWER_PROBE`."""
    for field_name, text in texts.items():
        if ANSWER_PROBE in text:
            raise DataError(path, line, field_name,
                            f"holds {ANSWER_PROBE!r}, the string minorsft puts in place of an "
                            "answer to find where the template writes it; remove it")


def tokenize_conversation(
    tokenizer, messages: list[dict], max_length: int | None,
    special: re.Pattern | None | bool = True, trained: list[bool] | None = None,
    tool_definitions: list[dict] | None = None,
) -> tuple[list[int], list[bool], bool]:
    """Token ids, answer mask and whether truncation happened, for one conversation.

    The template renders the whole conversation; each assistant turn's answer is its content
    and the end-of-turn token after it (see :func:`_answer_span`), and nothing the template adds
    around them (a default system prompt, role headers, the newline after the end-of-turn token).
    `special` is the tokenizer's :func:`special_token_pattern` (True: build it here).
    `trained` says per message which assistant turns are answer (None: all of them).
    `tool_definitions` go to the template as its `tools`; a turn's tool calls are answer too.
    """
    text, spans = render_conversation(tokenizer, messages, special, trained, tool_definitions)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return answer_tokens(encoded["input_ids"], encoded["offset_mapping"], spans, max_length)


def render_conversation(
    tokenizer, messages: list[dict], special: re.Pattern | None | bool = True,
    trained: list[bool] | None = None, tool_definitions: list[dict] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template writes it, and where in that text its answers lie
    (character offsets), for :func:`tokenize_conversation` (which see) to tokenize. Split from
    it so that the texts of many rows can go to the tokenizer at once (`classify_rows`)."""
    if special is True:
        special = special_token_pattern(tokenizer)
    if any(ANSWER_PROBE in message["content"] for message in messages):
        raise ValueError(f"the row holds {ANSWER_PROBE!r}, the string minorsft puts in place of "
                         "an answer to find where the template writes it; remove it")
    def render(some: list[dict], generation_prompt: bool) -> str:
        return _render(tokenizer, some, generation_prompt, tool_definitions)

    full_text = render(messages, generation_prompt=False)
    answered = [index for index, message in enumerate(messages)
                if message["role"] == "assistant" and (trained is None or trained[index])]
    try:
        answers = {index: _answer_span(render, messages, index, full_text, special)
                   for index in answered}
    except HistoryDiffers as error:
        # Where the last turn would train, say that it can be trained alone (Qwen3.5's
        # templates write earlier turns without the thinking block generation opens).
        if error.index != answered[-1]:
            try:  # (the row as --train-turns last reads it, all its checks included)
                render_conversation(tokenizer, messages, special,
                                    [index == answered[-1] for index in range(len(messages))],
                                    tool_definitions)
            except ValueError:
                raise error from None
            raise ValueError(f"{error}; its last turn can be trained alone, the earlier ones "
                             "as prompt, with --train-turns last") from None
        raise
    if tool_definitions or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        def render_with(some: list[dict], definitions: list[dict] | None) -> str:
            return _render(tokenizer, some, False, definitions)

        if reason := tools.unrendered(render_with, full_text, answers, messages,
                                      tool_definitions):
            raise ValueError(reason)
    return full_text, list(answers.values())


def answer_tokens(input_ids, offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                  max_length: int | None) -> tuple[list[int], list[bool], bool]:
    """Token ids, answer mask and whether truncation happened, from the tokenizer's ids and
    character offsets of a conversation's text and its answer `spans` in that text."""
    input_ids = list(input_ids)
    # A token is answer if it overlaps an answer span, not only if it starts in one: templates
    # that write a space before the content ("Assistant: " + content, Llama-2's "[/INST] ")
    # have it fused with the first word ("ĠThe", "▁The"), and that token is what generation
    # produces first. Zero-width tokens cover no text.
    answer_mask = _overlaps(offsets, spans)
    answer_mask[0] = False  # the first token has nothing before it to predict it
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, answer_mask = input_ids[:max_length], answer_mask[:max_length]
    return input_ids, answer_mask, truncated


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (its (start, stop) character offsets), whether it covers text of a span.

    The tokens of one text start in order, so one pass with a pointer into the spans sorted by
    start does it: a span that ends before a token starts ends before every later token too,
    and a span after the first one left starts no earlier, so if that one starts past the
    token, so do they. (Testing every span per token, as before 0.7.0, was a sizeable share of
    tokenizing: docs/performance.md 6c.) Offsets out of order take the test per span.
    """
    spans = sorted(spans)
    mask = []
    span, count, previous_start = 0, len(spans), 0
    for token_start, token_stop in offsets:
        if token_start < previous_start:
            break
        previous_start = token_start
        while span < count and spans[span][1] <= token_start:
            span += 1
        mask.append(token_start < token_stop and span < count
                    and spans[span][0] < token_stop and spans[span][1] > token_start)
    else:
        return mask
    return [token_start < token_stop
            and any(token_start < stop and token_stop > start for start, stop in spans)
            for token_start, token_stop in offsets]


# Stands in for an assistant turn's content, to find where the template puts the content.
ANSWER_PROBE = "MINORSFT_ANSWER_PROBE_7F3A"


def _answer_span(render: Callable[[list[dict], bool], str], messages: list[dict], index: int,
                 full_text: str, special: re.Pattern | None) -> tuple[int, int]:
    """Where assistant turn `index`'s answer lies in `full_text`: (start, stop) character offsets.

    Templates add text of their own around a turn's content: a role header, a default system
    prompt when the conversation has none (even before an assistant turn that comes first), an
    empty thinking block. None of that is answer. Rendering the conversation once more with a
    probe string in place of this turn's content shows what the template puts before and after
    it, whatever the content is (a template may also trim it). The whole conversation is
    rendered, not the part up to this turn: templates may render a turn differently when more
    follows (Qwen3's writes an empty thinking block only into turns after the last user turn).
    `render(messages, generation_prompt)` is the template with the row's tool definitions.
    """
    if "tool_calls" in messages[index]:
        return _tool_call_span(render, messages, index, full_text, special)
    probe_turn = dict(messages[index], content=ANSWER_PROBE)
    probed = render([*messages[:index], probe_turn, *messages[index + 1:]], False)
    if probed.count(ANSWER_PROBE) != 1:
        raise ValueError("the chat template does not render an assistant turn's content once; "
                         "cannot locate the answer tokens")
    head, tail = probed.split(ANSWER_PROBE)
    content_end = len(full_text) - len(tail)
    turn = sum(message["role"] == "assistant" for message in messages[: index + 1])
    # Trained after exactly the prompt that generation starts from: the conversation so far
    # plus the generation prompt. (An empty conversation cannot be rendered, so a first turn
    # has only the checks on the probe.)
    before = render(messages[:index], True) if index else None
    if full_text.startswith(head) and full_text.endswith(tail) and content_end > len(head):
        start = len(head)
        if before is not None and not head.startswith(before):
            raise HistoryDiffers(_history_differs_reason(messages, index, turn), index)
    elif (before is not None and full_text.startswith(before) and full_text.endswith(tail)
          and content_end > len(before)):
        # The template writes this content otherwise than a plain one (Qwen3's moves the
        # reasoning in <think>...</think> out of it, into a block of its own before it): all
        # that follows the generation prompt, up to the turn's end, is what the model generates.
        start = len(before)
    else:
        raise ValueError(f"the chat template renders assistant turn {turn} differently "
                         "depending on its content (as templates that move reasoning out of "
                         "it do); cannot locate the answer tokens")
    # The turn's own end: what the template writes after the content both when the
    # conversation ends with this turn and when it goes on (Phi-3's writes the eos token once,
    # after the last turn's <|end|>\n; the next turn's header is not this turn's).
    own_tail = tail if index == len(messages) - 1 else render(
        [*messages[:index], probe_turn], False).split(ANSWER_PROBE)[-1]
    turn_end = os.path.commonprefix([own_tail, tail])
    return start, content_end + _end_of_turn(turn_end, special)


class HistoryDiffers(ValueError):
    """The conversation before assistant turn `index` renders otherwise than the prompt that
    generation starts from (see :func:`_history_differs_reason`)."""

    def __init__(self, reason: str, index: int):
        super().__init__(reason)
        self.index = index


def _history_differs_reason(messages: list[dict], index: int, turn: int) -> str:
    """Why assistant turn `turn` (at `index`) is not trained: the conversation before it renders
    otherwise than the prompt generation starts from, with the likeliest cause named."""
    what = (f"the chat template renders the conversation before assistant turn {turn} "
            "otherwise than the prompt it renders to generate that turn, so training on it "
            "would not teach what generation asks")
    if messages[index - 1]["role"] == "assistant":
        return (f"{what}: the turn directly follows another assistant turn, which the template "
                "renders otherwise when it ends the conversation (as Qwen3's adds an empty "
                "thinking block to the last turn only); merge the two turns into one")
    if any(message["role"] == "system" for message in messages):
        return (f"{what} (as templates that write the system message into the last user turn "
                "only do): drop the system message or split the conversation")
    return f"{what}: split the conversation after each assistant turn"


def _end_of_turn(turn_end: str, special: re.Pattern | None) -> int:
    """How much of `turn_end` (the template's text after a turn's content) is answer: up to and
    including its first special token, the end-of-turn marker the model generates to stop
    (ChatML's <|im_end|>, Llama's </s>, Gemma's <end_of_turn>, Phi-3's <|end|>).

    Not the template's newline after it, which the model never has to generate, nor what a
    template writes after the marker (Phi-3's eos at the end of a conversation). A template
    without special tokens keeps its trailing text, minus whitespace.
    """
    if special is not None and (found := special.search(turn_end)):
        return found.end()
    return len(turn_end.rstrip())


def _tool_call_span(render: Callable[[list[dict], bool], str], messages: list[dict],
                    index: int, full_text: str, special: re.Pattern | None) -> tuple[int, int]:
    """Where assistant turn `index`, which calls tools, lies in `full_text`: its content (if
    any) and its calls as the template writes them, up to and including the token that ends it.

    Templates write calls in their own markup (Qwen's <tool_call>{json}</tool_call>, Llama's
    bare JSON, gpt-oss's `to=functions.name ... <|call|>`), and some drop the content of a turn
    that calls, so the answer is found from around it. It starts where the turn's content
    starts (found with the probe where the template writes the content, else right after the
    generation prompt). It ends as a turn with plain content in its place would (at its
    end-of-turn token, the conversation going on the same), else, where the template ends a
    conversation that stops at this turn with a special token (gpt-oss's <|call|>, Gemma 4's
    <|tool_response>), at that token.
    """
    turn = sum(message["role"] == "assistant" for message in messages[: index + 1])
    if index == 0:
        raise ValueError(f"assistant turn {turn} calls a tool before any prompt; a chat that "
                         "calls tools starts with a user turn")
    before = render(messages[:index], True)
    if not full_text.startswith(before):
        raise HistoryDiffers(_history_differs_reason(messages, index, turn), index)
    start = len(before)
    probed = render([*messages[:index], dict(messages[index], content=ANSWER_PROBE),
                     *messages[index + 1:]], False)
    if messages[index]["content"].strip() and probed.count(ANSWER_PROBE) != 1:
        raise ValueError(tools.dropped_text_reason(turn))  # (the turn's text would be lost)
    if probed.count(ANSWER_PROBE) == 1:  # the template writes the content of a calling turn
        head = probed.split(ANSWER_PROBE)[0]
        names = [call["function"]["name"] for call in messages[index]["tool_calls"]]
        if (full_text.startswith(head) and head.startswith(before)
                and not any(name in head[start:] for name in names)):
            # (not the empty thinking block Qwen3's writes before the content; but the calls,
            # where a template writes them before the content, are answer)
            start = len(head)
    stop = _plain_turn_end(render, messages, index, full_text, special)
    if stop is None:
        upto = full_text if index == len(messages) - 1 else render(messages[: index + 1], False)
        ending = upto[start:].rstrip()
        ends_with_special = special is not None and any(
            match.end() == len(ending) for match in special.finditer(ending))
        if not ends_with_special or full_text[:start + len(ending)] != upto[:start + len(ending)]:
            raise ValueError(f"the chat template ends assistant turn {turn}, which calls a "
                             "tool, otherwise than a turn with text, and not with a special "
                             "token; cannot locate where its answer ends")
        stop = start + len(ending)
    if stop <= start:
        raise ValueError(f"cannot locate assistant turn {turn}'s tool call in the rendered text")
    return start, stop


def _plain_turn_end(render: Callable[[list[dict], bool], str], messages: list[dict],
                    index: int, full_text: str, special: re.Pattern | None) -> int | None:
    """Where turn `index` ends in `full_text` if the template ends it as a turn with plain
    content (the probe) in its place, and writes what follows the same; None where not."""
    plain = {"role": "assistant", "content": ANSWER_PROBE}
    later = tools.with_result_probes(messages)[index + 1:]
    results = [tools.RESULT_PROBE.format(i) for i, message in enumerate(later, index + 1)
               if message["role"] == "tool"]
    try:
        rendered = render([*messages[:index], plain, *messages[index + 1:]], False)
        last = rendered if index == len(messages) - 1 else render([*messages[:index], plain],
                                                                   False)
        probed = render([*messages[:index], plain, *later], False) if results else ""
    except ValueError:  # a template that wants a result to follow a call (gpt-oss's)
        return None
    if rendered.count(ANSWER_PROBE) != 1 or last.count(ANSWER_PROBE) != 1:
        return None
    # What follows must be written the same after a plain turn, results included (Gemma 4's
    # drops a result that follows no call, and writes one that does inside the calling turn)
    if any(result not in probed for result in results):
        return None
    tail = rendered.split(ANSWER_PROBE)[1]
    turn_end = os.path.commonprefix([tail, last.split(ANSWER_PROBE)[1]])
    found = special.search(turn_end) if special else None
    if found is None or not full_text.endswith(tail):  # (an end-of-turn token, not a "<")
        return None
    return len(full_text) - len(tail) + found.end()


def _render(tokenizer, messages: list[dict], generation_prompt: bool,
            tool_definitions: list[dict] | None = None) -> str:
    from jinja2.exceptions import TemplateError  # transformers' template engine, needed here only

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tool_definitions, tokenize=False,
            add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError) as error:  # e.g. "roles must alternate user/assistant"
        raise ValueError(f"the chat template refused this conversation: {error}") from error
    except Exception as error:  # noqa: BLE001 (the template's code meeting the row's data)
        # Tool definitions and calls are the row's own objects, handed to the template's code:
        # DeepSeek-V3's adds a string to a call's arguments (TypeError), Gemma 4's sorts a
        # definition's `properties` as an object (AttributeError on a list).
        raise ValueError(f"the chat template failed on this conversation: "
                         f"{type(error).__name__}: {error}") from error


def row_id(record: dict, spec: FieldSpec, path: str = "", line: int | None = None) -> str:
    """The row's `id` column if it has one, else a hash of its content (stable across runs)."""
    if (value := record.get(spec.id_field)) is not None:
        if isinstance(value, float) and value.is_integer():
            # pandas stores an integer column with missing values as float64 (3 -> 3.0)
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(path, line, spec.id_field,
                            f"expected a string or integer id, got {type_name(value)}")
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
    return Rejection(path_str, row.line, error.field, error.reason, row.raw, error,
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
    spans: list[tuple[int, int]]
    answer_field: str


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
                item = Example(item.example_id, item.row.line, input_ids, answer_mask,
                               truncated, item.path)
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
            raise DataError(path_str, row.line, getattr(error, "field", conversation.fields),
                            str(error)) from error
        return _Rendered(item.example_id, row, path_str, text, spans,
                         conversation.answer_fields[0])
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
