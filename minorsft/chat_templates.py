"""Chat templates given on the command line (`--chat-template`).

Most base models' tokenizers have no chat template, and a user may want data rendered otherwise
than by the model's own. precompute renders every row with the template it is given and keeps
the template's text in the cache's metadata; train, verify and eval then use that text, so the
policy's tokenizer renders and fingerprints as the cache's did, and the trained model is saved
with the template it learned.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

from minorsft.models import ModelError

# ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), as Qwen and SmolLM write it, without a
# default system prompt: the template most chat data and inference servers know. With tools
# (rows with tool calling): the definitions in the system turn (after the row's own system
# text), each call as JSON in <tool_call> tags after the turn's text (as Qwen2.5's template
# writes calls), each result in a `tool` turn. Rows without tools render as without it.
CHATML = (
    "{%- set system_first = messages and messages[0]['role'] == 'system' -%}"
    "{%- if tools -%}{{- '<|im_start|>system\\n' -}}"
    "{%- if system_first -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou can call these functions; their definitions are in <tools></tools>:"
    "\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call one, write its name and arguments as JSON in "
    "<tool_call></tool_call> tags:\\n<tool_call>\\n{\"name\": <function name>, \"arguments\": "
    "<arguments as a JSON object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and system_first and loop.first) -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{{- ('\\n' if message['content'] or not loop.first else '') + '<tool_call>\\n' + "
    "({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Plain text, as TRL trains a string prompt and completion: the turns' contents written one
# after the other, nothing around them, each assistant turn ended by the eos token (what the
# model learns to stop with). For base-model completion data, not for chats: roles leave no
# trace in the text.
PLAIN = (
    "{%- for message in messages -%}"
    "{{- message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML, "plain": PLAIN}
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")

# What a template is checked on before any row is read: it must render a user turn followed by
# an assistant turn, and the prompt that generation starts from.
_CHECK_CONVERSATION = [{"role": "user", "content": "Hello"},
                       {"role": "assistant", "content": "Hi there"}]


# A chat template is a few KiB; a larger file is some other file given by mistake (weights).
MAX_TEMPLATE_BYTES = 1 << 20


@dataclass(frozen=True)
class ChatTemplate:
    """A template's Jinja text, where it came from (for messages), and whether it is a
    built-in one (which minorsft fits to the tokenizer: see `apply_chat_template`)."""

    text: str
    source: str
    builtin: bool = False


def read_chat_template(value: str, option: str = "--chat-template") -> ChatTemplate:
    """The template `value` names: a built-in name (`chatml`, `plain`), a file holding a Jinja
    template (or a tokenizer_config.json / chat_template.json with a `chat_template` key), or a
    model folder (or built-in model name) whose tokenizer has one."""
    if value in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[value], f"{option} {value}", builtin=True)
    return ChatTemplate(_template_text(value, option), f"{option} {value}")


def _template_text(value: str, option: str) -> str:
    from minorsft.models import BUILTIN_MODELS, resolve_model

    path = Path(resolve_model(value) if value in BUILTIN_MODELS else value).expanduser()
    if path.is_dir():
        text = _folder_template(path, option)
    elif path.is_file():
        text = _file_template(path, option)
    else:
        raise ModelError(f"{option} {value}: not a file, not a folder, and not a built-in "
                         f"template ({', '.join(BUILTIN_TEMPLATES)})")
    if not text.strip():
        raise ModelError(f"{option} {value}: the template is empty")
    return text


def _file_template(path: Path, option: str) -> str:
    # (a tokenizer_config.json holds the added tokens too: Gemma's is over 1 MiB)
    limit = MAX_TEMPLATE_BYTES * (64 if path.suffix == ".json" else 1)
    if (size := path.stat().st_size) > limit:
        raise ModelError(f"{option} {path}: {size / 2**20:.1f} MiB is no chat template (they "
                         f"are a few KiB; at most {limit >> 20} MiB is read)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"{option} {path}: cannot read it as UTF-8 text ({error})") from None
    if path.suffix != ".json":
        return text
    try:
        template = json.loads(text).get("chat_template")
    except (ValueError, AttributeError):
        raise ModelError(f"{option} {path}: a .json file must be a JSON object with a "
                         "'chat_template' key (as tokenizer_config.json has); give a Jinja "
                         "template as a .jinja file") from None
    return _one_template(template, f"{option} {path}")


def _folder_template(folder: Path, option: str) -> str:
    """A model folder's template, where transformers keeps it: chat_template.jinja (since
    transformers 4.43's save format), else tokenizer_config.json or chat_template.json."""
    if (folder / "chat_template.jinja").is_file():
        return _file_template(folder / "chat_template.jinja", option)
    for name in ("tokenizer_config.json", "chat_template.json"):
        file = folder / name
        if file.is_file():
            try:
                template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
            except (OSError, ValueError, AttributeError):
                continue
            if template:
                return _one_template(template, f"{option} {file}")
    raise ModelError(f"{option} {folder}: the folder has no chat template (no "
                     "chat_template.jinja, and no 'chat_template' in tokenizer_config.json or "
                     "chat_template.json)")


def _one_template(template, where: str) -> str:
    """A template as tokenizer_config.json may hold it: text, or a list of named templates
    (`[{"name": "default", "template": ...}, {"name": "tool_use", ...}]`), of which the
    default is the one a plain conversation renders with."""
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template
                 if isinstance(item, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise ModelError(f"{where}: no chat template (or no 'default' one among its named "
                         "templates)")
    return template


def apply_chat_template(tokenizer, template: ChatTemplate) -> None:
    """Give `tokenizer` the template, checked to render a user and an assistant turn with their
    content (a syntax error, a template for other roles or a file that is no template fails
    here, not on every row).

    A built-in template starts with the tokenizer's BOS token where the tokenizer puts one
    before every text it encodes (Llama's and Mistral's `<s>`): rows are tokenized as the
    template writes them, and such a model has seen every text begin with it. (The text given
    to the tokenizer is what the cache keeps, so train and eval apply it as it is.)
    """
    if template.text == PLAIN and tokenizer.eos_token is None:  # (Jinja would write "None")
        raise ModelError(f"{template.source}: the tokenizer has no eos token to end an answer "
                         "with; give a template that writes an end of its own")
    tokenizer.chat_template = template.text
    rendered = _render(tokenizer, template, _CHECK_CONVERSATION, generation_prompt=False)
    if template.builtin and (bos := bos_the_tokenizer_adds(tokenizer)) \
            and not rendered.startswith(bos):  # (a BOS of <|im_start|> is there already)
        tokenizer.chat_template = "{{- bos_token -}}" + template.text
    _render(tokenizer, template, _CHECK_CONVERSATION[:1], generation_prompt=True)
    if not all(message["content"] in rendered for message in _CHECK_CONVERSATION):
        raise ModelError(f"{template.source}: the chat template does not write the messages' "
                         f"content (it renders a user and an assistant turn as {rendered!r:.200})")


def _render(tokenizer, template: ChatTemplate, messages: list[dict],
            generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        raise ModelError(f"{template.source}: the chat template cannot render a user turn and "
                         f"an assistant turn ({type(error).__name__}: {error})") from None


def bos_the_tokenizer_adds(tokenizer) -> str | None:
    """The BOS token the tokenizer puts before every text it encodes, if it does (a tokenizer
    that adds one without naming it its bos_token is not seen)."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos is None or bos_id is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return str(bos) if ids and ids[0] == bos_id else None


def missing_bos_note(tokenizer, template: ChatTemplate) -> str | None:
    """A note for a template given as a file or folder that does not begin the text with the
    BOS token the tokenizer adds to every text (the model saw every text begin with it)."""
    bos = bos_the_tokenizer_adds(tokenizer)
    if template.builtin or bos is None:
        return None
    if _render(tokenizer, template, _CHECK_CONVERSATION, False).startswith(bos):
        return None
    return (f"{template.source} does not begin the text with the BOS token {bos!r}, which the "
            "tokenizer puts before every text it encodes and the model saw first in training; "
            "rows are tokenized as the template writes them, so they begin without it (write "
            "{{ bos_token }} at the template's start to keep it)")


def renders_plain_text(tokenizer) -> bool:
    """Whether the tokenizer's template is the built-in `plain` (with or without the BOS
    prefix): text straight after the prompt, as a base model continues it."""
    return isinstance(tokenizer.chat_template, str) and tokenizer.chat_template.endswith(PLAIN)


def unended_answer_note(tokenizer, template: ChatTemplate) -> str | None:
    """A note for a template that writes nothing after an assistant turn's content, neither an
    end-of-turn marker nor the eos token: the answers it trains on end nowhere, so the model
    never learns to stop (it said nothing, and such a model generates on past its answers)."""
    answer = _CHECK_CONVERSATION[-1]["content"]
    tails = [_render(tokenizer, template, _CHECK_CONVERSATION, False).rsplit(answer, 1)[-1]]
    with contextlib.suppress(ModelError):  # (a template may refuse to end on a user turn)
        going_on = _render(tokenizer, template,
                           [*_CHECK_CONVERSATION, {"role": "user", "content": "Thanks"}], False)
        tails.append(going_on.split(answer, 1)[-1])
    # the turn's own end is what both write after it (as the answer mask takes it); the
    # whitespace a template writes between turns is not answer
    if os.path.commonprefix(tails).strip():
        return None
    eos = getattr(tokenizer, "eos_token", None)
    return (f"{template.source} writes nothing after an assistant turn's content (no "
            f"end-of-turn marker{f', no eos {eos!r}' if eos else ''}): the model never learns "
            "to end an answer and generates on past it; end each assistant turn with "
            "{{ eos_token }} or the model's end-of-turn marker")


def template_notes(tokenizer, template: ChatTemplate) -> list[str]:
    """What a user should know about how `template` (given with --chat-template) fits the
    tokenizer: a BOS token it leaves out, ChatML markers the vocabulary lacks, answers that
    end with nothing."""
    notes = [note] if (note := missing_bos_note(tokenizer, template)) else []
    if note := unended_answer_note(tokenizer, template):
        notes.append(note)
    if missing := markers_not_in_vocabulary(tokenizer, template):
        notes.append(f"the tokenizer has no token {' or '.join(missing)}: the template writes it "
                     "as ordinary text (several tokens), which the model learns to end its "
                     "answers with; stop generation on that text")
    return notes


def markers_not_in_vocabulary(tokenizer, template: ChatTemplate) -> list[str]:
    """ChatML's markers that the template writes but the tokenizer has no token for: they are
    then tokenized as several ordinary tokens (most base models other than Qwen's and SmolLM's
    have no `<|im_end|>`), which the model learns to end its answers with."""
    vocabulary = tokenizer.get_vocab()
    return [marker for marker in CHATML_MARKERS
            if marker in template.text and marker not in vocabulary]


def stop_at_end_of_turn(model, tokenizer) -> str | None:
    """Add the template's end-of-turn token to the model's generation stop tokens, where it is
    not among them: a base model's generation_config stops at its own eos (`<|endoftext|>`),
    while the model learns to end answers with the template's marker (`<|im_end|>`), so
    `generate` and vLLM, which read generation_config.json, would run past it. The marker is
    the first added token (special or not) after the answer; one that is plain text, no token,
    is left to precompute's note. Returns a note where the token could not be added.
    """
    answer = _CHECK_CONVERSATION[-1]["content"]
    rendered = None
    # (a template may want a system turn first, and refuse the chat without one)
    for conversation in (_CHECK_CONVERSATION,
                         [{"role": "system", "content": "You help."}, *_CHECK_CONVERSATION]):
        try:
            rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
            break
        except Exception:  # noqa: BLE001, S112  (the template's own error, whatever its kind)
            continue
    if rendered is None or answer not in rendered:
        return ("the chat template's end-of-turn token could not be found (the template "
                "refuses a plain user/assistant chat, or leaves out its answer), so it is not "
                "added to the saved generation_config.json's eos_token_id: check that "
                "generation stops where the answers trained here end")
    after = rendered[rendered.rindex(answer) + len(answer):]
    added = {str(token) for token in getattr(tokenizer, "all_special_tokens", None) or ()}
    added |= {token.content for token in (getattr(tokenizer, "added_tokens_decoder", None)
                                          or {}).values()}
    found = [(after.index(token), token) for token in added
             if token.strip() and token in after]  # (not added runs of spaces or newlines)
    if not found:
        return None
    marker = min(found, key=lambda hit: (hit[0], -len(hit[1])))[1]  # first; longest there
    token_id = tokenizer.convert_tokens_to_ids(marker)
    config = model.generation_config
    stops = config.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    if token_id is None or token_id in stops:
        return None
    # transformers refuses to save a changed generation config that it finds invalid (a base
    # model's do_sample false with a temperature, say), which would fail the run's save after
    # training: checked now, on a copy
    candidate = copy.deepcopy(config)
    candidate.eos_token_id = [*stops, token_id]
    try:
        candidate.validate(strict=True)
    except ValueError as error:
        reason = str(error).strip().splitlines()
        return (f"{marker} (the template's end of turn) is not added to the saved "
                f"generation_config.json's eos_token_id: transformers does not save the "
                f"model's generation config once changed ({' '.join(reason[:2])}); add "
                f"{token_id} to its eos_token_id by hand, or stop generation on {marker}")
    config.eos_token_id = candidate.eos_token_id
    return None


def cached_chat_template(metadata: dict) -> ChatTemplate | None:
    """The template a cache was scored with where precompute was given one, else None."""
    given = metadata.get("chat_template")
    if not isinstance(given, dict):
        return None
    return ChatTemplate(given["text"], f"the cache's chat template (precompute "
                                       f"--chat-template {given.get('given')})")
