"""`train --eval-cache`: held-out NLL and m_theta of the policy every few steps, the same
numbers `minorsft eval` gives for the saved model, with training itself unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import minorsft.train as train_module
from minorsft.cache import CacheError
from minorsft.checkpoints import TrainingInterrupted
from minorsft.eval import EvalConfig, run_eval
from minorsft.heldout import eval_every, is_eval_step
from minorsft.train import TrainConfig, run_train

from .conftest import build_tiny_model, build_tiny_tokenizer, demo_rows, precompute_rows
from .test_train_resume import interrupt_after

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tmp_path_factory):
    """A training cache and a held-out one of other rows, under the tiny model."""
    folder = tmp_path_factory.mktemp("heldout")
    (folder / "train").mkdir()
    (folder / "heldout").mkdir()
    train = precompute_rows(str(tiny_model_dir), folder / "train", demo_rows(4),
                            max_batch_tokens=256)
    held = [{"id": f"held-{n}", "prompt": f"{n} plus {n}", "response": f"{2 * n} in total."}
            for n in range(8)]
    return train, precompute_rows(str(tiny_model_dir), folder / "heldout", held,
                                  max_batch_tokens=256)


def config(caches, output, **overrides):
    train, held = caches
    settings = dict(cache=str(train), output=str(output), batch_size=4, micro_batch_size=2,
                    lr=1e-3, max_steps=4, shuffle_buffer=8, eval_cache=str(held))
    return TrainConfig(**{**settings, **overrides})


def records(output):
    lines = (output / "eval_metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_evaluations_match_eval_and_leave_training_as_it_was(caches, tmp_path):
    run_train(config(caches, tmp_path / "with", eval_every=3), QUIET)
    evaluated = records(tmp_path / "with")
    assert [r["step"] for r in evaluated] == [0, 3, 4]  # before the first step, every 3, last
    assert all(r["rows"] == 8 for r in evaluated)
    # before any update the policy is the reference that scored the held-out cache
    assert abs(evaluated[0]["m_theta"]) < 1e-5
    assert evaluated[-1]["m_theta"] > evaluated[0]["m_theta"] + 1e-3  # trained (lr 1e-3)
    # the last record is what `minorsft eval` measures for the saved model
    final = run_eval(EvalConfig(model=str(tmp_path / "with"), reference=str(caches[1])),
                     QUIET)
    for key in ("rows", "answer_tokens", "nll_per_token", "mean_nll", "m_theta"):
        assert final["heldout"][key] == pytest.approx(evaluated[-1][key], rel=1e-5, abs=1e-6)
    # looking at the policy draws no random numbers and changes no weight
    run_train(config(caches, tmp_path / "without", eval_cache=None), QUIET)
    a = load_file(tmp_path / "with" / "model.safetensors")
    b = load_file(tmp_path / "without" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not (tmp_path / "without" / "eval_metrics.jsonl").exists()


def test_a_resumed_run_keeps_the_evaluations_up_to_its_checkpoint(caches, tmp_path,
                                                                  monkeypatch):
    run_train(config(caches, tmp_path / "a", eval_every=1), QUIET)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        run_train(config(caches, tmp_path / "b", eval_every=1), QUIET)
    monkeypatch.undo()
    # the stop goes to its checkpoint without the evaluation at 2 (minutes, for a large set,
    # of a scheduler's grace period): the resumed run makes it first
    assert [r["step"] for r in records(tmp_path / "b")] == [0, 1]
    run_train(config(caches, tmp_path / "b", eval_every=1, resume=True), QUIET)
    assert records(tmp_path / "b") == records(tmp_path / "a")
    # a record past the checkpoint (a kill after the evaluation at 3) goes; the one at the
    # checkpoint's step stays and is not made again
    (tmp_path / "b" / "run_config.json").unlink()
    for later in ("step-3", "step-4"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / later, ignore_errors=True)
    evaluated = []
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate",
                        lambda score, rows, step, *more: evaluated.append(step)
                        or real(score, rows, step, *more))
    run_train(config(caches, tmp_path / "b", eval_every=1, resume=True), QUIET)
    assert evaluated == [3, 4]
    assert records(tmp_path / "b") == records(tmp_path / "a")
    # a stop at the last step: its checkpoint is the end, and the resume evaluates it
    interrupt_after(monkeypatch, 4)
    with pytest.raises(TrainingInterrupted):
        run_train(config(caches, tmp_path / "c", eval_every=1), QUIET)
    monkeypatch.undo()
    assert [r["step"] for r in records(tmp_path / "c")] == [0, 1, 2, 3]
    run_train(config(caches, tmp_path / "c", eval_every=1, resume=True), QUIET)
    assert records(tmp_path / "c") == records(tmp_path / "a")
    # resumed on other held-out rows: the file mixes two sets, and the run says so
    (tmp_path / "b" / "run_config.json").unlink()
    console = Console(record=True, width=200)
    run_train(config(caches, tmp_path / "b", eval_every=1, eval_rows=3, resume=True), console)
    text = console.export_text()
    assert "holds evaluations on another held-out set (other rows or reference log-probs: 8 " \
           "rows, up to step 2)" in text
    assert "held-out: 3 rows of" in text and "evaluated after steps 3, 4" in text
    # resumed without --eval-cache: the curve ends at the checkpoint, which is said
    (tmp_path / "c" / "run_config.json").unlink()
    console = Console(record=True, width=200)
    run_train(config(caches, tmp_path / "c", resume=True, eval_cache=None, eval_every=None),
              console)
    assert "eval_metrics.jsonl holds held-out evaluations up to step 4, and this run has no " \
           "--eval-cache: its curve ends there" in console.export_text()


def test_a_stop_during_an_evaluation_checkpoints_right_after_it(caches, tmp_path,
                                                               monkeypatch):
    """A Ctrl-C that came while the policy was evaluated stopped only after one more step."""
    import os
    import signal

    real, evaluated = train_module.evaluate, []

    def evaluate_then_interrupt(score, rows, step, *more):
        evaluated.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(score, rows, step, *more)

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_interrupt)
    with pytest.raises(TrainingInterrupted) as stopped:
        run_train(config(caches, tmp_path / "run", eval_every=2), QUIET)
    assert stopped.value.step == 2 and evaluated == [0, 2]
    assert [r["step"] for r in records(tmp_path / "run")] == [0, 2]


def test_held_out_settings_are_checked_before_the_model_loads(caches, tmp_path, monkeypatch):
    train, _ = caches
    with pytest.raises(ValueError, match="--eval-every 2: held-out evaluation needs "
                                         "--eval-cache"):
        config(caches, tmp_path / "run", eval_cache=None, eval_every=2)
    with pytest.raises(ValueError, match="--eval-every and --eval-rows must be positive"):
        config(caches, tmp_path / "run", eval_rows=0)
    with pytest.raises(ValueError, match="--eval-cache is the training cache"):
        config(caches, tmp_path / "run", eval_cache=str(train))
    shutil.copytree(train, tmp_path / "copy.parquet")  # (or a merge of it)
    monkeypatch.setattr("minorsft.train.load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(CacheError, match="scored from the same input as the training cache"):
        run_train(config(caches, tmp_path / "run", eval_cache=str(tmp_path / "copy.parquet")),
                  QUIET)
    # a held-out cache tokenized by another tokenizer: its ids would mean other text
    other = tmp_path / "other"
    other.mkdir()
    tokenizer = build_tiny_tokenizer(extra_corpus=("zebra quokka",))
    build_tiny_model(tokenizer).save_pretrained(other / "model")
    tokenizer.save_pretrained(other / "model")
    foreign = precompute_rows(str(other / "model"), other, demo_rows(1), max_batch_tokens=256)
    with pytest.raises(CacheError, match=f"--eval-cache {foreign}: tokenized with a different "
                                         "tokenizer than the training cache"):
        run_train(config(caches, tmp_path / "run", eval_cache=str(foreign)), QUIET)


def test_evaluation_steps():
    assert eval_every(None, 100) == 10 and eval_every(None, 3) == 1 and eval_every(7, 3) == 7
    assert [d for d in range(26) if is_eval_step(d, eval_every(None, 25), 25)] == [
        0, 3, 6, 9, 12, 15, 18, 21, 24, 25]


def test_ranks_share_the_held_out_micro_batches_and_each_gets_every_score(monkeypatch):
    """Under torchrun each rank scores every world-size-th micro-batch, runs as many forwards as
    the others (FSDP and DDP need that) and, once their scores are added up, has every row's:
    exactly what one process scoring them all gets."""
    from types import SimpleNamespace

    from minorsft.distributed import World

    rows = [{"id": n} for n in range(11)]  # micro-batches of 3: 0-2, 3-5, 6-8, 9-10
    forwards: dict[int, list[list[int]]] = {}

    def state_of(rank: int, world_size: int) -> SimpleNamespace:
        def policy(micro, pad_token_id, device, packing):
            forwards.setdefault(rank, []).append([row["id"] for row in micro])
            return torch.tensor([-1.37 * row["id"] - 0.1 for row in micro]), None

        return SimpleNamespace(world=World(rank=rank, world_size=world_size),
                               model=torch.nn.Linear(1, 1), policy=policy,
                               tokenizer=SimpleNamespace(pad_token_id=0),
                               device=torch.device("cpu"), packing=False, autocast=None)

    config = SimpleNamespace(micro_batch_size=3)
    alone = train_module.policy_logps(state_of(0, 1), config, rows, split=True)
    assert forwards.pop(0) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    shares = []
    monkeypatch.setattr(train_module, "all_reduce_sum",
                        lambda tensor, world: shares.append(tensor.clone()) or tensor)
    for rank in range(3):
        train_module.policy_logps(state_of(rank, 3), config, rows, split=True)
    assert forwards == {0: [[0, 1, 2], [9, 10]], 1: [[3, 4, 5], [0, 1, 2]],
                        2: [[6, 7, 8], [0, 1, 2]]}  # (ranks 1 and 2 repeat the first)
    assert sum(shares).tolist() == alone
    assert all(int((share != 0).sum()) == count for share, count in zip(shares, [5, 3, 3],
                                                                         strict=True))
    # without `split` (the step-0 check) every rank scores every row
    forwards.clear()
    assert train_module.policy_logps(state_of(1, 3), config, rows) == alone
    assert forwards == {1: [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]}
