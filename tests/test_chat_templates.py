"""--chat-template: a base model (a tokenizer without a template) through precompute, train,
verify and eval, and the ways a template is named and refused."""

from __future__ import annotations

import json
import shutil

import pytest
from rich.console import Console
from typer.testing import CliRunner

from minorsft.cache import CacheError, iter_rows, read_metadata
from minorsft.chat_templates import (
    CHATML,
    ChatTemplate,
    markers_not_in_vocabulary,
    read_chat_template,
)
from minorsft.cli import app
from minorsft.eval import EvalConfig, run_eval
from minorsft.models import ModelError, load_tokenizer
from minorsft.precompute import PrecomputeConfig, run_precompute
from minorsft.train import TrainConfig, run_train
from minorsft.verify import VerifyConfig, run_verify

from .conftest import CHATML as TEST_MODEL_TEMPLATE
from .conftest import demo_rows, write_jsonl

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def base_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its tokenizer's chat template removed, as a base model's."""
    folder = tmp_path_factory.mktemp("tiny-base") / "base"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" not in config  # (transformers 5 keeps it in chat_template.jinja)
    return folder


def _precompute(model, data, out, **settings):
    return run_precompute(PrecomputeConfig(model=str(model), data=str(data), out=str(out),
                                           verify_sample=0, **settings), QUIET)


def test_a_tokenizer_without_a_template_is_refused_with_the_way_out(base_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows(1))
    with pytest.raises(ModelError, match="no chat template.*--chat-template.*chatml"):
        _precompute(base_model_dir, data, tmp_path / "cache")


def test_chatml_on_a_base_model_caches_what_the_model_with_chatml_caches(
        tiny_model_dir, base_model_dir, tmp_path):
    """The built-in template renders as the test model's own ChatML template: same token ids,
    answer masks and reference log-probs (same weights), and the cache keeps the text."""
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows(2))
    _precompute(tiny_model_dir, data, tmp_path / "own")
    _precompute(base_model_dir, data, tmp_path / "given", chat_template="chatml")
    own, given = list(iter_rows(tmp_path / "own")), list(iter_rows(tmp_path / "given"))
    assert len(own) == len(given) == 8
    for a, b in zip(own, given, strict=True):
        assert (a["input_ids"], a["answer_mask"]) == (b["input_ids"], b["answer_mask"])
        assert b["ref_logps"] == pytest.approx(a["ref_logps"], abs=1e-4)
    metadata = read_metadata(tmp_path / "given")
    assert metadata["chat_template"] == {"given": "chatml", "text": CHATML}
    assert "chat_template" not in read_metadata(tmp_path / "own")
    own_fp = read_metadata(tmp_path / "own")["fingerprint"]
    assert metadata["fingerprint"]["chat_template"] != own_fp["chat_template"]  # (other text)
    assert metadata["fingerprint"]["weights"] == own_fp["weights"]


def test_train_verify_and_eval_use_the_caches_template(base_model_dir, tmp_path):
    """Train, verify and eval load the base model's tokenizer with the cache's template (it
    matches the cache's fingerprint), and the trained model is saved with it, so it evaluates
    with no --chat-template."""
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows(2))
    cache = tmp_path / "cache"
    _precompute(base_model_dir, data, cache, chat_template="chatml")
    history = run_train(TrainConfig(cache=str(cache), output=str(tmp_path / "run"),
                                    batch_size=4, max_steps=1), QUIET)
    assert abs(history[0]["m_theta"]) < 1e-5  # the policy's tokens are the cache's
    report = run_verify(VerifyConfig(cache=str(cache)), QUIET)
    assert report.rows > 0
    saved = load_tokenizer(str(tmp_path / "run"))
    assert saved.chat_template == CHATML
    trained = run_eval(EvalConfig(model=str(tmp_path / "run"), data=str(data)), QUIET)
    assert trained["heldout"]["rows"] == 8
    against_cache = run_eval(EvalConfig(model=str(base_model_dir), reference=str(cache)), QUIET)
    assert against_cache["heldout"]["m_theta"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ModelError, match="no chat template"):
        run_eval(EvalConfig(model=str(base_model_dir), data=str(data)), QUIET)
    given = run_eval(EvalConfig(model=str(base_model_dir), data=str(data),
                                chat_template="chatml"), QUIET)
    assert given["heldout"]["nll_per_token"] == pytest.approx(
        against_cache["heldout"]["nll_per_token"], rel=1e-5)


def test_a_resume_with_another_template_is_refused(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows(1))
    (tmp_path / "other.jinja").write_text(TEST_MODEL_TEMPLATE + "{# another #}")
    out = tmp_path / "cache"
    _precompute(tiny_model_dir, data, out, chat_template="chatml")
    with pytest.raises(CacheError, match="chat_template"):
        _precompute(tiny_model_dir, data, out, chat_template=str(tmp_path / "other.jinja"))


def test_templates_are_read_from_files_folders_and_tokenizer_configs(tiny_model_dir, tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text(TEST_MODEL_TEMPLATE)
    assert read_chat_template(str(jinja)) == ChatTemplate(TEST_MODEL_TEMPLATE,
                                                          f"--chat-template {jinja}")
    assert read_chat_template(str(tiny_model_dir)).text == TEST_MODEL_TEMPLATE
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}))
    assert read_chat_template(str(named)).text == "plain"
    assert read_chat_template(str(named / "tokenizer_config.json")).text == "plain"
    assert read_chat_template("chatml").text == CHATML


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jinja", "not a file, not a folder, and not a built-in"),
    (lambda d: (d / "empty.jinja").write_text("  \n") and d / "empty.jinja", "empty"),
    (lambda d: d, "the folder has no chat template"),
    (lambda d: (d / "x.json").write_text("[1]") and d / "x.json", "JSON object"),
    (lambda d: (d / "x.json").write_text("{}") and d / "x.json", "no chat template"),
])
def test_a_template_that_cannot_be_read_is_named(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ModelError, match=message) as raised:
        read_chat_template(str(path))
    assert str(raised.value).startswith(f"--chat-template {path}")


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", "cannot render.*TemplateSyntaxError"),
    ("{{ raise_exception('system only') }}", "cannot render.*system only"),
    ('{"a": 1}\n', "does not write the messages' content"),
])
def test_a_template_that_cannot_render_a_chat_is_refused_before_any_row(
        base_model_dir, tmp_path, template, message):
    (tmp_path / "t.jinja").write_text(template)
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows(1))
    with pytest.raises(ModelError, match=message) as raised:
        _precompute(base_model_dir, data, tmp_path / "cache",
                    chat_template=str(tmp_path / "t.jinja"))
    assert str(raised.value).startswith(f"--chat-template {tmp_path / 't.jinja'}")
    assert not (tmp_path / "cache").exists()


def test_chatml_markers_a_tokenizer_lacks_are_named():
    class Vocabulary:
        def __init__(self, tokens):
            self.tokens = tokens

        def get_vocab(self):
            return dict.fromkeys(self.tokens, 0)

    chatml = ChatTemplate(CHATML, "chatml")
    assert markers_not_in_vocabulary(Vocabulary(["<|im_start|>", "<|im_end|>"]), chatml) == []
    assert markers_not_in_vocabulary(Vocabulary(["<|im_end|>"]), chatml) == ["<|im_start|>"]
    assert markers_not_in_vocabulary(Vocabulary([]), ChatTemplate("{{ x }}", "f")) == []


def test_cli_precompute_takes_the_option_and_cache_info_names_it(base_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows(1))
    out = tmp_path / "cache"
    runner = CliRunner()
    result = runner.invoke(app, ["precompute", "--data", str(data), "--model",
                                 str(base_model_dir), "--out", str(out), "--chat-template",
                                 "chatml", "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["cache", "info", str(out)])
    assert info.exit_code == 0, info.output
    assert f"chat_template: --chat-template chatml ({len(CHATML)} characters" in info.output


def _base_model(folder, specials=("<|endoftext|>",), eos="<|endoftext|>", bos=None):
    """A tiny base model whose tokenizer has only `specials`, eos `eos`, and (given `bos`) puts
    `bos` before every text it encodes, as Llama's and Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .conftest import CORPUS, build_tiny_model

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=bos,
                                        unk_token=specials[0])
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def _answer_of(tokenizer, row) -> str:
    return tokenizer.decode([token for token, kept in zip(row["input_ids"], row["answer_mask"],
                                                          strict=True) if kept])


def test_chatml_on_a_tokenizer_without_its_markers_trains_them_as_text(tmp_path):
    """A base model whose vocabulary lacks <|im_start|> and <|im_end|> (as GPT-2's, Llama-3's):
    precompute says the markers are plain text, and the answer ends with <|im_end|>'s
    several tokens (the model's stop text), not with the newline after it."""
    folder, tokenizer = _base_model(tmp_path / "gpt-like-base")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2 plus 3", "response": "5"}])
    console = Console(record=True, width=200)
    run_precompute(PrecomputeConfig(model=str(folder), data=str(data), out=str(tmp_path / "c"),
                                    chat_template="chatml", verify_sample=0), console)
    assert ("the tokenizer has no token <|im_start|> or <|im_end|>: the template writes it as "
            "ordinary text") in console.export_text()
    (row,) = iter_rows(tmp_path / "c")
    assert _answer_of(tokenizer, row) == "5<|im_end|>"
    assert sum(row["answer_mask"]) > 2  # the marker is several tokens


def test_chatml_keeps_the_bos_token_a_llama_like_tokenizer_adds(tmp_path):
    """Rows are tokenized as the template writes them: the built-in ChatML began them without
    the <s> a Llama-like tokenizer puts before every text (the model saw it first in
    pretraining). A template file without it gets a note; one with it none."""
    folder, tokenizer = _base_model(tmp_path / "llama-like", ("<unk>", "<s>", "</s>"), "</s>",
                                    bos="<s>")
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2 plus 3", "response": "5"}])
    console = Console(record=True, width=300)
    run_precompute(PrecomputeConfig(model=str(folder), data=str(data), out=str(tmp_path / "c"),
                                    chat_template="chatml", verify_sample=0), console)
    (row,) = iter_rows(tmp_path / "c")
    assert row["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(row["input_ids"]).startswith("<s><|im_start|>user\n2 plus 3")
    assert "BOS" not in console.export_text()
    history = run_train(TrainConfig(cache=str(tmp_path / "c"), output=str(tmp_path / "run"),
                                    batch_size=1, max_steps=1), QUIET)
    assert abs(history[0]["m_theta"]) < 1e-5  # the cached text (with BOS) applied as it is
    for template, noted in ((CHATML, True), ("{{ bos_token }}" + CHATML, False)):
        (tmp_path / "t.jinja").write_text(template)
        console = Console(record=True, width=300)
        run_precompute(PrecomputeConfig(model=str(folder), data=str(data), overwrite=True,
                                        out=str(tmp_path / "c2"), verify_sample=0,
                                        chat_template=str(tmp_path / "t.jinja")), console)
        assert ("does not begin the text with the BOS token '<s>'" in console.export_text()
                ) == noted


def test_a_template_that_ends_answers_with_nothing_gets_a_note(tmp_path):
    """A template file that writes no end-of-turn marker and no eos after an answer trains a
    model that never learns to stop; precompute said nothing of it."""
    folder, _ = _base_model(tmp_path / "llama-like", ("<unk>", "<s>", "</s>"), "</s>",
                            bos="<s>")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2 plus 3", "response": "5"}])
    loop = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    for ending, noted in (("\n", True), ("{{ eos_token }}\n", False), ("\n### end\n", False)):
        (tmp_path / "t.jinja").write_text(loop + ending + "{% endfor %}")
        console = Console(record=True, width=400)
        run_precompute(PrecomputeConfig(model=str(folder), data=str(data), overwrite=True,
                                        out=str(tmp_path / "c"), verify_sample=0,
                                        chat_template=str(tmp_path / "t.jinja")), console)
        said = console.export_text()
        assert ("writes nothing after an assistant turn's content (no end-of-turn marker, no "
                "eos '</s>'): the model never learns to end an answer" in said) == noted, said
    # the built-in templates end their answers
    for name in ("chatml", "plain"):
        console = Console(record=True, width=400)
        run_precompute(PrecomputeConfig(model=str(folder), data=str(data), overwrite=True,
                                        out=str(tmp_path / "c"), verify_sample=0,
                                        chat_template=name), console)
        assert "writes nothing after" not in console.export_text()


@pytest.mark.parametrize("lora", [False, True])
def test_the_trained_model_stops_at_the_templates_end_of_turn(tmp_path, lora):
    """A Qwen-base-like model: <|im_end|> is a token, but its eos is <|endoftext|>. The model
    learns to end answers with <|im_end|>, so the saved generation config must stop there
    too (generate and vLLM read it), for the full model and the merged LoRA model."""
    from transformers import GenerationConfig

    folder, tokenizer = _base_model(tmp_path / "qwen-like",
                                    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2 plus 3", "response": "5"}] * 2)
    cache = tmp_path / "c"
    _precompute(folder, data, cache, chat_template="chatml")
    lora_options = {"lora_r": 4, "merge_lora": True} if lora else {}
    run_train(TrainConfig(cache=str(cache), output=str(tmp_path / "run"), batch_size=2,
                          max_steps=1, **lora_options), QUIET)
    saved = tmp_path / "run" / "merged" if lora else tmp_path / "run"
    stops = GenerationConfig.from_pretrained(saved).eos_token_id
    assert set(stops) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    if lora:  # merged again from the saved adapters (FSDP runs, --resume --merge-lora)
        from minorsft.lora import merge_saved_adapters

        again = merge_saved_adapters(tmp_path / "run", str(folder), load_tokenizer(str(saved)))
        assert set(GenerationConfig.from_pretrained(again).eos_token_id) == set(stops)


def test_a_models_own_template_stops_at_its_end_of_turn_too(tmp_path):
    """A base model whose own tokenizer has a ChatML template (Qwen2.5's base models) and whose
    eos is <|endoftext|>: the trained model stopped only there, running past the <|im_end|> it
    learned to end answers with (it was left as it was without --chat-template)."""
    folder, tokenizer = _base_model(tmp_path / "qwen-like",
                                    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    (folder / "chat_template.jinja").write_text(CHATML)
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2 plus 3", "response": "5"}] * 2)
    _precompute(folder, data, tmp_path / "c")
    run_train(TrainConfig(cache=str(tmp_path / "c"), output=str(tmp_path / "run"),
                          batch_size=2, max_steps=1), QUIET)
    saved = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tokenizer.eos_token_id,
                                     tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_odd_option_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--chat-template is empty"):
        PrecomputeConfig(model="m", data="d", out="o", chat_template=" ")
    with pytest.raises(ValueError, match="--chat-template is empty"):
        EvalConfig(model="m", choices=["x.csv"], chat_template="")
    big = tmp_path / "model.safetensors"
    with big.open("wb") as handle:
        handle.truncate(3 << 20)
    with pytest.raises(ModelError, match="3.0 MiB is no chat template"):
        read_chat_template(str(big))


def test_a_builtin_model_names_its_template():
    from minorsft.models import DEFAULT_MODEL, load_tokenizer, resolve_model

    own = load_tokenizer(resolve_model(DEFAULT_MODEL)).chat_template
    assert read_chat_template(DEFAULT_MODEL).text == own


def test_mismatch_messages_name_the_template(tiny_model_dir, base_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows(1))
    cache = tmp_path / "cache"
    _precompute(base_model_dir, data, cache, chat_template="chatml")
    (tmp_path / "other.jinja").write_text(CHATML + "{# other #}")
    with pytest.raises(CacheError, match="rendered with --chat-template chatml, which eval uses"):
        run_eval(EvalConfig(model=str(base_model_dir), reference=str(cache),
                            chat_template=str(tmp_path / "other.jinja")), QUIET)
    with pytest.raises(CacheError, match="the chat template differs from the cache's, which "
                                         "was --chat-template chatml"):
        _precompute(base_model_dir, data, cache, chat_template=str(tmp_path / "other.jinja"))
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    (other / "chat_template.jinja").write_text(CHATML)
    with pytest.raises(ValueError, match=r"different chat_template than --model.*give both one "
                                         "template with --chat-template"):
        run_eval(EvalConfig(model=str(tiny_model_dir), reference=str(other), data=str(data)),
                 QUIET)


def test_a_generation_config_transformers_would_not_save_changed_gets_a_note(tmp_path):
    """transformers validates a changed generation config strictly when saving: a base model's
    do_sample false with a temperature made the run fail at its save, after training."""
    from transformers import GenerationConfig

    folder, tokenizer = _base_model(tmp_path / "qwen-like",
                                    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    saved = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(
        dict(saved, do_sample=False, temperature=0.7)))
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2 plus 3", "response": "5"}] * 2)
    _precompute(folder, data, tmp_path / "c", chat_template="chatml")
    console = Console(record=True, width=400)
    run_train(TrainConfig(cache=str(tmp_path / "c"), output=str(tmp_path / "run"), batch_size=2,
                          max_steps=1), console)
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert GenerationConfig.from_pretrained(tmp_path / "run").eos_token_id == \
        tokenizer.eos_token_id
    text = " ".join(console.export_text().split())
    assert ("<|im_end|> (the template's end of turn) is not added to the saved "
            "generation_config.json's eos_token_id") in text


def test_an_end_of_turn_added_as_an_ordinary_token_is_a_stop_token_too(tmp_path):
    from tokenizers import AddedToken

    from minorsft.chat_templates import stop_at_end_of_turn

    from .conftest import build_tiny_model

    _, tokenizer = _base_model(tmp_path / "base")
    tokenizer.add_tokens([AddedToken("<|im_start|>", special=False),
                          AddedToken("<|im_end|>", special=False)])
    tokenizer.chat_template = CHATML
    model = build_tiny_model(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert stop_at_end_of_turn(model, tokenizer) is None
    assert model.generation_config.eos_token_id == [
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert stop_at_end_of_turn(model, tokenizer) is None  # (not added twice)
    assert len(model.generation_config.eos_token_id) == 2


def test_a_bos_of_im_start_is_not_doubled(tmp_path):
    folder, tokenizer = _base_model(tmp_path / "im-start-bos",
                                    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                                    bos="<|im_start|>")
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2 plus 3", "response": "5"}])
    _precompute(folder, data, tmp_path / "c", chat_template="chatml")
    (row,) = iter_rows(tmp_path / "c")
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>user\n")


def test_a_large_tokenizer_config_is_read(tmp_path):
    """tokenizer_config.json holds the added tokens too (over 1 MiB for Gemma's)."""
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": CHATML, "padding": "x" * (3 << 20)}))
    assert read_chat_template(str(config)).text == CHATML


def test_plain_trains_the_completion_and_eos_after_the_prompt_text(tmp_path):
    """`--chat-template plain`: TRL's string prompt/completion as plain text (the prompt's text
    then the completion's and eos), for base-model completion data; the answer is the
    completion and the eos, and the model's eos is already its stop token."""
    from transformers import GenerationConfig

    folder, tokenizer = _base_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Tom has 3 apples and buys 4 more, so he has", "completion": " 7 apples."}] * 2)
    _precompute(folder, data, tmp_path / "c", chat_template="plain")
    row = next(iter_rows(tmp_path / "c"))
    assert tokenizer.decode(row["input_ids"]) == \
        "Tom has 3 apples and buys 4 more, so he has 7 apples.<|endoftext|>"
    assert _answer_of(tokenizer, row) == " 7 apples.<|endoftext|>"
    run_train(TrainConfig(cache=str(tmp_path / "c"), output=str(tmp_path / "run"), batch_size=2,
                          max_steps=1), QUIET)
    assert GenerationConfig.from_pretrained(tmp_path / "run").eos_token_id == \
        tokenizer.eos_token_id


def test_plain_needs_an_eos_token(tmp_path):
    from minorsft.chat_templates import apply_chat_template

    from .conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ModelError, match="--chat-template plain: the tokenizer has no eos token"):
        apply_chat_template(tokenizer, read_chat_template("plain"))


def test_plain_scores_a_choice_letter_with_its_space(tmp_path):
    """Under `plain` the letter follows "Your answer is:" as text: a base model writes " A"
    there, and "A" (no space) got a small share of its probability (0.0013 of SmolLM2's)."""
    from minorsft.chat_templates import apply_chat_template
    from minorsft.eval import Question, choice_examples

    from .conftest import build_tiny_tokenizer

    question = Question("q1", 1, "What is 2 plus 3?", ("4", "5", "6", "7"), "B")
    tokenizer = build_tiny_tokenizer()
    own = [tokenizer.decode([t for t, m in zip(e.input_ids, e.answer_mask, strict=True) if m])
           for e in choice_examples(tokenizer, question)]
    assert own == ["A", "B", "C", "D"]  # ChatML: the letter opens the assistant turn
    apply_chat_template(tokenizer, read_chat_template("plain"))
    examples = choice_examples(tokenizer, question)
    scored = [tokenizer.decode([t for t, m in zip(e.input_ids, e.answer_mask, strict=True) if m])
              for e in examples]
    # (this tokenizer has no " A" token: the space stays prompt, as generation would see it)
    assert [text.strip() for text in scored] == ["A", "B", "C", "D"]
    assert tokenizer.decode(examples[1].input_ids).endswith("Your answer is: B<|im_end|>")


def test_a_template_that_wants_a_system_turn_still_gets_its_stop_token(tmp_path):
    """The end of turn was looked for in a user/assistant chat only: a template that raises
    without a system turn first left the saved stop tokens as they were, without a word."""
    from minorsft.chat_templates import stop_at_end_of_turn

    from .conftest import build_tiny_model

    _, tokenizer = _base_model(tmp_path / "base", ("<|endoftext|>", "<|im_start|>",
                                                   "<|im_end|>"))
    wants_system = ("{% if messages[0]['role'] != 'system' %}"
                    "{{ raise_exception('a system turn first') }}{% endif %}" + CHATML)
    model = build_tiny_model(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.chat_template = wants_system
    assert stop_at_end_of_turn(model, tokenizer) is None
    assert model.generation_config.eos_token_id == [
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # one that refuses both chats: said, not silent
    tokenizer.chat_template = "{{ raise_exception('never') }}"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    note = stop_at_end_of_turn(model, tokenizer)
    assert note is not None and "end-of-turn token could not be found" in note
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
