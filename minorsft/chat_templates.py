"""Chat templates given on the command line (`--chat-template`).

Most base models' tokenizers have no chat template, and a user may want data rendered otherwise
than by the model's own. precompute renders every row with the template it is given and keeps
the template's text in the cache's metadata; train, verify and eval then use that text, so the
policy's tokenizer renders and fingerprints as the cache's did, and the trained model is saved
with the template it learned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minorsft.models import ModelError

# ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), as Qwen and SmolLM write it, without a
# default system prompt: the template most chat data and inference servers know.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")

# What a template is checked on before any row is read: it must render a user turn followed by
# an assistant turn, and the prompt that generation starts from.
_CHECK_CONVERSATION = [{"role": "user", "content": "Hello"},
                       {"role": "assistant", "content": "Hi there"}]


@dataclass(frozen=True)
class ChatTemplate:
    """A template's Jinja text, and where it came from (for messages)."""

    text: str
    source: str


def read_chat_template(value: str, option: str = "--chat-template") -> ChatTemplate:
    """The template `value` names: a built-in name (`chatml`), a file holding a Jinja template
    (or a tokenizer_config.json / chat_template.json with a `chat_template` key), or a model
    folder whose tokenizer has one."""
    return ChatTemplate(_template_text(value, option), f"{option} {value}")


def _template_text(value: str, option: str) -> str:
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value).expanduser()
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
    here, not on every row)."""
    from jinja2.exceptions import TemplateError

    tokenizer.chat_template = template.text
    try:
        rendered = tokenizer.apply_chat_template(_CHECK_CONVERSATION, tokenize=False)
        tokenizer.apply_chat_template(_CHECK_CONVERSATION[:1], tokenize=False,
                                      add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        raise ModelError(f"{template.source}: the chat template cannot render a user turn and "
                         f"an assistant turn ({type(error).__name__}: {error})") from None
    if not all(message["content"] in rendered for message in _CHECK_CONVERSATION):
        raise ModelError(f"{template.source}: the chat template does not write the messages' "
                         f"content (it renders a user and an assistant turn as {rendered!r:.200})")


def markers_not_in_vocabulary(tokenizer, template: ChatTemplate) -> list[str]:
    """ChatML's markers that the template writes but the tokenizer has no token for: they are
    then tokenized as several ordinary tokens (most base models other than Qwen's and SmolLM's
    have no `<|im_end|>`), which the model learns to end its answers with."""
    vocabulary = tokenizer.get_vocab()
    return [marker for marker in CHATML_MARKERS
            if marker in template.text and marker not in vocabulary]


def cached_chat_template(metadata: dict) -> ChatTemplate | None:
    """The template a cache was scored with where precompute was given one, else None."""
    given = metadata.get("chat_template")
    if not isinstance(given, dict):
        return None
    return ChatTemplate(given["text"], f"the cache's chat template (precompute "
                                       f"--chat-template {given.get('given')})")
