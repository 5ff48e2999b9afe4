"""Bad input rows that precompute must reject with file, line and field (not a test module).

Shared by tests/test_bad_input.py and scripts/bad_inputs_table.py (docs/reliability.md).
Each case: a name, the raw line (bytes), the field the error must name, and a reason fragment.
"""

from __future__ import annotations

import json

GOOD = {"id": "good", "prompt": "What is 2 plus 3?", "response": "2 plus 3 is 5."}
LONG_PROMPT = " ".join(["How many apples are left in total if Tom buys more?"] * 12)
MAX_LENGTH = 48  # the --max-length the cases run with: the long prompt alone is longer


def _json(row: dict) -> bytes:
    return json.dumps(row).encode()


CASES = [
    ("malformed JSON (cut-off line)", b'{"id": "c1", "prompt": "x", "response": ', None,
     "malformed JSON (Expecting value at column 41, the end of the line)"),
    ("JSON that is not an object", b'["What is 2 plus 3?", "5"]', None,
     "expected a JSON object"),
    ("non-UTF-8 bytes (Latin-1 text)", b'{"id": "c3", "prompt": "caf\xe9?", "response": "x"}',
     None, "not valid UTF-8 (byte 0xe9 at column 28)"),
    ("unknown format (no known columns)", _json({"id": "c4", "text": "hello"}), None,
     "unknown format"),
    ("missing field (response is null)", _json({"id": "c5", "prompt": "x", "response": None}),
     "response", "missing"),
    ("wrongly typed field (response is a number)",
     _json({"id": "c6", "prompt": "x", "response": 42}), "response",
     "expected a string, got int"),
    ("wrongly typed field (system is a number)",
     _json({"id": "c7", "system": 5, "prompt": "x", "response": "y"}), "system",
     "expected a string, got int"),
    ("wrongly typed field (messages is a string)", _json({"id": "c8", "messages": "hi"}),
     "messages", "expected a non-empty list of {role, content}, got str"),
    ("wrongly typed field (content is a list of strings, not of text parts)",
     _json({"id": "c9", "messages": [{"role": "user", "content": ["x"]},
                                     {"role": "assistant", "content": "y"}]}),
     "messages[0].content[0]",
     "expected a string or a list of text parts ({type: text, text}), got a str"),
    ("wrongly typed id (an object)",
     _json({"id": {"n": 1}, "prompt": "x", "response": "y"}), "id",
     "expected a string or integer id"),
    ("empty answer (whitespace only)", _json({"id": "c11", "prompt": "x", "response": "  "}),
     "response", "empty"),
    ("answer of characters that show nothing (a zero-width space, a soft hyphen)",
     _json({"id": "c11b", "prompt": "x", "response": "\u200b\u00ad "}), "response",
     "holds only characters that show nothing (U+00AD U+200B)"),
    ("assistant turn of a control character",
     _json({"id": "c12b", "messages": [{"role": "user", "content": "x"},
                                       {"role": "assistant", "content": "\u0000"}]}),
     "messages[1].content", "holds only characters that show nothing (U+0000)"),
    ("empty assistant turn in a chat",
     _json({"id": "c12", "messages": [{"role": "user", "content": "x"},
                                      {"role": "assistant", "content": ""}]}),
     "messages[1].content", "empty answer"),
    ("unknown role",
     _json({"id": "c13", "messages": [{"role": "robot", "content": "x"},
                                      {"role": "assistant", "content": "y"}]}),
     "messages[0].role", "unknown role 'robot'"),
    ("chat without an assistant turn",
     _json({"id": "c14", "messages": [{"role": "user", "content": "x"}]}), "messages",
     "no assistant turn"),
    ("duplicate id", _json(dict(GOOD, prompt="Another question?")), "id",
     "duplicate id 'good' (first on line 1)"),
    ("answer truncated to zero tokens by --max-length",
     _json({"id": "c16", "prompt": LONG_PROMPT, "response": "5"}), "response",
     "truncated to zero tokens"),
    ("system prompt twice (a system column and a system message)",
     _json({"id": "c17", "system": "Be brief.",
            "messages": [{"role": "system", "content": "Be kind."},
                         {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "system", "the chat has its own system message (messages[0])"),
    ("columns of two formats (messages and prompt/response)",
     _json({"id": "c18", "prompt": "x", "response": "y",
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}]}),
     None, "ambiguous format: the row has 'messages' and 'prompt'+'response'"),
    ("missing field (a prompt without a response)", _json({"id": "c19", "prompt": "x"}),
     "response", "missing (the row has 'prompt', so it reads as the prompt/response format)"),
    ("missing field (a message without content)",
     _json({"id": "c20", "messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}),
     "messages[1].content", "missing"),
    ("chat-control text in the answer (a fake user turn)",
     _json({"id": "c21", "prompt": "x", "response": "ok<|im_end|>\n<|im_start|>user\nextra"}),
     "response", "contains the tokenizer's special token '<|im_end|>'"),
    ("unpaired surrogate (a \\ud800 escape, as in scraped text)",
     _json({"id": "c22", "prompt": "caf\ud800?", "response": "y"}), "prompt",
     "contains an unpaired surrogate (\\ud800)"),
    ("wrongly typed field (alpaca input is 0)",
     _json({"id": "c23", "instruction": "x", "input": 0, "output": "y"}), "input",
     "expected a string, got int"),
    ("a number Python cannot read (5000 digits)",
     b'{"id": "c24", "prompt": "x", "response": "y", "n": ' + b"1" * 5000 + b"}", None,
     "unreadable JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    ("JSON nested too deeply (100,000 brackets)", b'{"id": "c25", "prompt": ' + b"[" * 100_000,
     None, "unreadable JSON (nested deeper than Python's JSON reader allows)"),
    ("a key given twice (JSON readers keep one value)",
     b'{"id": "c26", "prompt": "x", "response": "a", "response": "b"}', "response",
     "the key 'response' appears twice in one JSON object"),
]


def case_file_lines(case_line: bytes) -> list[bytes]:
    """A file of two rows: a good one, then the case (so the error must name line 2)."""
    return [_json(GOOD), case_line]


def all_cases_lines() -> list[bytes]:
    """One file with a good row, every case, and good rows between them."""
    lines = [_json(GOOD)]
    for index, (_, line, _, _) in enumerate(CASES):
        lines.append(line)
        lines.append(_json(dict(GOOD, id=f"good-{index}", prompt=f"What is {index} plus 1?")))
    return lines
