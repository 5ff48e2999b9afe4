"""JSON helpers: JSON that strict parsers read (for the JSON and JSONL files minorsft writes),
and the rows' JSON read strictly (a key given twice refused, a malformed line said where)."""

import json
import math


def json_safe(value):
    """`value` with NaN and infinities replaced by None (JSON null), recursively.

    json.dumps writes them as NaN / Infinity, which is not JSON: strict parsers (jq, browsers,
    most other languages) reject the whole file. A log-prob of -inf (an answer token the model
    gives probability 0 in low precision) would otherwise make an NLL or m_theta infinite.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def malformed_json_reason(error: json.JSONDecodeError, text: str) -> str:
    """json's complaint about a line, with the column in the line (`text`, the line without its
    ending) and whether that is the line's end (a cut-off line)."""
    # Some of json's messages end in the word "at" ("Invalid control character at"): without a
    # position after it the message read as cut short.
    at = "" if error.msg.endswith(" at") else " at"
    at_end = ", the end of the line" if error.pos >= len(text.rstrip()) else ""
    return f"malformed JSON ({error.msg}{at} column {error.colno}{at_end})"


class RepeatedKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def object_without_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object builder, refusing a key given twice (it would keep the last value)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        raise RepeatedKeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return record
