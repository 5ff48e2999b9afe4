"""Tool calling in chat rows: definitions, calls and results reach the template, a calling turn
is answer up to its end-of-turn token, and a template that leaves any of them out is refused."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from minorsft.cache import iter_rows, read_metadata
from minorsft.chat_templates import CHATML as BUILTIN_CHATML
from minorsft.data import Rejection, iter_examples
from minorsft.precompute import PrecomputeConfig, run_precompute
from minorsft.train import TrainConfig, run_train
from minorsft.verify import VerifyConfig, run_verify

from .conftest import build_tiny_tokenizer, write_jsonl

# Qwen2.5's way, written small: tools in the system turn, a call as JSON in <tool_call> tags
# after the turn's content, a result in a `tool` turn.
HERMES = (
    "{%- if tools -%}{{- '<|im_start|>system\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": '"
    " + (call.function.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Llama 3.1's way: a calling turn is the call alone, its content left out.
CALL_ONLY = HERMES.replace(
    "'\\n' + message['content'] -}}",
    "'\\n' + ('' if message.get('tool_calls') else message['content']) -}}")
# gpt-oss's way: a calling turn ends with its own token (here <|endoftext|>), not <|im_end|>.
OWN_END = HERMES.replace(
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}",
    "{%- endfor -%}{{- '<|endoftext|>' if message.get('tool_calls') else '<|im_end|>\\n' -}}"
    "{%- endfor -%}")
# Gemma 4's way: a result is written inside the calling turn, right after the call (a result
# that follows no call is dropped), opened by the token (here <|endoftext|>) that the model
# writes to hand over to the tool, which also ends a conversation that stops at a call.
INLINE_RESULTS = (
    "{%- for message in messages -%}{%- set previous = messages[loop.index0 - 1] -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.index0 and previous.get('tool_calls') -%}"
    "{{- '<|endoftext|>' + message['content'] + '</tool_response>' -}}{%- endif -%}"
    "{%- elif message.get('tool_calls') -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{{- '<tool_call>' + call.function.name + (call.function.arguments | tojson) -}}"
    "{%- endfor -%}{%- if loop.last -%}{{- '<|endoftext|>' -}}{%- endif -%}"
    "{%- elif loop.index0 and previous['role'] == 'tool' -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'tool' -%}"
    "{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROW = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny in Paris."}]}
CALL_ANSWER = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '</tool_call><|im_end|>')


def tokenizer_with(template: str):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def read_rows(tokenizer, tmp_path, rows):
    return list(iter_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer,
                              on_bad="skip"))


def answers(tokenizer, example) -> list[str]:
    """The example's answer tokens, decoded run by run."""
    runs, run = [], []
    for token, kept in zip(example.input_ids, example.answer_mask, strict=True):
        if kept:
            run.append(token)
        elif run:
            runs, run = [*runs, tokenizer.decode(run)], []
    return runs + ([tokenizer.decode(run)] if run else [])


def test_a_calling_turn_is_answer_and_definitions_and_results_are_prompt(tmp_path):
    tokenizer = tokenizer_with(HERMES)
    (example,) = read_rows(tokenizer, tmp_path, [ROW])
    assert answers(tokenizer, example) == [CALL_ANSWER, "It is sunny in Paris.<|im_end|>"]
    text = tokenizer.decode(example.input_ids)
    assert text.startswith('<|im_start|>system\n<tools>\n{"type": "function", "function": '
                           '{"name": "get_weather"')
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in text


@pytest.mark.parametrize("layout", [
    "dict arguments", "bare call", "older function_call", "tools as a JSON string",
    "calls as a JSON string", "older functions and function_call",
    "a lone definition", "ipython result", "function result", "sharegpt", "sharegpt list",
])
def test_each_layout_of_a_tool_calling_row_gives_the_same_tokens(tmp_path, layout):
    """The layouts datasets use (OpenAI's, transformers', LLaMA-Factory's ShareGPT) read as
    one: arguments as an object or a JSON string, calls nested or bare, the result's role."""
    messages = json.loads(json.dumps(ROW["messages"]))
    row = {"tools": [WEATHER], "messages": messages}
    call, result = messages[1], messages[2]
    function = {"name": "get_weather", "arguments": {"city": "Paris"}}
    if layout == "dict arguments":
        call["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    elif layout == "bare call":
        call["tool_calls"] = [function]
    elif layout == "older function_call":
        del call["tool_calls"]
        call["function_call"] = function
    elif layout == "older functions and function_call":  # (OpenAI's legacy layout, whole)
        del call["tool_calls"], row["tools"]
        call["function_call"] = function
        row["functions"] = [WEATHER["function"]]
        result.update(role="function", name="get_weather")
        del result["tool_call_id"]
    elif layout == "calls as a JSON string":
        call["tool_calls"] = json.dumps(call["tool_calls"])
    elif layout == "tools as a JSON string":
        row["tools"] = json.dumps([WEATHER])
    elif layout == "a lone definition":
        row["tools"] = WEATHER
    elif layout in ("ipython result", "function result"):
        result["role"] = layout.split()[0]
    else:
        value = json.dumps([function] if layout == "sharegpt list" else function)
        row = {"tools": json.dumps([WEATHER]), "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": value},
            {"from": "observation", "value": "sunny, 21 C"},
            {"from": "gpt", "value": "It is sunny in Paris."}]}
    tokenizer = tokenizer_with(HERMES)
    # (the older `functions` hold bare definitions, which this template writes as they are)
    same = dict(ROW, tools=[WEATHER["function"]]) if "functions" in row else ROW
    (expected,), (example,) = (read_rows(tokenizer, tmp_path, [same]),
                               read_rows(tokenizer, tmp_path, [row]))
    assert not isinstance(example, Rejection), example
    # (the call id is not rendered by this template, so rows without one match too)
    assert (example.input_ids, example.answer_mask) == (expected.input_ids,
                                                        expected.answer_mask)


@pytest.mark.parametrize(("template", "text", "call_answer"), [
    (CALL_ONLY, None, CALL_ANSWER),
    (OWN_END, "Let me check.", "Let me check." + CALL_ANSWER.replace("<|im_end|>",
                                                                     "<|endoftext|>")),
    (HERMES, "Let me check.", "Let me check." + CALL_ANSWER),
    (INLINE_RESULTS, None, '<tool_call>get_weather{"city": "Paris"}<|endoftext|>'),
    (BUILTIN_CHATML, None, CALL_ANSWER),
    (BUILTIN_CHATML, "Let me check.", "Let me check.\n" + CALL_ANSWER),
])
def test_the_answer_of_a_calling_turn_under_other_templates(tmp_path, template, text,
                                                            call_answer):
    """A template that writes a calling turn's call alone, one that ends the turn with a token
    of its own, a turn with text before its call, and a template that writes the result inside
    the calling turn (the result was answer): the answer is what generation writes after the
    generation prompt, up to the token that ends the turn, never the result."""
    row = json.loads(json.dumps(ROW))
    row["messages"][1]["content"] = text
    if template == INLINE_RESULTS:
        del row["tools"]  # (it writes none)
    tokenizer = tokenizer_with(template)
    (example,) = read_rows(tokenizer, tmp_path, [row])
    assert answers(tokenizer, example) == [call_answer, "It is sunny in Paris.<|im_end|>"]


# Qwen3's way, written small: an empty thinking block before every assistant turn's content,
# which generation's prompt does not hold.
THINKING_HERMES = HERMES.replace(
    "'<|im_start|>' + message['role'] + '\\n' + message['content']",
    "'<|im_start|>' + message['role'] + '\\n' + ('<think>\\n\\n</think>\\n\\n' if "
    "message['role'] == 'assistant' else '') + message['content']")


@pytest.mark.parametrize("name", ["get_weather", "think", "in"])
def test_a_thinking_block_before_a_calling_turn_is_not_answer_whatever_the_tool(tmp_path, name):
    """A tool whose name is in the template's own text before the content ("think" in
    "<think>") was taken for calls written there: the empty thinking block was answer."""
    assert THINKING_HERMES != HERMES
    row = json.loads(json.dumps(ROW).replace("get_weather", name))
    row["messages"][1]["content"] = "Let me check."
    tokenizer = tokenizer_with(THINKING_HERMES)
    (example,) = read_rows(tokenizer, tmp_path, [row])
    assert answers(tokenizer, example) == [
        "Let me check." + CALL_ANSWER.replace("get_weather", name),
        "It is sunny in Paris.<|im_end|>"]


def test_the_builtin_chatml_writes_the_definitions_after_the_rows_system_text(tmp_path):
    """`--chat-template chatml` (base models) renders tool calling; without tools a row renders
    as the plain ChatML template does (tests/test_chat_templates.py)."""
    row = json.loads(json.dumps(ROW))
    row["messages"].insert(0, {"role": "system", "content": "Be brief."})
    tokenizer = tokenizer_with(BUILTIN_CHATML)
    (example,) = read_rows(tokenizer, tmp_path, [row])
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert text.count("<|im_start|>system") == 1
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert answers(tokenizer, example) == [CALL_ANSWER, "It is sunny in Paris.<|im_end|>"]


@pytest.mark.parametrize("weight", [1, 0])
def test_a_template_that_drops_a_calling_turns_text_is_refused(tmp_path, weight):
    """Trained or not (then it is prompt of the later turns), the turn's text would be lost."""
    row = json.loads(json.dumps(ROW))
    row["messages"][1].update(content="Let me check.", weight=weight)
    (rejected,) = read_rows(tokenizer_with(CALL_ONLY), tmp_path, [row])
    assert "drops the text of assistant turn 1, which calls a tool" in rejected.reason


def test_a_template_that_leaves_tools_out_is_refused_per_part(tmp_path):
    """Before 0.6.0 any tool calling was refused; now a template that drops a part of it (the
    test model's plain ChatML drops calls and definitions) is, rather than training without."""
    tokenizer = build_tiny_tokenizer()
    without_definitions = dict(ROW, messages=[ROW["messages"][0], ROW["messages"][3]])
    with_weight_0 = json.loads(json.dumps(ROW))
    with_weight_0["messages"][1]["weight"] = 0
    del with_weight_0["tools"]
    without_tools = {key: value for key, value in ROW.items() if key != "tools"}
    rejected = read_rows(tokenizer, tmp_path, [ROW, without_definitions, with_weight_0,
                                               without_tools])
    # the definitions' refusal names the row's `tools` (it named `messages`)
    assert [r.field for r in rejected] == ["tools", "tools", "messages", "messages"]
    older = dict(without_tools, functions=[WEATHER["function"]])  # (OpenAI's older column)
    (rejected_older,) = read_rows(tokenizer, tmp_path, [older])
    assert rejected_older.field == "functions", rejected_older
    assert "does not render tool definitions (the text is the same" in rejected[0].reason
    assert "does not render tool definitions" in rejected[1].reason
    assert "does not render tool calls (assistant turn 1's call 1, to 'get_weather', is not in " \
        "the text)" in rejected[2].reason  # (an untrained call too)
    assert "does not render tool calls" in rejected[3].reason
    assert "--chat-template" in rejected[0].reason


@pytest.mark.parametrize(("dropped", "weight", "reason"), [
    ("{%- for call in message.get('tool_calls') or [] -%}", 0, "does not render tool calls"),
    ("{%- for call in message.get('tool_calls') or [] -%}", 1, "does not render tool calls"),
    ("{%- if tools -%}", 1, "does not render tool definitions"),
    ("'<|im_start|>' + message['role']", 1, "does not render tool results"),
])
def test_text_elsewhere_in_the_row_does_not_pass_for_a_dropped_part(tmp_path, dropped, weight,
                                                                    reason):
    """A template that drops one part was let through where the row held its words elsewhere:
    a call's name in the definitions (an untrained call) or in the turn's text, the definitions'
    names in the call, a result quoted in the final answer."""
    if dropped.startswith("{%- for"):  # calls: never written
        template = HERMES.replace(dropped, "{%- for call in [] -%}")
    elif dropped.startswith("{%- if"):  # definitions: never written
        template = HERMES.replace(dropped, "{%- if false -%}")
    else:  # results: a tool turn is not written
        template = HERMES.replace(
            "{%- for message in messages -%}",
            "{%- for message in messages if message['role'] != 'tool' -%}")
    row = json.loads(json.dumps(ROW))
    row["messages"][1].update(content="I will use get_weather on Paris.", weight=weight)
    row["messages"][3]["content"] = "It is sunny, 21 C in Paris."
    (rejected,) = read_rows(tokenizer_with(template), tmp_path, [row])
    assert isinstance(rejected, Rejection), rejected
    assert reason in rejected.reason, rejected.reason


def test_each_call_of_a_turn_must_be_written_and_escaped_argument_names_are_found(tmp_path):
    """gpt-oss's template writes a turn's first call only: a second call to the same tool
    passed the check (its name and argument names were the first's). An argument name that
    JSON escapes (`say "hi"`) is written escaped, and was refused as missing."""
    first_only = HERMES.replace("message.get('tool_calls') or []",
                                "(message.get('tool_calls') or [])[:1]")
    row = json.loads(json.dumps(ROW))
    row["messages"][1]["tool_calls"].append(
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}})
    (rejected,) = read_rows(tokenizer_with(first_only), tmp_path, [row])
    assert "(assistant turn 1's call 2, to 'get_weather', is not in the text)" in (
        rejected.reason)
    (example,) = read_rows(tokenizer_with(HERMES), tmp_path, [row])
    assert not isinstance(example, Rejection), example
    row["messages"][1]["tool_calls"][1]["function"]["arguments"] = {'say "hi"': "x"}
    (example,) = read_rows(tokenizer_with(HERMES), tmp_path, [row])
    assert not isinstance(example, Rejection), example


def test_parquet_calls_and_definitions_lose_the_nulls_of_other_rows_keys(tmp_path):
    """A Parquet struct column gives each row every other row's keys, as nulls: the call to
    get_weather trained as {"city": "Paris", "tz": null}. A JSON string keeps its nulls; bad
    structures and values the template cannot write are rejected, not a crash of the run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = json.loads(json.dumps(ROW))
    other["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"tz": "CET"}
    rows = [json.loads(json.dumps(ROW)), other]
    rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    dated = json.loads(json.dumps(ROW))
    dated["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"day": "2026-11-28"}
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    tokenizer = tokenizer_with(HERMES)
    first, second = iter_examples(path, tokenizer)
    (expected,) = read_rows(tokenizer, tmp_path, [ROW])
    assert first.input_ids == expected.input_ids
    assert '{"tz": "CET"}' in tokenizer.decode(second.input_ids)
    assert "null" not in tokenizer.decode(first.input_ids + second.input_ids)
    broken = json.loads(json.dumps(ROW))
    broken["tools"][0]["function"]["parameters"]["properties"] = ["city"]
    gemma_like = HERMES.replace("(tool | tojson)", "(tool.function.parameters.properties | "
                                "dictsort | string)")
    (rejected,) = read_rows(tokenizer_with(gemma_like), tmp_path, [broken])
    assert "the chat template failed on this conversation: " in rejected.reason


@pytest.mark.parametrize(("change", "field", "reason"), [
    (lambda row: row.update(tools="[{"), "tools", "JSON string of one; not JSON"),
    (lambda row: row.update(tools="[" + "9" * 5000 + "]"), "tools",
     "the JSON cannot be read (ValueError: Exceeds the limit"),
    (lambda row: row.update(tools="[" * 100_000 + "]" * 100_000), "tools",
     "the JSON cannot be read (RecursionError"),
    (lambda row: row["messages"][1]["tool_calls"][0]["function"].update(
        arguments='{"city": "\\ud800"}'),
     "messages[1].tool_calls[0].function.arguments", "an unpaired surrogate escape"),
    (lambda row: row.update(tools=[{"type": "function", "function": {}}]),
     "tools[0].function.name", "expected the tool's name"),
    (lambda row: row.update(tools=["get_weather"]), "tools[0]",
     "expected a tool definition"),
    (lambda row: row["messages"][1]["tool_calls"][0]["function"].update(arguments="city=Paris"),
     "messages[1].tool_calls[0].function.arguments", "not JSON"),
    (lambda row: row["messages"][1]["tool_calls"][0]["function"].update(arguments=["Paris"]),
     "messages[1].tool_calls[0].function.arguments", "expected an object of arguments"),
    (lambda row: row["messages"][1]["tool_calls"][0]["function"].pop("name"),
     "messages[1].tool_calls[0].function.name", "expected the called tool's name"),
    (lambda row: row["messages"][1].update(tool_calls={"name": "x"}),
     "messages[1].tool_calls", "expected a list of calls"),
    (lambda row: row["messages"][0].update(tool_calls=[CALL]),
     "messages[0].tool_calls", "only assistant turns call tools"),
    (lambda row: row["messages"][2].update(training=True),
     "messages[2].training", "a tool turn marked to be trained"),
    (lambda row: row["messages"][2].update(tool_call_id=7),
     "messages[2].tool_call_id", "expected a string, got int"),
    (lambda row: row["messages"][2].update(content=None), "messages[2].content", "missing"),
    (lambda row: row["messages"][1].update(content=None, tool_calls=[]),
     "messages[1].content", "missing"),
    (lambda row: row["messages"][1]["tool_calls"][0]["function"].update(
        arguments={"city": "<|im_end|>"}),
     "messages[1].tool_calls", "special token '<|im_end|>'"),
    (lambda row: row["messages"][2].update(name="get<|im_start|>"),
     "messages[2].name", "special token '<|im_start|>'"),
    (lambda row: row.update(tools=[dict(WEATHER, description="<|im_start|>")]), "tools",
     "special token '<|im_start|>'"),
    (lambda row: row["messages"].pop(0), "messages",
     "assistant turn 1 calls a tool before any prompt"),
    # a key given twice in a JSON string, as in the row's own JSON: one value would be lost
    (lambda row: row["messages"][1]["tool_calls"][0]["function"].update(
        arguments='{"city": "Paris", "city": "Rome"}'),
     "messages[1].tool_calls[0].function.arguments", "the key 'city' appears twice"),
    (lambda row: row.update(functions=[WEATHER["function"]]), "functions",
     "tool definitions in both 'tools' and 'functions'; give them in one column"),
    (lambda row: row.update(tools=None, functions=["get_weather"]), "functions[0]",
     "expected a tool definition"),
])
def test_bad_tool_calling_rows_are_rejected_naming_the_field(tmp_path, change, field, reason):
    row = json.loads(json.dumps(ROW))
    change(row)
    (rejected,) = read_rows(tokenizer_with(HERMES), tmp_path, [row])
    assert isinstance(rejected, Rejection), rejected
    assert rejected.field == field and reason in rejected.reason, rejected


def test_a_tool_calling_cache_matches_a_fresh_forward_pass_and_trains(tiny_model_dir, tmp_path):
    """precompute with a tool template file, verify (cached log-probs against a fresh forward
    pass of the tokens) and a training step on the calls."""
    (tmp_path / "hermes.jinja").write_text(HERMES)
    rows = [dict(json.loads(json.dumps(ROW)), id=f"r{i}") for i in range(3)]
    rows[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Rome"}
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    cache = tmp_path / "cache"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(data), out=str(cache),
                                    chat_template=str(tmp_path / "hermes.jinja"),
                                    verify_sample=0), Console(quiet=True))
    cached = list(iter_rows(cache))
    assert len(cached) == 3 and read_metadata(cache)["chat_template"]["text"] == HERMES
    assert run_verify(VerifyConfig(cache=str(cache)), Console(quiet=True)).rows == 3
    history = run_train(TrainConfig(cache=str(cache), output=str(tmp_path / "run"),
                                    batch_size=3, max_steps=1), Console(quiet=True))
    assert abs(history[0]["m_theta"]) < 1e-5  # the policy starts as the reference


def test_a_functions_column_is_read_beside_chats_only(tmp_path):
    """OpenAI's older `functions` column is its chats' tool definitions; beside a single-turn
    row (prompt/response, alpaca) a column of that name may hold anything and is left alone."""
    tokenizer = tokenizer_with(HERMES)
    single = {"prompt": "Name two functions of a cell.", "response": "Growth and repair.",
              "functions": ["growth", "repair"]}
    (example,) = read_rows(tokenizer, tmp_path, [single])
    assert not isinstance(example, Rejection), example
    assert "<tools>" not in tokenizer.decode(example.input_ids)
