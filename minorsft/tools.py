"""Tool calling in chat rows: tool definitions, the assistant's tool calls and the tools' results.

They are read into the shapes that chat templates take (transformers' `tools=` argument, an
assistant message's `tool_calls`, `tool` messages), from the layouts datasets use:

- `tools`: a list of definitions (OpenAI's `{type: function, function: {name, description,
  parameters}}` or a bare `{name, ...}`), or that list as a JSON string (as Parquet datasets
  store it, their schemas differing per row);
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

from minorsft.data_errors import DataError

# Roles of a tool's result, mapped to the one templates know.
TOOL_RESULT_ROLES = ("tool", "ipython", "function", "observation")
# A result's keys that templates read (Mistral's needs tool_call_id; others write the name).
TOOL_RESULT_KEYS = ("name", "tool_call_id")


def read_tools(value, path: str, line: int) -> list[dict] | None:
    """The row's tool definitions, or None where it defines none (null, empty, "[]")."""
    if value is None or value == "" or value is False:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(path, line, "tools", "expected a list of tool definitions or a "
                            f"JSON string of one; the string is not JSON ({error.msg} at "
                            f"character {error.pos})") from None
    if isinstance(value, dict):
        value = [] if not value else [value]  # one definition, not in a list
    if not isinstance(value, list):
        raise DataError(path, line, "tools", "expected a list of tool definitions, got "
                        f"{type(value).__name__}")
    for index, definition in enumerate(value):
        tool_name(definition, path, line, f"tools[{index}]")
    return value or None


def tool_name(definition, path: str, line: int, where: str) -> str:
    """A definition's function name: `function.name` (OpenAI's layout) or `name`."""
    if not isinstance(definition, dict):
        raise DataError(path, line, where, "expected a tool definition ({type: function, "
                        f"function: {{name, description, parameters}}}}), got "
                        f"{type(definition).__name__}")
    function = definition.get("function")
    holder, key = ((function, f"{where}.function.name") if isinstance(function, dict)
                   else (definition, f"{where}.name"))
    name = holder.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(path, line, key, "expected the tool's name (a non-empty string), got "
                        f"{name!r}")
    return name


def read_tool_calls(message: dict, path: str, line: int, where: str) -> list[dict]:
    """An assistant message's calls (`tool_calls`, or the older single `function_call`), in
    the layout templates take; [] where it makes none."""
    calls, key = message.get("tool_calls"), "tool_calls"
    if not calls and message.get("function_call"):
        calls, key = [message["function_call"]], "function_call"
    if not calls:
        return []
    if not isinstance(calls, list):
        raise DataError(path, line, f"{where}.{key}",
                        f"expected a list of calls, got {type(calls).__name__}")
    return [read_call(call, path, line, f"{where}.{key}"
                      + (f"[{index}]" if key == "tool_calls" else ""))
            for index, call in enumerate(calls)]


def read_sharegpt_call(value, path: str, line: int, where: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value: a call (`{name, arguments}`) or a list of calls,
    as a JSON string, as LLaMA-Factory's data holds them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(path, line, where, "expected the call as JSON ({name, arguments}); "
                            f"not JSON ({error.msg} at character {error.pos})") from None
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
                        f"{{name, arguments}}}}), got {type(call).__name__}")
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
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise DataError(path, line, where, "expected an object or a JSON string of one; "
                            f"not JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(value, dict):
        raise DataError(path, line, where,
                        f"expected an object of arguments, got {type(value).__name__}")
    return value


def call_texts(calls: list[dict], where: str) -> dict[str, str]:
    """The calls as text, by field, for the checks every text field goes through (special
    tokens): a call's arguments are written into the answer as they are."""
    return {f"{where}[{index}]": json.dumps(call["function"], ensure_ascii=False)
            for index, call in enumerate(calls)}


def unrendered(full_text: str, spans: dict[int, tuple[int, int]], messages: list[dict],
               tools: list[dict] | None) -> str | None:
    """What of the row's tool calling the rendered text lacks, as the reason to reject the row;
    None where all of it is there.

    `spans` maps the index of each trained assistant turn to its answer's (start, stop). Every
    call's tool name and argument names must lie inside its turn's answer (an untrained turn's
    anywhere in the text), every defined tool's name and every non-empty result in the text.
    """
    turns = results = 0
    for index, message in enumerate(messages):
        turns += message["role"] == "assistant"
        results += message["role"] == "tool"
        turn_text = full_text[slice(*spans[index])] if index in spans else full_text
        for call in message.get("tool_calls") or ():
            function = call["function"]
            missing = [word for word in (function["name"], *function["arguments"])
                       if word not in turn_text]
            if missing:
                return (f"the chat template does not render tool calls (assistant turn {turns}'s "
                        f"call to {function['name']!r}: {missing[0]!r} is not in the rendered "
                        "turn); give a template that does with --chat-template (such as "
                        "Qwen2.5's)")
        if message["role"] == "tool" and message["content"] not in full_text:
            return (f"the chat template does not render tool results (tool result {results} "
                    "is not in the rendered text); give a template that does with "
                    "--chat-template")
    for definition in tools or ():
        name = (definition["function"] if isinstance(definition.get("function"), dict)
                else definition)["name"]
        if name not in full_text:
            return (f"the chat template does not render tool definitions (tool {name!r} is not "
                    "in the rendered prompt); give a template that does with --chat-template "
                    "(such as Qwen2.5's)")
    return None
