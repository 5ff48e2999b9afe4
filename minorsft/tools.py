"""Tool calling in chat rows: tool definitions, the assistant's tool calls and the tools' results.

They are read into the shapes that chat templates take (transformers' `tools=` argument, an
assistant message's `tool_calls`, `tool` messages), from the layouts datasets use:

- `tools`: a list of definitions (OpenAI's `{type: function, function: {name, description,
  parameters}}` or a bare `{name, ...}`), or that list as a JSON string (as Parquet datasets
  store it, their schemas differing per row); OpenAI's older `functions` column the same;
- an assistant turn's `tool_calls`: `[{type: function, id?, function: {name, arguments}}]`, the
  arguments an object or a JSON string of one (OpenAI's fine-tuning files); OpenAI's older
  single `function_call: {name, arguments}`; ShareGPT's `function_call` turns (LLaMA-Factory's
  layout), whose value is the call (or a list of calls) as JSON;
- a tool's result: a `tool` turn (also `ipython`, OpenAI's older `function`, LLaMA-Factory's
  `observation`), its `content` the result as text, with its optional `name` and `tool_call_id`.

A tool-calling turn is answer like any assistant turn: the model learns to write the call as the
template renders it. Templates that know no tools render nothing of them, so what a template made
of a row is checked (:func:`unrendered`): a row whose tools, calls or results it left out is
rejected rather than trained on without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from minorsft.data_errors import DataError, type_name
from minorsft.jsonl import RepeatedKeyError, object_without_repeated_keys

# Roles of a tool's result, mapped to the one templates know.
TOOL_RESULT_ROLES = ("tool", "ipython", "function", "observation")
# A result's keys that templates read (Mistral's needs tool_call_id; others write the name).
TOOL_RESULT_KEYS = ("name", "tool_call_id")


# Columns of tool definitions: `tools`, and OpenAI's older `functions` (bare definitions, beside
# the older `function_call` turns), read alike.
DEFINITION_COLUMNS = ("tools", "functions")


def read_definitions(record: dict, path: str, line: int,
                     columns: tuple[str, ...] = DEFINITION_COLUMNS,
                     ) -> tuple[list[dict] | None, str]:
    """The row's tool definitions, from the first of `columns` that has some, and that column
    (None and "tools" where none has)."""
    found = [(defined, column) for column in columns
             if (defined := read_tools(record.get(column), path, line, column))]
    if len(found) > 1:
        raise DataError(path, line, found[1][1], "the row has tool definitions in both "
                        f"{found[0][1]!r} and {found[1][1]!r}; give them in one column")
    return found[0] if found else (None, columns[0])


def read_tools(value, path: str, line: int, column: str = "tools") -> list[dict] | None:
    """The tool definitions of column `column`, or None where it defines none (null, false, 0,
    empty, "[]", "null")."""
    if value is None or value == "" or value is False or value == 0:
        return None
    if isinstance(value, str):
        value = _loads(value, path, line, column,
                       "expected a list of tool definitions or a JSON string of one")
        if value is None:
            return None
    elif from_parquet(path):
        value = without_nulls(value)
    if isinstance(value, dict):
        value = [] if not value else [value]  # one definition, not in a list
    if not isinstance(value, list):
        raise DataError(path, line, column, "expected a list of tool definitions, got "
                        f"{type_name(value)}")
    for index, definition in enumerate(value):
        tool_name(definition, path, line, f"{column}[{index}]")
    return value or None


def tool_name(definition, path: str, line: int, where: str) -> str:
    """A definition's function name: `function.name` (OpenAI's layout) or `name`."""
    if not isinstance(definition, dict):
        raise DataError(path, line, where, "expected a tool definition ({type: function, "
                        f"function: {{name, description, parameters}}}}), got "
                        f"{type_name(definition)}")
    function = definition.get("function")
    holder, key = ((function, f"{where}.function.name") if isinstance(function, dict)
                   else (definition, f"{where}.name"))
    name = holder.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(path, line, key, "expected the tool's name (a non-empty string), got "
                        f"{name!r}")
    return name


def calls_key(message: dict) -> str | None:
    """Which key of a message holds its calls: `tool_calls`, the older `function_call`, or
    none."""
    return next((key for key in ("tool_calls", "function_call") if message.get(key)), None)


def read_tool_calls(message: dict, path: str, line: int, where: str) -> list[dict]:
    """An assistant message's calls (`tool_calls`, a JSON string of them, or the older single
    `function_call`), in the layout templates take; [] where it makes none."""
    key = calls_key(message)
    if key is None:
        return []
    calls, where = message[key], f"{where}.{key}"
    if isinstance(calls, str):
        calls = _loads(calls, path, line, where, "expected a list of calls or a JSON string "
                       "of one")
    elif from_parquet(path):
        calls = without_nulls(calls)
    if key == "function_call":
        calls = [calls]  # one call, and its fields are named without an index
    elif not isinstance(calls, list):
        raise DataError(path, line, where,
                        f"expected a list of calls, got {type_name(calls)}")
    return [read_call(call, path, line, where + ("" if key == "function_call" else f"[{index}]"))
            for index, call in enumerate(calls)]


def _loads(text: str, path: str, line: int, where: str, expected: str):
    """A JSON string inside a row (`tools`, a call or its arguments), as a DataError where it
    cannot be read: not JSON, a key given twice in one object, a number past Python's 4300
    digits, nesting past the recursion limit, or an unpaired surrogate escape (\\ud800), which
    no tokenizer takes."""
    try:
        value = json.loads(text, object_pairs_hook=object_without_repeated_keys)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RepeatedKeyError as error:  # (as in a row's own JSON: one value would be dropped)
        raise DataError(path, line, where, f"{expected}; the key {error.key!r} appears twice "
                        "in one JSON object (JSON readers silently keep one of the values)") \
            from None
    except json.JSONDecodeError as error:
        raise DataError(path, line, where, f"{expected}; not JSON ({error.msg} at character "
                        f"{error.pos})") from None
    except UnicodeEncodeError:
        raise DataError(path, line, where, "the JSON holds an unpaired surrogate escape "
                        "(\\ud800-\\udfff), half of a UTF-16 pair and no character; repair "
                        "the text or drop the row") from None
    except (ValueError, RecursionError) as error:  # too many digits, too deeply nested
        raise DataError(path, line, where, f"{expected}; the JSON cannot be read "
                        f"({type(error).__name__}: {str(error)[:200]})") from None
    return value


def from_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def without_nulls(value):
    """`value` without the keys whose value is null, at any depth.

    A Parquet struct column has one schema for all its rows, so each row's definitions and
    arguments come back with every other row's keys, as nulls (`{"city": null, "tz": "CET"}`):
    left in, they would teach calls with parameters the tool does not have. A null that a
    row's data really holds cannot be told apart there; as a JSON string it is kept.
    """
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def read_sharegpt_call(value, path: str, line: int, where: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value: a call (`{name, arguments}`) or a list of calls,
    as a JSON string, as LLaMA-Factory's data holds them."""
    if isinstance(value, str):
        value = _loads(value, path, line, where, "expected the call as JSON ({name, arguments})")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise DataError(path, line, where, "expected a call, got an empty list")
    return [read_call(call, path, line, where + (f"[{index}]" if isinstance(value, list) else ""))
            for index, call in enumerate(calls)]


def read_call(call, path: str, line: int, where: str) -> dict:
    """One call as `{type: function, function: {name, arguments}}` (and its `id`, which some
    templates write), the arguments an object."""
    if not isinstance(call, dict):
        raise DataError(path, line, where, "expected a call ({type: function, function: "
                        f"{{name, arguments}}}}), got {type_name(call)}")
    function = call.get("function")
    if isinstance(function, dict):
        where = f"{where}.function"
    else:
        function = call  # a bare {name, arguments}
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(path, line, f"{where}.name",
                        f"expected the called tool's name (a non-empty string), got {name!r}")
    read = {"type": "function", "function": {
        "name": name, "arguments": _arguments(function.get("arguments"), path, line,
                                              f"{where}.arguments")}}
    if isinstance(call.get("id"), str):
        read["id"] = call["id"]
    return read


def _arguments(value, path: str, line: int, where: str) -> dict:
    """A call's arguments as an object: templates write them with `tojson`, so a JSON string
    left as it is would be written as one string, quoted and escaped."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = (_loads(value, path, line, where, "expected an object or a JSON string of one")
                 if value.strip() else {})
    if not isinstance(value, dict):
        raise DataError(path, line, where,
                        f"expected an object of arguments, got {type_name(value)}")
    return value


def as_text(value) -> str:
    """Definitions or a call as text, for the checks every text field goes through (special
    tokens): they are written into the prompt or the answer as they are. (A Parquet date or
    decimal in them is written as its text: the template decides whether it takes it.)"""
    return json.dumps(value, ensure_ascii=False, default=str)


# Stands in for a tool's result, to find whether and where the template writes it.
RESULT_PROBE = "MINORSFT_RESULT_PROBE_{}_9C2E"


def with_result_probes(messages: list[dict]) -> list[dict]:
    """The conversation with each tool result's content replaced by its own probe."""
    return [dict(message, content=RESULT_PROBE.format(index)) if message["role"] == "tool"
            else message for index, message in enumerate(messages)]


class DefinitionsNotRendered(ValueError):
    """The template leaves out the row's tool definitions: the refusal names their column
    (`tools` or `functions`; it named the messages, which hold nothing wrong)."""


def unrendered(render: Callable[[list[dict], list[dict] | None], str], full_text: str,
               answers: dict[int, tuple[int, int]], messages: list[dict],
               tools: list[dict] | None) -> str | None:
    """What of the row's tool calling the template leaves out, as the reason to reject the row;
    None where it writes all of it. Raises :class:`DefinitionsNotRendered` for the definitions.

    `render(messages, tools)` is the template; `answers` maps the index of each trained
    assistant turn to its answer's (start, stop) in `full_text`. Each part is checked by
    rendering the conversation without it or with a probe in its place, so that text elsewhere
    in the row (a definition holding a call's name, an answer quoting a result, a first call
    like a second one) cannot stand in for it: the definitions must change the text; each
    call's probed name must be written (gpt-oss's template writes a turn's first call only),
    and in a trained turn its tool's and arguments' names lie inside the answer; each result's
    probe must be written.
    """
    if tools and render(messages, None) == full_text:
        raise DefinitionsNotRendered("the chat template does not render tool definitions (the "
                                     f"text is the same without them); {_GIVE_ONE}")
    if reason := _unrendered_calls(render, full_text, answers, messages, tools):
        return reason
    probed = render(with_result_probes(messages), tools)
    for index, message in enumerate(messages):
        if message["role"] == "tool" and RESULT_PROBE.format(index) not in probed:
            results = sum(m["role"] == "tool" for m in messages[: index + 1])
            return (f"the chat template does not render tool results (tool result {results} "
                    f"is not in the text); {_GIVE_ONE}")
    return None


# Stand in for a called tool's name (lower case and an identifier, as a template may expect)
# and for the text of a turn that calls.
CALL_PROBE = "minorsft_call_probe_{}_{}"
CALLER_TEXT_PROBE = "MINORSFT_CALLER_TEXT_PROBE_{}_5B1D"


def _unrendered_calls(render, full_text: str, answers: dict[int, tuple[int, int]],
                      messages: list[dict], tools: list[dict] | None) -> str | None:
    probed_messages = [dict(message, tool_calls=[
        dict(call, function=dict(call["function"], name=CALL_PROBE.format(index, number)))
        for number, call in enumerate(message["tool_calls"])],
        content=CALLER_TEXT_PROBE.format(index) if message["content"] else "")
        if message.get("tool_calls") else message for index, message in enumerate(messages)]
    try:
        probed = render(probed_messages, tools)
    except ValueError:  # a template that takes only the defined tools' names
        probed = None
    turn = 0
    for index, message in enumerate(messages):
        turn += message["role"] == "assistant"
        if (probed is not None and message.get("tool_calls") and message["content"]
                and CALLER_TEXT_PROBE.format(index) not in probed):
            # (Llama 3.1's writes the call alone; a trained turn is refused on this sooner)
            return dropped_text_reason(turn)
        for number, call in enumerate(message.get("tool_calls") or ()):
            function = call["function"]
            where = f"assistant turn {turn}'s call {number + 1}, to {function['name']!r}"
            if probed is not None and CALL_PROBE.format(index, number) not in probed:
                return (f"the chat template does not render tool calls ({where}, is not in "
                        f"the text); {_GIVE_ONE}")
            if index in answers:
                answer = full_text[slice(*answers[index])]
                if missing := [word for word in (function["name"], *function["arguments"])
                               if word not in answer and json.dumps(word)[1:-1] not in answer]:
                    return (f"the chat template does not render tool calls ({where}: "
                            f"{missing[0]!r} is not in its answer); {_GIVE_ONE}")
        if (probed is None and message.get("tool_calls")
                and _same_without_calls(render, messages, index, tools, full_text)):
            return (f"the chat template does not render tool calls (assistant turn {turn}'s "
                    f"text is the same without them); {_GIVE_ONE}")
    return None


_GIVE_ONE = "give a template that does with --chat-template (such as Qwen2.5's)"


def dropped_text_reason(turn: int) -> str:
    return (f"the chat template drops the text of assistant turn {turn}, which calls a tool; "
            "leave the text out of the turn, or give a template that writes it with "
            "--chat-template")


def _same_without_calls(render, messages: list[dict], index: int, tools, full_text: str) -> bool:
    without = {key: value for key, value in messages[index].items() if key != "tool_calls"}
    try:
        return render([*messages[:index], without, *messages[index + 1:]], tools) == full_text
    except ValueError:  # the template wants the calls there (a result follows): it reads them
        return False
