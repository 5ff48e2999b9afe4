"""The command line: help for every command, and clear errors for what users get wrong."""

import io
import json
import os
import socket

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from minorsft.cache import iter_rows
from minorsft.cli import app

from .conftest import DEMO_ROWS, write_jsonl

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["precompute"], ["train"], ["cache"], ["cache", "info"]])
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_top_level_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    for name in ("precompute", "train", "cache"):
        assert name in result.output


def test_missing_data_file(tmp_path):
    result = runner.invoke(app, ["precompute", "--data", str(tmp_path / "nope.jsonl"),
                                 "--out", str(tmp_path / "c.parquet")])
    assert result.exit_code == 2
    assert "nope.jsonl" in result.output and "no such file" in result.output


def test_bracketed_text_is_printed_as_written(tmp_path):
    """rich reads "[word]" as a style: paths, fields and pip extras must come out as written."""
    missing = tmp_path / "run[lora]" / "data[x].jsonl"
    result = runner.invoke(app, ["precompute", "--data", str(missing),
                                 "--out", str(tmp_path / "c.parquet")])
    assert result.exit_code == 2
    assert "run[lora]" in result.output and "data[x].jsonl" in result.output
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "minorsft[lora]" in help_text


def test_unknown_format_names_file_and_line(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "reply": "r"}])
    result = runner.invoke(app, ["precompute", "--data", str(data), "--model",
                                 str(tiny_model_dir), "--out", str(tmp_path / "c.parquet")])
    assert result.exit_code == 2
    assert f"{data}:1" in result.output.replace("\n", "") and "unknown format" in result.output
    assert not (tmp_path / "c.parquet").exists()  # nothing half-written


def test_missing_cache(tmp_path):
    result = runner.invoke(app, ["train", "--cache", str(tmp_path / "none.parquet"),
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no such cache" in result.output


def test_cache_model_mismatch_is_refused(tiny_model_dir, demo_jsonl, tmp_path):
    from .conftest import build_tiny_model, build_tiny_tokenizer

    cache = tmp_path / "ref.parquet"
    result = runner.invoke(app, ["precompute", "--data", str(demo_jsonl), "--model",
                                 str(tiny_model_dir), "--out", str(cache)])
    assert result.exit_code == 0, result.output
    other = tmp_path / "other-model"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=99).save_pretrained(other)
    tokenizer.save_pretrained(other)
    args = ["train", "--cache", str(cache), "--model", str(other), "--output",
            str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "fingerprint.weights" in result.output and "--allow-mismatch" in result.output
    result = runner.invoke(app, [*args, "--allow-mismatch"])
    assert result.exit_code == 0, result.output
    # an lr that makes the loss nan: one line with the way out, not a traceback
    diverging = ["train", "--cache", str(cache), "--output", str(tmp_path / "nan"),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "1e30", "--no-step0-check"]
    result = runner.invoke(app, diverging)
    assert result.exit_code == 2, result.output
    assert "lower --lr" in result.output and "Traceback" not in result.output


def test_cache_info(tiny_model_dir, demo_jsonl, tmp_path):
    cache = tmp_path / "ref.parquet"
    runner.invoke(app, ["precompute", "--data", str(demo_jsonl), "--model", str(tiny_model_dir),
                        "--out", str(cache)])
    result = runner.invoke(app, ["cache", "info", str(cache)])
    assert result.exit_code == 0 and "transformers" in result.output
    # the counts once, in one line; nested metadata as key=value, not a Python dict
    lines = result.output.splitlines()
    assert [line.split(":")[0].strip() for line in lines].count("rows") == 1
    assert "16 cached + 0 rejected = 16 input rows" in result.output
    assert "{'" not in result.output and "device=cpu" in result.output


def test_bad_option_values():
    result = runner.invoke(app, ["train", "--loss", "dpo"])
    assert result.exit_code == 2 and "unknown loss" in result.output
    for command in (["precompute", "--data", "d.jsonl"],
                    ["eval", "--model", "m", "--data", "d.jsonl"]):
        result = runner.invoke(app, [*command, "--train-turns", "first"])
        assert result.exit_code == 2 and "--train-turns must be one of all, last" in (
            result.output), result.output
    result = runner.invoke(app, ["eval", "--model", "m", "--choices", "q.csv", "--train-turns",
                                 "last"])  # (no --data: it would be ignored)
    assert result.exit_code == 2 and "--train-turns apply to --data" in result.output
    result = runner.invoke(app, ["train", "--batch-size", "10", "--micro-batch-size", "4"])
    assert result.exit_code == 2 and "multiple" in result.output


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max-grad-norm", "-1", "--max-grad-norm must be positive"),  # would reverse the step
    ("--max-grad-norm", "0", "--max-grad-norm must be positive"),  # would freeze the model
    ("--epochs", "0", "--epochs must be at least 1"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0"),
    # NaN and inf passed the checks: an all-NaN model saved with exit 0 (--lr inf), or a
    # failure at step 0 that blamed the lr (--beta nan)
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0"),
    ("--lr", "inf", "--lr must be a positive finite number"),
    ("--lr", "nan", "--lr must be a positive finite number"),
    ("--beta", "nan", "--beta must be a finite number"),
    ("--beta", "inf", "--beta must be a finite number"),
    ("--lora-alpha", "nan", "--lora-alpha must be positive"),
    ("--dtype", "float16", "--dtype float16 does not train"),  # no loss scale: grads underflow
    ("--step0-tolerance", "-1", "--step0-tolerance must be positive"),
    ("--lora-dropout", "1", "--lora-dropout lie in [0, 1)"),
    ("--attention", "foo", "unknown --attention 'foo'"),
])
def test_train_refuses_option_values_that_would_train_wrong(option, value, message):
    result = runner.invoke(app, ["train", option, value])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(("option", "value", "message"), [
    # vLLM's options: ignored by the transformers engine and found by vLLM only after loading
    ("--gpu-memory-utilization", "2", "--gpu-memory-utilization must lie in (0, 1]"),
    ("--gpu-memory-utilization", "nan", "--gpu-memory-utilization must lie in (0, 1]"),
    ("--tensor-parallel-size", "0", "--tensor-parallel-size must be positive"),
    ("--max-model-len", "1", "--max-model-len must be at least 2"),
    ("--max-length", "-5", "--max-length must be at least 2 (0: no limit)"),
])
def test_precompute_refuses_vllm_option_values_before_loading(option, value, message):
    result = runner.invoke(app, ["precompute", "--data", "demo", "--out", "unused", option,
                                 value])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_precompute_refuses_an_unknown_verify_dtype_before_scoring(tmp_path):
    """--verify-dtype was read only by the drift check, after the whole cache was scored."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    result = runner.invoke(app, ["precompute", "--data", str(data), "--out",
                                 str(tmp_path / "c"), "--verify-dtype", "bogus"])
    assert result.exit_code == 2 and "unknown --verify-dtype 'bogus'" in result.output
    assert not (tmp_path / "c").exists()


def test_precompute_out_below_a_file_is_a_one_line_error(tiny_model_dir, tmp_path):
    """NotADirectoryError came out as a traceback."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(data / "cache")])
    assert result.exit_code == 2, result.output
    assert "cannot create its folder (Not a directory)" in result.output


def test_a_model_folder_without_a_tokenizer_is_named(tiny_model_dir, tmp_path):
    """transformers' own message spoke of converting a tokenizer and installing sentencepiece."""
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    result = runner.invoke(app, ["precompute", "--model", str(folder), "--data", str(data),
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert f"--model {folder}: no tokenizer in this folder" in " ".join(result.output.split())


def test_a_training_checkpoint_as_model_says_what_it_is(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    result = runner.invoke(app, ["eval", "--model", str(checkpoint), "--data", str(data)])
    assert result.exit_code == 2, result.output
    assert "it is a training checkpoint" in " ".join(result.output.split())
    # the run folder itself, not finished (stopped with checkpoints): said so, with the way on
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "run"), "--data", str(data)])
    assert result.exit_code == 2, result.output
    assert ("it is a `minorsft train` output that has not finished (it holds metrics or "
            "checkpoints, no model yet): finish it with the same train command and --resume"
            in " ".join(result.output.split())), result.output


def test_system_field_option_reaches_the_cache(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"system_prompt": "Answer in French.", "question": "2 plus 3?", "response": "cinq"}])
    cache = tmp_path / "c"
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(cache), "--prompt-field", "question",
                                 "--response-field", "response", "--system-field",
                                 "system_prompt", "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    (row,) = iter_rows(cache)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert "Answer in French." in tokenizer.decode(row["input_ids"])
    assert "(--system-field)" not in result.output
    # a column the rows do not have (mistyped) gets a note, not silence
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(tmp_path / "c2"), "--prompt-field",
                                 "question", "--response-field", "response", "--system-field",
                                 "sytem_prompt", "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    assert ("note: the first row has no 'sytem_prompt' column (--system-field)"
            in " ".join(result.output.split())), result.output
    assert "is not given to the chat template" not in result.output
    # named columns beside a `tools` column (xLAM's layout): the tools are not the template's,
    # which is said rather than left unseen
    data = write_jsonl(tmp_path / "xlam.jsonl", [
        {"query": "Weather in Paris?", "answers": '[{"name": "get_weather"}]',
         "tools": '[{"name": "get_weather", "parameters": {}}]'}])
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(tmp_path / "c3"), "--prompt-field",
                                 "query", "--response-field", "answers", "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    assert ("note: the rows' 'tools' column is not given to the chat template with "
            "--prompt-field/--response-field" in " ".join(result.output.split())), result.output
    # rows after the first are counted too: the note looked at the first row only
    # (a row that defines none, "[]" as datasets write it, is not counted)
    data = write_jsonl(tmp_path / "xlam2.jsonl", [
        {"query": "Hi", "answers": "Hello", "tools": "[]"},
        {"query": "Weather in Paris?", "answers": '[{"name": "get_weather"}]',
         "tools": '[{"name": "get_weather", "parameters": {}}]'},
        {"query": "Bye", "answers": "Goodbye", "tools": ""}])
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(tmp_path / "c4"), "--prompt-field",
                                 "query", "--response-field", "answers", "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "the rows' 'tools' column" not in output
    assert (f"note: cached rows have text in columns that were not read, which the cache does "
            f"not hold: 'tools' in 1 (the first: {data}:2). A column left out is not read with "
            "--prompt-field/--response-field; tool definitions are given to the chat template "
            "only with rows as chats" in output), output


def test_text_in_a_column_the_rows_format_leaves_out_is_counted(tiny_model_dir, tmp_path):
    """Every input row ends up in the cache or the rejects, and what a cached row leaves out is
    said: alpaca's `input` beside `prompt`+`response` was dropped unseen. A column whose text
    the chat holds anyway (ultrachat's `prompt` beside its `messages`) is not counted."""
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "Translate.", "response": "Bonjour.", "input": "Hello."},
        {"prompt": "Add.", "response": "3", "input": ""},
        {"prompt": "Name a colour.", "messages": chat},
        {"messages": chat, "completion": "Blue."},
        {"prompt": "Sum.", "response": "5", "input": "2 and 3"},
        {"prompt": "Multiply 12 by it.", "response": "24", "input": "2"},  # (in the chat, but
        {"prompt": "Its country?", "response": "France", "input": "assistant"},  # not a turn)
        {"instruction": "Say hi.", "output": "Hi.", "input": "", "category": "greeting"}])
    result = CliRunner().invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                      str(data), "--out", str(tmp_path / "c"),
                                      "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert (f"not hold: 'completion' in 1 (the first: {data}:4); 'input' in 4 (the first: "
            f"{data}:1). A row is read in one format" in output), output
    # two shards of two-row parts: each says its own rows, the one that completes the cache
    # the whole cache's, which `cache info` shows (and a merge of the shards keeps)
    sharded = tmp_path / "sharded"
    said = []
    for shard in ("0/2", "1/2"):
        result = CliRunner().invoke(app, [
            "precompute", "--model", str(tiny_model_dir), "--data", str(data), "--out",
            str(sharded), "--verify-sample", "0", "--part-rows", "2", "--shard", shard])
        assert result.exit_code == 0, result.output
        said.append(" ".join(result.output.split()))
    assert (f"not hold: 'input' in 3 (the first: {data}:1). " in said[0]
            ), said[0]  # (its parts 0 and 2: rows 1, 2, 5, 6)
    assert (f"not hold: 'completion' in 1 (the first: {data}:4); 'input' in 4 (the first: "
            f"{data}:1)" in said[1]), said[1]
    merged = tmp_path / "merged"
    assert CliRunner().invoke(app, ["cache", "merge", str(sharded), "--out",
                                    str(merged)]).exit_code == 0
    for cache in (sharded, merged):
        result = CliRunner().invoke(app, ["cache", "info", str(cache)])
        assert result.exit_code == 0, result.output
        assert (f"left-out columns: 'completion' in 1 rows (the first: {data}:4); 'input' in "
                f"4 rows (the first: {data}:1) (text the cache does not hold)"
                in " ".join(result.output.split())), result.output
    # eval scores held-out rows read the same way: it says so too
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                      str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert (f"note: scored rows have text in columns that were not read, which their scores "
            f"leave out: 'completion' in 1 (the first: {data}:4); 'input' in 4 (the first: "
            f"{data}:1)" in " ".join(result.stderr.split())), result.stderr
    # OpenOrca's layout: its system prompt column is not --system-field's default name
    orca = write_jsonl(tmp_path / "orca.jsonl", [
        {"id": "o1", "system_prompt": "Be brief.", "question": "2 plus 3?", "response": "5"},
        {"id": "o2", "system_prompt": "", "question": "3 plus 3?", "response": "6"}])
    result = CliRunner().invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                      str(orca), "--out", str(tmp_path / "c2"),
                                      "--prompt-field", "question", "--response-field",
                                      "response", "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    assert (f"not hold: 'system_prompt' in 1 (the first: {orca}:1). A column left out is not "
            "read with --prompt-field/--response-field; --system-field system_prompt reads "
            "'system_prompt' as the system prompt" in " ".join(result.output.split()))
    clean = write_jsonl(tmp_path / "clean.jsonl", [
        {"prompt": "Name a colour.", "messages": chat},
        {"instruction": "Say hi.", "output": "Hi.", "input": "   "}])
    result = CliRunner().invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                      str(clean), "--out", str(tmp_path / "c3"),
                                      "--verify-sample", "0"])
    assert result.exit_code == 0 and "not read" not in result.output, result.output


def test_answers_whose_first_token_holds_the_prompts_end_get_a_note(tiny_model_dir, tmp_path):
    """A generation prompt that ends with a space the answer's first word takes: the rows are
    cached as they are, and precompute says how many and which first."""
    template = tmp_path / "spaced.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'user' %}"
                        "{{ 'User: ' + m['content'] + '\n\n' }}{% else %}"
                        "{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2 plus 3", "response": "5"},
                                              {"prompt": "4 plus 4", "response": "8"}])
    result = CliRunner().invoke(app, [
        "precompute", "--model", str(tiny_model_dir), "--data", str(data), "--out",
        str(tmp_path / "c"), "--chat-template", str(template), "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("note: 2 cached row(s) have an answer whose first token also holds the end of the "
            "prompt (first: ") in text and "d.jsonl, line 1: ' 5')" in text, text
    assert len(list(iter_rows(tmp_path / "c"))) == 2


def test_a_max_length_past_a_rotary_models_context_gets_a_note(tiny_model_dir, tmp_path):
    """Nothing fails there, but the rows past it are scored beyond what the model learned."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}] * 2)
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--verify-sample", "0"]
    result = runner.invoke(app, ["precompute", *common, "--out", str(tmp_path / "c"),
                                 "--max-length", "600"])
    assert result.exit_code == 0, result.output
    assert (f"note: --max-length 600 is more than {tiny_model_dir}'s context of 512 tokens: a "
            "longer row is scored past the lengths") in " ".join(result.output.split())
    for max_length, command in (("0", "eval"), ("512", "precompute")):
        out = ["--out", str(tmp_path / "c2")] if command == "precompute" else []
        result = runner.invoke(app, [command, *common[:4], *out, "--max-length", max_length])
        assert result.exit_code == 0, result.output
        noted = "is more than" in result.output
        assert noted == (max_length == "0"), (command, result.output)


def test_evals_context_note_names_a_reference_with_a_shorter_context(tiny_model_dir, tmp_path):
    """The note named --model only: a reference model of shorter context scored the same rows
    past its context without a word."""
    import shutil

    reference = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, reference)
    config = json.loads((reference / "config.json").read_text())
    (reference / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=256)))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}] * 2)
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--reference",
                                 str(reference), "--data", str(data), "--max-length", "300"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"note: --max-length 300 is more than {reference}'s context of 256 tokens" in output
    assert f"{tiny_model_dir}'s context" not in output


def test_options_of_another_engine_or_strategy_get_a_note(tiny_model_dir, tmp_path):
    """They were ignored without a word."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}] * 4)
    cache = tmp_path / "c"
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(cache), "--engine", "transformers",
                                 "--gpu-memory-utilization", "0.5", "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    assert ("note: --gpu-memory-utilization applies to the vLLM engine; the transformers engine "
            "scores this run and ignores them") in " ".join(result.output.split())
    result = runner.invoke(app, ["train", "--cache", str(cache), "--output", str(tmp_path / "r"),
                                 "--max-steps", "1", "--batch-size", "2", "--cpu-offload"])
    assert result.exit_code == 0, result.output
    assert "--cpu-offload applies under --strategy fsdp only" in result.output


def test_precompute_finds_a_bad_first_row_before_loading_the_model(tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was looked at")

    monkeypatch.setattr("minorsft.precompute.make_engine", no_engine)
    data = tmp_path / "rows.jsonl"
    data.write_text('[{"prompt": "p", "response": "r"}]\n')
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert "rows.jsonl:1:" in result.output and "jq -c" in result.output
    assert not (tmp_path / "c").exists()


def test_a_max_length_past_learned_position_embeddings_is_refused(tiny_tokenizer,
                                                                  tiny_model_dir, tmp_path):
    """GPT-2's kind: a row longer than n_positions crashed in the embedding lookup (IndexError
    on a CPU, a device-side assert on CUDA)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
    )).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2 plus 3", "response": "5"}])
    args = ["precompute", "--model", str(folder), "--data", str(data), "--verify-sample", "0"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "c1")])
    assert result.exit_code == 2, result.output
    assert ("--max-length 2048 is more than the 32 positions" in " ".join(result.output.split()))
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "c2"), "--max-length", "32"])
    assert result.exit_code == 0, result.output
    # eval reads --data as precompute does (it ended in the IndexError), and a question longer
    # than the positions is named with its line
    evaluate = ["eval", "--model", str(folder)]
    result = runner.invoke(app, [*evaluate, "--data", str(data)])
    assert result.exit_code == 2, result.output
    assert ("--max-length 2048 is more than the 32 positions" in " ".join(result.output.split()))
    result = runner.invoke(app, [*evaluate, "--data", str(data), "--max-length", "32"])
    assert result.exit_code == 0, result.output
    choices = tmp_path / "q.csv"
    choices.write_text("What is 2 + 2?,3,4,5,22,B\n", encoding="utf-8")  # the prompt: ~180
    result = runner.invoke(app, [*evaluate, "--choices", str(choices)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "q.csv:1: field 'question'" in text and "more than the 32 positions" in text, text
    # ... before the held-out rows are scored (it was found after their whole pass)
    result = runner.invoke(app, [*evaluate, "--data", str(data), "--max-length", "32",
                                 "--choices", str(choices)])
    assert result.exit_code == 2 and "scoring" not in result.output, result.output
    assert "q.csv:1: field 'question'" in " ".join(result.output.split())
    # the same model as --reference, after a policy without such a table: refused before the
    # policy's pass (it was an IndexError traceback after it)
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--reference",
                                 str(folder), "--data", str(data)])
    assert result.exit_code == 2 and "scoring" not in result.output, result.output
    assert (f"--max-length 2048 is more than the 32 positions of {folder}'s"
            in " ".join(result.output.split()))


def test_device_and_model_mistakes_are_one_line_errors(tmp_path, monkeypatch):
    # offline, as this machine is (online, the hub answers "not found": the same error)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    out = str(tmp_path / "c")
    result = runner.invoke(app, ["precompute", "--data", str(data), "--out", out,
                                 "--device", "gpu"])
    assert result.exit_code == 2 and "--device 'gpu' is not a device" in result.output
    for other in ("mps", "meta"):  # real torch devices, which failed deep in a traceback
        result = runner.invoke(app, ["precompute", "--data", str(data), "--out", out,
                                     "--device", other])
        assert result.exit_code == 2, result.output
        assert "runs on cpu and cuda devices only" in " ".join(result.output.split())
    if not __import__("torch").cuda.is_available():
        result = runner.invoke(app, ["precompute", "--data", str(data), "--out", out,
                                     "--device", "cuda"])
        assert result.exit_code == 2 and "sees no CUDA GPU" in result.output
    # a typo of the built-in name: neither a folder nor on the hub (offline or not)
    result = runner.invoke(app, ["precompute", "--data", str(data), "--out", out,
                                 "--model", "smollm2-135m-instruc"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "did you mean the built-in 'smollm2-135m-instruct'" in text


def test_lora_adapter_folder_as_model_points_to_the_merged_model(tmp_path):
    run = tmp_path / "lora-run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    # (eval scores adapters on their base: tests/test_qlora.py; precompute takes a whole model)
    result = runner.invoke(app, ["precompute", "--model", str(run), "--data", "demo",
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--merge-lora" in " ".join(result.output.split())


def test_all_rows_rejected_points_to_a_rejects_file_that_exists(tiny_model_dir, tmp_path):
    bad = {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]}
    data = write_jsonl(tmp_path / "bad.jsonl", [bad, bad])
    out = tmp_path / "c"
    result = runner.invoke(app, ["precompute", "--data", str(data), "--model",
                                 str(tiny_model_dir), "--out", str(out), "--on-bad", "skip"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "no usable rows (all 2 rejected; see" in text
    rejects = out / "_rejects.jsonl"
    assert str(rejects) in result.output
    assert len(rejects.read_text().splitlines()) == 2


def test_one_named_column_is_an_option_error_before_any_row_is_read(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    result = runner.invoke(app, ["precompute", "--data", str(data), "--out",
                                 str(tmp_path / "c"), "--prompt-field", "question",
                                 "--on-bad", "skip"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "--prompt-field and --response-field must be given" in text
    assert not (tmp_path / "c").exists()
    result = runner.invoke(app, ["eval", "--model", "smollm2-135m-instruct", "--data", str(data),
                                 "--response-field", "answer"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "--prompt-field and --response-field must be given" in text


@pytest.mark.parametrize("error", [
    OSError(__import__("errno").ENOSPC, "No space left on device", "run/model.safetensors"),
    type("SafetensorError", (Exception,), {})("Error while serializing: No space left on device"),
])
def test_a_full_disk_is_a_one_line_error(monkeypatch, tmp_path, error):
    def full_disk(config, console):
        raise error

    monkeypatch.setattr("minorsft.train.run_train", full_disk)
    result = runner.invoke(app, ["train", "--cache", str(tmp_path / "c"), "--output",
                                 str(tmp_path / "run")])
    assert result.exit_code == 2 and "space left" in result.output, result.output
    assert result.output.startswith("error:")


@pytest.mark.parametrize("reachable", [False, True])
def test_an_unreachable_hub_is_used_offline_at_once(monkeypatch, capsys, reachable):
    """Offline, every hub lookup retried for about 50 s before it failed (or fell back to the
    local cache): a hub that takes no connection is now used offline from the start."""
    import huggingface_hub.constants

    from minorsft.models import check_hub_reachable, resolve_model

    monkeypatch.delenv("HF_HUB_OFFLINE")
    for name in ("TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                 "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    tried = []

    def connect(address, timeout):
        tried.append(address)
        if not reachable:
            raise socket.gaierror(-2, "Name or service not known")
        return io.BytesIO()  # something with close()

    monkeypatch.setattr("minorsft.models.socket.create_connection", connect)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    assert resolve_model("Org/model") == "Org/model"
    assert resolve_model("Org/other") == "Org/other"
    assert tried == [("hub.example", 8443)]  # once per process
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
    assert offline == (not reachable)
    note = capsys.readouterr().err
    assert ("hub.example:8443 cannot be reached (Name or service not known)" in note) == (
        not reachable)
    # a proxy may reach the hub where a direct connection cannot; HF_HUB_OFFLINE=0 is a choice
    for variable, value in (("HTTPS_PROXY", "http://proxy:3128"), ("HF_HUB_OFFLINE", "0")):
        check_hub_reachable.cache_clear()
        tried.clear()
        with monkeypatch.context() as patch:
            patch.delenv("HF_HUB_OFFLINE", raising=False)
            patch.setenv(variable, value)
            assert check_hub_reachable() and not tried


def test_a_mistyped_local_path_is_named_before_the_hub_is_tried(tmp_path, monkeypatch, capsys):
    """`runs/minr` (meant: runs/minor) is also a well-formed hub id: offline, the hub's retries
    took about 50 s before any word about the local folder."""
    from minorsft.models import resolve_model

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("runs/minr") == "runs/minr"  # still tried on the hub
    assert "runs/minr: no such folder here" in capsys.readouterr().err
    assert resolve_model("Qwen/Qwen2-7B-Instruct") == "Qwen/Qwen2-7B-Instruct"
    assert capsys.readouterr().err == ""  # a hub id: no note
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
    assert resolve_model("runs/minr") == "runs/minr"
    assert capsys.readouterr().err == ""


def test_a_tokenizer_with_named_chat_templates_precomputes(tiny_model_dir, demo_jsonl, tmp_path):
    """A dict of named templates ("default", "tool_use": Command-R's kind) crashed the chat
    template's fingerprint; its default template renders the rows."""
    import shutil

    from minorsft.models import chat_template_fingerprint, load_tokenizer

    from .conftest import CHATML

    folder = tmp_path / "named-templates"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = {"default": CHATML, "tool_use": CHATML + "{# tools #}"}
    tokenizer.save_pretrained(folder)
    result = runner.invoke(app, ["precompute", "--model", str(folder), "--data", str(demo_jsonl),
                                 "--out", str(tmp_path / "c"), "--verify-sample", "0"])
    assert result.exit_code == 0, result.output
    named = chat_template_fingerprint(load_tokenizer(str(folder)))
    assert named != chat_template_fingerprint(load_tokenizer(str(tiny_model_dir)))
    tokenizer.chat_template = {"default": CHATML, "tool_use": CHATML + "{# other tools #}"}
    assert chat_template_fingerprint(tokenizer) != named


def test_precompute_of_several_files_keeps_each_rows_file(tiny_model_dir, tmp_path):
    """A pattern the shell expanded arrives as --data's value plus arguments: the files are read
    in that order; the cache's `file` column and the rejects report name each row's file; a
    resume with another set of files is refused; verify and eval read the cache."""
    from minorsft.cache import read_metadata

    first = write_jsonl(tmp_path / "train-0.jsonl", [dict(DEMO_ROWS[0], id="a")])
    bad = {"id": "c", "messages": [{"role": "robot", "content": "hi"}]}
    second = write_jsonl(tmp_path / "train-1.jsonl", [dict(DEMO_ROWS[1], id="b"), bad])
    out = tmp_path / "cache"
    command = ["precompute", "--model", str(tiny_model_dir), "--out", str(out), "--on-bad",
               "skip", "--verify-sample", "2"]
    result = runner.invoke(app, [*command, "--data", str(first), str(second)])
    assert result.exit_code == 0, result.output
    assert "reading 2 files in this order: train-0.jsonl, train-1.jsonl" in result.output
    assert [(row["id"], row["file"], row["line"]) for row in iter_rows(out)] == [
        ("a", str(first), 1), ("b", str(second), 1)]
    (rejected,) = [json.loads(line) for line in (out / "_rejects.jsonl").read_text().splitlines()]
    assert (rejected["file"], rejected["line"]) == (str(second), 2)
    metadata = read_metadata(out)
    assert metadata["source_files"] == [str(first), str(second)]
    assert metadata["source"] == f"{first} and 1 more file"
    # the same files as a quoted pattern: the same input, so the finished cache is kept
    result = runner.invoke(app, [*command, "--data", str(tmp_path / "train-*.jsonl")])
    assert result.exit_code == 0 and "nothing to score" in " ".join(result.output.split())
    result = runner.invoke(app, [*command, "--data", str(first)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "input content: 2 files, sha256" in text
    result = runner.invoke(app, [*command, "--data", str(second), "--data", str(first)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and ("input files: the same files in another order: "
                                      "train-0.jsonl, train-1.jsonl -> train-1.jsonl, "
                                      "train-0.jsonl") in text
    third = write_jsonl(tmp_path / "train-2.jsonl", [dict(DEMO_ROWS[2], id="d")])
    write_jsonl(first, [dict(DEMO_ROWS[0], id="a2")])
    result = runner.invoke(app, [*command, "--data", str(tmp_path / "train-*.jsonl")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and ("input files: changed: train-0.jsonl; added: "
                                      "train-2.jsonl") in text
    third.unlink()
    write_jsonl(first, [dict(DEMO_ROWS[0], id="a")])
    result = runner.invoke(app, [*command, "--data", str(first), "1024"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "unexpected argument '1024'" in text
    result = runner.invoke(app, ["verify", "--cache", str(out), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    per_item = tmp_path / "items.jsonl"
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                 str(tmp_path / "train-*.jsonl"), "--per-item", str(per_item),
                                 "--max-rows", "2"])  # (the third row is the bad one)
    assert result.exit_code == 0, result.output
    items = [json.loads(line) for line in per_item.read_text().splitlines()]
    assert [(item["file"], item["line"]) for item in items] == [(str(first), 1), (str(second), 1)]
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(first),
                                 str(second)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Quote it (--data 'dir/test-*.parquet')" in text
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "is a minorsft cache, not input data" in text
    # its parts, reached by a pattern, too (each row was rejected as of an unknown format)
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                 str(tmp_path / "**" / "*.parquet")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and (f"{out / 'part-00000.parquet'}: is a part of the "
                                      f"minorsft cache {out}, not input data") in text, text


def test_every_option_of_the_long_commands_has_a_help_panel():
    """`--help` of precompute, train and eval groups their options (17-40 each) in panels: a
    new option must be given one, or it lands alone in a plain "Options" box."""
    import typer

    commands = typer.main.get_command(app).commands
    for name in ("precompute", "train", "eval"):
        ungrouped = [param.name for param in commands[name].params
                     if param.name != "help" and not getattr(param, "rich_help_panel", None)]
        assert ungrouped == [], name
        panels = {param.rich_help_panel for param in commands[name].params if param.name != "help"}
        assert len(panels) >= 5, (name, panels)


def test_h_is_help_everywhere():
    """`-h` was an unknown option; the plot usage line read `{run_dirs}...`."""
    runner = CliRunner()
    for command in ([], ["train"], ["cache", "info"], ["plot"]):
        result = runner.invoke(app, [*command, "-h"], prog_name="minorsft")
        assert result.exit_code == 0 and "Usage: minorsft" in result.output, (command,
                                                                                result.output)
    assert "{RUN_DIR}..." in runner.invoke(app, ["plot", "-h"], prog_name="minorsft").output


def test_a_stopped_precompute_says_what_it_kept(tiny_model_dir, tmp_path, monkeypatch):
    """It said "the parts finished so far are kept" where none was (no folder at all)."""
    import minorsft.precompute

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": "a"}
                                              for i in range(4)])
    runner = CliRunner()
    done = tmp_path / "done"
    assert runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data", str(data),
                               "--out", str(done), "--part-rows", "2", "--verify-sample",
                               "0"]).exit_code == 0

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minorsft.precompute, "run_precompute", stopped)
    for out, said in ((tmp_path / "never", "no part was finished, so nothing is kept"),
                      (done, "the 2 parts finished so far are kept")):
        result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                     str(data), "--out", str(out)])
        assert result.exit_code == 130 and said in " ".join(result.output.split()), \
            result.output


@pytest.mark.parametrize("command", [[], ["train"], ["precompute"], ["eval"], ["verify"],
                                     ["cache", "info"], ["cache", "merge"], ["plot"]])
def test_help_shows_no_value_placeholder_after_flags(command):
    """typer 0.29 showed `--json <bool>`, read as taking a value (`--json true` is an error)."""
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--help" in result.output and "<bool>" not in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "--cache", ""], "--cache is empty; give a path"),
    (["train", "--output=", "--max-steps", "1"], "--output is empty; give a path"),
    (["train", "--eval-cache", ""], "--eval-cache is empty; give a path"),
    (["precompute", "--data", "x.jsonl", "--out", ""], "--out is empty; give a path"),
    (["plot", "run", "-o", ""], "-o is empty; give a path"),
    (["cache", "info", ""], "an empty PATH argument; give a path"),
    (["cache", "merge", "a", "", "--out", "b"], "an empty SOURCES argument; give a path"),
    (["precompute", "--data", ""], "--data is empty; give a file, folder or built-in data set"),
    (["precompute", "--data=x.jsonl", "--prompt-field", "", "--response-field", ""],
     "--prompt-field is empty; give a column name"),
    (["eval", "--model", "m", "--reference="], "--reference is empty; give a model or cache"),
])
def test_an_empty_path_is_refused_not_read_as_the_working_folder(args, message, tmp_path,
                                                                 monkeypatch):
    """`--output ""` (a script's unset variable) was read as "." and trained into the working
    folder; nothing is written now."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_an_empty_value_of_an_option_that_takes_no_path_is_left_to_it():
    result = runner.invoke(app, ["train", "--lr", ""])
    assert result.exit_code == 2 and "is empty; give a path" not in result.output


def test_files_of_one_name_are_listed_by_their_paths(tiny_model_dir, tmp_path):
    """Two folders' train.jsonl were listed as "train.jsonl, train.jsonl"."""
    files = []
    for folder, row in (("a", DEMO_ROWS[0]), ("b", DEMO_ROWS[1])):
        (tmp_path / folder).mkdir()
        files.append(write_jsonl(tmp_path / folder / "train.jsonl", [row]))
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--out",
                                 str(tmp_path / "cache"), "--verify-sample", "0",
                                 *[arg for path in files for arg in ("--data", str(path))]])
    assert result.exit_code == 0, result.output
    assert (f"reading 2 files in this order: {files[0]}, {files[1]}"
            in " ".join(result.output.split()))
