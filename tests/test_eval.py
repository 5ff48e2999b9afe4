"""`minorsft eval`: held-out NLL, m_theta against a reference, multiple-choice accuracy."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from minorsft.cli import app
from minorsft.data import DataError
from minorsft.engines.hf import TransformersEngine
from minorsft.eval import (
    LETTERS,
    EvalConfig,
    Question,
    choice_examples,
    choice_file_labels,
    choice_logps,
    choice_metrics,
    format_table,
    json_safe,
    read_choices,
    run_eval,
)
from minorsft.logprobs import pad_batch, sequence_logps
from minorsft.precompute import PrecomputeConfig, run_precompute

from .conftest import CHATML, build_tiny_tokenizer, write_jsonl

# Four questions with known answers; quoted cells hold commas, as in the real MMLU files.
CHOICES_CSV = (
    'What is 2 + 2?,3,4,5,22,B\n'
    '"Which city is the capital of France, the country?",Berlin,Madrid,Paris,Rome,C\n'
    'What colour is a clear daytime sky?,Blue,Green,Red,Black,A\n'
    'How many legs does a spider have?,Two,Four,Six,Eight,D\n'
)


@pytest.fixture
def choices_csv(tmp_path):
    path = tmp_path / "easy.csv"
    path.write_text(CHOICES_CSV, encoding="utf-8")
    return path


def _full_logits_choice_logps(model_dir, tokenizer, questions):
    """Independent route: full [B, T, V] logits of each prompt+letter sequence, letter only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for question in questions:
        examples = choice_examples(tokenizer, question)
        ids, attention, mask = pad_batch([e.input_ids for e in examples],
                                         [e.answer_mask for e in examples],
                                         tokenizer.pad_token_id, torch.device("cpu"))
        with torch.no_grad():
            rows.append(sequence_logps(model(input_ids=ids, attention_mask=attention).logits,
                                       ids, mask).tolist())
    return rows


def test_read_choices_csv(choices_csv):
    questions = read_choices(choices_csv)
    assert [q.answer for q in questions] == ["B", "C", "A", "D"]
    assert questions[1].question == "Which city is the capital of France, the country?"
    assert questions[1].options == ("Berlin", "Madrid", "Paris", "Rome")
    prompt = questions[0].prompt()
    assert prompt.startswith("You need to choose one of the four options A, B, C, and D")
    assert "The question content is: What is 2 + 2? The four options are: A. 3 B. 4 C. 5 D. 22 " \
           "Your answer is:" in prompt


def test_read_choices_jsonl(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 2})
                    + "\n" + json.dumps({"question": "q2", "A": "a", "B": "b", "C": "c",
                                         "D": "d", "answer": "d"}) + "\n")
    assert [q.answer for q in read_choices(path)] == ["C", "D"]


@pytest.mark.parametrize("text, line, field", [
    ("q,a,b,c,d,B\nq,a,b,c,d,E\n", 2, "answer"),
    ("q,a,b,c,d,B\nq,a,b,c\n", 2, None),
    # a quoted cell over three lines (as in MMLU's code questions): the bad row starts on text
    # line 4, which an editor shows (it was named as row 2)
    ('"def f():\n    return 1\n",a,b,c,d,B\nq,a,b,c,d,E\n', 4, "answer"),
    ("\nq,a,b,c,d,B\n\nq,a,b,c,d,E\n", 4, "answer"),  # blank lines count too
    ("q,a,b,c,d,B\nq2,,,,,A\n", 2, "A"),  # empty cells were scored as options
    (",a,b,c,d,B\n", 1, "question"),
])
def test_read_choices_bad_rows_name_line_and_field(tmp_path, text, line, field):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        read_choices(path)
    assert (caught.value.line, caught.value.field) == (line, field)
    assert str(path) in str(caught.value)


def test_jsonl_missing_answers_and_repeated_ids_are_named(tmp_path):
    path = tmp_path / "q.jsonl"
    row = {"question": "q", "choices": ["a", "b", "c", "d"]}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="'answer': missing"):
        read_choices(path)
    path.write_text(json.dumps({**row, "id": 7, "answer": "A"}) + "\n"
                    + json.dumps({**row, "id": 7, "answer": "B"}) + "\n")
    with pytest.raises(DataError, match=r":2: field 'id': duplicate id '7' \(first on line 1\)"):
        read_choices(path)
    header_only = tmp_path / "header.csv"
    header_only.write_text("question,A,B,C,D,answer\n")
    with pytest.raises(DataError, match=r"no questions \(only the header row\)"):
        read_choices(header_only)


@pytest.mark.parametrize("record, field, message", [
    ({"question": "q", "A": "1", "B": 2, "C": "3", "D": "4", "answer": "B"}, "B",
     "an option must be a string, got 2 (write \"2\": the prompt shows it as text)"),
    ({"question": "q", "choices": ["x", "y", None, "z"], "answer": "A"}, "choices[2]",
     "an option must be a string, got None"),
])
def test_jsonl_options_that_are_not_text_are_named(tmp_path, record, field, message):
    """A numeric option under "B" was reported as field 'choices', which the row did not have."""
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as caught:
        read_choices(path)
    assert (caught.value.line, caught.value.field) == (1, field)
    assert message in str(caught.value)


def _strict_json(text: str):
    """json.loads, but refusing NaN and Infinity (which Python's json accepts by default)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl"])
def test_empty_choices_file_is_an_error_naming_it(tiny_model_dir, tmp_path, name):
    path = tmp_path / name
    path.write_text("\n")
    with pytest.raises(DataError, match="no questions"):
        read_choices(path)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--choices",
                                      str(path), "--json"])
    assert result.exit_code == 2
    assert f"{name}: no questions" in " ".join(result.output.split())


def test_empty_or_bad_heldout_data_is_an_error_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """A bad held-out row stopped eval only after the model had loaded (minutes for a 7B)."""
    import minorsft.eval as eval_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were read")

    monkeypatch.setattr(eval_module, "TransformersEngine", no_model)
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="no rows"):
        run_eval(EvalConfig(model=str(tiny_model_dir), data=str(path)))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "2 plus 3", "response": "5"},
                                               {"prompt": "4 plus 4"}])
    with pytest.raises(DataError, match="bad.jsonl:2: field 'response': missing"):
        run_eval(EvalConfig(model=str(tiny_model_dir), data=str(bad)))


def test_json_safe_maps_non_finite_numbers_to_null():
    value = {"a": math.nan, "b": [1.5, -math.inf], "c": {"d": math.inf, "e": 2}, "f": "x"}
    assert json_safe(value) == {"a": None, "b": [1.5, None], "c": {"d": None, "e": 2}, "f": "x"}


def test_cli_eval_json_has_no_nan_or_infinity(tiny_model_dir, demo_jsonl, monkeypatch):
    """An answer the model gives probability 0 (log-prob -inf) makes the NLL infinite and
    m_theta NaN; --json then wrote Infinity / NaN, which JSON parsers reject."""
    monkeypatch.setattr(TransformersEngine, "score",
                        lambda self, examples: [-math.inf] * len(examples))
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir),
        "--data", str(demo_jsonl), "--max-rows", "2", "--json"])
    assert result.exit_code == 0, result.output
    held = _strict_json(result.stdout)["heldout"]
    assert held["nll_per_token"] is None and held["m_theta"] is None
    assert "| NLL per answer token | n/a |" in format_table({"heldout": held})


def test_a_json_out_that_fails_to_write_loses_no_result(tiny_model_dir, demo_jsonl, tmp_path,
                                                       monkeypatch):
    """Written before the table was printed, outside the error handling: a full disk at the end
    lost the whole evaluation in a traceback."""
    from pathlib import Path

    target = tmp_path / "result.json"
    real_write = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self == target:
            raise OSError(28, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model_dir), "--data", str(demo_jsonl), "--max-rows", "2",
        "--json-out", str(target)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "NLL per answer token" in text  # the table, printed before the failed write
    assert "cannot write it (No space left on device); the result is printed above" in text


def test_choice_file_labels_are_stems_unless_stems_repeat():
    assert choice_file_labels(["mmlu/geo.csv", "mmlu/facts.jsonl"]) == {
        "mmlu/geo.csv": "geo", "mmlu/facts.jsonl": "facts"}
    assert choice_file_labels(["a/test.csv", "b/test.csv", "c/other.csv"]) == {
        "a/test.csv": "a/test.csv", "b/test.csv": "b/test.csv", "c/other.csv": "other"}


def test_choices_files_with_one_stem_keep_separate_results(tiny_model_dir, choices_csv):
    """mc.csv and mc.jsonl (or two test.csv in different folders) once shared one key, so the
    second file's result replaced the first's while `overall` still counted both."""
    jsonl = choices_csv.with_suffix(".jsonl")
    jsonl.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0})
                     + "\n")
    result = run_eval(EvalConfig(model=str(tiny_model_dir),
                                 choices=[str(choices_csv), str(jsonl)]))["choices"]
    assert result["overall"]["questions"] == 5
    assert {name: m["questions"] for name, m in result["files"].items()} == {
        str(choices_csv): 4, str(jsonl): 1}


def test_csv_header_of_the_layout_is_skipped(tmp_path):
    path = tmp_path / "with_header.csv"
    path.write_text("Question,A,B,C,D,Answer\n" + CHOICES_CSV)
    questions = read_choices(path)
    assert [q.answer for q in questions] == ["B", "C", "A", "D"]
    assert questions[0].line == 2  # rows are still named as a spreadsheet shows them


def test_excel_csv_utf8_with_a_byte_order_mark_is_read(tmp_path):
    # Excel's "CSV UTF-8" starts with a byte-order mark; read as plain UTF-8 it made the header
    # "\ufeffquestion,...", which was refused with "is the first row a header?".
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + ("question,A,B,C,D,answer\r\n" + CHOICES_CSV).encode())
    assert [q.answer for q in read_choices(path)] == ["B", "C", "A", "D"]
    jsonl = tmp_path / "excel.jsonl"
    row = {"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 2}
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    assert [q.answer for q in read_choices(jsonl)] == ["C"]


@pytest.mark.parametrize("name", ["latin1.csv", "latin1.jsonl"])
def test_choices_file_not_in_utf8_names_the_file_and_byte(tmp_path, name):
    path = tmp_path / name
    text = ('q1,a,b,c,d,A\nCaf\xe9?,a,b,c,d,B\n' if name.endswith(".csv") else
            '{"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 0}\n'
            '{"question": "Caf\xe9?", "choices": ["a", "b", "c", "d"], "answer": 1}\n')
    path.write_bytes(text.encode("latin-1"))
    offset = text.index("\xe9")
    with pytest.raises(DataError) as caught:  # was a bare "'utf-8' codec can't decode" error
        read_choices(path)
    assert str(caught.value) == (f"{path}: not valid UTF-8: byte 0xe9 at byte offset {offset} "
                                 "(line 2); save the file as UTF-8 (in Excel: CSV UTF-8)")


@pytest.mark.parametrize("header", ["question,option A,option B,option C,option D,answer",
                                    "id,question,A,B,C,D,answer"])
def test_other_csv_header_gets_a_hint(tmp_path, header):
    path = tmp_path / "other_header.csv"
    path.write_text(header + "\n" + CHOICES_CSV)
    with pytest.raises(DataError, match="is the first row a header") as caught:
        read_choices(path)
    assert caught.value.line == 1


def test_csv_bad_answer_without_header_look_gets_no_hint(tmp_path):
    path = tmp_path / "typo.csv"
    path.write_text("What is 2 + 2?,3,4,5,22,F\n")
    with pytest.raises(DataError) as caught:
        read_choices(path)
    assert caught.value.field == "answer" and "header" not in str(caught.value)


def test_an_unclosed_csv_quote_gets_a_hint(tmp_path):
    """A quote opened and not closed makes the rest of the file one cell: "got 1 column"
    alone did not say why."""
    path = tmp_path / "unclosed.csv"
    path.write_text('What is 2 + 2?,3,4,5,22,B\n"What is 3 + 3?,5,6,7,8,B\nWhy?,a,b,c,d,A\n')
    with pytest.raises(DataError) as caught:
        read_choices(path)
    assert caught.value.line == 2
    assert str(caught.value).endswith(
        "got 1; a cell holds commas: a quote (\") opened on line 2 is not closed where it "
        "should be, so the text up to line 3 was read as one cell")
    # a well-quoted cell with commas in a row of too few columns, mid-file: no quote hint
    path.write_text('"What is 1,000 + 1?",1001,2,3,A\nWhat is 2 + 2?,3,4,5,22,B\n')
    with pytest.raises(DataError) as caught:
        read_choices(path)
    assert str(caught.value).endswith("got 5")
    path.write_text("What is 2 + 2?,3,4,5\n")  # too few columns, no quote: no hint
    with pytest.raises(DataError) as caught:
        read_choices(path)
    assert str(caught.value).endswith("got 4")


THINKING_CHATML = CHATML.replace(
    "message['role'] + '\n' + message['content']",
    "message['role'] + '\n' + ('<think>\n\n</think>\n\n' if message['role'] == 'assistant' "
    "else '') + message['content']")


# DeepSeek-LLM-chat's layout: "Assistant: " + content; the letter's token carries the space.
SPACE_BEFORE_ANSWER = CHATML.replace(
    "message['role'] + '\n' + message['content']",
    "message['role'] + '\n' + (' ' if message['role'] == 'assistant' else '') "
    "+ message['content']")


@pytest.mark.parametrize(("eos", "template"), [("<|im_end|>", None), ("<|endoftext|>", None),
                                               ("<|im_end|>", THINKING_CHATML),
                                               ("<|im_end|>", SPACE_BEFORE_ANSWER)])
def test_choice_examples_mask_only_the_letter(tiny_tokenizer, choices_csv, eos, template):
    """Also where eos is not the token that ends the turn (Gemma, Phi-3: the turn marker was
    scored with the letter there), where the template writes text before the answer (Qwen3's
    empty <think></think>), and where a space before the answer is fused with the letter (the
    eos token alone was scored there: the tokenizer here knows " A" as one token)."""
    if template == SPACE_BEFORE_ANSWER:
        tiny_tokenizer = build_tiny_tokenizer(extra_corpus=(" A B C D",) * 20)
        assert len(tiny_tokenizer.tokenize(" A")) == 1
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = eos
    if template is not None:
        assert template != CHATML  # the replacement took
        tokenizer.chat_template = template
    question = read_choices(choices_csv)[0]
    examples = choice_examples(tokenizer, question)
    for letter, example in zip(LETTERS, examples, strict=True):
        answer_ids = [t for t, m in zip(example.input_ids, example.answer_mask, strict=True) if m]
        assert tokenizer.decode(answer_ids).lstrip(" ") == letter


def test_a_letter_split_from_its_space_is_scored_with_it_under_plain(choices_csv):
    """The `plain` template's answer is " A". A tokenizer that knows " B" as one token but
    splits " A" into a space and "A" had A scored without its space: log p(A | prompt + " ")
    against log p(" B" | prompt), and A won whatever the model thought."""
    from minorsft.chat_templates import apply_chat_template, read_chat_template

    tokenizer = build_tiny_tokenizer(extra_corpus=(" B C D",) * 20)
    assert len(tokenizer.tokenize(" A")) == 2 and len(tokenizer.tokenize(" B")) == 1
    apply_chat_template(tokenizer, read_chat_template("plain"))
    examples = choice_examples(tokenizer, read_choices(choices_csv)[0])
    for letter, example in zip(LETTERS, examples, strict=True):
        answer_ids = [t for t, m in zip(example.input_ids, example.answer_mask, strict=True) if m]
        assert tokenizer.decode(answer_ids) == " " + letter


def test_choice_logps_fast_path_equals_full_logits(tiny_model_dir, tiny_tokenizer, choices_csv):
    questions = read_choices(choices_csv)
    engine = TransformersEngine(str(tiny_model_dir), dtype="float32", device="cpu")
    fast = choice_logps(engine, tiny_tokenizer, questions, fast=True)
    slow = choice_logps(engine, tiny_tokenizer, questions, fast=False)
    full = _full_logits_choice_logps(tiny_model_dir, tiny_tokenizer, questions)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(full), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(slow), torch.tensor(full), atol=1e-5, rtol=0)


def test_choice_logps_fast_path_runs_in_the_engines_mixed_precision(tiny_model_dir,
                                                                    tiny_tokenizer, choices_csv):
    """Under --dtype bf16-mixed the fast path ran without autocast: it scored in fp32 while the
    results said bf16-mixed."""
    questions = read_choices(choices_csv)
    mixed = TransformersEngine(str(tiny_model_dir), dtype="bf16-mixed", device="cpu")
    plain = TransformersEngine(str(tiny_model_dir), dtype="float32", device="cpu")
    fast = torch.tensor(choice_logps(mixed, tiny_tokenizer, questions, fast=True))
    slow = torch.tensor(choice_logps(mixed, tiny_tokenizer, questions, fast=False))
    fp32 = torch.tensor(choice_logps(plain, tiny_tokenizer, questions, fast=True))
    assert not torch.equal(fast, fp32)
    # both paths in bf16: they agree to bf16's rounding, far closer than to other letters
    torch.testing.assert_close(fast, slow, atol=0.05, rtol=0)


def test_accuracy_is_argmax_of_letter_logps_tiny(tiny_model_dir, tiny_tokenizer, choices_csv):
    questions = read_choices(choices_csv)
    full = _full_logits_choice_logps(tiny_model_dir, tiny_tokenizer, questions)
    expected = sum(LETTERS[row.index(max(row))] == q.answer
                   for q, row in zip(questions, full, strict=True)) / len(questions)
    result = run_eval(EvalConfig(model=str(tiny_model_dir), choices=[str(choices_csv)]))
    overall = result["choices"]["overall"]
    assert overall["questions"] == 4
    assert overall["accuracy"] == expected
    assert 0 < overall["letter_mass"] <= 1


def test_m_theta_of_reference_against_itself_is_zero(tiny_model_dir, demo_jsonl):
    result = run_eval(EvalConfig(model=str(tiny_model_dir), reference=str(tiny_model_dir),
                                 data=str(demo_jsonl)))
    held = result["heldout"]
    assert held["rows"] == 16
    assert held["m_theta"] == 0.0
    assert held["nll_per_token"] > 0


def test_m_theta_against_cache_and_other_model(tiny_model_dir, tiny_tokenizer, demo_jsonl,
                                               tmp_path):
    from .conftest import build_tiny_model

    cache = tmp_path / "heldout.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(cache)))
    same = run_eval(EvalConfig(model=str(tiny_model_dir), reference=str(cache)))
    assert same["heldout"]["rows"] == 16
    assert same["heldout"]["m_theta"] == 0.0

    other = tmp_path / "other-model"
    build_tiny_model(tiny_tokenizer, seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    result = run_eval(EvalConfig(model=str(other), reference=str(cache)))["heldout"]
    # Independently: full logits of the other model on the cached token ids.
    from transformers import AutoModelForCausalLM

    from minorsft.cache import iter_rows

    model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    ratios, nll, tokens = [], 0.0, 0
    for row in iter_rows(cache):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = sequence_logps(model(input_ids=ids).logits, ids,
                                  torch.tensor([row["answer_mask"]])).item()
        ratios.append((logp - row["ref_logps"]) / row["num_tokens"])
        nll -= logp
        tokens += row["num_tokens"]
    assert result["m_theta"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)
    assert result["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-5)
    assert abs(result["m_theta"]) > 1e-3  # a different model really does deviate


def test_a_cache_with_no_rows_as_reference_is_an_error(tiny_model_dir, tmp_path):
    """It printed an empty table and exited 0."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p"}\n')
    cache = tmp_path / "empty"
    with pytest.raises(ValueError, match="no usable rows"):  # but the cache stays, rejects and all
        run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(data),
                                        out=str(cache), on_bad="skip", verify_sample=0))
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--reference",
                                      str(cache)])
    assert result.exit_code == 2, result.output
    assert "the cache has no rows" in " ".join(result.output.split())
    # cache info shows it for what it is (it refused it, and --json printed no JSON)
    result = CliRunner().invoke(app, ["cache", "info", str(cache)])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert ("status: NO ROWS (train refuses it): every input row was rejected; see its "
            "_rejects.jsonl" in text and "rows: 0 cached + 1 rejected = 1 input rows" in text)
    result = CliRunner().invoke(app, ["cache", "info", str(cache), "--json"])
    info = json.loads(result.output)
    assert (info["rows"], info["metadata"]["rows_rejected"], info["num_tokens"]) == (0, 1, None)


def test_cache_reference_with_data_is_refused(tiny_model_dir, demo_jsonl, tmp_path):
    """--data was silently ignored: the cache's rows were scored instead."""
    cache = tmp_path / "heldout.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(cache), verify_sample=0))
    with pytest.raises(ValueError, match="do not go together"):
        EvalConfig(model=str(tiny_model_dir), reference=str(cache), data=str(demo_jsonl))
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--reference",
                                      str(cache), "--data", str(demo_jsonl)])
    assert result.exit_code == 2
    assert "Drop --data" in " ".join(result.output.split())
    # options that shape how --data is read were as silently ignored
    with pytest.raises(ValueError, match="--max-length apply to --data, and there is none "
                                         r"\(the cache .* already tokenized and truncated\)"):
        EvalConfig(model=str(tiny_model_dir), reference=str(cache), max_length=100)
    with pytest.raises(ValueError, match="--prompt-field, --response-field apply to --data"):
        EvalConfig(model=str(tiny_model_dir), choices=["mmlu.csv"], prompt_field="q",
                   response_field="a")
    EvalConfig(model=str(tiny_model_dir), reference=str(cache))  # the default length is fine


def test_max_rows_reads_no_further_than_its_rows(tiny_model_dir, demo_jsonl, tmp_path):
    """--max-rows 3 read row 4 too, and refused the file for its error."""
    lines = demo_jsonl.read_text().splitlines()[:3] + ['{"prompt": "q", "response": 5}']
    data = tmp_path / "bad_fourth.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data), max_rows=3))
    assert result["heldout"]["rows"] == 3
    with pytest.raises(DataError, match=":4: field 'response'"):
        run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data), max_rows=4))


def test_on_bad_skip_scores_the_good_rows_and_lists_the_bad(tiny_model_dir, demo_jsonl,
                                                           tmp_path):
    """A bad held-out row stopped eval with no way round it but editing the file; with
    --on-bad skip the others are scored (the same numbers as without the bad rows) and every
    rejected row is named, with its reason, in the JSON result."""
    good = demo_jsonl.read_text().splitlines()[:3]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join([good[0], '{"prompt": "q"}', good[1], "not json", good[2]]) + "\n")
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(good) + "\n")
    with pytest.raises(DataError, match="mixed.jsonl:2: field 'response'"):
        run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data)))
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                      str(data), "--on-bad", "skip", "--json"])
    assert result.exit_code == 0, result.output
    skipped = _strict_json(result.stdout)
    expected = run_eval(EvalConfig(model=str(tiny_model_dir), data=str(clean)))["heldout"]
    assert skipped["heldout"] == {**expected, "rejected_rows": 2}
    assert [(r["file"], r["line"], r["field"]) for r in skipped["rejected"]] == [
        (str(data), 2, "response"), (str(data), 4, None)]
    assert "2 held-out rows rejected and not scored" in " ".join(result.stderr.split())
    assert "2 rejected rows not scored" in format_table(skipped)
    with pytest.raises(DataError, match=r"no row could be scored \(1 rejected; the first: .*:1"):
        run_eval(EvalConfig(model=str(tiny_model_dir), on_bad="skip",
                            data=str(write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt": "q"}]))))
    with pytest.raises(ValueError, match="--on-bad must be 'error' or 'skip'"):
        EvalConfig(model=str(tiny_model_dir), data=str(data), on_bad="drop")
    with pytest.raises(ValueError, match="--on-bad apply to --data, and there is none"):
        EvalConfig(model=str(tiny_model_dir), choices=["mmlu.csv"], on_bad="skip")


def test_adapters_without_their_base_are_named(tiny_model_dir, choices_csv, tmp_path):
    """Adapters are scored on the base they name (tests/test_qlora.py); adapters that name
    none, or a base that is gone, get one line, and merged/ beside them is a model as any."""
    import shutil

    run = tmp_path / "lora-run"
    shutil.copytree(tiny_model_dir, run / "merged")
    (run / "adapter_model.safetensors").write_bytes(b"")  # (never read: refused before)

    def refused(adapter_config: dict, *options: str) -> str:
        (run / "adapter_config.json").write_text(json.dumps(adapter_config))
        result = CliRunner().invoke(app, ["eval", "--model", str(run), *options, "--choices",
                                          str(choices_csv)], env={"HF_HUB_OFFLINE": "1"})
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())

    assert "the adapters do not say which model they trained on (no base_model_name_or_path" \
        in refused({})
    gone = tmp_path / "gone"
    assert f"{gone}: the model this run trained from is not there any more (the base of the " \
        f"LoRA adapters in {run}, as {run / 'adapter_config.json'} names it); if it moved, " \
        "name where it is now with --base-model" in refused(
            {"base_model_name_or_path": str(gone)})
    # another tool's adapters naming a folder relative to where they were made
    relative = "models/bases/tiny"
    assert f"{relative}: the model this run trained from is not there any more (the base of " \
        f"the LoRA adapters in {run}, as {run / 'adapter_config.json'} names it, from the " \
        "working folder)" in refused({"base_model_name_or_path": relative})
    # one that could be a hub id, offline and not in the local cache
    assert (f"tinybase: the base of the LoRA adapters in {run}, as "
            f"{run / 'adapter_config.json'} names it, is no folder here (from the working "
            "folder) nor a model in the local Hugging Face cache, and the hub is offline; name "
            "where it is now with --base-model" in refused(
                {"base_model_name_or_path": "tinybase"}))
    # named where it is now; but adapter_config.json without adapter weights is not adapters
    (run / "adapter_model.safetensors").unlink()
    assert f"{run}: adapter_config.json but no adapter weights (adapter_model.safetensors or " \
        "adapter_model.bin)" in refused({"base_model_name_or_path": "tinybase"},
                                        "--base-model", str(tiny_model_dir))
    merged = run_eval(EvalConfig(model=str(run / "merged"), choices=[str(choices_csv)]))
    assert merged["choices"]["overall"]["questions"] == 4


def test_cli_eval_table_and_json(tiny_model_dir, demo_jsonl, choices_csv, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir),
        "--data", str(demo_jsonl), "--choices", str(choices_csv), "--max-rows", "4",
        "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "m_theta vs reference | +0.000e+00" in result.output
    assert "accuracy (easy)" in result.output
    saved = json.loads(out.read_text())
    assert saved["heldout"]["rows"] == 4 and saved["choices"]["overall"]["questions"] == 4


def test_per_item_lines_add_up_to_the_summary(tiny_model_dir, demo_jsonl, choices_csv,
                                               tmp_path):
    """--per-item: one JSONL line per held-out row and per question, whose sums are the
    summary's figures (so that two checkpoints can be compared row by row)."""
    items_path = tmp_path / "items.jsonl"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir),
        "--data", str(demo_jsonl), "--choices", str(choices_csv), "--max-rows", "5",
        "--per-item", str(items_path), "--json-out", str(tmp_path / "summary.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    items = [json.loads(line) for line in items_path.read_text().splitlines()]
    held = [item for item in items if item["kind"] == "heldout"]
    asked = [item for item in items if item["kind"] == "choice"]
    assert len(held) == 5 and len(asked) == 4 and len(items) == 9
    assert [item["line"] for item in held] == [1, 2, 3, 4, 5]
    tokens = sum(item["answer_tokens"] for item in held)
    nll = -sum(item["policy_logps"] for item in held) / tokens
    assert tokens == summary["heldout"]["answer_tokens"]
    assert nll == pytest.approx(summary["heldout"]["nll_per_token"], rel=1e-12)
    assert all(item["r_per_token"] == 0.0 for item in held)  # the model against itself
    overall = summary["choices"]["overall"]
    assert sum(item["correct"] for item in asked) == overall["correct"]
    for item in asked:
        scores = item["letter_logps"]
        assert item["predicted"] == max("ABCD", key=lambda letter: scores[letter])
        assert item["correct"] == (item["predicted"] == item["answer"]) and item["file"] == "easy"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model_dir), "--choices", str(choices_csv),
        "--per-item", str(tmp_path)])  # a folder: refused before any scoring
    assert result.exit_code == 2 and "--per-item" in result.output
    assert "scoring" not in result.output


def test_eval_outputs_may_not_write_over_its_inputs(tiny_model_dir, choices_csv, tmp_path):
    """`--per-item held.jsonl --data held.jsonl` replaced the held-out data with the per-item
    lines, and `--json-out <model>/config.json` the model's config."""
    held = tmp_path / "data"
    held.mkdir()
    (held / "held.jsonl").write_text('{"prompt": "2 plus 3", "response": "5"}\n')
    kept = {path: path.read_bytes() for path in [held / "held.jsonl", choices_csv,
                                                 tiny_model_dir / "config.json"]}
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(held), "--choices",
            str(choices_csv)]
    for extra, message in [
        (["--per-item", held / "held.jsonl"], "--per-item {} would write over a file of --data"),
        (["--json-out", choices_csv], "--json-out {} would write over --choices"),
        (["--json-out", tiny_model_dir / "config.json"],
         "--json-out {} would write over a file of --model"),
        (["--per-item", held / "items.jsonl"], "--per-item {} would write over a file of --data"),
        (["--json-out", tmp_path / "same.json", "--per-item", tmp_path / "same.json"],
         "--json-out and --per-item name the same file"),
    ]:
        result = CliRunner().invoke(app, [*base, *map(str, extra)])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and message.format(extra[1]) in text, text
        assert "scoring" not in text
    assert {path: path.read_bytes() for path in kept} == kept
    assert not (held / "items.jsonl").exists()
    # a new file beside the model's is fine (results next to the run they are of)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--choices",
                                      str(choices_csv), "--json-out",
                                      str(tiny_model_dir / "eval.json")])
    assert result.exit_code == 0, result.output
    (tiny_model_dir / "eval.json").unlink()


def test_cli_eval_errors(tiny_model_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "nothing to evaluate" in result.output
    # a mistyped cache was taken for a model: "nothing to evaluate" although a cache was given
    typo = str(tmp_path / "heldout.parquet")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--reference", typo])
    assert result.exit_code == 2 and f"--reference {typo}: no such cache" in " ".join(
        result.output.split())
    # a cache folder's name mistyped (no .parquet): said to be no such path
    for reference, what in ((tmp_path / "ref-cache", "no such path"),
                            (tiny_model_dir, "not a cache")):
        result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--reference",
                                     str(reference)])
        assert result.exit_code == 2 and (f"(--reference {reference} is {what}; a reference "
                                          "model is compared on --data)") in " ".join(
            result.output.split()), result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a,b,c,d,Z\n")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--choices", str(bad)])
    assert result.exit_code == 2
    assert "bad.csv:1: field 'answer'" in " ".join(result.output.split())



def test_eval_mistakes_fail_before_any_scoring(tiny_model_dir, demo_jsonl, choices_csv,
                                               tmp_path, monkeypatch):
    """A mistyped --reference (named as --model), a --json-out it cannot write, a choices file
    given twice and a reference without held-out data each failed after the policy's pass, or
    were silently ignored."""
    import minorsft.engines.hf

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the mistake was found")

    monkeypatch.setattr(minorsft.engines.hf.TransformersEngine, "score", no_scoring)
    runner = CliRunner()

    def fails(*args) -> str:
        result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), *map(str, args)])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        return " ".join(result.output.split())

    assert "--reference ./nope: no such model folder" in fails(
        "--data", demo_jsonl, "--reference", "./nope")
    assert "--json-out" in fails("--data", demo_jsonl, "--json-out", tmp_path)
    assert "given twice" in fails("--choices", choices_csv, "--choices",
                                  f"{choices_csv.parent}/./{choices_csv.name}")
    assert "give them with --data" in fails("--choices", choices_csv, "--reference",
                                            tiny_model_dir)
    assert "must be positive" in fails("--choices", choices_csv, "--max-batch-tokens", 0)


def test_a_question_line_is_the_text_line_it_starts_on(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text('"What does\nthis print?",a,b,c,d,B\nq,a,b,c,d,A\n')
    assert [(q.line, q.id) for q in read_choices(path)] == [(1, "mc:1"), (3, "mc:3")]


@pytest.mark.parametrize("name", ["mc.csv", "mc.jsonl"])
def test_max_questions_reads_no_further_than_its_questions(tiny_model_dir, tmp_path, name):
    """--max-questions 1 read the whole file and stopped at a bad third question (--max-rows
    does not read past its rows either)."""
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("What is 2 + 2?,3,4,5,22,B\n\nq,a,b,c,d,E\n")
    else:
        good = json.dumps({"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"],
                           "answer": 1})
        path.write_text(f"{good}\n\nnot json\n")
    assert [q.line for q in read_choices(path, limit=1)] == [1]
    result = run_eval(EvalConfig(model=str(tiny_model_dir), choices=[str(path)],
                                 max_questions=1))
    assert result["choices"]["overall"]["questions"] == 1
    with pytest.raises(DataError, match=":3:"):
        read_choices(path, limit=2)


def test_a_quoted_index_as_answer_is_explained(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c", "d"],
                                "answer": "0"}) + "\n")
    with pytest.raises(DataError, match=r'write 0, not "0"'):
        read_choices(path)


def test_max_length_below_two_is_refused(tiny_model_dir, demo_jsonl):
    """-3 was taken as a slice end: every row lost its last 3 tokens, silently."""
    for bad in (-3, 1):
        with pytest.raises(ValueError, match="--max-length must be at least 2"):
            EvalConfig(model=str(tiny_model_dir), data=str(demo_jsonl), max_length=bad)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                      str(demo_jsonl), "--max-length", "-3"])
    assert result.exit_code == 2 and "at least 2" in result.output


def test_rows_cut_by_max_length_are_counted(tiny_model_dir, tmp_path):
    data = tmp_path / "long_answers.jsonl"
    long_answer = "Tom has 3 apples and buys 4 more, so he has 7 apples. The answer is 7."
    data.write_text("".join(json.dumps({"prompt": "How many?", "response": long_answer * n})
                            + "\n" for n in (1, 2, 3)) + json.dumps(
        {"prompt": "Hi", "response": "Paris"}) + "\n")
    whole = run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data)))
    assert whole["heldout"]["truncated_rows"] == 0
    assert "cut at the maximum length" not in format_table(whole)
    cut = run_eval(EvalConfig(model=str(tiny_model_dir), data=str(data), max_length=24))
    assert cut["heldout"]["truncated_rows"] == 3
    assert cut["heldout"]["answer_tokens"] < whole["heldout"]["answer_tokens"]
    assert "3 cut at the maximum length" in format_table(cut)


def test_a_file_named_all_does_not_share_the_pooled_rows_label(tiny_model_dir, tmp_path):
    files = []
    for name in ("all.csv", "other.csv"):
        files.append(str(tmp_path / name))
        (tmp_path / name).write_text(CHOICES_CSV)
    table = format_table(run_eval(EvalConfig(model=str(tiny_model_dir), choices=files)))
    labels = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert labels == ["accuracy, all files", "accuracy (all)", "accuracy (other)"]


def test_csv_answer_message_offers_no_numbers(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text("What is 2 + 2?,3,4,5,22,1\n")
    with pytest.raises(DataError, match=r"expected one of A, B, C, D, got '1'"):
        read_choices(path)

@pytest.mark.smollm2
def test_smollm2_self_deviation_and_easy_questions(choices_csv, tmp_path):
    """SmolLM2-135M-Instruct against itself, and four trivially easy questions.

    Measured here: with the paper's prompt this 135M model puts only ~20-40% of its mass on the
    letters and prefers "A" whatever the question (1/4 right on these four). So the test pins
    what must hold for any model, on the real tokenizer: m_theta of a model against itself is
    exactly 0, the one-forward route equals `answer_logps` on prompt + letter, and accuracy is
    the argmax count. Its near-chance accuracy is documented in docs/evaluation.md.
    """
    from .conftest import DEMO_ROWS, write_jsonl

    data = write_jsonl(tmp_path / "heldout.jsonl", DEMO_ROWS[:2])
    name = "smollm2-135m-instruct"
    result = run_eval(EvalConfig(model=name, reference=name, data=str(data),
                                 choices=[str(choices_csv)]))
    assert result["heldout"]["m_theta"] == 0.0
    assert 0.3 < result["heldout"]["nll_per_token"] < 3.0  # fluent English, not memorised

    from minorsft.models import load_tokenizer, resolve_model

    questions = read_choices(choices_csv)
    engine = TransformersEngine(resolve_model(name), dtype="float32", device="cpu")
    tokenizer = load_tokenizer(resolve_model(name))
    fast = choice_logps(engine, tokenizer, questions)
    slow = choice_logps(engine, tokenizer, questions[:2], fast=False)
    torch.testing.assert_close(torch.tensor(fast[:2]), torch.tensor(slow), atol=1e-4, rtol=0)
    overall = result["choices"]["overall"]
    expected = sum(LETTERS[row.index(max(row))] == q.answer
                   for q, row in zip(questions, fast, strict=True))
    assert overall["correct"] == expected
    assert 0.05 < overall["letter_mass"] < 1.0


def test_non_finite_letter_scores_give_no_accuracy():
    """max() over NaNs picks "A": an fp16 overflow would have reported a made-up accuracy."""
    question = Question("q1", 1, "2 + 2?", ("4", "5", "6", "7"), "A")
    metrics = choice_metrics([question], [[float("nan")] * 4])
    assert math.isnan(metrics["accuracy"]) and metrics["unscored"] == 1
    assert choice_metrics([question], [[-0.1, -3.0, -4.0, -5.0]])["accuracy"] == 1.0
    # one question unscorable beside a scored one: it counts as not correct, the other counts
    inf = float("inf")
    mixed = choice_metrics([question, question], [[float("nan"), -1.0, -2.0, -3.0],
                                                  [-0.5, -inf, -inf, -inf]])
    assert (mixed["correct"], mixed["unscored"], mixed["accuracy"]) == (1, 1, 0.5)


def test_a_json_array_of_questions_gets_the_jq_hint(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('[{"question": "x", "choices": ["a", "b", "c", "d"], "answer": 0}]\n')
    with pytest.raises(DataError, match=r"jq -c '\.\[\]' mc\.jsonl > mc\.lines\.jsonl"):
        read_choices(path)


def test_a_special_token_in_a_question_is_refused_with_its_line(tiny_model_dir, tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text("What is 2 + 2?,3,4,5,6,B\nWhat ends a turn?,<|im_end|>,a,b,c,A\n")
    with pytest.raises(DataError) as caught:
        run_eval(EvalConfig(model=str(tiny_model_dir), choices=[str(path)]))
    assert (caught.value.line, caught.value.field) == (2, "A")
    assert "special token '<|im_end|>'" in caught.value.reason
