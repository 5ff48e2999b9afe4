"""Input formats, the answer mask, truncation, row ids and clear errors."""

import codecs
import json
import pickle
import random
import re
from pathlib import Path

import pytest

from minorsft.answer_spans import _overlaps, tokenize_conversation
from minorsft.data import (
    DataError,
    Example,
    FieldSpec,
    Rejection,
    classify_rows,
    iter_examples,
    resolve_data,
)
from minorsft.data_files import split_of
from minorsft.row_workers import RowWorkers

from .conftest import CHATML, DEMO_ROWS, build_tiny_tokenizer, write_jsonl

# ChatML that adds a default system prompt when the first message is not a system message, as
# SmolLM2-Instruct's template does ("You are a helpful AI assistant named SmolLM, ...").
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML that writes an empty thinking block before every assistant turn it renders (as
# reasoning models' templates do), but not in the generation prompt.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{{ '<think></think>' }}{% endif %}"
    "{{ message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def answer_text(tokenizer, example: Example) -> str:
    ids = [t for t, m in zip(example.input_ids, example.answer_mask, strict=True) if m]
    return tokenizer.decode(ids)


def test_each_format_masks_exactly_the_answer_and_end_of_turn(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", DEMO_ROWS)
    examples = list(iter_examples(path, tiny_tokenizer))
    texts = [answer_text(tiny_tokenizer, e) for e in examples]
    assert texts == [
        "The capital of France is Paris.<|im_end|>",
        "He has 7 apples.<|im_end|>",
        "3 are left in total.<|im_end|>",
        "5<|im_end|>10<|im_end|>",  # multi-turn: every assistant turn is answer
    ]
    assert [e.id for e in examples] == ["a", "b", "c", "d"]
    # The prompt (and the template's newline after <|im_end|>) is never answer.
    first = examples[0]
    assert not first.answer_mask[0] and first.num_tokens == sum(first.answer_mask)


def tokenizer_with_template(template: str):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


ASSISTANT_FIRST = {"messages": [{"role": "assistant", "content": "answer first"},
                                {"role": "user", "content": "then user"},
                                {"role": "assistant", "content": "5"}]}


@pytest.mark.parametrize("template", [DEFAULT_SYSTEM_TEMPLATE, THINKING_TEMPLATE])
def test_answer_holds_no_text_the_template_adds(tmp_path, template):
    # Before the fix, an assistant turn that came first was answer from character 0: the
    # template's default system prompt and role header were trained on; and an empty thinking
    # block the template writes into an assistant turn was answer too.
    tokenizer = tokenizer_with_template(template)
    rows = [ASSISTANT_FIRST, DEMO_ROWS[0], DEMO_ROWS[3]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    texts = [answer_text(tokenizer, e) for e in iter_examples(path, tokenizer)]
    assert texts == ["answer first<|im_end|>5<|im_end|>",
                     "The capital of France is Paris.<|im_end|>", "5<|im_end|>10<|im_end|>"]


def test_answer_content_trimmed_by_the_template_is_still_found(tmp_path):
    tokenizer = tokenizer_with_template(THINKING_TEMPLATE)  # it trims the content
    row = {"prompt": "2 plus 3", "response": "  5\n"}
    (example,) = iter_examples(write_jsonl(tmp_path / "rows.jsonl", [row]), tokenizer)
    assert answer_text(tokenizer, example) == "5<|im_end|>"


def test_a_turn_end_marker_other_than_eos_is_answer_but_not_the_newline_after_it(tmp_path):
    # As Gemma's <end_of_turn> (its eos token is <eos>): no eos in the turn to stop at.
    tokenizer = tokenizer_with_template(CHATML.replace("<|im_end|>", "<|endoftext|>"))
    (example,) = iter_examples(write_jsonl(tmp_path / "rows.jsonl", [DEMO_ROWS[1]]), tokenizer)
    assert answer_text(tokenizer, example) == "He has 7 apples.<|endoftext|>"


# "User: ...\n\nAssistant: " + content + eos (DeepSeek-LLM-chat's layout): the space before the
# content is fused with its first word ("ĠThe"), so that token starts in the template's text.
SPACE_BEFORE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Phi-3's layout: every turn ends with <|end|> and a newline; the eos token comes once, after
# the last turn, only when no generation prompt follows. <|endoftext|> plays <|end|> here.
END_OF_CONVERSATION_EOS_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|endoftext|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)


def test_the_answers_first_word_fused_with_the_templates_space_is_answer(tmp_path):
    # It was left out: a one-word answer trained on its end-of-turn token alone.
    tokenizer = tokenizer_with_template(SPACE_BEFORE_TEMPLATE)
    # (DEMO_ROWS[3] without its system message, which this template leaves out)
    rows = [DEMO_ROWS[0], {"prompt": "2 plus 3", "response": "5"},
            {"messages": DEMO_ROWS[3]["messages"][1:]}]
    examples = list(iter_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer))
    assert [answer_text(tokenizer, e) for e in examples] == [
        " The capital of France is Paris.<|im_end|>", " 5<|im_end|>",
        " 5<|im_end|> 10<|im_end|>"]
    # the token before the answer is the template's ":", which stays prompt
    first = examples[0]
    start = first.answer_mask.index(True)
    assert tokenizer.decode(first.input_ids[start - 1]) == ":"


# SPACE_BEFORE_TEMPLATE's generation prompt with the space: "Assistant: " (the space is prompt).
SPACE_IN_PROMPT_TEMPLATE = SPACE_BEFORE_TEMPLATE.replace("{{ 'Assistant:' }}",
                                                         "{{ 'Assistant: ' }}")


def test_an_answer_token_that_holds_the_end_of_the_generation_prompt_is_flagged():
    """Where the generation prompt ends inside the answer's first token (its trailing space
    fused with the first word; an answer starting with a newline after ChatML's
    "assistant\n"), training reads a token generation would not write: the example says which
    token, so that precompute can say so. A space the template writes after the generation
    prompt is generation's own: not flagged."""
    plain = {"prompt": "2 plus 3", "response": "5 is it"}
    spaced = tokenizer_with_template(SPACE_IN_PROMPT_TEMPLATE)
    ids, _, _ = tokenize_conversation(spaced, [{"role": "user", "content": "2 plus 3"},
                                               {"role": "assistant", "content": "5 is it"}],
                                      None)
    examples = {}
    for name, tokenizer, row in [
            ("space in prompt", spaced, plain),
            ("template's space", tokenizer_with_template(SPACE_BEFORE_TEMPLATE), plain),
            ("chatml", build_tiny_tokenizer(), plain)]:
        (examples[name],) = classify_example(tokenizer, row)
    joined = {name: example.prompt_joined for name, example in examples.items()}
    assert joined["template's space"] is None and joined["chatml"] is None
    first_answer = examples["space in prompt"].answer_mask.index(True)
    assert joined["space in prompt"] == first_answer
    assert spaced.decode(ids[first_answer]) == " 5"
    # SmolLM2's tokenizer writes "\n\n\n" as "\n\n" + "\n" (but "\n\n" as two tokens): the
    # template's newline and the first of an answer's two
    from minorsft.models import DEFAULT_MODEL, load_tokenizer, resolve_model

    smollm2 = load_tokenizer(resolve_model(DEFAULT_MODEL))
    for response, token in [("\n\n5", "\n\n"), ("\n5", None), ("5", None), (" 5", None)]:
        (example,) = classify_example(smollm2, dict(plain, response=response))
        assert (example.prompt_joined is not None) == (token is not None), response
        if token is not None:
            assert example.prompt_joined == example.answer_mask.index(True)
            assert smollm2.decode(example.input_ids[example.prompt_joined]) == token


def classify_example(tokenizer, row: dict) -> list:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        return list(iter_examples(write_jsonl(Path(folder) / "rows.jsonl", [row]), tokenizer))


def build_metaspace_tokenizer(template: str):
    """A SentencePiece-style tokenizer (words carry a leading "▁"), as Llama-2's and Mistral's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    backend.train_from_iterator(["What is the capital of France", "The capital is Paris"] * 20,
                                trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def test_sentencepiece_words_after_the_templates_space_are_answer(tmp_path):
    tokenizer = build_metaspace_tokenizer(  # Llama-2-chat's layout
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
    row = {"prompt": "What is the capital of France", "response": "The capital is Paris"}
    (example,) = iter_examples(write_jsonl(tmp_path / "rows.jsonl", [row]), tokenizer)
    answer = [tokenizer.convert_ids_to_tokens(t)
              for t, m in zip(example.input_ids, example.answer_mask, strict=True) if m]
    assert answer[0] == "▁The" and answer[-1] == "</s>"


def test_eos_the_template_writes_once_after_the_last_turn_is_not_answer(tmp_path):
    # Phi-3's layout: multi-turn chats were refused ("does not render conversations prefix by
    # prefix") and a last turn's answer ran on through "\n" and the eos token.
    tokenizer = tokenizer_with_template(END_OF_CONVERSATION_EOS_TEMPLATE)
    rows = [DEMO_ROWS[1], DEMO_ROWS[3]]
    examples = list(iter_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer))
    assert [answer_text(tokenizer, e) for e in examples] == [
        "He has 7 apples.<|endoftext|>", "5<|endoftext|>10<|endoftext|>"]


# Qwen3's layout: an empty thinking block only in assistant turns after the last user turn, so
# a turn renders differently when the conversation goes on.
THINKING_AFTER_LAST_USER_TEMPLATE = (
    "{% set ns = namespace(last_user=0) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral v0.3's layout: the system message goes into the last user turn only.
SYSTEM_IN_LAST_USER_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set chat = messages[1:] %}{% else %}{% set system = '' %}{% set chat = messages %}"
    "{% endif %}"
    "{% for message in chat %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.last and system %}{{ '[INST] ' + system + '\n\n' + message['content'] + "
    "'[/INST]' }}{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def test_a_turn_the_template_renders_otherwise_when_more_follows_is_found(tmp_path):
    # Every multi-turn chat was rejected: the first answer rendered alone got the thinking
    # block, the whole conversation has none there.
    tokenizer = tokenizer_with_template(THINKING_AFTER_LAST_USER_TEMPLATE)
    rows = [DEMO_ROWS[0], DEMO_ROWS[3]]
    texts = [answer_text(tokenizer, e) for e in iter_examples(
        write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer)]
    assert texts == ["The capital of France is Paris.<|im_end|>", "5<|im_end|>10<|im_end|>"]


# Qwen3's handling of reasoning: an assistant content "<think>R</think>A" is written as a
# thinking block of its own in the last turn, and as A alone in earlier turns.
REASONING_TEMPLATE = (
    "{% set ns = namespace(last_user=0) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% set parts = message['content'].split('</think>') %}"
    "{% if message['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{% set reasoning = parts[0].split('<think>')[-1].strip() if parts | length > 1 else '' %}"
    "{{ '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ parts[-1].lstrip() + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_reasoning_the_template_moves_into_a_block_of_its_own_is_answer(tmp_path):
    """Rejected as a template that renders a turn differently depending on its content."""
    tokenizer = tokenizer_with_template(REASONING_TEMPLATE)
    chat = {"messages": [
        {"role": "user", "content": "2 plus 3"},
        {"role": "assistant", "content": "<think>add them</think>5"},
        {"role": "user", "content": "times 2"},
        {"role": "assistant", "content": "<think>double it</think>10"}]}
    (example,) = iter_examples(write_jsonl(tmp_path / "rows.jsonl", [chat]), tokenizer)
    text = tokenizer.decode(example.input_ids)
    assert "add them" not in text  # the template drops an earlier turn's reasoning
    assert answer_text(tokenizer, example) == (
        "5<|im_end|><think>\ndouble it\n</think>\n\n10<|im_end|>")


def test_a_system_message_the_template_moves_is_rejected_with_the_reason(tmp_path):
    """Mistral's v0.2/v0.3 templates write the system message into the conversation's last
    turn when it is a user turn: a training row, which ends with an answer, is written without
    it. It was rejected as a history that renders otherwise; now the reason says what is lost."""
    tokenizer = tokenizer_with_template(SYSTEM_IN_LAST_USER_TEMPLATE)
    without_system = {"messages": DEMO_ROWS[3]["messages"][1:]}
    kept, rejected = iter_examples(  # DEMO_ROWS[3] has a system message
        write_jsonl(tmp_path / "rows.jsonl", [without_system, DEMO_ROWS[3]]), tokenizer,
        on_bad="skip")
    assert answer_text(tokenizer, kept) == " 5<|im_end|> 10<|im_end|>"
    assert isinstance(rejected, Rejection) and rejected.field == "messages[0].content"
    assert rejected.reason.startswith("the chat template leaves out the system message")
    # The variant that writes it into the last *user* turn keeps it in a training row, but the
    # earlier answers follow a prompt without it: refused as a history that renders otherwise.
    last_user = SYSTEM_IN_LAST_USER_TEMPLATE.replace(
        "{% if loop.last and system %}",
        "{% if message == (chat | selectattr('role', 'equalto', 'user') | list)[-1] "
        "and system %}")
    (rejected,) = iter_examples(write_jsonl(tmp_path / "rows.jsonl", [DEMO_ROWS[3]]),
                                tokenizer_with_template(last_user), on_bad="skip")
    assert isinstance(rejected, Rejection) and rejected.field == "messages"
    assert rejected.reason.startswith("the chat template renders the conversation before "
                                      "assistant turn 1 otherwise than the prompt")
    assert "system message into the last user turn" in rejected.reason


def test_a_system_prompt_the_template_leaves_out_is_refused_naming_its_field(tmp_path):
    """A template that writes only user and assistant turns trained the answer without the
    instruction it follows, silently: a system turn, a developer turn or a `system` column."""
    tokenizer = tokenizer_with_template(SPACE_BEFORE_TEMPLATE)
    rows = [{"system": "Answer in French.", "prompt": "hi", "response": "Bonjour"},
            {"messages": [{"role": "developer", "content": " Answer in French. "},
                          {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "Bonjour"}]},
            {"system": "  ", "prompt": "hi", "response": "Bonjour"}]  # (blank: none)
    column, developer, blank = iter_examples(write_jsonl(tmp_path / "rows.jsonl", rows),
                                             tokenizer, on_bad="skip")
    assert (column.field, developer.field) == ("system", "messages[0].content")
    assert "leaves out the system message" in developer.reason
    assert not isinstance(blank, Rejection)
    chatml = build_tiny_tokenizer()  # (writes system turns: kept)
    assert not any(isinstance(row, Rejection) for row in iter_examples(
        tmp_path / "rows.jsonl", chatml, on_bad="skip"))
    # A system text that another turn repeats was taken as written (a substring test): the
    # template's leaving it out is found by rendering the row with a probe in its place.
    echoed = [{"system": "Answer in French.", "prompt": "Answer in French. hi",
               "response": "Bonjour"},
              {"messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Be brief, as the system says"},
                            {"role": "assistant", "content": "Be brief."}]}]
    path = write_jsonl(tmp_path / "echoed.jsonl", echoed)
    column, turn = iter_examples(path, tokenizer, on_bad="skip")
    assert (column.field, turn.field) == ("system", "messages[0].content")
    assert "leaves out the system message" in turn.reason
    assert not any(isinstance(row, Rejection) for row in iter_examples(path, chatml,
                                                                       on_bad="skip"))


# Qwen3's own rule: the thinking block goes into the last assistant turn after the last user
# turn, and into earlier ones only when they carry reasoning.
THINKING_IN_LAST_TURN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_consecutive_assistant_turns_are_rejected_with_their_own_reason(tmp_path):
    """The reason named the system message, which the row did not have."""
    tokenizer = tokenizer_with_template(THINKING_IN_LAST_TURN_TEMPLATE)
    chat = {"messages": [{"role": "user", "content": "2 plus 3"},
                         {"role": "assistant", "content": "5"},
                         {"role": "assistant", "content": "Anything else?"}]}
    (rejected,) = iter_examples(write_jsonl(tmp_path / "rows.jsonl", [chat]), tokenizer,
                                on_bad="skip")
    assert isinstance(rejected, Rejection) and rejected.field == "messages"
    assert "assistant turn 2 otherwise than the prompt" in rejected.reason
    assert "directly follows another assistant turn" in rejected.reason
    assert "system message" not in rejected.reason


def test_a_row_holding_the_probe_string_is_rejected_with_that_reason(tiny_tokenizer, tmp_path):
    from minorsft.answer_spans import ANSWER_PROBE

    rows = [{"prompt": f"say {ANSWER_PROBE}", "response": "ok"}]
    (rejected,) = iter_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tiny_tokenizer,
                                on_bad="skip")
    assert ANSWER_PROBE in rejected.reason and "remove it" in rejected.reason
    assert rejected.field == "prompt"


def test_a_byte_order_mark_on_a_later_line_is_dropped(tiny_tokenizer, tmp_path):
    # `cat a.jsonl b.jsonl` of two files saved with a mark puts b's at the start of a line.
    rows = [{"prompt": "2 plus 3", "response": "5"}, {"prompt": "4 plus 1", "response": "5"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(codecs.BOM_UTF8 + first + codecs.BOM_UTF8 + second + codecs.BOM_UTF8 + b"\n")
    examples = list(iter_examples(path, tiny_tokenizer))
    assert [example.line for example in examples] == [1, 2]


def test_a_blank_system_column_is_no_system_message(tiny_tokenizer, tmp_path):
    rows = [{"system": "  ", "prompt": "2 plus 3", "response": "5"},
            {"prompt": "2 plus 3", "response": "5"}]
    blank, none = iter_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tiny_tokenizer)
    assert blank.input_ids == none.input_ids


def test_a_refusal_of_a_row_without_messages_names_the_columns_it_was_made_of(tmp_path):
    tokenizer = tokenizer_with_template(
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML)
    row = {"system": "Be brief.", "prompt": "2 plus 3", "response": "5"}
    (rejected,) = iter_examples(write_jsonl(tmp_path / "rows.jsonl", [row]), tokenizer,
                                on_bad="skip")
    assert isinstance(rejected, Rejection) and rejected.field == "system, prompt, response"
    assert rejected.reason.endswith("System role not supported")


def test_conversation_the_template_refuses_is_rejected_not_a_crash(tmp_path):
    tokenizer = tokenizer_with_template(
        "{% if messages[0]['role'] == 'assistant' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        + DEFAULT_SYSTEM_TEMPLATE)
    path = write_jsonl(tmp_path / "rows.jsonl", [DEMO_ROWS[0], ASSISTANT_FIRST])
    kept, rejected = iter_examples(path, tokenizer, on_bad="skip")
    assert isinstance(kept, Example) and isinstance(rejected, Rejection)
    assert (rejected.line, rejected.field) == (2, "messages")
    assert rejected.reason == ("the chat template refused this conversation: "
                               "Conversation roles must alternate user/assistant")


def test_named_fields_and_alpaca_input(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2 plus 3", "answer": "5"}])
    (example,) = iter_examples(path, tiny_tokenizer, FieldSpec("question", "answer"))
    assert answer_text(tiny_tokenizer, example) == "5<|im_end|>"
    text = tiny_tokenizer.decode(example.input_ids)
    assert "<|im_start|>user\n2 plus 3<|im_end|>" in text
    assert example.id.startswith("sha256:")  # no id column: a content hash


def test_parquet_integer_ids_stored_as_floats_are_ids(tiny_tokenizer, tmp_path):
    """pandas writes an integer id column with missing values as float64: every row was
    rejected ("expected a string or integer id, got float")."""
    import polars as pl

    path = tmp_path / "rows.parquet"
    pl.DataFrame({"id": [3.0, None, 2.5, float("nan")], "prompt": ["a", "b", "c", "d"],
                  "response": ["x", "y", "z", "w"]}).write_parquet(path)
    kept_3, kept_hash, rejected, nan_hash = iter_examples(path, tiny_tokenizer, on_bad="skip")
    assert kept_3.id == "3" and kept_hash.id.startswith("sha256:")
    assert rejected.field == "id" and "got float 2.5" in rejected.reason
    # pandas' missing value, NaN, is no id too (it was rejected as a float)
    assert nan_hash.id.startswith("sha256:") and nan_hash.id != kept_hash.id
    # a rejected Parquet row is shown as JSON in the report (made only for rejected rows)
    assert json.loads(rejected.as_dict()["raw"]) == {"id": 2.5, "prompt": "c", "response": "z"}


def test_parquet_input(tiny_tokenizer, tmp_path):
    import polars as pl

    path = tmp_path / "rows.parquet"
    pl.DataFrame({"prompt": ["2 plus 3", "4 plus 4"], "response": ["5", "8"]}).write_parquet(path)
    examples = list(iter_examples(path, tiny_tokenizer))
    assert [answer_text(tiny_tokenizer, e) for e in examples] == ["5<|im_end|>", "8<|im_end|>"]
    assert [e.line for e in examples] == [1, 2]


def test_parquet_is_streamed_in_batches_with_the_rows_a_whole_read_gives(tmp_path, monkeypatch):
    """The file was loaded whole (a multi-GB data set cost its size in RAM): it is read in
    batches now, which must give the same Python values row by row (the row ids hash them)."""
    import datetime

    import polars as pl

    import minorsft.row_reading as row_reading

    monkeypatch.setattr(row_reading, "PARQUET_BATCH_ROWS", 7)
    rows = [{"id": index if index % 4 else None, "score": index / 3 if index % 5 else None,
             "messages": [{"role": "user", "content": f"q{index}", "weight": None},
                          {"role": "assistant", "content": f"a{index}",
                           "weight": float(index % 2)}],
             "day": datetime.date(2026, 1, 1 + index % 28), "blob": bytes([index]) * 2,
             "tags": ["a", "b"][: index % 3], "kind": ["x", "y"][index % 2]}
            for index in range(50)]
    path = tmp_path / "rows.parquet"
    pl.DataFrame(rows).with_columns(pl.col("kind").cast(pl.Categorical)).write_parquet(
        path, row_group_size=20)
    whole = list(pl.read_parquet(path).iter_rows(named=True))
    streamed = list(row_reading.read_rows(path))
    assert [row.record for row in streamed] == whole
    assert [row.line for row in streamed] == list(range(1, 51))
    (tmp_path / "cut.parquet").write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="cannot read Parquet"):
        list(row_reading.read_rows(tmp_path / "cut.parquet"))
    # a type polars cannot convert panics in Rust (a BaseException): one DataError all the same
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x"], "response": ["y"], "price": pa.array(
        [decimal.Decimal("1.00")], pa.decimal256(40, 2))}), tmp_path / "wide.parquet")
    with pytest.raises(DataError, match="cannot read Parquet: .*Int256") as raised:
        list(row_reading.read_rows(tmp_path / "wide.parquet"))
    assert "\n" not in str(raised.value)


def test_parquet_with_columns_of_several_formats_uses_the_filled_ones(tiny_tokenizer, tmp_path):
    # A Parquet file mixing chat and prompt/response rows has every column on every row; the
    # columns of the other format are null there, which is not ambiguous.
    import polars as pl

    path = tmp_path / "mixed.parquet"
    pl.DataFrame([{"messages": CHAT, "prompt": None, "response": None},
                  {"messages": None, "prompt": "4 plus 4", "response": "8"}]).write_parquet(path)
    examples = list(iter_examples(path, tiny_tokenizer))
    assert [answer_text(tiny_tokenizer, e) for e in examples] == ["5<|im_end|>", "8<|im_end|>"]


def test_columns_that_make_no_second_format_are_not_ambiguous(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "2 plus 3", "prompt_id": "p1", "messages": CHAT},  # as in UltraChat
            {"question": "2 plus 3", "answer": "5", "prompt": "x", "response": "y"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows[:1])
    (chat,) = iter_examples(path, tiny_tokenizer)
    assert answer_text(tiny_tokenizer, chat) == "5<|im_end|>"
    path = write_jsonl(tmp_path / "named.jsonl", rows[1:])
    (named,) = iter_examples(path, tiny_tokenizer, FieldSpec("question", "answer"))
    assert answer_text(tiny_tokenizer, named) == "5<|im_end|>"  # named columns win


def test_content_hash_ids_are_stable_and_repeats_numbered(tiny_tokenizer, tmp_path):
    row = {"prompt": "2 plus 3", "response": "5"}
    path = write_jsonl(tmp_path / "dup.jsonl", [row, row])
    first, second = iter_examples(path, tiny_tokenizer)
    again, _ = iter_examples(path, tiny_tokenizer)
    assert first.id == again.id and second.id == f"{first.id}#2"


def test_truncation_keeps_the_first_tokens_and_rejects_answerless_rows(tiny_tokenizer, tmp_path):
    messages = DEMO_ROWS[0]["messages"]
    ids, mask, truncated = tokenize_conversation(tiny_tokenizer, messages, None)
    prompt_tokens = mask.index(True)
    ids_cut, mask_cut, truncated = tokenize_conversation(tiny_tokenizer, messages,
                                                         prompt_tokens + 2)
    assert truncated and ids_cut == ids[: prompt_tokens + 2] and sum(mask_cut) == 2
    path = write_jsonl(tmp_path / "long.jsonl", [DEMO_ROWS[0]])
    with pytest.raises(DataError, match="truncated to zero tokens"):
        list(iter_examples(path, tiny_tokenizer, max_length=prompt_tokens))


CHAT = [{"role": "user", "content": "2 plus 3"}, {"role": "assistant", "content": "5"}]


def test_system_column_becomes_the_first_message_of_every_format(tiny_tokenizer, tmp_path):
    rows = [{"system": "Be brief.", "messages": CHAT},
            {"system": "Be brief.", "prompt": "2 plus 3", "response": "5"},
            {"system": "", "messages": CHAT}]  # an empty system column adds nothing
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    texts = [tiny_tokenizer.decode(e.input_ids) for e in iter_examples(path, tiny_tokenizer)]
    with_system = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 plus 3<|im_end|>\n"
                   "<|im_start|>assistant\n5<|im_end|>\n")
    assert texts == [with_system, with_system, with_system.split("\n", 2)[2]]


BAD_ROWS = [
    ('{"prompt": "x", "response": ', None, "malformed JSON"),
    ({"text": "x"}, None, "unknown format (columns: text)"),
    ({"prompt": "x"}, "response", "missing (the row has 'prompt', so it reads as the "
                                  "prompt/response format)"),
    ({"output": "x", "input": "y"}, "instruction", "missing (the row has 'output', so it reads "
                                                   "as the alpaca format)"),
    ({"prompt": "x", "output": "y"}, None, "unknown format (columns: output, prompt)"),
    ({"messages": None}, "messages", "missing"),
    ({"prompt": "x", "response": 3}, "response", "expected a string"),
    ({"prompt": "x", "response": "  "}, "response", "empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "unknown role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
     "messages[1].content", "missing"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0].role", "missing"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "empty answer"),
    ({"system": "Be brief.", "messages": [{"role": "system", "content": "Be kind."}] + CHAT},
     "system", "the chat has its own system message (messages[0])"),
    ({"messages": CHAT, "prompt": "x", "response": "y"}, None,
     "ambiguous format: the row has 'messages' and 'prompt'+'response'; keep the columns of one"),
]


@pytest.mark.parametrize(("row", "field", "reason"), BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tiny_tokenizer, tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [DEMO_ROWS[1], row])
    with pytest.raises(DataError, match=re.escape(reason)) as caught:
        list(iter_examples(path, tiny_tokenizer))
    assert caught.value.line == 2 and caught.value.field == field
    assert str(caught.value).startswith(f"{path}:2:")


def test_skip_accounts_for_every_row(tiny_tokenizer, tmp_path):
    rows = [DEMO_ROWS[0]] + [row for row, _, _ in BAD_ROWS] + [DEMO_ROWS[1], DEMO_ROWS[1]]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    items = list(iter_examples(path, tiny_tokenizer, on_bad="skip"))
    kept = [i for i in items if isinstance(i, Example)]
    rejected = [i for i in items if isinstance(i, Rejection)]
    assert len(kept) + len(rejected) == len(rows)
    assert len(kept) == 2
    assert [r.line for r in rejected] == list(range(2, len(BAD_ROWS) + 2)) + [len(rows)]
    assert "duplicate id 'b'" in rejected[-1].reason
    assert json.loads(json.dumps(rejected[0].as_dict()))["line"] == 2


@pytest.mark.parametrize(("line", "reason"), [
    # Cut off: the column is where the line ends (json said "column 1" of a next line).
    ('{"prompt": "broken", "response":  ',
     "malformed JSON (Expecting value at column 35, the end of the line)"),
    ('{"prompt": "x" "response": "y"}\r', "malformed JSON (Expecting ',' delimiter at column 16)"),
])
def test_malformed_json_names_the_column_in_the_line(tiny_tokenizer, tmp_path, line, reason):
    path = write_jsonl(tmp_path / "rows.jsonl", [DEMO_ROWS[1], line])
    with pytest.raises(DataError) as caught:
        list(iter_examples(path, tiny_tokenizer))
    assert (caught.value.line, caught.value.reason) == (2, reason)


def test_a_json_array_file_is_refused_with_a_hint_at_json_lines(tiny_tokenizer, tmp_path):
    hint = ("rows.json looks like one JSON document (an array), but the data must be JSON Lines: "
            "one JSON object per line (convert with jq -c '.[]' rows.json > rows.jsonl)")
    path = tmp_path / "rows.json"
    for text in (json.dumps(DEMO_ROWS[1:3], indent=2), json.dumps(DEMO_ROWS[1:3])):
        path.write_text(text + "\n")
        with pytest.raises(DataError) as caught:
            list(iter_examples(path, tiny_tokenizer))
        assert caught.value.line == 1 and caught.value.reason.endswith(hint)
    # Named .jsonl, the hint's copy gets another name: `> rows.jsonl` would empty the input
    # before jq reads it.
    array_jsonl = tmp_path / "rows.jsonl"
    array_jsonl.write_text(json.dumps(DEMO_ROWS[1:3]) + "\n")
    with pytest.raises(DataError) as caught:
        list(iter_examples(array_jsonl, tiny_tokenizer))
    assert caught.value.reason.endswith("jq -c '.[]' rows.jsonl > rows.lines.jsonl)")
    # Pretty-printed objects: jq -c . (the array's '.[]' fails on an object)
    path.write_text("\n".join(json.dumps(row, indent=2) for row in DEMO_ROWS[1:3]) + "\n")
    with pytest.raises(DataError) as caught:
        list(iter_examples(path, tiny_tokenizer))
    assert caught.value.reason.endswith(
        "rows.json looks like one JSON document (pretty-printed objects), but the data must be "
        "JSON Lines: one JSON object per line (convert with jq -c . rows.json > rows.jsonl)")
    # A JSON Lines file with a stray array on a later line is not an array file.
    write_jsonl(path, [DEMO_ROWS[1], ["2 plus 3", "5"]])
    with pytest.raises(DataError) as caught:
        list(iter_examples(path, tiny_tokenizer))
    assert (caught.value.line, caught.value.reason) == (2, "expected a JSON object, got list")
    # a `null` line: JSON's word (it said "got NoneType")
    path.write_text(json.dumps(DEMO_ROWS[1]) + "\nnull\n")
    with pytest.raises(DataError) as caught:
        list(iter_examples(path, tiny_tokenizer))
    assert (caught.value.line, caught.value.reason) == (2, "expected a JSON object, got null")


def test_non_utf8_and_missing_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        list(iter_examples(path, tiny_tokenizer))
    with pytest.raises(DataError, match="no such file"):
        resolve_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown file type"):
        list(iter_examples(tmp_path / "rows.csv", tiny_tokenizer))


def test_builtin_demo_data_is_packaged(tiny_tokenizer):
    examples = list(iter_examples(resolve_data("demo"), tiny_tokenizer))
    assert len(examples) == 48 and all(e.num_tokens > 0 for e in examples)
    held = list(iter_examples(resolve_data("demo-heldout"), tiny_tokenizer))
    assert len(held) == 16 and all(e.num_tokens > 0 for e in held)

    def prompts(name):
        return {json.loads(line)["messages"][0]["content"]
                for line in resolve_data(name)[0].read_text(encoding="utf-8").splitlines()}

    assert not prompts("demo") & prompts("demo-heldout")  # held out: no training row's question


def test_a_local_demo_folder_wins_and_its_error_names_the_built_in(tmp_path, monkeypatch):
    """`--data demo` in a folder holding runs/demo-like `demo/` read that folder, and its
    "no data file" error said nothing of the built-in set it hid."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "ref.parquet").mkdir(parents=True)
    with pytest.raises(DataError, match="hides the built-in data set 'demo': run from another "
                                        "folder"):
        resolve_data("demo")
    write_jsonl(tmp_path / "demo" / "mine.jsonl", [{"prompt": "a", "response": "b"}])
    assert resolve_data("demo") == [Path("demo") / "mine.jsonl"]
    write_jsonl(tmp_path / "demo-heldout", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="a file without a type .* hides the built-in data set "
                                        "'demo-heldout' here: rename it"):
        resolve_data("demo-heldout")


FAKE_TURN = "ok<|im_end|>\n<|im_start|>user\nextra"


@pytest.mark.parametrize(("row", "field", "token"), [
    # Before the fix these were cached: the rendered text was tokenized with special tokens
    # parsed, so the first answer held a fake user turn and the second was m=2 of control tokens.
    ({"prompt": "x", "response": FAKE_TURN}, "response", "<|im_end|>"),
    ({"prompt": "x", "response": "<|im_end|>"}, "response", "<|im_end|>"),
    ({"prompt": "<|im_start|>system", "response": "y"}, "prompt", "<|im_start|>"),
    ({"system": "Be <|endoftext|> brief.", "prompt": "x", "response": "y"}, "system",
     "<|endoftext|>"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "<|im_end|>"},
                   {"role": "assistant", "content": "z"}]}, "messages[2].content", "<|im_end|>"),
    ({"instruction": "x", "input": "a<|im_start|>", "output": "y"}, "input", "<|im_start|>"),
    ({"instruction": "x<|im_end|>", "output": "y"}, "instruction", "<|im_end|>"),
    ({"instruction": "x", "output": "y<|im_end|>"}, "output", "<|im_end|>"),
])
def test_special_token_text_in_a_field_is_rejected(tiny_tokenizer, tmp_path, row, field, token):
    path = write_jsonl(tmp_path / "rows.jsonl", [DEMO_ROWS[1], row])
    kept, rejected = iter_examples(path, tiny_tokenizer, on_bad="skip")
    assert isinstance(kept, Example) and isinstance(rejected, Rejection)
    assert (rejected.line, rejected.field) == (2, field)
    assert rejected.reason.startswith(f"contains the tokenizer's special token {token!r}")


def test_special_tokens_in_named_fields_and_unused_columns(tiny_tokenizer, tmp_path):
    # Named columns are checked; a column the conversation is not made of is not trained on.
    rows = [{"q": "x", "a": "y", "text": "<|im_start|>user\nx<|im_end|>"},
            {"q": "x", "a": "y<|im_end|>"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    kept, rejected = iter_examples(path, tiny_tokenizer, FieldSpec("q", "a"), on_bad="skip")
    assert answer_text(tiny_tokenizer, kept) == "y<|im_end|>"
    assert (rejected.line, rejected.field) == (2, "a")


def test_a_null_id_is_no_id(tiny_tokenizer, tmp_path):
    # Before the fix the second row was rejected as a duplicate of the first's content hash.
    import polars as pl

    row = {"id": None, "prompt": "2 plus 3", "response": "5"}
    path = write_jsonl(tmp_path / "rows.jsonl", [row, row])
    first, second = iter_examples(path, tiny_tokenizer)
    assert first.id.startswith("sha256:") and second.id == f"{first.id}#2"
    path = tmp_path / "rows.parquet"
    pl.DataFrame({"id": ["a", None, None], "prompt": ["x", "2 plus 3", "2 plus 3"],
                  "response": ["y", "5", "5"]}).write_parquet(path)
    ids = [e.id for e in iter_examples(path, tiny_tokenizer)]
    assert ids[0] == "a" and ids[2] == f"{ids[1]}#3"


@pytest.mark.parametrize(("value", "kept"), [
    (0, False), (False, False), (5, False), ([], False), ("", True), (None, True)])
def test_alpaca_input_of_another_type_is_rejected(tiny_tokenizer, tmp_path, value, kept):
    # 0 and false were dropped silently (`input or ""`), while 5 was rejected.
    row = {"instruction": "2 plus 3", "input": value, "output": "5"}
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    (item,) = iter_examples(path, tiny_tokenizer, on_bad="skip")
    if kept:
        assert "<|im_start|>user\n2 plus 3<|im_end|>" in tiny_tokenizer.decode(item.input_ids)
    else:
        assert (item.field, item.reason) == ("input",
                                             f"expected a string, got {type(value).__name__}")


@pytest.mark.parametrize(("line", "field"), [
    # A TypeError from the tokenizer before the fix:
    ('{"id": "s1", "prompt": "caf\\ud800", "response": "y"}', "prompt"),
    ('{"id": "s2", "messages": [{"role": "user", "content": "x"}, '
     '{"role": "assistant", "content": "\\udc00y"}]}', "messages[1].content"),
    # A UnicodeEncodeError from the content hash (no id), or one in the id itself:
    ('{"prompt": "x", "response": "y", "note": "\\ud800"}', "note"),
    ('{"id": "\\uD800", "prompt": "x", "response": "y"}', "id"),
], ids=["prompt", "chat content", "a row without id", "the id"])
def test_an_unpaired_surrogate_is_rejected_with_its_field(tiny_tokenizer, tmp_path, line,
                                                          field):
    path = write_jsonl(tmp_path / "rows.jsonl", [DEMO_ROWS[1], line])
    kept, rejected = iter_examples(path, tiny_tokenizer, on_bad="skip")
    assert isinstance(kept, Example) and (rejected.line, rejected.field) == (2, field)
    assert rejected.reason.startswith("contains an unpaired surrogate (\\ud")
    json.dumps(rejected.as_dict(), ensure_ascii=False).encode()  # the rejects file takes it
    with pytest.raises(DataError, match=re.escape(f"rows.jsonl:2: field {field!r}")):
        list(iter_examples(path, tiny_tokenizer))


def test_a_surrogate_pair_escape_is_text(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ['{"prompt": "\\ud83d\\ude00", "response": "y"}'])
    (example,) = iter_examples(path, tiny_tokenizer)
    assert "\U0001F600" in tiny_tokenizer.decode(example.input_ids)


@pytest.mark.parametrize(("line", "reason"), [
    ('{"prompt": "x", "response": "y", "n": ' + "1" * 5000 + "}",
     "unreadable JSON (Exceeds the limit (4300 digits) for integer string conversion: value has "
     "5000 digits)"),
    ('{"prompt": ' + "[" * 100_000, "unreadable JSON (nested deeper than Python's JSON reader "
                                    "allows)"),
])
def test_json_python_cannot_read_is_a_rejected_line(tiny_tokenizer, tmp_path, line, reason):
    # Both stopped the whole run without file or line (only JSONDecodeError was caught).
    path = write_jsonl(tmp_path / "rows.jsonl", [DEMO_ROWS[1], line, DEMO_ROWS[0]])
    items = list(iter_examples(path, tiny_tokenizer, on_bad="skip"))
    assert [type(i) for i in items] == [Example, Rejection, Example]
    assert (items[1].line, items[1].field, items[1].reason) == (2, None, reason)


def test_json_messages_that_end_in_at_read_once(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ['{"prompt": "x", "response": "cut off'])
    with pytest.raises(DataError) as caught:
        list(iter_examples(path, tiny_tokenizer))
    assert caught.value.reason == "malformed JSON (Unterminated string starting at column 29)"


def test_not_utf8_names_the_column_as_json_does(tiny_tokenizer, tmp_path):
    # The byte's position counted from 0, in bytes, where json's columns count characters from 1.
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "\xc3\xa9t\xe9", "response": "x"}\n')
    with pytest.raises(DataError) as caught:
        list(iter_examples(path, tiny_tokenizer))
    assert caught.value.reason == "not valid UTF-8 (byte 0xe9 at column 15)"


def test_a_byte_order_mark_on_a_blank_first_line_is_blank(tiny_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\r\n" + json.dumps(DEMO_ROWS[1]).encode() + b"\r\n")
    (example,) = iter_examples(path, tiny_tokenizer)
    assert (example.id, example.line) == ("b", 2)


def test_cr_line_endings_get_a_hint(tiny_tokenizer, tmp_path):
    path = tmp_path / "mac.jsonl"
    path.write_bytes(b"\r".join(json.dumps(row).encode() for row in DEMO_ROWS[1:3]) + b"\r")
    (rejected,) = iter_examples(path, tiny_tokenizer, on_bad="skip")
    assert rejected.reason.startswith("malformed JSON (Extra data at column ")
    assert rejected.reason.endswith("the file uses CR line endings; convert with "
                                    "tr '\\r' '\\n' < mac.jsonl > mac.lf.jsonl")


@pytest.mark.parametrize(("messages", "got"), [("hi", "str"), ([], "an empty list"),
                                               ({"role": "user"}, "dict")])
def test_messages_of_another_type_say_what_they_are(tiny_tokenizer, tmp_path, messages, got):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": messages}])
    with pytest.raises(DataError) as caught:
        list(iter_examples(path, tiny_tokenizer))
    assert caught.value.reason == f"expected a non-empty list of {{role, content}}, got {got}"


def test_the_same_column_as_prompt_and_answer_is_refused():
    with pytest.raises(ValueError, match="name the same column 'q'"):
        FieldSpec("q", "q")


# --- the formats people bring from other tools ----------------------------------------------

def _user(text, **extra):
    return {"role": "user", "content": text, **extra}


def _assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def read_all(tokenizer, tmp_path, rows):
    return list(iter_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer,
                              on_bad="skip"))


def test_trl_prompt_completion_rows_train_on_the_completion_only(tiny_tokenizer, tmp_path):
    """TRL's SFT format: strings are one turn; lists are a chat whose prompt turns (few-shot
    answers too) are context and whose completion's assistant turns are the answer."""
    system = {"role": "system", "content": "Be brief."}
    rows = [
        {"prompt": "What is 2 plus 3?", "completion": "5"},
        {"prompt": "What is 2 plus 3?", "response": "5"},
        {"prompt": [system, _user("1 plus 1?"), _assistant("2"), _user("2 plus 3?")],
         "completion": [_assistant("5")]},
        {"messages": [system, _user("1 plus 1?"), _assistant("2", weight=0), _user("2 plus 3?"),
                      _assistant("5")]},
    ]
    text_completion, text_response, chat_completion, weighted = read_all(
        tiny_tokenizer, tmp_path, rows)
    assert (text_completion.input_ids, text_completion.answer_mask) == (
        text_response.input_ids, text_response.answer_mask)
    assert answer_text(tiny_tokenizer, chat_completion) == "5<|im_end|>"
    # the few-shot answer stays in the prompt, as a weight-0 turn of a chat does
    assert (chat_completion.input_ids, chat_completion.answer_mask) == (
        weighted.input_ids, weighted.answer_mask)
    assert "1 plus 1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>" in tiny_tokenizer.decode(
        chat_completion.input_ids)
    # a text beside a list is neither form: named as that (it said the text was no list)
    text_prompt, text_completion = read_all(tiny_tokenizer, tmp_path, [
        {"prompt": "2 plus 3?", "completion": [_assistant("5")]},
        {"prompt": [_user("2 plus 3?")], "completion": "5"}])
    assert (text_prompt.field, text_completion.field) == ("prompt", "completion")
    assert text_prompt.reason.startswith(
        "a text beside a list of turns in 'completion': TRL's prompt and completion are both "
        "texts, or both lists of {role, content} turns (the conversational form); give "
        "'prompt' as a list too")


def test_openai_turn_weights_choose_the_trained_turns(tiny_tokenizer, tmp_path):
    chat = [_user("Q1"), _assistant("BAD ANSWER", weight=0), _user("Try again"),
            _assistant("5", weight=1)]
    rows = [{"messages": chat},
            {"messages": [_user("Q1"), _assistant("A", weight=0.5)]},
            {"messages": [_user("Q1"), _assistant("A", weight="0")]},
            {"messages": [_user("Q1"), _assistant("A", weight=0)]}]
    trained, half, text, none = read_all(tiny_tokenizer, tmp_path, rows)
    assert answer_text(tiny_tokenizer, trained) == "5<|im_end|>"
    assert "BAD ANSWER" in tiny_tokenizer.decode(trained.input_ids)  # still in the prompt
    assert (half.field, text.field) == ("messages[1].weight", "messages[1].weight")
    assert half.reason == "expected 0 (not trained on) or 1, got 0.5"
    assert (none.field, none.reason) == (
        "messages", "every assistant turn is marked not to be trained (weight 0, or "
        "training/train false): nothing to train on")


def test_weight_on_a_user_or_system_turn_is_checked_as_on_an_assistant_turn(tiny_tokenizer,
                                                                            tmp_path):
    """`weight` was read on assistant turns only: a user turn with weight 0.5 or 1, or a system
    turn with weight "heavy", was accepted silently (the README says they are rejected)."""
    rows = [{"messages": [_user("Q1", weight=0.5), _assistant("A")]},
            {"messages": [_user("Q1", weight=1), _assistant("A")]},
            {"messages": [{"role": "system", "content": "S", "weight": "heavy"}, _user("Q1"),
                          _assistant("A")]},
            {"messages": [_user("Q1", weight=0), _assistant("A")]}]
    half, trained, text, untrained = read_all(tiny_tokenizer, tmp_path, rows)
    assert (half.field, half.reason) == ("messages[0].weight",
                                         "expected 0 (not trained on) or 1, got 0.5")
    assert trained.field == "messages[0].weight"
    assert "a user turn marked to be trained" in trained.reason
    assert (text.field, text.reason) == ("messages[0].weight",
                                         "expected 0 (not trained on) or 1, got 'heavy'")
    assert answer_text(tiny_tokenizer, untrained) == "A<|im_end|>"


def test_axolotl_training_flags_choose_the_trained_turns(tiny_tokenizer, tmp_path):
    """axolotl's per-turn booleans (`training`, or `train` where its config names that key)
    were ignored: a turn marked `training: false` was trained on."""
    def chat(first: dict, last: dict | None = None) -> dict:
        return {"messages": [_user("Q1"), _assistant("BAD ANSWER", **first), _user("Again"),
                             _assistant("5", **(last or {}))]}

    rows = [chat({"training": False}), chat({"train": False}, {"train": True}),
            chat({"weight": 0, "training": False}), chat({"weight": 1}),
            chat({"training": "no"}), chat({"weight": 0, "train": True}),
            chat({"train_detail": [{"begin_offset": 0, "end_offset": 3, "train": True}]}),
            {"messages": [_user("Q1", training=True), _assistant("A")]},
            {"messages": [_user("Q1", training=False), _assistant("A")]},
            chat({"training": False}, {"training": False})]
    (flagged, train_key, agreeing, weighted, text, disagreeing, detail, user_trained,
     user_untrained, none) = read_all(tiny_tokenizer, tmp_path, rows)
    for example in (flagged, train_key, agreeing):
        assert answer_text(tiny_tokenizer, example) == "5<|im_end|>"
        assert "BAD ANSWER" in tiny_tokenizer.decode(example.input_ids)  # still in the prompt
    assert answer_text(tiny_tokenizer, weighted) == "BAD ANSWER<|im_end|>5<|im_end|>"
    assert (text.field, text.reason) == ("messages[1].training", "expected true or false, "
                                                                 "got 'no'")
    assert (disagreeing.field, disagreeing.reason) == (
        "messages[1]", "the turn's marks disagree on whether it is trained (train: True, "
        "weight: 0); keep one")
    assert detail.field == "messages[1].train_detail"
    assert "spans of a turn to train on are not supported" in detail.reason
    assert user_trained.field == "messages[0].training"
    assert "a user turn marked to be trained" in user_trained.reason
    assert answer_text(tiny_tokenizer, user_untrained) == "A<|im_end|>"
    assert none.field == "messages"
    # 1 and 0 as true and false (as `weight` takes them); a TRL prompt's turns are context
    # whatever their marks, as they were before the marks were read
    numbers, prompt_marked = read_all(tiny_tokenizer, tmp_path, [
        chat({"train": 0}, {"train": 1}),
        {"prompt": [_user("Q1", train=True), _assistant("A", weight=0.5, training=True),
                    _user("Q2")], "completion": [_assistant("5")]}])
    assert answer_text(tiny_tokenizer, numbers) == "5<|im_end|>"
    assert answer_text(tiny_tokenizer, prompt_marked) == "5<|im_end|>"


def test_sharegpt_text_parts_and_developer_read_as_the_plain_chat(tiny_tokenizer, tmp_path):
    plain = {"messages": [{"role": "system", "content": "Be brief."}, _user("2 plus 3?"),
                          _assistant("5")]}
    rows = [
        plain,
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "2 plus 3?"}, {"from": "gpt", "value": "5"}]},
        {"conversations": plain["messages"]},
        {"messages": [{"role": "developer", "content": "Be brief."},
                      _user([{"type": "text", "text": "2 plus "}, {"type": "text", "text": "3?"}]),
                      _assistant([{"type": "text", "text": "5"}])]},
    ]
    first, *others = read_all(tiny_tokenizer, tmp_path, rows)
    for other in others:
        assert (other.input_ids, other.answer_mask) == (first.input_ids, first.answer_mask)


@pytest.mark.parametrize(("row", "field", "reason"), [
    ({"messages": [_user("Weather?"), _assistant("Let me check.", tool_calls=[
        {"type": "function", "function": {"name": "get_weather", "arguments": {}}}])]},
     "messages", "the chat template does not render tool calls"),  # (this one: ChatML)
    ({"messages": [_user("2 plus 3?"), _assistant("5", reasoning_content="2+3=5")]},
     "messages[1].reasoning_content", "reasoning in its own key is not supported"),
    ({"messages": [_user("Weather?"), _assistant("Sun.")], "tools": [{"type": "function"}]},
     "tools[0].name", "expected the tool's name"),
    ({"messages": [_user("Weather?"), _assistant("Sun.")], "tools": [{"name": "get_weather"}]},
     "tools", "the chat template does not render tool definitions"),
    ({"messages": [_user([{"type": "image_url", "image_url": {"url": "x"}}]), _assistant("A")]},
     "messages[0].content[0]", "got a part of type 'image_url'"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
     "conversations[1].from", "unknown role 'bot'; expected one of system, human, user, gpt"),
    ({"messages": [{"role": ["user"], "content": "Q"}, _assistant("A")]}, "messages[0].role",
     "expected a string, got list"),  # (a crash of the whole run, not a rejection)
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "{}"},
                        {"from": "gpt", "value": "A"}]},
     "conversations[1].value.name", "expected the called tool's name"),
    ({"prompt": "Q"}, "response", "so it reads as the prompt/response format); with a "
     "'completion' column it reads as prompt/completion"),
    ({"prompt": "Q", "completion": [_assistant("A")]}, "prompt",
     "a text beside a list of turns in 'completion'"),
])
def test_what_would_be_dropped_is_refused_with_the_field(tiny_tokenizer, tmp_path, row, field,
                                                         reason):
    """Tool calls, tool turns, tool definitions and reasoning in its own key were dropped
    without a word: the row trained on other text than it holds. (Since 0.6.0 tool calling is
    read, and refused where the template drops it: tests/test_tools.py.)"""
    (rejected,) = read_all(tiny_tokenizer, tmp_path, [row])
    assert isinstance(rejected, Rejection), rejected
    assert rejected.field == field and reason in rejected.reason, rejected


def test_a_named_system_column_is_the_system_message(tiny_tokenizer, tmp_path):
    """OpenOrca's `system_prompt` was silently unused: no option named it."""
    rows = [{"system_prompt": "Answer in French.", "question": "2 plus 3?", "response": "cinq"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    (named,) = iter_examples(path, tiny_tokenizer, FieldSpec("question", "response",
                                                             "system_prompt"))
    assert "<|im_start|>system\nAnswer in French.<|im_end|>" in tiny_tokenizer.decode(
        named.input_ids)
    assert answer_text(tiny_tokenizer, named) == "cinq<|im_end|>"
    with pytest.raises(ValueError, match="--system-field 'question' is also the prompt"):
        FieldSpec("question", "response", "question")
    with pytest.raises(ValueError, match="--system-field 'id' is the rows' id column"):
        FieldSpec(system_field="id")


def test_a_system_column_the_rows_format_reads_too_is_refused(tiny_tokenizer, tmp_path):
    """`--system-field instruction` on alpaca rows wrote the instruction as the system message
    and again as the prompt."""
    rows = [{"id": "a", "instruction": "Translate to French", "input": "cat", "output": "chat"},
            {"id": "b", "instruction": "Translate", "input": "dog", "output": "chien"},
            {"id": "c", "prompt": "Q", "response": "A", "input": "the system prompt"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    for column, lines in (("instruction", [1, 2]), ("input", [1, 2]), ("output", [1, 2])):
        found = iter_examples(path, tiny_tokenizer, FieldSpec(system_field=column),
                              on_bad="skip")
        assert [item.line for item in found if isinstance(item, Rejection)] == lines
        assert all(item.field == column and "reads too" in item.reason
                   for item in found if isinstance(item, Rejection))
    # a column the prompt/response format does not read is a system column like any other
    *_, third = iter_examples(path, tiny_tokenizer, FieldSpec(system_field="input"),
                              on_bad="skip")
    assert "<|im_start|>system\nthe system prompt<|im_end|>" in tiny_tokenizer.decode(
        third.input_ids)


def test_gzip_jsonl_and_utf16_files_are_read(tiny_tokenizer, tmp_path):
    import codecs
    import gzip

    from minorsft.precompute import _count_rows

    rows = [{"prompt": "2 plus 3?", "response": "5"}, {"prompt": "1 plus 1?", "response": "2"}]
    plain = write_jsonl(tmp_path / "rows.jsonl", rows)
    packed = tmp_path / "rows.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert [e.input_ids for e in iter_examples(packed, tiny_tokenizer)] == [
        e.input_ids for e in iter_examples(plain, tiny_tokenizer)]
    broken = tmp_path / "cut.jsonl.gz"
    broken.write_bytes(packed.read_bytes()[:-12])
    with pytest.raises(DataError, match="cut.jsonl.gz: not a readable gzip file"):
        list(iter_examples(broken, tiny_tokenizer))
    # UTF-16 with its byte-order mark, as Windows PowerShell's `>` writes (was refused with a
    # hint to convert it with iconv, which Windows lacks); little- and big-endian, gzipped too
    expected = [(e.input_ids, e.answer_mask) for e in iter_examples(plain, tiny_tokenizer)]
    text = plain.read_text().replace("\n", "\r\n")
    for name, data in [("le.jsonl", text.encode("utf-16")),
                       ("be.jsonl", codecs.BOM_UTF16_BE + text.encode("utf-16-be")),
                       ("le.jsonl.gz", gzip.compress(text.encode("utf-16")))]:
        (tmp_path / name).write_bytes(data)
        assert [(e.input_ids, e.answer_mask)
                for e in iter_examples(tmp_path / name, tiny_tokenizer)] == expected, name
    assert _count_rows([tmp_path / "le.jsonl"]) == 2  # (precompute's progress total)
    lone = tmp_path / "lone.jsonl"  # half of a surrogate pair: that row only is rejected
    lone.write_bytes(text.encode("utf-16") + '{"prompt": "\ud800"}\r\n'.encode(
        "utf-16-le", "surrogatepass") + text.encode("utf-16-le"))
    rows = list(iter_examples(lone, tiny_tokenizer, on_bad="skip"))
    assert [type(row).__name__ for row in rows] == ["Example"] * 2 + ["Rejection"] + [
        "Example"] * 2 and rows[2].line == 3
    assert "half of a UTF-16 surrogate pair (U+D800) at column 13" in rows[2].reason
    assert "raw_base64" not in rows[2].as_dict()  # (no bytes of the file's to keep)
    carriage = tmp_path / "cr.jsonl"  # a CR inside a line is whitespace, not a line's end
    carriage.write_bytes('{"prompt": "a",\r "response": "b"}\n'.encode("utf-16"))
    (row,) = iter_examples(carriage, tiny_tokenizer)
    assert row.line == 1
    utf32 = tmp_path / "utf32.jsonl"
    utf32.write_bytes(text.encode("utf-32"))
    with pytest.raises(DataError, match="starts with UTF-32's byte-order mark"):
        list(iter_examples(utf32, tiny_tokenizer))
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(text.encode("utf-16")[:-1])
    with pytest.raises(DataError, match=r"cut.jsonl: not valid UTF-16 after line 1 \(trunc"):
        list(iter_examples(cut, tiny_tokenizer))
    # without its byte-order mark it reads as UTF-8 with NULs: a hint, not a bare "malformed"
    no_mark = tmp_path / "no_mark.jsonl"
    no_mark.write_bytes(text.encode("utf-16-le"))
    with pytest.raises(DataError, match=r"no_mark.jsonl:1: malformed JSON .*; the line holds NUL "
                       r"characters: is the file UTF-16 without a byte-order mark\? Convert it "
                       r"with iconv -f UTF-16LE -t UTF-8 no_mark.jsonl > no_mark.utf8.jsonl"):
        list(iter_examples(no_mark, tiny_tokenizer))


def test_a_folder_or_a_pattern_reads_its_files_in_name_order(tiny_tokenizer, tmp_path):
    """Hugging Face's sharded data sets: rows keep their own file and line, are numbered across
    the files, and ids are unique across them (a repeat names the other file)."""
    import polars as pl

    shards = tmp_path / "data"
    shards.mkdir()
    rows = [{key: value for key, value in row.items() if key != "id"} for row in DEMO_ROWS[:3]]
    pl.DataFrame([rows[1], rows[1]]).write_parquet(shards / "train-00001-of-00002.parquet")
    write_jsonl(shards / "train-00000-of-00002.jsonl", [rows[2], rows[1]])
    (shards / "README.md").write_text("not data")
    (shards / "dataset_info.json").write_text("{}")
    expected = [shards / "train-00000-of-00002.jsonl", shards / "train-00001-of-00002.parquet"]
    assert resolve_data(str(shards)) == expected
    assert resolve_data(str(shards / "train-*")) == expected
    assert resolve_data([str(path) for path in expected]) == expected  # as the shell expands
    items = [item for _, item in classify_rows(expected, tiny_tokenizer)]
    assert [(Path(item.path if isinstance(item, Rejection) else item.file).name, item.line)
            for item in items] == [("train-00000-of-00002.jsonl", 1),
                                   ("train-00000-of-00002.jsonl", 2),
                                   ("train-00001-of-00002.parquet", 1),
                                   ("train-00001-of-00002.parquet", 2)]
    # the same row again (no id column): numbered by file and line
    assert [item.id.partition("#")[2] for item in items] == [
        "", "", "train-00001-of-00002.parquet:1", "train-00001-of-00002.parquet:2"]
    assert len({item.id for item in items}) == 4
    # two files of one name in two folders: numbered by path
    (tmp_path / "other").mkdir()
    twins = [write_jsonl(tmp_path / folder / "twin.jsonl", [rows[1], rows[1]])
             for folder in ("data", "other")]
    ids = [item.id for item in iter_examples(twins, tiny_tokenizer)]
    assert len(set(ids)) == 4 and ids[3].endswith(f"#{twins[1]}:2")
    with_ids = [dict(row, id=f"r{i}") for i, row in enumerate(rows[1:3])]
    write_jsonl(tmp_path / "a.jsonl", with_ids)
    write_jsonl(tmp_path / "b.jsonl", with_ids[1:])
    *_, repeat = iter_examples([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tiny_tokenizer,
                               on_bad="skip")
    assert isinstance(repeat, Rejection) and repeat.path.endswith("b.jsonl")
    assert repeat.reason == f"duplicate id 'r1' (first on {tmp_path / 'a.jsonl'}, line 2)"


def test_data_names_that_give_no_file_or_mix_splits_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError,
                       match=r"is a folder with no .jsonl, .ndjson \(or either .gz\) or .parquet"):
        resolve_data(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no file matches this pattern"):
        resolve_data(str(tmp_path / "empty" / "*.jsonl"))
    with pytest.raises(DataError, match="no such file$"):
        resolve_data(str(tmp_path / "missing.jsonl"))
    splits = tmp_path / "splits"
    splits.mkdir()
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
        (splits / name).write_bytes(b"")
    for name in (str(splits), str(splits / "*"), str(tmp_path / "*" / "*.parquet")):
        with pytest.raises(DataError, match=r"several splits: test \(1 file\), train \(1 "
                                            r"file\); name the files of one, e.g. --data "
                                            r"'.*splits/train-\*'.*join them into one file"):
            resolve_data(name)
    with pytest.raises(DataError, match=r"e.g. --data '.*splits/test-\*'"):
        resolve_data(str(splits), prefer_split="test")  # (eval's)
    with pytest.raises(DataError, match="several splits"):  # as the shell expands splits/*
        resolve_data([str(path) for path in sorted(splits.iterdir())])
    # no pattern names just the train files: all of them are named (the hint named the first)
    for name in ("gsm8k_train.parquet", "train-00000-of-00002.parquet"):
        (splits / name).write_bytes(b"")
    (splits / "train-00000-of-00001.parquet").rename(splits / "train-00001-of-00002.parquet")
    train = [splits / name for name in ("gsm8k_train.parquet", "train-00000-of-00002.parquet",
                                        "train-00001-of-00002.parquet")]
    with pytest.raises(DataError) as refused:
        resolve_data(str(splits))
    assert ("several splits: test (1 file), train (3 files); name the files of one, e.g. "
            + " ".join(f"--data {path}" for path in train) + "; ") in str(refused.value)
    # Hugging Face's names: the split is the shards' prefix; else the name's last split word
    assert [split_of(Path(name)) for name in (
        "train_sft-00000-of-00003.parquet", "test_gen-00001-of-00002.parquet",
        "gsm8k_train.jsonl", "Training.jsonl", "unit_test_generation-train.jsonl",
        "contest.jsonl", "retrain.jsonl", "heldout/x.jsonl", "data.parquet")] == [
        "train_sft", "test_gen", "train", "train", "train", None, None, "held-out", None]
    write_jsonl(tmp_path / "a.jsonl", DEMO_ROWS[:1])
    with pytest.raises(DataError, match="a.jsonl: named twice in --data"):
        resolve_data([str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl")])


def test_rows_without_tools_or_with_both_sharegpt_layouts_are_read(tiny_tokenizer, tmp_path):
    """A Parquet column mixing {from, value} and {role, content} turns gives every turn all four
    keys, the other kind's null; `tools` that define nothing are no tools; and named columns
    build their own prompt, whatever `tools` the row has."""
    plain = {"messages": [_user("Q"), _assistant("A")]}
    both = [{"from": None, "value": None, "role": "user", "content": "Q"},
            {"from": "gpt", "value": "A", "role": None, "content": None}]
    rows = [plain, {"conversations": both}, dict(plain, tools="{}"), dict(plain, tools=False),
            dict(plain, tools=[]), dict(plain, tool_calls=None)]
    first, *others = read_all(tiny_tokenizer, tmp_path, rows)
    for other in others:
        assert (other.input_ids, other.answer_mask) == (first.input_ids, first.answer_mask)
    named = [{"question": "Q", "answer": "A", "tools": ["calculator"]}]
    (example,) = iter_examples(write_jsonl(tmp_path / "named.jsonl", named), tiny_tokenizer,
                               FieldSpec("question", "answer"))
    assert (example.input_ids, example.answer_mask) == (first.input_ids, first.answer_mask)


def test_a_rejected_line_that_is_not_utf8_keeps_its_bytes_byte_order_mark_and_all(tmp_path):
    import base64

    from minorsft.row_reading import read_rows

    line = codecs.BOM_UTF8 + b'{"prompt": "caf\xe9", "response": "x"}'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(line + b"\r\n")
    (row,) = read_rows(path)
    record = Rejection(str(path), row.line, None, row.error.reason, row.text, row.error,
                       row.raw_bytes).as_dict()
    assert base64.b64decode(record["raw_base64"]) == line
    assert record["raw"] == '{"prompt": "caf\ufffd", "response": "x"}'


# Qwen3.5's way: the generation prompt opens an (empty) thinking block, which earlier assistant
# turns are written without; the last turn is written with it.
THINKING_LAST = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if loop.last and message['role'] == 'assistant' -%}{{- '<think></think>' -}}"
    "{%- endif -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think></think>' -}}"
    "{%- endif -%}"
)


def test_train_turns_last_trains_the_last_answer_and_lets_qwen35_chats_through(tmp_path):
    """A multi-turn chat under a template that writes earlier turns without the thinking block
    its generation prompt opens (Qwen3.5's) was refused whole; with --train-turns last the
    earlier turns are prompt and only the last trained turn is answer."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = THINKING_LAST
    chat = [_user("Hi"), _assistant("Hello"), _user("Again?"), _assistant("Yes")]
    rows = [{"messages": chat}, {"prompt": chat[:1], "completion": chat[1:]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    every = list(iter_examples(path, tokenizer, on_bad="skip"))
    assert all(isinstance(row, Rejection) for row in every)
    assert "split the conversation after each assistant turn; its last turn can be trained " \
        "alone, the earlier ones as prompt, with --train-turns last" in every[0].reason
    last, trl = iter_examples(path, tokenizer, FieldSpec(train_turns="last"))
    assert answer_text(tokenizer, last) == "Yes<|im_end|>"
    assert (trl.input_ids, trl.answer_mask) == (last.input_ids, last.answer_mask)
    plain = build_tiny_tokenizer()  # (ChatML: every turn trained by default)
    marked = {"messages": [*chat[:3], _assistant("Yes", weight=0)]}
    path = write_jsonl(tmp_path / "plain.jsonl", [rows[0], marked])
    both, _ = iter_examples(path, plain)
    one, before_marked = iter_examples(path, plain, FieldSpec(train_turns="last"))
    assert both.input_ids == one.input_ids and answer_text(plain, one) == "Yes<|im_end|>"
    assert answer_text(plain, both) == "Hello<|im_end|>Yes<|im_end|>"
    assert answer_text(plain, before_marked) == "Hello<|im_end|>"  # the last one trained
    with pytest.raises(ValueError, match="--train-turns must be one of all, last"):
        FieldSpec(train_turns="first")


def test_an_empty_assistant_turn_that_is_prompt_is_context_and_an_empty_answer_is_refused(
        tmp_path):
    """Only an answer must say something: an empty assistant turn before the last with
    --train-turns last, marked weight 0, or in a TRL prompt is prompt (it was refused as
    "empty answer"); an empty turn that trains is refused, naming its field."""
    tokenizer = build_tiny_tokenizer()
    chat = [_user("Hi"), _assistant(""), _user("Again?"), _assistant("Yes")]
    rows = [{"messages": chat},
            {"messages": [chat[0], _assistant(" ", weight=0), *chat[2:]]},
            {"prompt": chat[:3], "completion": chat[3:]},
            {"messages": [*chat[:3], _assistant("")]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    every = list(iter_examples(path, tokenizer, on_bad="skip"))
    assert [(row.field, row.reason) for row in every if isinstance(row, Rejection)] == [
        ("messages[1].content", "empty answer")] * 2
    last, marked, trl, empty_last = iter_examples(path, tokenizer, FieldSpec(train_turns="last"),
                                                  on_bad="skip")
    for example in (last, marked, trl):
        assert answer_text(tokenizer, example) == "Yes<|im_end|>"
    assert last.input_ids == trl.input_ids
    assert tokenizer.decode(last.input_ids).count("<|im_start|>assistant\n<|im_end|>") == 1
    assert isinstance(empty_last, Rejection) and empty_last.field == "messages[3].content"


def test_the_one_pass_answer_mask_equals_testing_every_span():
    """`_overlaps` (a pointer into the sorted spans) marks a token exactly when it covers text
    of some span: random offsets with empty tokens, tokens sharing offsets (a character's bytes
    split over tokens), touching and overlapping spans, offsets out of order."""
    def every_span(offsets, spans):
        return [start < stop and any(start < s_stop and stop > s_start
                                     for s_start, s_stop in spans) for start, stop in offsets]

    rng = random.Random(0)
    kinds = {"in order": 0, "out of order": 0}
    for _ in range(5000):
        position, offsets = 0, []
        for _ in range(rng.randint(1, 30)):
            start = position + rng.choice([0, 0, 1, 2])
            stop = start + rng.choice([0, 1, 2, 3])
            offsets.append((start, stop))
            position = start if rng.random() < 0.3 else stop
        shuffled = rng.random() < 0.1
        if shuffled:
            rng.shuffle(offsets)
        kinds["out of order" if shuffled else "in order"] += 1
        spans = [(start, start + rng.randint(0, 8))
                 for start in (rng.randint(0, position + 3) for _ in range(rng.randint(0, 4)))]
        assert _overlaps(offsets, spans) == every_span(offsets, spans), (offsets, spans)
    assert min(kinds.values()) > 100


def test_tokenizing_rows_in_batches_gives_what_one_at_a_time_gives(tiny_tokenizer, tmp_path):
    """classify_rows renders rows one by one and tokenizes their texts `batch_rows` at a time:
    the same items in the same order for any batch size, over good rows, bad ones, duplicate
    ids, rows truncated to no answer, rows another shard takes, and two files."""
    import gzip

    bad = ['{"prompt": "x"', {"id": "a", "prompt": "q", "response": "r"},
           {"prompt": "q", "response": ""}, {"prompt": "w " * 40, "response": "long prompt"}]
    first = write_jsonl(tmp_path / "one.jsonl", [*DEMO_ROWS, *bad] * 3)
    second = tmp_path / "two.jsonl.gz"
    second.write_bytes(gzip.compress(write_jsonl(
        tmp_path / "plain.jsonl", [dict(row, id=f"2-{row['id']}") for row in DEMO_ROWS])
        .read_bytes()))

    def items(batch_rows, workers=None):
        found = []
        for index, item in classify_rows([first, second], tiny_tokenizer, FieldSpec(), 30,
                                         select=lambda i: i % 5 != 3, batch_rows=batch_rows,
                                         workers=workers):
            found.append((index, type(item).__name__, getattr(item, "id", None),
                          getattr(item, "input_ids", None), getattr(item, "answer_mask", None),
                          getattr(item, "truncated", None), getattr(item, "file", None),
                          getattr(item, "field", None), getattr(item, "reason", None)))
        return found

    one_at_a_time = items(1)
    kinds = {kind for _, kind, *_ in one_at_a_time}
    assert kinds == {"Example", "Rejection", "NoneType"}
    assert any("truncated to zero tokens" in (entry[-1] or "") for entry in one_at_a_time)
    assert any(entry[2] and entry[2].startswith("2-") for entry in one_at_a_time)
    assert any("duplicate id" in (entry[-1] or "") for entry in one_at_a_time)
    for batch_rows in (2, 5, 64):
        assert items(batch_rows) == one_at_a_time
    with RowWorkers(2, tiny_tokenizer) as workers:  # (`precompute --tokenize-workers`)
        for batch_rows in (1, 5, 64):
            assert items(batch_rows, workers) == one_at_a_time


def test_rows_read_before_a_cut_off_file_come_before_its_error(tiny_tokenizer, tmp_path):
    import gzip

    rows = [dict(row, id=f"{row['id']}{n}") for n in range(10) for row in DEMO_ROWS]
    packed = write_jsonl(tmp_path / "rows.jsonl", rows).read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    compressed = gzip.compress(packed)
    cut.write_bytes(compressed[: len(compressed) * 3 // 4])  # a download that stopped

    def read(batch_rows, workers=None):
        got = []
        with pytest.raises(DataError, match="cut.jsonl.gz"):
            for _, item in classify_rows(cut, tiny_tokenizer, batch_rows=batch_rows,
                                         workers=workers):
                got.append(item.id)
        return got

    before_the_cut = read(1)
    assert 0 < len(before_the_cut) < len(rows)
    assert read(64) == before_the_cut
    with RowWorkers(2, tiny_tokenizer) as workers:
        assert read(3, workers) == before_the_cut


def test_row_workers_stop_with_their_reader_and_refuse_another_tokenizer(tiny_tokenizer,
                                                                         tmp_path):
    rows = [dict(row, id=f"{row['id']}{n}") for n in range(100) for row in DEMO_ROWS]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with RowWorkers(2, tiny_tokenizer) as workers:
        processes = list(workers._pool._processes.values())
        assert len(processes) == 2 and all(process.is_alive() for process in processes)
        reader = classify_rows(data, tiny_tokenizer, batch_rows=4, workers=workers)
        assert next(reader)[0] == 0
        reader.close()  # as precompute's read-ahead does when a row stops the run
        # the workers are free again: a second read gives every row
        assert len(list(classify_rows(data, tiny_tokenizer, workers=workers))) == len(rows)
        with pytest.raises(ValueError, match="another tokenizer"):
            next(classify_rows(data, build_tiny_tokenizer(), workers=workers))
    assert not any(process.is_alive() for process in processes)


class TwoArguments(Exception):  # as jinja2's TemplateSyntaxError(message, lineno)
    def __init__(self, message, line):
        super().__init__(f"{message} (line {line})")


@pytest.mark.parametrize("error", [RuntimeError("a bug while rendering r9"),
                                   TwoArguments("a bug while rendering r9", 3)])
def test_an_error_in_a_worker_comes_where_in_one_process_with_nothing_after(
        tiny_tokenizer, tmp_path, monkeypatch, error):
    """Not a bad row (those are rejections) but a bug: in one process it stops the rows at its
    batch. With workers, the batches after it must not come first (precompute would record a
    part without the failed batch's rows as done), and an exception the parent cannot rebuild
    must still say what it was."""
    import minorsft.data as data

    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"id": f"r{i}", "prompt": f"q {i}", "response": f"a {i}"} for i in range(40)])
    real = data._render_row

    def buggy(item, *args):
        if item.example_id == "r9":  # in the third batch of 4
            raise error
        return real(item, *args)

    monkeypatch.setattr(data, "_render_row", buggy)  # (before the fork: the workers have it)

    def read(workers):
        got = []
        with pytest.raises(Exception, match="a bug while rendering r9") as raised:
            for index, _ in classify_rows(rows, tiny_tokenizer, batch_rows=4, workers=workers):
                got.append(index)
        return got, raised.type

    assert read(None) == (list(range(8)), type(error))
    with RowWorkers(2, tiny_tokenizer) as workers:
        got, kind = read(workers)
        assert got == list(range(8))
        assert kind is (RuntimeError if isinstance(error, TwoArguments) else type(error))
        # the workers go on working (rows without r9)
        others = write_jsonl(tmp_path / "others.jsonl", [
            {"id": f"s{i}", "prompt": f"q {i}", "response": f"a {i}"} for i in range(40)])
        assert len(list(classify_rows(others, tiny_tokenizer, workers=workers))) == 40


def test_workers_that_cannot_all_start_leave_none_behind(tiny_tokenizer, monkeypatch):
    """A fork refused (a pids limit) after the first succeeded: the one started must not wait
    for work forever (the interpreter would hang at exit joining it)."""
    import multiprocessing
    import os

    real_fork, forks = os.fork, []

    def fork():
        forks.append(1)
        if len(forks) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    with pytest.raises(BlockingIOError):
        RowWorkers(2, tiny_tokenizer)
    assert len(forks) == 2
    assert multiprocessing.active_children() == []


def test_tokenize_workers_default_to_none_on_the_cpu_and_half_the_cores_on_a_gpu(monkeypatch):
    import minorsft.row_workers as row_workers

    for cores, expected in ((1, 0), (2, 1), (16, 8), (64, 8)):
        monkeypatch.setattr(row_workers.os, "sched_getaffinity", lambda _, n=cores: range(n),
                            raising=False)
        assert row_workers.auto_workers(on_gpu=False) == 0
        assert row_workers.auto_workers(on_gpu=True) == expected


def test_a_data_error_crosses_processes_whole():
    error = DataError("rows.jsonl", 3, "messages[1].content", "empty answer")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.line, copy.field, copy.reason, str(copy)) == (
        error.path, error.line, error.field, error.reason, str(error))


def _chat(*contents: str, system: str | None = None) -> list[dict]:
    """User and assistant turns alternating, from the user: (user, assistant, user, ...)."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user" if number % 2 == 0 else "assistant", "content": content}
                   for number, content in enumerate(contents)]


ONE_RENDER_CHATS = [
    _chat("2 plus 3", "5", "times 2", "10", "minus 1", "9", system="Be brief."),
    _chat("a", "5", "b", "5", "c", "5"),  # the same answer thrice
    _chat("a", "  padded\n", "b", "plain", "c", "\nlast "),  # what trimming templates change
    _chat("a", "<think>add</think>5", "b", "<think>double</think>10"),  # reasoning moved out
    _chat("a", "", "b", "x"),  # an empty answer
    _chat("a", "assistant\n", "b", "<|im_start|>user\n"),  # contents that look like markup
    [{"role": "assistant", "content": "first"}, *_chat("then", "second")],
    [*_chat("a", "one"), {"role": "assistant", "content": "two"}, *_chat("b", "three")[1:]],
]
ONE_RENDER_TEMPLATES = [CHATML, DEFAULT_SYSTEM_TEMPLATE, THINKING_TEMPLATE, SPACE_BEFORE_TEMPLATE,
                        END_OF_CONVERSATION_EOS_TEMPLATE, SPACE_IN_PROMPT_TEMPLATE,
                        THINKING_AFTER_LAST_USER_TEMPLATE, SYSTEM_IN_LAST_USER_TEMPLATE,
                        REASONING_TEMPLATE, THINKING_IN_LAST_TURN_TEMPLATE]


def _rendered_or_refused(tokenizer, messages, trained):
    from minorsft.answer_spans import render_conversation

    try:
        return render_conversation(tokenizer, messages, trained=trained)
    except ValueError as error:
        return type(error).__name__, str(error)


@pytest.mark.parametrize("template", range(len(ONE_RENDER_TEMPLATES)))
def test_answers_found_from_one_render_are_those_found_turn_by_turn(template, monkeypatch):
    """0.9.1 finds every answer's content from one render with a probe in each place, where
    the template writes the conversation the same whatever the contents; turn by turn (a render
    of the whole chat per turn) is how it was found before, and where that check fails."""
    import minorsft.answer_spans as answer_spans

    tokenizer = tokenizer_with_template(ONE_RENDER_TEMPLATES[template])
    one_render = answer_spans._content_places
    for messages in ONE_RENDER_CHATS:
        answered = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for trained in (None, [i == answered[-1] for i in range(len(messages))],
                        [i != answered[-1] for i in range(len(messages))]):
            monkeypatch.setattr(answer_spans, "_content_places", one_render)
            found = _rendered_or_refused(tokenizer, messages, trained)
            monkeypatch.setattr(answer_spans, "_content_places", lambda *_: {})
            assert found == _rendered_or_refused(tokenizer, messages, trained), (
                messages, trained)


def test_one_render_finds_plain_contents_and_leaves_changed_ones_to_each_turn():
    from minorsft.answer_spans import _content_places, _render

    def places(template, messages):
        tokenizer = tokenizer_with_template(template)

        def render(some, generation_prompt):
            return _render(tokenizer, some, generation_prompt)

        answered = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        return _content_places(render, messages, answered, render(messages, False))

    chat = ONE_RENDER_CHATS[0]
    found = places(CHATML, chat)
    text = tokenizer_with_template(CHATML).apply_chat_template(chat, tokenize=False)
    assert {index: text[start:stop] for index, (start, stop) in found.items()} == {
        2: "5", 4: "10", 6: "9"}
    assert places(THINKING_AFTER_LAST_USER_TEMPLATE, chat).keys() == {2, 4, 6}
    # a content the template trims, and reasoning it moves out: each turn alone
    assert places(THINKING_TEMPLATE, ONE_RENDER_CHATS[2]) == {}
    assert places(REASONING_TEMPLATE, ONE_RENDER_CHATS[3]) == {}


def test_a_compressed_or_parquet_file_named_jsonl_is_named_for_what_it_is(tiny_tokenizer,
                                                                          tmp_path):
    """Read as text, such a file was "not valid UTF-8 (byte 0x8b at column 2)" at line 1, or,
    for Parquet, a hint about UTF-16 without a byte-order mark."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "2 plus 3?", "response": "5"}]
    plain = write_jsonl(tmp_path / "rows.jsonl", rows).read_bytes()
    (tmp_path / "gz.jsonl").write_bytes(gzip.compress(plain))
    (tmp_path / "twice.jsonl.gz").write_bytes(gzip.compress(gzip.compress(plain)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq.jsonl")
    expected = {"gz.jsonl": "not JSON Lines text: a gzip-compressed file (it starts with the "
                            "bytes 1f 8b); name it .jsonl.gz",
                "twice.jsonl.gz": "it is compressed twice",
                "pq.jsonl": "not JSON Lines text: a Parquet file (it starts with the bytes "
                            "50 41 52 31); name it .parquet"}
    for name, message in expected.items():
        with pytest.raises(DataError, match=re.escape(message)) as raised:
            list(iter_examples(tmp_path / name, tiny_tokenizer))
        assert str(raised.value).startswith(str(tmp_path / name))


# Phi-3's layout with its markers as text (a tokenizer without them, --chat-template): every
# turn ends "<|end|>\n", the conversation with the eos token after that.
PHI3_AS_TEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_a_turns_end_written_as_text_stops_at_its_line(tmp_path):
    """A turn that ends the chat ("<|end|>\\n<|endoftext|>") and one that goes on
    ("<|end|>\\n<|user|>") share "<|end|>\\n<|", which was answer; the last turn's ran on
    through the newline to the eos token."""
    tokenizer = tokenizer_with_template(PHI3_AS_TEXT_TEMPLATE)
    rows = [DEMO_ROWS[3], DEMO_ROWS[1]]
    texts = [answer_text(tokenizer, e) for e in iter_examples(
        write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer)]
    assert texts == ["5<|end|>10<|end|>", "He has 7 apples.<|end|>"]


def test_an_answer_token_that_runs_into_what_follows_is_found():
    from minorsft.answer_spans import answer_runs_on

    offsets = [(0, 3), (3, 6), (6, 9)]
    assert answer_runs_on(offsets, [(2, 5, 2)]) == 1  # "3-6" holds text after the answer's 5
    assert answer_runs_on(offsets, [(0, 6, 0)]) is None  # ends where a token ends
    assert answer_runs_on(offsets, [(0, 3, 0), (6, 8, 6)]) == 2


@pytest.mark.smollm2
def test_an_end_of_turn_marker_written_as_text_fused_with_the_next_header_gets_a_note(tmp_path):
    """Llama 3's layout with its markers as text (a tokenizer without them): SmolLM2's tokenizer
    writes "<|eot_id|><|start_header_id|>" with one "><" token, answer and header at once."""
    from rich.console import Console

    from minorsft.precompute import PrecomputeConfig, run_precompute

    template = tmp_path / "llama3.jinja"
    template.write_text(
        "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>"
        "\\n\\n' }}{% endif %}")
    data = write_jsonl(tmp_path / "rows.jsonl", [DEMO_ROWS[3]])
    console = Console(record=True, width=200)
    run_precompute(PrecomputeConfig(model="smollm2-135m-instruct", data=str(data),
                                    out=str(tmp_path / "cache"), chat_template=str(template),
                                    verify_sample=0), console)
    text = console.export_text()
    assert ("note: 1 cached row(s) have an answer whose last token also holds text the "
            "template writes after it (first: " in text and "line 1: '><')" in text), text
