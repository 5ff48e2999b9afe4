"""Evaluate a checkpoint: held-out answer NLL, m_theta against a reference, multiple choice.

Three numbers, each computed with the same machinery as training (`data` tokenizes, the
transformers engine and `logprobs.answer_logps` score):

- ``nll_per_token``: -sum log pi_theta(y|x) / sum m over the held-out answers (token-weighted),
  and ``mean_nll``, the sample mean of -(1/m) log pi_theta(y|x), which is the `nll` that
  `minorsft train` logs;
- ``m_theta`` (eq. 8): the sample mean of r/m with r = log pi_theta(y|x) - log pi_ref(y|x),
  the paper's deviation metric, on held-out data rather than the training batch. The reference
  is a model (scored here) or a cache written by `minorsft precompute` on the held-out data
  (its token ids and reference log-probs are reused, so the reference is scored once);
- ``accuracy`` on multiple-choice questions: the paper's ceval-exam prompt (section 4) as the
  user turn, and the option whose letter the model finds most likely as the assistant's first
  token(s) wins. Log-likelihood comparison, not generation: no answer parsing, and a model that
  would have answered in prose still gets a score.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
from rich.console import Console

from minorsft.answer_spans import refuse_special_tokens, special_token_pattern
from minorsft.answer_spans import tokenize_conversation as _tokenize_conversation
from minorsft.cache import (
    CacheError,
    atomic_write_text,
    iter_rows,
    looks_like_cache,
    read_metadata,
    validate_values,
)
from minorsft.chat_templates import (
    ChatTemplate,
    cached_chat_template,
    read_chat_template,
    renders_plain_text,
    template_notes,
)
from minorsft.conversations import count_left_out, left_out_note
from minorsft.data import (
    DataError,
    Example,
    FieldSpec,
    Rejection,
    data_label,
    data_source,
    iter_examples,
    resolve_data,
)
from minorsft.engines.hf import TransformersEngine, token_budget_batches
from minorsft.heldout import TOKENIZER_FIELDS, heldout_metrics
from minorsft.jsonl import json_safe, malformed_json_reason
from minorsft.logprobs import final_logit_transform, pad_batch
from minorsft.models import (
    TOKENIZER_FILES,
    AdapterRun,
    adapter_run,
    autocast_context,
    comparable_fields,
    context_note,
    fingerprint,
    learned_position_limit,
    load_tokenizer,
    read_model_config,
    refuse_lengths_past_learned_positions,
    resolve_model,
)
from minorsft.row_reading import lines_file_name

# The paper's ceval-exam prompt (section 4), verbatim up to the placeholders.
CEVAL_PROMPT = (
    "You need to choose one of the four options A, B, C, and D as the most appropriate answer "
    "to the question. You can only output one character, and this character must be one of A, "
    "B, C, and D. The question content is: {question} The four options are: A. {A} B. {B} "
    "C. {C} D. {D} Your answer is:"
)
LETTERS = ("A", "B", "C", "D")


@dataclass
class EvalConfig:
    """Settings of `minorsft eval`."""

    model: str
    reference: str | None = None  # a model, or a precompute cache of the held-out set
    data: str | list[str] | None = None
    choices: list[str] = field(default_factory=list)
    prompt_field: str | None = None
    response_field: str | None = None
    system_field: str = "system"
    train_turns: str = "all"  # which assistant turns of a --data chat are scored, as precompute's
    # as precompute's; None: a cache --reference's template where it was given one, else the
    # model's own
    chat_template: str | None = None
    max_length: int | None = 2048
    max_rows: int | None = None  # first N held-out rows (quick looks)
    max_questions: int | None = None  # first N questions of each choices file
    dtype: str = "auto"
    device: str = "auto"
    max_batch_tokens: int | None = None
    per_item: str | None = None  # JSONL: one line per held-out row and per question
    on_bad: str = "error"  # a bad --data row: "error" stops, "skip" scores the rest and lists it
    base_model: str | None = None  # where --model's LoRA base is now, if it moved since training
    reference_base_model: str | None = None  # the same for a LoRA run as --reference

    def __post_init__(self):
        # checks them before any work
        if self.on_bad not in {"error", "skip"}:
            raise ValueError(f"--on-bad must be 'error' or 'skip', got {self.on_bad!r}")
        FieldSpec(self.prompt_field, self.response_field, self.system_field,
                  train_turns=self.train_turns)
        if self.reference and self.reference.endswith(".parquet") \
                and not Path(self.reference).exists():  # no model is named so: a mistyped cache
            raise ValueError(f"--reference {self.reference}: no such cache")
        if self.data is None and not self.choices and not looks_like_cache(self.reference):
            given = ""
            if self.reference:  # (a mistyped cache path read as "give a cache")
                missing = not Path(self.reference).exists()
                given = (f" (--reference {self.reference} is "
                         + ("no such path" if missing else "not a cache") + "; a reference "
                         "model is compared on --data)")
            raise ValueError("nothing to evaluate: give --data, --choices, or a cache as "
                             f"--reference{given}")
        if self.data is not None and looks_like_cache(self.reference):
            # The cache's rows are the held-out set (its token ids and reference log-probs);
            # scoring them instead of --data would report numbers for data the user did not ask
            # about, and looking --data's rows up in the cache is not defined for rows it lacks.
            raise ValueError(f"--data and a cache as --reference ({self.reference}) do not go "
                             "together: the cache holds the held-out rows it was written from. "
                             "Drop --data to score the cache's rows, or give the reference "
                             "model instead of its cache to score --data")
        if self.data is None and (given := [
                option for option, value, unset in (
                    ("--prompt-field", self.prompt_field, None),
                    ("--response-field", self.response_field, None),
                    ("--system-field", self.system_field, EvalConfig.system_field),
                    ("--train-turns", self.train_turns, EvalConfig.train_turns),
                    ("--max-length", self.max_length, EvalConfig.max_length),
                    ("--on-bad", self.on_bad, EvalConfig.on_bad))
                if value != unset]):
            # they shape how --data is read; a cache's rows were tokenized and cut by precompute
            raise ValueError(f"{', '.join(given)} apply to --data, and there is none"
                             + (f" (the cache {self.reference} holds rows precompute already "
                                "tokenized and truncated)" if looks_like_cache(self.reference)
                                else ""))
        if self.reference_base_model and (not self.reference or looks_like_cache(self.reference)):
            raise ValueError("--reference-base-model is where the base of a LoRA run given as "
                             "--reference is now; there is no such --reference")
        if self.reference and not looks_like_cache(self.reference) and self.data is None:
            raise ValueError(f"--reference {self.reference} is what m_theta compares held-out "
                             "answers against: give them with --data (multiple-choice accuracy "
                             "does not use a reference)")
        if self.chat_template is not None and not self.chat_template.strip():
            # (an unset shell variable): silently the model's own template otherwise
            raise ValueError("--chat-template is empty: give a built-in name (chatml, plain), a "
                             ".jinja file or a model folder, or leave the option out")
        if self.max_length is not None and self.max_length < 2:  # (as precompute's)
            raise ValueError("--max-length must be at least 2 (0: no limit)")
        for name in ("max_rows", "max_questions", "max_batch_tokens"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if len({Path(path).resolve() for path in self.choices}) < len(self.choices):
            raise ValueError("a --choices file is given twice: " + " ".join(self.choices))


@dataclass
class Question:
    """One multiple-choice question: four options and the letter of the right one."""

    id: str
    line: int
    question: str
    options: tuple[str, str, str, str]
    answer: str

    def prompt(self) -> str:
        return CEVAL_PROMPT.format(question=self.question, **dict(zip(LETTERS, self.options,
                                                                     strict=True)))


# --- reading multiple-choice files ---------------------------------------------------------------

def read_choices(path: Path, limit: int | None = None) -> list[Question]:
    """Questions from an MMLU-style CSV (question, A, B, C, D, answer; no header, or exactly
    those names) or JSONL; the first `limit` of them (a bad row after those is not read, as
    with `--max-rows`).

    JSONL rows hold ``question``, ``answer`` (a letter A-D, or an index 0-3) and either ``A``..
    ``D`` or ``choices`` (a list of four strings). Bad rows raise DataError with file, line,
    field: a benchmark that silently lost questions would report a wrong accuracy.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        questions = _read_choices_csv(path, limit)
    elif suffix in {".jsonl", ".json", ".ndjson"}:
        questions = _read_choices_jsonl(path, limit)
    else:
        raise DataError(str(path), None, None, f"unknown file type {path.suffix!r}: use .csv "
                                               "(MMLU layout) or .jsonl")
    if not questions:
        # An accuracy of 0/0 is no result; as with empty SFT data, stop and name the file.
        raise DataError(str(path), None, None, "no questions (" + (
            "the file is empty)" if not _read_text(path).strip() else "only the header row)"))
    first_line: dict[str, int] = {}
    for question in questions:  # (a blank cell or string: a malformed question, not one)
        for name, text in (("question", question.question),
                           *zip(LETTERS, question.options, strict=True)):
            if not text.strip():
                raise DataError(str(path), question.line, name, "empty")
        if (first := first_line.setdefault(question.id, question.line)) != question.line:
            raise DataError(str(path), question.line, "id",
                            f"duplicate id {question.id!r} (first on line {first}): "
                            "--per-item could not tell the two apart")
    return questions


def _read_text(path: Path) -> str:
    """The whole file as text (choices files are small): UTF-8, with or without the byte-order
    mark that Excel's "CSV UTF-8" puts before the header."""
    data = path.read_bytes()
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start + len(data) - len(body)  # where a hex editor shows the byte
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(str(path), None, None,
                        f"not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
                        f"(line {line}); save the file as UTF-8 (in Excel: CSV UTF-8)") from None


def _answer_letter(value, path: str, line: int, numbers: bool = True) -> str:
    """The answer's letter; `numbers`: the format can hold the index 0-3 (JSON can, CSV cannot:
    its cells are text, and "1" could mean A or B)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return LETTERS[value]
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return value.strip().upper()
    also = " (or the number 0-3)" if numbers else ""
    if value is None:
        raise DataError(path, line, "answer", f"missing (one of A, B, C, D{also})")
    if numbers and isinstance(value, str) and value.strip() in {"0", "1", "2", "3"}:
        also += f" (an index is a JSON number: write {value.strip()}, not {json.dumps(value)})"
    raise DataError(path, line, "answer", f"expected one of A, B, C, D{also}, got {value!r}")


# The CSV layout's own column names: a first row that spells them is a header, never a question
# (its answer cell is not a letter), so it is skipped.
CSV_HEADER = ("question", "a", "b", "c", "d", "answer")
HEADER_HINT = ("; is the first row a header? The CSV layout has none (or exactly "
               "question,A,B,C,D,answer)")


def _looks_like_header(cells: list[str]) -> bool:
    names = {cell.strip().lower() for cell in cells}
    return "question" in names or "answer" in names


def _read_choices_csv(path: Path, limit: int | None) -> list[Question]:
    questions = []
    first_row = True
    with io.StringIO(_read_text(path), newline="") as handle:
        reader = csv.reader(handle)
        next_line = 1
        for cells in reader:
            # The text line the row starts on, as an editor shows it: a quoted cell can span
            # lines (MMLU's code questions do), so the row count is not the line.
            index, next_line = next_line, reader.line_num + 1
            if len(questions) == limit:
                break
            if not cells or not any(c.strip() for c in cells):
                continue
            is_first, first_row = first_row, False
            if is_first and tuple(c.strip().lower() for c in cells) == CSV_HEADER:
                continue
            hint = HEADER_HINT if is_first and _looks_like_header(cells) else ""
            if len(cells) != 6:
                # An unclosed quote takes the rest of the file into one cell (a cut quote
                # said nothing of it); a well-quoted cell with commas mid-file does not.
                if any("," in cell for cell in cells) and next(reader, None) is None:
                    hint += (f"; a cell holds commas: a quote (\") opened on line {index} is "
                             f"not closed where it should be, so the text up to line "
                             f"{reader.line_num} was read as one cell")
                raise DataError(str(path), index, None,
                                f"expected 6 columns (question, A, B, C, D, answer), got "
                                f"{len(cells)}{hint}")
            question, *options, answer = cells
            try:
                letter = _answer_letter(answer, str(path), index, numbers=False)
            except DataError as error:
                raise DataError(str(path), index, "answer", error.reason + hint) from None
            questions.append(Question(f"{path.stem}:{index}", index, question,
                                      tuple(options), letter))
    return questions


def _read_choices_jsonl(path: Path, limit: int | None) -> list[Question]:
    questions = []
    with io.StringIO(_read_text(path), newline=None) as handle:
        for line_no, text in enumerate(handle, start=1):
            if len(questions) == limit:
                break
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(str(path), line_no, None,
                                malformed_json_reason(error, text.rstrip("\r\n"))) from error
            except (ValueError, RecursionError) as error:  # a 5000-digit number, deep nesting
                raise DataError(str(path), line_no, None,
                                f"unreadable JSON ({error})") from error
            if not isinstance(record, dict):
                hint = (f"; {path.name} looks like one JSON array, but choices files are JSON "
                        f"Lines: one object per line (jq -c '.[]' {path.name} > "
                        f"{lines_file_name(path)})"
                        if line_no == 1 and isinstance(record, list) else "")
                raise DataError(str(path), line_no, None, "expected a JSON object" + hint)
            if not isinstance(record.get("question"), str):
                raise DataError(str(path), line_no, "question", "missing or not a string")
            if "choices" in record:
                options = record["choices"]
                if not (isinstance(options, list) and len(options) == 4):
                    raise DataError(str(path), line_no, "choices", "expected a list of 4 options")
                fields = [f"choices[{i}]" for i in range(4)]
            else:
                missing = [k for k in LETTERS if k not in record]
                if missing:
                    raise DataError(str(path), line_no, missing[0],
                                    "missing (give A, B, C, D or a 'choices' list)")
                options, fields = [record[k] for k in LETTERS], list(LETTERS)
            for option, name in zip(options, fields, strict=True):
                if not isinstance(option, str):
                    hint = (f" (write {json.dumps(str(option))}: the prompt shows it as text)"
                            if isinstance(option, int | float) and not isinstance(option, bool)
                            else "")
                    raise DataError(str(path), line_no, name,
                                    f"an option must be a string, got {option!r}{hint}")
            question_id = str(record.get("id", f"{path.stem}:{line_no}"))
            questions.append(Question(question_id, line_no, record["question"], tuple(options),
                                      _answer_letter(record.get("answer"), str(path), line_no)))
    return questions


def choice_file_labels(paths: list[str]) -> dict[str, str]:
    """The name each choices file's results go under: its stem, or the path as given where
    stems repeat (mc.csv and mc.jsonl, or two test.csv in different folders), so that no
    file's results overwrite another's."""
    stems = [Path(path).stem for path in paths]
    return {path: stem if stems.count(stem) == 1 else path
            for path, stem in zip(paths, stems, strict=True)}


# --- scoring -----------------------------------------------------------------------------------

def choice_examples(tokenizer, question: Question) -> list[Example]:
    """Four sequences, prompt + letter, each with only the letter's token(s) as answer.

    The chat template renders the assistant turn as "<letter><end-of-turn marker(s)>"; the
    answer mask is cut after the tokens that spell the letter, so that the score is
    log p(letter | prompt) alone, whatever closes the turn (eos, Gemma's <end_of_turn>, Phi-3's
    <|end|> and a newline). Under the built-in `plain` template the letter follows the prompt's
    "Your answer is:" directly, as text, so it is scored as " A", as a base model writes it.
    """
    messages = [{"role": "user", "content": question.prompt()}]
    before_letter = " " if renders_plain_text(tokenizer) else ""
    examples = []
    for letter in LETTERS:
        answer = {"role": "assistant", "content": before_letter + letter}
        input_ids, mask, _ = _tokenize_conversation(tokenizer, messages + [answer],
                                                    max_length=None)
        positions = [i for i, m in enumerate(mask) if m]
        if (span := _letter_span(tokenizer, [input_ids[i] for i in positions], letter,
                                 with_space=bool(before_letter))):
            keep = set(positions[span[0]:span[1]])
            mask = [m and i in keep for i, m in enumerate(mask)]
        elif len(positions) > 1 and input_ids[positions[-1]] == tokenizer.eos_token_id:
            mask[positions[-1]] = False  # the letter merged with its neighbours: drop eos only
        examples.append(Example(f"{question.id}/{letter}", question.line, input_ids, mask))
    return examples


def _letter_span(tokenizer, answer_ids: list[int], letter: str,
                 with_space: bool = False) -> tuple[int, int] | None:
    """The shortest run of answer tokens that spells `letter` alone, earliest first (a template
    may put text before it, e.g. an empty <think></think>, and the turn's end after it).
    `with_space`: the answer is " A" (the `plain` template), and a space the tokenizer keeps
    apart from the letter is part of it: else a letter split so was scored without its space's
    log-prob, against letters whose token holds the space (" B"), and won unfairly."""
    for length in range(1, len(answer_ids) + 1):
        for start in range(len(answer_ids) - length + 1):
            if tokenizer.decode(answer_ids[start:start + length]).strip() == letter:
                stop = start + length
                while with_space and start and not tokenizer.decode(
                        answer_ids[start - 1:start]).strip():
                    start -= 1
                return start, stop
    return None


def _single_token_split(examples: list[Example]) -> tuple[list[int], list[int]] | None:
    """(shared prefix, four letter ids) when the options differ only in one final answer token."""
    prefixes, letters = [], []
    for example in examples:
        positions = [i for i, m in enumerate(example.answer_mask) if m]
        if len(positions) != 1:
            return None
        prefixes.append(tuple(example.input_ids[: positions[0]]))
        letters.append(example.input_ids[positions[0]])
    if len(set(prefixes)) != 1 or len(set(letters)) != len(letters):
        return None
    return list(prefixes[0]), letters


@torch.inference_mode()
def _next_token_logps(model, prefixes: list[list[int]], candidates: list[list[int]], pad_id: int,
                      device, max_batch_tokens: int) -> list[list[float]]:
    """log p(candidate | prefix) for each prefix's candidate tokens: one forward per prefix.

    Equal to `answer_logps` on prefix + candidate with the candidate as the only answer token
    (tests check this), at a quarter of the cost for four options.
    """
    out: list[list[float]] = [[] for _ in prefixes]
    fake = [Example(str(i), 0, p, [False] * len(p)) for i, p in enumerate(prefixes)]
    for batch in token_budget_batches(fake, max_batch_tokens):
        input_ids, attention_mask, _ = pad_batch([prefixes[i] for i in batch],
                                                 [fake[i].answer_mask for i in batch],
                                                 pad_id, device)
        last = attention_mask.sum(1) - 1  # [B]: the last real position predicts the next token
        rows = torch.arange(len(batch), device=device)
        if final_logit_transform(model):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, last]
        else:  # as in answer_logps: the output head on the needed positions only, no [B, T, V]
            hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask
                                         ).last_hidden_state  # [B, T, H]
            logits = model.get_output_embeddings()(hidden[rows, last])  # [B, V]
        logps = torch.log_softmax(logits.float(), dim=-1)
        for row, index in enumerate(batch):
            out[index] = logps[row, candidates[index]].tolist()
    return out


def refuse_questions_past_learned_positions(question_sets: dict[str, list[Question]],
                                            tokenizer, limit: int | None) -> None:
    """A question longer, as the model reads it, than `limit` (the model's learned positions;
    None: no such table) would index past them: a DataError naming it."""
    if limit is None:
        return
    for path, questions in question_sets.items():
        for question in questions:
            if (longest := max(len(e.input_ids) for e in choice_examples(tokenizer, question))
                    ) > limit:
                raise DataError(path, question.line, "question",
                                f"{longest} tokens as the model reads it (prompt and answer "
                                f"letter), more than the {limit} positions of its learned "
                                "position embeddings; shorten it or leave it out")


def choice_logps(engine: TransformersEngine, tokenizer, questions: list[Question],
                 fast: bool = True) -> list[list[float]]:
    """log p(letter | prompt) for the four letters of each question, [N][4].

    With `fast` (the default), questions whose four sequences share one prefix and differ in a
    single letter token are scored with one forward pass; any other question (a tokenizer that
    merges the letter with the text before it, multi-token letters) goes through
    `answer_logps` on each of its four sequences.
    """
    result: list[list[float] | None] = [None] * len(questions)
    slow: list[Example] = []
    slow_owner: list[int] = []
    fast_prefixes, fast_letters, fast_owner = [], [], []
    for index, question in enumerate(questions):
        examples = choice_examples(tokenizer, question)
        split = _single_token_split(examples) if fast else None
        if split is None:
            slow.extend(examples)
            slow_owner.append(index)
        else:
            fast_prefixes.append(split[0])
            fast_letters.append(split[1])
            fast_owner.append(index)
    if fast_prefixes:
        # in the engine's precision, as engine.score below (bf16-mixed: under bf16 autocast)
        with autocast_context(engine.device, engine.autocast):
            scores = _next_token_logps(engine.model, fast_prefixes, fast_letters,
                                       engine.pad_id, engine.device, engine.max_batch_tokens)
        for index, row in zip(fast_owner, scores, strict=True):
            result[index] = row
    if slow:
        flat = engine.score(slow)
        for k, index in enumerate(slow_owner):
            result[index] = flat[4 * k: 4 * k + 4]
    return result  # type: ignore[return-value]


def predicted_letter(letter_logps: list[float]) -> str | None:
    """The letter with the highest log-prob (ties go to the earlier letter), or None where the
    scores name none: a NaN, or nothing finite (fp16 overflow). max() would pick "A" there and
    count an answer the model did not give; -inf beside finite scores is a clear no."""
    if any(math.isnan(v) for v in letter_logps) or not any(map(math.isfinite, letter_logps)):
        return None
    return LETTERS[max(range(4), key=lambda k: letter_logps[k])]


def choice_metrics(questions: list[Question], logps: list[list[float]]) -> dict:
    """Accuracy (argmax of the four letter log-probs; ties go to the earlier letter) and the
    mean probability mass the model puts on the four letters (how far it follows the format).
    A question without a prediction (`predicted_letter`) counts as not correct, and as
    "unscored"."""
    predicted = [predicted_letter(row) for row in logps]
    scorable = [letter is not None for letter in predicted]
    correct = [letter == q.answer for q, letter in zip(questions, predicted, strict=True)]
    letter_mass = [sum(math.exp(v) for v in row) for row in logps]
    any_scored = any(scorable)
    return {"questions": len(questions), "correct": sum(correct),
            "unscored": len(questions) - sum(scorable),
            "accuracy": sum(correct) / len(questions) if any_scored else float("nan"),
            "letter_mass": sum(letter_mass) / len(letter_mass) if letter_mass else float("nan")}


def heldout_items(examples: list[Example], policy_logps: list[float],
                  ref_logps: list[float] | None) -> list[dict]:
    """One record per held-out row, for `--per-item`: its summed log-probs and per-token NLL
    (and r / m against the reference), so that two checkpoints can be compared row by row."""
    items = []
    for index, (example, logp) in enumerate(zip(examples, policy_logps, strict=True)):
        m = example.num_tokens
        item = {"kind": "heldout", "id": example.id, **({"file": example.file} if example.file
                                                         else {}),
                "line": example.line, "answer_tokens": m,
                "truncated": example.truncated, "policy_logps": logp, "nll_per_token": -logp / m}
        if ref_logps is not None:
            item["ref_logps"] = ref_logps[index]
            item["r_per_token"] = (logp - ref_logps[index]) / m
        items.append(item)
    return items


def choice_items(label: str, questions: list[Question], logps: list[list[float]]) -> list[dict]:
    """One record per multiple-choice question, for `--per-item`."""
    items = []
    for question, row in zip(questions, logps, strict=True):
        predicted = predicted_letter(row)
        items.append({"kind": "choice", "file": label, "id": question.id, "line": question.line,
                      "answer": question.answer, "predicted": predicted,
                      "correct": predicted == question.answer,
                      "letter_logps": dict(zip(LETTERS, row, strict=True))})
    return items


def write_items(path: Path, items: list[dict]) -> None:
    """JSONL, written whole through a temporary file (an interrupted write leaves no half)."""
    atomic_write_text(path, "".join(json.dumps(json_safe(item), allow_nan=False) + "\n"
                                    for item in items))


# --- the stage ---------------------------------------------------------------------------------

def _cache_examples(path: Path, tokenizer_fp: dict, max_rows: int | None):
    metadata = read_metadata(path)
    cached = metadata.get("fingerprint", {})
    for key, want in comparable_fields(
            cached, {key: tokenizer_fp[key] for key in TOKENIZER_FIELDS}).items():
        if cached.get(key) != want:
            fix = ""
            if key == "chat_template":
                given = (metadata.get("chat_template") or {}).get("given")
                fix = (f" (the cache was rendered with --chat-template {given}, which eval "
                       "uses unless --chat-template says otherwise)" if given else
                       " (the cache was rendered with its model's own template)")
            raise CacheError(f"{path}: the cache was tokenized with a different {key} than the "
                             f"evaluated model's; its token ids do not apply{fix}")
    validate_values(path)  # (a NaN reference log-prob showed as an unexplained "n/a")
    examples, ref_logps = [], []
    for row in islice(iter_rows(path), max_rows):
        examples.append(Example(row["id"], row["line"], row["input_ids"], row["answer_mask"],
                                row["truncated"], row.get("file") or ""))
        ref_logps.append(row["ref_logps"])
    if not examples:  # (train and verify refuse it too)
        raise CacheError(f"{path}: the cache has no rows (were they all rejected? see its "
                         "_rejects.jsonl): nothing to evaluate")
    return examples, ref_logps, metadata


def _chat_template_for(config: EvalConfig) -> ChatTemplate | None:
    """The template text to render with: --chat-template's, else the one a cache --reference
    was scored with (its rows were rendered with it, and a model trained on them was saved
    with it), else None (the model's own)."""
    if config.chat_template:
        return read_chat_template(config.chat_template)
    if looks_like_cache(config.reference):
        return cached_chat_template(read_metadata(Path(config.reference)))
    return None


def _refuse_special_tokens_in_questions(question_sets: dict[str, list[Question]],
                                        tokenizer) -> None:
    """A question or option holding one of the tokenizer's special tokens (`<|im_end|>`) would
    be read as that control token in the rendered prompt, as in training data (data.py)."""
    special = special_token_pattern(tokenizer)
    for path, questions in question_sets.items():
        for question in questions:
            fields = {"question": question.question, **dict(zip(LETTERS, question.options,
                                                                 strict=True))}
            refuse_special_tokens(fields, special, path, question.line)


def _holds_chat_template(folder: Path) -> bool:
    """Whether a saved tokenizer in `folder` has its chat template with it (transformers
    writes chat_template.jinja, older versions a chat_template key or chat_template.json)."""
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    try:
        return "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class _ScoredModel:
    """A model eval scores: a model folder or hub id, or a LoRA run's adapters on its base
    (scored unmerged, on a 4-bit base where the run was QLoRA: the policy as it trained)."""

    name: str  # as given
    option: str  # --model or --reference
    path: str  # what from_pretrained loads (the base, for adapters)
    dtype: str  # --dtype; "auto" for adapters: the precision their run trained in
    adapters: AdapterRun | None

    @classmethod
    def resolve(cls, name: str, option: str, dtype: str,
                base_model: str | None = None) -> _ScoredModel:
        path = resolve_model(name, option=option, adapters=True)
        base_option = "--base-model" if option == "--model" else "--reference-base-model"
        run = adapter_run(path, base_model, base_option)
        if run is None and base_model is not None:
            raise ValueError(f"{base_option} is where the base of LoRA adapters given to "
                             f"{option} is now, and {option} {name} is a whole model, not "
                             "adapters")
        if run is not None and dtype == "auto" and run.dtype:
            dtype = run.dtype
        return cls(name, option, run.base if run else path, dtype, run)

    def tokenizer(self, template: ChatTemplate | None):
        """The run's tokenizer saved beside its adapters (chat template included), else the
        model's, with the template the run's cache was rendered with where it was given one
        (adapters copied without the tokenizer beside them)."""
        folder = self.path
        if self.adapters and any((Path(self.adapters.adapters) / file).exists()
                                 for file in TOKENIZER_FILES):
            folder = self.adapters.adapters
            if template is None and not _holds_chat_template(Path(folder)):
                # (the tokenizer copied without its chat_template.jinja): the run's template
                template = cached_chat_template(self.adapters.cache_metadata) or ChatTemplate(
                    load_tokenizer(self.path, option=self.option).chat_template,
                    f"the chat template of the base {self.path}")
        elif self.adapters and template is None:
            template = cached_chat_template(self.adapters.cache_metadata)
        return load_tokenizer(folder, option=self.option, chat_template=template)

    def note(self) -> str | None:
        if self.adapters is None:
            return None
        four_bit = (f" in 4-bit {self.adapters.quantization} (QLoRA)"
                    if self.adapters.quantization else "")
        precision = ("--dtype auto (float32 on a CPU, bfloat16 on a GPU that has it)"
                     if self.dtype == "auto" else self.dtype)
        unchecked = "" if self.adapters.recorded else (
            "; no run_config.json beside them (not a `minorsft train` output, or copied "
            "without it), so nothing checks that this base, its precision (4-bit for QLoRA) "
            "and the chat template are those the adapters trained with")
        if self.adapters.base_unchecked:
            unchecked = ("; the run (--allow-mismatch, before 0.9.3) recorded nothing of its "
                         "base's weights, so nothing checks that this base is the one it "
                         "trained on")
        return (f"LoRA adapters, scored unmerged on their base {self.path}{four_bit}, "
                f"in {precision}{unchecked}")

    def engine(self, config: EvalConfig) -> TransformersEngine:
        run = self.adapters
        return TransformersEngine(self.path, dtype=self.dtype, device=config.device,
                                  max_batch_tokens=config.max_batch_tokens,
                                  quantization=run.quantization if run else None,
                                  adapters=run.adapters if run else None)


def run_eval(config: EvalConfig, console: Console | None = None) -> dict:
    """Score the model on held-out answers and/or multiple-choice files; return a result dict."""
    console = console or Console(stderr=True)
    # Read the question files first: a bad row should fail before minutes of model loading.
    question_sets = {path: read_choices(Path(path), config.max_questions)
                     for path in config.choices}
    template = _chat_template_for(config)
    model = _ScoredModel.resolve(config.model, "--model", config.dtype, config.base_model)
    tokenizer = model.tokenizer(template)
    for note in template_notes(tokenizer, template) if config.chat_template else ():
        console.print(f"note: {note}", highlight=False, markup=False)
    _refuse_special_tokens_in_questions(question_sets, tokenizer)
    # GPT-2-like models index a table of positions: a longer row was an IndexError
    model_config = read_model_config(model.path)
    position_limit = learned_position_limit(model_config)
    if config.data is not None and not looks_like_cache(config.reference):
        refuse_lengths_past_learned_positions(config.max_length, config.model, model_config)
        if note := context_note(config.max_length, config.model, model_config):
            console.print(f"note: {note}", highlight=False, markup=False)
    refuse_questions_past_learned_positions(question_sets, tokenizer, position_limit)
    model_fp = fingerprint(model.path, tokenizer).as_dict()
    ref_model = None
    if config.reference and not looks_like_cache(config.reference):
        # Before any scoring: a mistyped --reference should not cost the policy's whole pass.
        ref_model = _ScoredModel.resolve(config.reference, "--reference", config.dtype,
                                         config.reference_base_model)
        ref_fp = fingerprint(ref_model.path, ref_model.tokenizer(template)).as_dict()
        for key in TOKENIZER_FIELDS:
            if ref_fp[key] != model_fp[key]:
                fix = (" (give both one template with --chat-template)"
                       if key == "chat_template" and not config.chat_template else "")
                raise ValueError(f"--reference {config.reference} has a different {key} "
                                 f"than --model: log-ratios would compare different tokens{fix}")
        # it reads the same rows, after the policy's whole pass
        ref_config = read_model_config(ref_model.path)
        refuse_lengths_past_learned_positions(config.max_length, config.reference, ref_config)
        if note := context_note(config.max_length, config.reference, ref_config):
            console.print(f"note: {note}", highlight=False, markup=False)
    # The rows before the model: a bad held-out row or cache fails before minutes of loading.
    examples, ref_logps, metadata, data = None, None, None, None
    rejected: list[Rejection] = []
    if looks_like_cache(config.reference):
        examples, ref_logps, metadata = _cache_examples(Path(config.reference), model_fp,
                                                        config.max_rows)
        if position_limit is not None and (
                longest := max(len(e.input_ids) for e in examples)) > position_limit:
            raise ValueError(f"--reference {config.reference}: rows of up to {longest} tokens, "
                             f"more than the {position_limit} positions of {config.model}'s "
                             "learned position embeddings")
        data = metadata.get("source")
    elif config.data is not None:
        data_files = resolve_data(config.data, prefer_split="test")
        spec = FieldSpec(config.prompt_field, config.response_field, config.system_field,
                         train_turns=config.train_turns)
        # islice takes the first N rows; a bad row past them is not theirs and raises nothing
        # (the reader may have rendered up to a tokenizer batch more, unused)
        examples = []
        for item in islice(iter_examples(data_files, tokenizer, spec, config.max_length,
                                         on_bad=config.on_bad), config.max_rows):
            (rejected if isinstance(item, Rejection) else examples).append(item)
        if not examples:
            raise DataError(data_label(data_files), None, None, (
                f"no row could be scored ({len(rejected)} rejected; the first: "
                f"{rejected[0].error})") if rejected else (
                f"no rows (the {'file is' if len(data_files) == 1 else 'files are'} empty)"))
        left_out: dict = {}
        for example in examples:
            count_left_out(left_out, example)
        if left_out:
            console.print(left_out_note(left_out, bool(spec.prompt_field), "scored",
                                        "their scores leave out"), highlight=False, markup=False)
        if rejected:
            console.print(f"note: {len(rejected)} held-out row{'s' * (len(rejected) != 1)} "
                          f"rejected and not scored (the first: {rejected[0].error}); "
                          "the JSON (--json, --json-out) lists them all", highlight=False,
                          markup=False)
        data = str(data_files[0]) if len(data_files) == 1 else data_source(config.data)

    if note := model.note():
        console.print(f"{config.model}: {note}", highlight=False, markup=False)
    engine = model.engine(config)
    result: dict = {"model": config.model, "reference": config.reference,
                    "dtype": engine.precision, "config": asdict(config)}
    for key, scored in (("adapters_on", model), ("reference_adapters_on", ref_model)):
        if scored is not None and scored.adapters is not None:  # what they were scored on
            result[key] = {"base": scored.path, "quantization": scored.adapters.quantization}
    if examples is not None:
        result["data"] = data
    if metadata is not None and metadata.get("dtype") != result["dtype"]:
        console.print(f"[yellow]note:[/] reference cache scored in {metadata.get('dtype')}, "
                      f"this model in {result['dtype']}; m_theta includes that difference")
    if metadata is not None and metadata.get("quantization") != engine.quantization:
        # (a QLoRA run's merged model against its 4-bit cache, say)
        cache_side, model_side = (
            (f"under the model in 4-bit ({metadata['quantization']})", "this model as it is")
            if metadata.get("quantization") else
            ("under the model as it is", f"this model's base in 4-bit ({engine.quantization})"))
        console.print(f"[yellow]note:[/] reference cache scored {cache_side}, {model_side}; "
                      "m_theta includes that difference")

    policy_logps = None
    if examples:
        console.print(f"scoring {len(examples)} held-out answers under {config.model}",
                      markup=False)
        policy_logps = engine.score(examples)

    choices, items = None, []
    if config.choices:
        per_file, all_questions, all_logps = {}, [], []
        labels = choice_file_labels(list(question_sets))
        for choice_path, questions in question_sets.items():
            console.print(f"scoring {len(questions)} question{'s' * (len(questions) != 1)} "
                          f"of {choice_path}", markup=False)
            logps = choice_logps(engine, tokenizer, questions)
            per_file[labels[choice_path]] = choice_metrics(questions, logps)
            if config.per_item:
                items += choice_items(labels[choice_path], questions, logps)
            all_questions += questions
            all_logps += logps
        choices = {"overall": choice_metrics(all_questions, all_logps), "files": per_file}

    if examples and ref_model is not None:
        # One model in memory at a time: the policy's engine goes before the reference's comes.
        engine.close()
        # Scored again even when the weights are the same: a model against itself then
        # checks that the two passes agree (m_theta exactly 0).
        console.print(f"scoring them under the reference {config.reference}", markup=False)
        if note := ref_model.note():
            console.print(f"{config.reference}: {note}", highlight=False, markup=False)
        ref_engine = ref_model.engine(config)
        ref_logps = ref_engine.score(examples)
        ref_engine.close()
    if examples:
        result["heldout"] = heldout_metrics(policy_logps, ref_logps,
                                            [e.num_tokens for e in examples],
                                            sum(e.truncated for e in examples))
        if config.on_bad == "skip" and config.data is not None:
            result["heldout"]["rejected_rows"] = len(rejected)
            result["rejected"] = [rejection.as_dict() for rejection in rejected]
        if config.per_item:
            items = heldout_items(examples, policy_logps, ref_logps) + items
    if choices is not None:
        result["choices"] = choices
    if config.per_item:
        write_items(Path(config.per_item), items)
        result["per_item"] = config.per_item
    return json_safe(result)



def _number(value: float | None, spec: str) -> str:
    """A metric for the table; None is a value that was not finite (see `json_safe`)."""
    return "n/a" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    """The result as a small markdown table (what `minorsft eval` prints)."""
    lines = ["| metric | value |", "|---|---|"]
    if held := result.get("heldout"):
        cut = (f"; {held['truncated_rows']} cut at the maximum length"
               if held.get("truncated_rows") else "")
        if held.get("rejected_rows"):
            cut += f"; {held['rejected_rows']} rejected rows not scored"
        lines.append(f"| held-out rows | {held['rows']} ({held['answer_tokens']} answer "
                     f"tokens{cut}) |")
        lines.append(f"| NLL per answer token | {_number(held['nll_per_token'], '.4f')} |")
        lines.append(f"| mean per-sample NLL | {_number(held['mean_nll'], '.4f')} |")
        if "m_theta" in held:
            lines.append(f"| m_theta vs reference | {_number(held['m_theta'], '+.3e')} |")
    if choices := result.get("choices"):
        # the pooled row unparenthesised: a file may be named all.csv
        for name, metrics in [("accuracy, all files", choices["overall"]),
                              *((f"accuracy ({stem})", m) for stem, m in
                                choices["files"].items())]:
            correct = _number(metrics["correct"], "d")
            lines.append(f"| {name} | {_number(metrics['accuracy'], '.3f')} "
                         f"({correct}/{metrics['questions']}), letter mass "
                         f"{_number(metrics['letter_mass'], '.2f')} |")
    return "\n".join(lines)
