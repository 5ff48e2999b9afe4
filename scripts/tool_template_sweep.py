"""Which real chat templates minorsft trains tool calling with, and what it takes as answer.

One tool-calling chat (a definition, a call, its result, a final answer) is tokenized under every
template that TRL ships in `trl/chat_templates/` (copies of the models' own, `pip install
trl`), and a Markdown table shows each template's answer tokens, decoded, or why the row is
refused. Run: `python scripts/tool_template_sweep.py` (a few seconds; needs the built-in model,
whose tokenizer stands in for each model's).

The stand-in tokenizer is SmolLM2's, with each template's markers (`<|im_end|>`, `<turn|>`,
`[TOOL_CALLS]`, ...) added as special tokens, as the models' own tokenizers have them, except
`<tool_call>`, `</tool_call>`, `<think>` and `</think>`, which Qwen's tokenizers hold as plain
added tokens. Which markers a real tokenizer holds as special is so guessed from their shape:
a template whose calling turn ends with a marker the real tokenizer does not hold as special may
be refused there, never trained otherwise.
"""

from __future__ import annotations

import json
import re
from importlib import resources

from minorsft.answer_spans import tokenize_conversation
from minorsft.conversations import FieldSpec, read_conversation
from minorsft.data_errors import DataError
from minorsft.models import load_tokenizer, resolve_model

ROW = {
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call12345",
         "name": "get_weather"},
        {"role": "assistant", "content": "It is sunny in Paris."}],
}
MARKER = re.compile(r"<\|[\w\"]+\|?>|<\w+\|>|<｜[^>]+｜>|\[/?[A-Z_]+\]|</?tool_call>|</?think>")
PLAIN_ADDED = ("<tool_call>", "</tool_call>", "<think>", "</think>")


def answer_runs(tokenizer, input_ids: list[int], mask: list[bool]) -> list[str]:
    runs, run = [], []
    for token, kept in zip(input_ids, mask, strict=True):
        if kept:
            run.append(token)
        elif run:
            runs, run = [*runs, tokenizer.decode(run)], []
    return runs + ([tokenizer.decode(run)] if run else [])


def cell(text: str) -> str:
    """Text as a Markdown table cell's code span (a `|` even inside one would split the cell)."""
    return "`" + text.replace("\n", "\\n").replace("|", "\\|") + "`"


def main() -> None:
    folder = resources.files("trl") / "chat_templates"
    model = resolve_model("smollm2-135m-instruct")
    print("| template | answer of the calling turn | answer of the last turn |")
    print("|---|---|---|")
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        text = path.read_text() if path.name.endswith(".jinja") else ""
        if "tool" not in text or "training" in path.name:
            continue
        tokenizer = load_tokenizer(model)
        markers = sorted(set(MARKER.findall(text)))
        tokenizer.add_special_tokens({"additional_special_tokens": [
            m for m in markers if m not in PLAIN_ADDED]}, replace_extra_special_tokens=False)
        tokenizer.add_tokens([m for m in markers if m in PLAIN_ADDED])
        tokenizer.chat_template = text
        name = path.name.removesuffix(".jinja")
        try:
            row = read_conversation(json.loads(json.dumps(ROW)), FieldSpec(), name, 1)
            ids, mask, _ = tokenize_conversation(tokenizer, row.messages, None, True,
                                                 row.trained, row.tools)
        except (ValueError, DataError) as error:
            print(f"| {name} | refused: {error} | |")
            continue
        print(f"| {name} | {' | '.join(map(cell, answer_runs(tokenizer, ids, mask)))} |")


if __name__ == "__main__":
    main()
