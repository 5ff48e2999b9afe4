"""A row as a conversation: which format it is in and what its turns are (`read_conversation`).

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
the template as transformers takes it (see :mod:`minorsft.tools`); a calling turn is answer.
Reasoning in its own key, which minorsft does not pass on, is refused, not dropped.

A ``system`` column (``--system-field``), where present and not empty, becomes the system
message (in a chat, the first message; a chat that has a system message of its own and a
``system`` column is rejected).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minorsft import tools
from minorsft.data_errors import DataError, type_name

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
        if self.system_field == self.id_field:  # (every row's id was its system message)
            raise ValueError(f"--system-field {self.system_field!r} is the rows' id column; "
                             "give the column that holds the system prompt")
        # The same column twice would train the model to repeat its prompt as the answer.
        if self.prompt_field and self.prompt_field == self.response_field:
            raise ValueError(f"--prompt-field and --response-field name the same column "
                             f"{self.prompt_field!r}; give the prompt and the answer columns")


def _require_text(record: dict, key: str, path: str, line: int, allow_empty=False) -> str:
    if key not in record or record[key] is None:
        raise DataError(path, line, key, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(path, line, key, f"expected a string, got {type_name(value)}")
    if not allow_empty and (reason := blank_reason(value)):
        raise DataError(path, line, key, reason)
    return value


def blank_reason(text: str) -> str | None:
    """Why `text` says nothing, or None where it does: empty or white space, or only characters
    that show nothing (zero-width spaces, soft hyphens, control characters: "\u200b" passed
    `str.strip()` and was trained as an answer)."""
    if not text.strip():
        return "empty"
    if any(character.isprintable() and not character.isspace() for character in text):
        return None
    shown = " ".join(sorted({f"U+{ord(character):04X}" for character in text
                             if not character.isspace()}))
    return f"holds only characters that show nothing ({shown})"


# The known formats and the columns each needs (alpaca's `input` is optional).
FORMATS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt/response": ("prompt", "response"),
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}

# Alpaca's optional column, read beside its two.
ALPACA_EXTRA = ("input",)
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
    # the tool definitions the template is given (their column is among `texts`: `tools`, or
    # OpenAI's older `functions`)
    tools: list[dict] | None = None
    # the row's columns this reading takes (whether they hold anything or not)
    columns: frozenset[str] = frozenset()


# Columns some reading takes as text: one the row's own reading leaves holds text the cache
# would silently lack (alpaca's `input` beside `prompt`/`response`, say). Other columns (ids,
# sources, scores) are a dataset's own, and none of minorsft's concern.
# System prompts under other names than --system-field's default (OpenOrca's `system_prompt`)
# and Dolly's `context` are text of the row too.
SYSTEM_COLUMNS = ("system", "system_prompt", "system_message")
TEXT_COLUMNS = frozenset({column for columns in FORMATS.values() for column in columns}
                         | {*ALPACA_EXTRA, *tools.DEFINITION_COLUMNS, *SYSTEM_COLUMNS,
                            "context"})


def read_conversation(record: dict, spec: FieldSpec, path: str, line: int) -> Conversation:
    """The row as a :class:`Conversation`.

    The text fields are what later checks name (`response`, `messages[1].content`): one message
    may join two of them (alpaca's instruction and input).
    """
    conversation = _read_conversation(record, spec, path, line)
    conversation.columns = _columns_read(record, spec)
    return conversation


def _columns_read(record: dict, spec: FieldSpec) -> frozenset[str]:
    """The columns `_read_conversation` takes from a row it read."""
    if spec.prompt_field or spec.response_field:
        return frozenset({spec.prompt_field, spec.response_field, spec.system_field})
    row_format = _row_format(record, "", 0)
    definitions = tools.DEFINITION_COLUMNS if _chat_like(record, row_format) \
        else tools.DEFINITION_COLUMNS[:1]
    return frozenset({*FORMATS[row_format], *ALPACA_EXTRA * (row_format == "alpaca"),
                      *definitions, spec.system_field})


def unread_columns(record: dict, conversation: Conversation) -> list[str]:
    """The row's TEXT_COLUMNS outside those its reading took that hold something other than a
    message of the `conversation` word for word: what its cache row lacks. ultrachat's
    `prompt` beside its `messages` repeats the first user turn, and is not counted; a value
    found merely somewhere in the chat ("2", "Paris", "assistant") is not a repeat."""
    contents = {message["content"].strip() for message in conversation.messages
                if isinstance(message.get("content"), str)}
    return [column for column in sorted(TEXT_COLUMNS - conversation.columns)
            if holds_something(value := record.get(column))
            and not (isinstance(value, str) and value.strip() in contents)]


def count_left_out(counts: dict, example, file: str | None = None) -> None:
    """Count `example` (an Example) under each column it left out (`unread_columns`):
    counts[column] = {"rows": n, "first": "file:line" of the first such row}; kept in the
    manifest of a cache's part, so JSON. `file`: the example's file under another name."""
    for column in example.left_out:
        place = f"{file or example.file}:{example.line}"
        tally = counts.setdefault(column, {"rows": 0, "first": place})
        tally["rows"] += 1


def left_out_note(counts: dict, named: bool, rows: str, lacking: str) -> str:
    """What to say of `rows` ("cached", "scored") rows with text in a column their reading did
    not take (`count_left_out`'s counts): `lacking` ("the cache does not hold") it, and
    nothing else would say so. `named`: the columns were named (--prompt-field)."""
    columns = "; ".join(
        f"{column!r} in {tally['rows']} (the first: {tally['first']})"
        for column, tally in sorted(counts.items()))  # (as a manifest keeps them)
    hint = ("; tool definitions are given to the chat template only with rows as chats "
            "(a 'messages' column beside 'tools')"
            if any(column in tools.DEFINITION_COLUMNS for column in counts) else "")
    if system := [column for column in counts if column in SYSTEM_COLUMNS]:
        hint += f"; --system-field {system[0]} reads {system[0]!r} as the system prompt"
    fix = ("a column left out is not read with --prompt-field/--response-field"
           if named else "a row is read in one format (README: data formats); to read other "
           "columns, name them with --prompt-field/--response-field")
    return (f"note: {rows} rows have text in columns that were not read, which {lacking}: "
            f"{columns}. {fix[0].upper()}{fix[1:]}{hint}")


def holds_something(value) -> bool:
    """Whether a column's value holds anything: not None, blank, empty, nor a string of JSON
    for nothing ("[]", "{}", "null"), as datasets write a tools column of a row with none."""
    if isinstance(value, str):
        return value.strip() not in ("", "[]", "{}", "null", '""')
    return bool(value)  # (None, [], {}: nothing)


def _chat_like(record: dict, row_format: str) -> bool:
    """Whether the row is a chat (messages, ShareGPT, or TRL's conversational prompt and
    completion), beside which OpenAI's older `functions` column is read too."""
    return row_format in ("chat", "sharegpt") or (
        row_format == "prompt/completion"
        and any(isinstance(record[column], list) for column in ("prompt", "completion")))


def _read_conversation(record: dict, spec: FieldSpec, path: str, line: int) -> Conversation:
    texts: dict[str, str] = {}

    def text(key: str) -> str:
        texts[key] = _require_text(record, key, path, line)
        return texts[key]

    system = record.get(spec.system_field)
    if system is not None and not isinstance(system, str):
        raise DataError(path, line, spec.system_field,
                        f"expected a string, got {type_name(system)}")
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
    # has (a `tools` column among them is not this prompt's; precompute says it is left out).
    if spec.prompt_field or spec.response_field:
        defined = None
        return single_turn(spec.prompt_field, spec.response_field)
    row_format = _row_format(record, path, line)
    if spec.system_field in (*FORMATS[row_format], *ALPACA_EXTRA * (row_format == "alpaca")):
        # (`--system-field instruction` on alpaca rows wrote the instruction twice)
        raise DataError(path, line, spec.system_field,
                        f"--system-field {spec.system_field!r} is a column the row's "
                        f"{row_format} format reads too: its text would be both the system "
                        "message and part of the chat; give a column of its own")
    # OpenAI's older `functions` column is read beside chats only, the layout it comes in
    # (elsewhere a column of that name may hold anything).
    chat = _chat_like(record, row_format)
    defined, column = tools.read_definitions(
        record, path, line, tools.DEFINITION_COLUMNS if chat else tools.DEFINITION_COLUMNS[:1])
    if defined:
        texts[column] = tools.as_text(defined)
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
            if isinstance(prompt, str) or isinstance(completion, str):
                text_column = "prompt" if isinstance(prompt, str) else "completion"
                raise DataError(path, line, text_column, (
                    f"a text beside a list of turns in "
                    f"'{'completion' if text_column == 'prompt' else 'prompt'}': TRL's prompt "
                    "and completion are both texts, or both lists of {role, content} turns "
                    f"(the conversational form); give {text_column!r} as a list too, e.g. "
                    + ('[{"role": "user", "content": ...}]' if text_column == "prompt" else
                       '[{"role": "assistant", "content": ...}]')))
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
        if flag and not message.get("tool_calls") and (reason := blank_reason(message["content"])):
            raise DataError(path, line, name, f"{reason} answer" if reason == "empty" else reason)
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
