"""From a conversation to token ids and an answer mask: the tokenizer's chat template renders
the conversation once; answer tokens are those whose text lies inside a trained assistant
turn's content up to and including the end-of-turn token (`render_conversation`,
`tokenize_conversation`, `answer_tokens`).

Truncation rule ("right"): with ``--max-length N`` a sequence keeps its first N tokens; answer
tokens past N are dropped (and counted out of m). A row whose first answer token lies past N is
rejected rather than trained on with nothing to learn.

A row whose tool calls, results or definitions the template leaves out is refused (see
:mod:`minorsft.tools`), as is a template that renders a turn otherwise once the conversation
goes on.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable, Iterator

from minorsft import tools
from minorsft.data_errors import DataError


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
) -> tuple[str, list[tuple[int, int, int]]]:
    """The conversation as the template writes it, and where in that text its answers lie
    (character offsets: start, stop, and where the generation prompt before it ends), for
    :func:`tokenize_conversation` (which see) to tokenize. Split from it so that the texts of
    many rows can go to the tokenizer at once (`classify_rows`)."""
    if special is True:
        special = special_token_pattern(tokenizer)
    if any(ANSWER_PROBE in message["content"] for message in messages):
        raise ValueError(f"the row holds {ANSWER_PROBE!r}, the string minorsft puts in place of "
                         "an answer to find where the template writes it; remove it")
    def render(some: list[dict], generation_prompt: bool) -> str:
        return _render(tokenizer, some, generation_prompt, tool_definitions)

    full_text = render(messages, generation_prompt=False)
    _refuse_unrendered_system(render, messages, full_text, tool_definitions)
    answered = [index for index, message in enumerate(messages)
                if message["role"] == "assistant" and (trained is None or trained[index])]
    places = _content_places(render, messages, [
        index for index in answered if "tool_calls" not in messages[index]], full_text)
    try:
        answers = {index: _answer_span(render, messages, index, full_text, special,
                                       places.get(index))
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

        if reason := tools.unrendered(render_with, full_text,
                                      {index: span[:2] for index, span in answers.items()},
                                      messages, tool_definitions):
            raise ValueError(reason)
    return full_text, list(answers.values())


def _refuse_unrendered_system(render: Callable[[list[dict], bool], str], messages: list[dict],
                              full_text: str, tool_definitions: list[dict] | None) -> None:
    """A SystemNotRendered for a system message that `full_text` (the conversation rendered)
    lacks. Its (trimmed: templates may trim a turn's text, as Llama 3's and Gemma's do) text not
    in the rendered conversation settles it, as it does for most rows; where the text is there
    but also in another turn (or the tools), that turn may be where it comes from, so the row is
    rendered once more with a probe in its place."""
    for index, message in enumerate(messages):
        if message["role"] != "system" or not (text := message["content"].strip()):
            continue
        if text not in full_text:
            raise SystemNotRendered(text)
        elsewhere = (string for other in [*messages[:index], *messages[index + 1:],
                                          tool_definitions]
                     for string in _strings(other))
        if full_text.count(text) > 1 or any(text in string for string in elsewhere):
            probed = [*messages[:index], dict(message, content=SYSTEM_PROBE),
                      *messages[index + 1:]]
            if SYSTEM_PROBE not in render(probed, False):
                raise SystemNotRendered(text)


def _strings(value) -> Iterator[str]:
    """Every string in a row's value (a message, its tool calls, tool definitions)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def prompt_joined(offsets: list[tuple[int, int]],
                  spans: list[tuple[int, int, int]]) -> int | None:
    """The first token that is answer but also holds text of the prompt that generation starts
    its turn from (None: no such token), as when an answer starting with two newlines follows
    ChatML's "assistant\n" (SmolLM2's tokenizer: "\n\n" then "\n") or a prompt ends with a
    space that the answer's first word takes. Training reads that token where generation, whose
    prompt ends inside it, would not write it. A space the template writes after the generation
    prompt, which the first word takes ("Assistant:" + " The"), is not such a token: generation
    writes it."""
    for start, stop, prompt_end in spans:
        token = bisect.bisect_right(offsets, start, key=lambda offset: offset[1])
        if token < len(offsets) and offsets[token][0] < min(prompt_end, stop) \
                and offsets[token][0] < offsets[token][1]:
            return token
    return None


def answer_runs_on(offsets: list[tuple[int, int]],
                   spans: list[tuple[int, int, int]]) -> int | None:
    """The first answer token that also holds text the template writes after the answer (None:
    no such token), as when its end-of-turn marker is text the tokenizer fuses with the next
    header's ("<|eot_id|><|start_header_id|>" as "...", "><", ...: a tokenizer without those
    tokens). Training reads that token as answer, so the model learns to write the start of
    what follows. The twin of :func:`prompt_joined`, at the answer's other end."""
    for _, stop, _ in spans:
        token = bisect.bisect_left(offsets, stop, key=lambda offset: offset[1])
        if token < len(offsets) and offsets[token][0] < stop < offsets[token][1]:
            return token
    return None


def answer_tokens(input_ids, offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]],
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


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, ...]]) -> list[bool]:
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
            and any(token_start < stop and token_stop > start for start, stop, *_ in spans)
            for token_start, token_stop in offsets]


# Stands in for an assistant turn's content, to find where the template puts the content.
ANSWER_PROBE = "MINORSFT_ANSWER_PROBE_7F3A"
# Stands in for a system message, to see whether the template writes it at all.
SYSTEM_PROBE = "MINORSFT_SYSTEM_PROBE_7F3A"


class SystemNotRendered(ValueError):
    """The template leaves out the row's system message (some write only user and assistant
    turns): the row would train as if it had none, its answer following an instruction the model
    never saw. `text` finds the field that holds it."""

    def __init__(self, text: str):
        super().__init__("the chat template leaves out the system message (its text is not in "
                         "the rendered conversation): the answer would be trained without the "
                         "instruction it follows; give a template that writes system messages "
                         "with --chat-template, or drop the system prompt")
        self.text = text


def _content_places(render: Callable[[list[dict], bool], str], messages: list[dict],
                    indexes: list[int], full_text: str) -> dict[int, tuple[int, int]]:
    """Where the content of each assistant turn in `indexes` lies in `full_text` (start, stop),
    from one render with a probe of its own in place of each: what :func:`_answer_span` would
    otherwise render the whole conversation once per turn to find (a long chat's turns each
    cost a render of all of it: 40 turns, 40 renders of 80 messages).

    Trusted only where the template writes the conversation the same whatever the contents,
    each in the place of its probe: each probe is there once, in order, and putting the
    contents back where the probes are gives `full_text` exactly. Otherwise (a template that
    trims a content, moves reasoning out of it or writes a turn otherwise for some content)
    nothing is returned and each turn is probed alone, as before 0.9.1.
    """
    if len(indexes) < 2:  # (one turn: its probe alone costs the same render)
        return {}
    probes = {index: f"{ANSWER_PROBE}_{number}_" for number, index in enumerate(indexes)}
    try:
        probed = render([dict(message, content=probes[index]) if index in probes else message
                         for index, message in enumerate(messages)], False)
    except ValueError:
        return {}
    places, pieces, read, written = {}, [], 0, 0
    for index in indexes:
        at = probed.find(probes[index], read)
        if at < 0 or probed.count(probes[index]) != 1:
            return {}
        content = messages[index]["content"]
        pieces += [probed[read:at], content]
        written += at - read
        places[index] = (written, written + len(content))
        written += len(content)
        read = at + len(probes[index])
    pieces.append(probed[read:])
    return places if "".join(pieces) == full_text else {}


def _answer_span(render: Callable[[list[dict], bool], str], messages: list[dict], index: int,
                 full_text: str, special: re.Pattern | None,
                 place: tuple[int, int] | None = None) -> tuple[int, int]:
    """Where assistant turn `index`'s answer lies in `full_text`: (start, stop) character offsets.

    Templates add text of their own around a turn's content: a role header, a default system
    prompt when the conversation has none (even before an assistant turn that comes first), an
    empty thinking block. None of that is answer. Rendering the conversation once more with a
    probe string in place of this turn's content shows what the template puts before and after
    it, whatever the content is (a template may also trim it). The whole conversation is
    rendered, not the part up to this turn: templates may render a turn differently when more
    follows (Qwen3's writes an empty thinking block only into turns after the last user turn).
    `render(messages, generation_prompt)` is the template with the row's tool definitions.
    `place`: where the content lies in `full_text`, if :func:`_content_places` found it (the
    render with the probe would then be `full_text` with the probe there).
    """
    if "tool_calls" in messages[index]:
        return _tool_call_span(render, messages, index, full_text, special)
    probe_turn = dict(messages[index], content=ANSWER_PROBE)
    if place is not None:
        head, tail = full_text[:place[0]], full_text[place[1]:]
    else:
        probed = render([*messages[:index], probe_turn, *messages[index + 1:]], False)
        if probed.count(ANSWER_PROBE) != 1:
            raise ValueError("the chat template does not render an assistant turn's content "
                             "once; cannot locate the answer tokens")
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
    return (start, content_end + _end_of_turn(turn_end, special),
            start if before is None else len(before))


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

    Nothing past the first line break: `turn_end` is what a turn that ends the conversation
    and one that goes on have in common, and with markers that are text, not special tokens
    (a template given with --chat-template), that ran on by chance into what follows: Phi-3's
    "<|end|>\n" then "<|user|>" or "<|endoftext|>" share "<|end|>\n<|", which was answer.
    """
    own_line = turn_end.split("\n", 1)[0]
    if special is not None and (found := special.search(own_line)):
        return found.end()
    return len(own_line.rstrip())


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
    # The conversation with a plain turn (the probe, no calls) in this one's place, which both
    # checks below compare with (None: the template refuses it, as gpt-oss's wants a result to
    # follow a call)
    try:
        plain = render([*messages[:index], PLAIN_TURN, *messages[index + 1:]], False)
    except ValueError:
        plain = None
    if probed.count(ANSWER_PROBE) == 1:  # the template writes the content of a calling turn
        head = probed.split(ANSWER_PROBE)[0]
        if (full_text.startswith(head) and head.startswith(before)
                and not _calls_before_content(messages[index], plain, before, head[start:])):
            # (not the empty thinking block Qwen3's writes before the content; but the calls,
            # where a template writes them before the content, are answer)
            start = len(head)
    stop = _plain_turn_end(render, messages, index, full_text, special, plain)
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
    return start, stop, len(before)


# An assistant turn with plain content (the probe) and no calls, in place of a calling turn.
PLAIN_TURN = {"role": "assistant", "content": ANSWER_PROBE}


def _calls_before_content(turn: dict, plain: str | None, before: str, written: str) -> bool:
    """Whether `written`, what the template writes between the generation prompt `before` and
    calling `turn`'s content, holds its calls. Not where the conversation with a plain turn in
    its place (`plain`) gets the same text there (Qwen3's empty thinking block); else, where a
    call's name is in it (a name alone misread a tool called "think" as written in "<think>")."""
    if plain is not None and plain.count(ANSWER_PROBE) == 1 and plain.startswith(before) \
            and plain.split(ANSWER_PROBE)[0][len(before):] == written:
        return False
    return any(call["function"]["name"] in written for call in turn["tool_calls"])


def _plain_turn_end(render: Callable[[list[dict], bool], str], messages: list[dict],
                    index: int, full_text: str, special: re.Pattern | None,
                    rendered: str | None) -> int | None:
    """Where turn `index` ends in `full_text` if the template ends it as a turn with plain
    content (the probe) in its place, and writes what follows the same; None where not.
    `rendered`: the conversation with that plain turn (None: the template refused it)."""
    later = tools.with_result_probes(messages)[index + 1:]
    results = [tools.RESULT_PROBE.format(i) for i, message in enumerate(later, index + 1)
               if message["role"] == "tool"]
    if rendered is None:
        return None
    try:
        last = rendered if index == len(messages) - 1 else render(
            [*messages[:index], PLAIN_TURN], False)
        probed = render([*messages[:index], PLAIN_TURN, *later], False) if results else ""
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
    found = special.search(turn_end.split("\n", 1)[0]) if special else None  # (_end_of_turn)
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
