"""Details of training that the other tests only pass through at their defaults.

beta other than 0.04 (in train_step and from the command line), LoRA's alpha/r scale, the logged
metrics of a short step against a plain forward pass, the data order per epoch, the exact lr
factors, the step-0 guard on signs that cancel, and the torch RNG state across a resume.
"""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from typer.testing import CliRunner

from minorsft.cache import CacheError, iter_rows
from minorsft.checkpoints import list_checkpoints
from minorsft.cli import app
from minorsft.train import (
    TrainConfig,
    check_finite,
    check_step0,
    epoch_rows,
    linear_schedule,
    run_train,
    save,
    setup,
    train_step,
    training_batches,
)

from .conftest import as_killed_after, demo_rows, precompute_rows
from .test_accumulation import (
    paper_mean_loss_gradient,
    record_gradients_away_from_the_reference,
)

# One torch thread: many tiny forward passes, where a second thread only adds contention.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, tmp_path_factory):
    """8 rows in one part, scored by the tiny model itself."""
    folder = tmp_path_factory.mktemp("details")
    return precompute_rows(str(tiny_model_dir), folder, demo_rows(2))


def perturbed_step_state(cache, output, loss, beta, batch_size=6, micro_batch_size=3):
    """A trainer state whose policy has moved away from the reference (so r varies from row to
    row) and whose optimizer only records the gradients, leaving the weights as they were."""
    config = TrainConfig(cache=str(cache), output=str(output), loss=loss, beta=beta,
                         batch_size=batch_size, micro_batch_size=micro_batch_size,
                         warmup_ratio=0.0, max_grad_norm=1e12)  # no clipping
    return record_gradients_away_from_the_reference(setup(config, Console(quiet=True))), config


def plain_answer_logps(model, rows) -> list[float]:
    """Each row's summed answer log-prob from the model's own full logits, in float64."""
    values = []
    with torch.no_grad():
        for row in rows:
            ids = row["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            values.append(sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))
                              if row["answer_mask"][t]))
    return values


# --- beta reaches the loss -----------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["minorsft", "sft-dpo"])
def test_beta_half_gives_the_paper_gradient_and_reward(tiny_cache, tmp_path, loss):
    """Every other training test runs at beta = 0.04, so a beta fixed at 0.04 anywhere between
    the config and the loss went unseen. At beta = 0.5 the gradient must be eq. 7's / eq. 3's at
    0.5 and the logged reward 0.5 r."""
    beta = 0.5
    state, config = perturbed_step_state(tiny_cache, tmp_path, loss, beta)
    rows = list(iter_rows(tiny_cache))[:6]
    want = paper_mean_loss_gradient(state.model, rows, loss, beta)
    policy = plain_answer_logps(state.model, rows)
    r = [p - row["ref_logps"] for p, row in zip(policy, rows, strict=True)]
    assert max(abs(x) for x in r) > 1.0  # beta 0.04 and 0.5 give visibly different weights
    metrics = train_step(state, config, rows)
    assert metrics["reward"] == pytest.approx(beta * sum(r) / len(r), rel=1e-4, abs=1e-6)
    for parameter, expected in zip(state.model.parameters(), want, strict=True):
        got = state.optimizer.seen[id(parameter)].double()
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-9


def test_cli_beta_reaches_the_config_and_the_reward(tiny_cache, tmp_path):
    """`--beta 0.3` on the command line is the beta the run records and trains with."""
    output = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--cache", str(tiny_cache), "--output", str(output), "--beta", "0.3",
        "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e-2",
        "--warmup-ratio", "0", "--no-shuffle"])
    assert result.exit_code == 0, result.output
    run_config = json.loads((output / "run_config.json").read_text())
    assert run_config["config"]["beta"] == 0.3
    # Step 0 runs at r = 0 (policy = reference); step 1 saw an update, so r is not 0 there.
    step1 = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()][1]
    r = step1["policy_logps"] - step1["ref_logps"]  # batch mean of r
    assert abs(r) > 1e-2
    assert step1["reward"] == pytest.approx(0.3 * r, rel=1e-4)


# --- LoRA's scale --------------------------------------------------------------------------------

def test_lora_scale_is_alpha_over_r_and_alpha_is_saved(tiny_cache, tmp_path):
    """peft scales the adapters' output by alpha / r: r = 4, alpha = 8 must give 2, not 1 (alpha
    replaced by r), and the saved adapter config must say alpha 8 for whoever loads it."""
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    config = TrainConfig(cache=str(tiny_cache), output=str(tmp_path / "lora"), batch_size=4,
                         micro_batch_size=4, max_steps=1, lora_r=4, lora_alpha=8)
    state = setup(config, Console(quiet=True))
    layers = [m for m in state.model.modules() if isinstance(m, LoraLayer)]
    assert layers
    assert all(layer.scaling["default"] == 2.0 for layer in layers)
    save(state, config)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (4, 8)


# --- logged metrics of a short step --------------------------------------------------------------

@pytest.mark.parametrize("loss", ["minorsft", "sft-dpo", "sft"])
def test_short_step_metrics_are_means_over_its_rows(tiny_cache, tmp_path, loss):
    """5 rows at batch size 6 (a short last batch): each logged metric is the mean over the 5
    rows, of per-token quantities where the name says so, computed here from a plain forward."""
    beta = 0.3
    state, config = perturbed_step_state(tiny_cache, tmp_path, loss, beta)
    rows = list(iter_rows(tiny_cache))[:5]
    policy = plain_answer_logps(state.model, rows)
    metrics = train_step(state, config, rows)

    per_row = {key: [] for key in ("loss", "nll", "m_theta", "coefficient", "reward")}
    for p, row in zip(policy, rows, strict=True):
        m, r = row["num_tokens"], p - row["ref_logps"]
        logsig = float(F.logsigmoid(torch.tensor(beta * r, dtype=torch.float64)))
        per_row["loss"].append({"sft": -p / m, "sft-dpo": -logsig,
                                "minorsft": -2 / (beta * m) * logsig}[loss])
        per_row["nll"].append(-p / m)
        per_row["m_theta"].append(r / m)
        per_row["coefficient"].append(1 / (1 + math.exp(beta * r)))  # sigmoid(-beta r)
        per_row["reward"].append(beta * r)
    # The rows differ, so "divided by m" and "divided by the batch size" change the numbers.
    assert len({row["num_tokens"] for row in rows}) > 1
    assert abs(sum(per_row["m_theta"])) > 1e-2
    assert metrics["samples"] == 5
    for key, values in per_row.items():
        assert metrics[key] == pytest.approx(sum(values) / 5, rel=1e-4, abs=1e-6), key


# --- data order ----------------------------------------------------------------------------------

@pytest.mark.parametrize("buffer_size", [3, 64])
def test_each_epoch_is_a_new_permutation_of_all_rows(tiny_cache, buffer_size):
    """A buffer smaller than the cache (3) and larger (64): every epoch yields every row once,
    and the second epoch is shuffled differently from the first."""
    ids = [row["id"] for row in iter_rows(tiny_cache)]

    def epoch(number):
        return [row["id"] for row in epoch_rows(tiny_cache, 7, True, buffer_size, number)]

    first, second = epoch(0), epoch(1)
    assert sorted(first) == sorted(ids) and sorted(second) == sorted(ids)
    assert first != second
    assert first != ids  # shuffled at all
    # A pure function of (cache, seed, epoch): the same again, and batched epoch by epoch
    # (8 rows in batches of 3: the last of each epoch short, none spanning two epochs).
    assert epoch(0) == first
    batches = list(training_batches(tiny_cache, 7, True, buffer_size, 2, 3))
    assert [len(b) for b in batches] == [3, 3, 2, 3, 3, 2]
    assert [row["id"] for batch in batches for row in batch] == first + second


def test_an_unshuffled_stream_keeps_the_cache_order(tiny_cache):
    ids = [row["id"] for row in iter_rows(tiny_cache)]
    assert ids == [row["id"] for row in demo_rows(2)]  # the cache keeps the input order
    for number in (0, 1):
        assert [row["id"] for row in epoch_rows(tiny_cache, 7, False, 3, number)] == ids


# --- lr schedule ---------------------------------------------------------------------------------

def test_linear_schedule_factors_step_by_step():
    """w = 2 warm-up steps of 6: step s < w runs at (s + 1) / (w + 1) (README: no step at lr 0),
    the peak at step w, then (6 - s) / (6 - w) down to 1/4 at the last step and 0 after it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = linear_schedule(optimizer, 2, 6)
    seen = []
    for _ in range(7):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0, 3 / 4, 2 / 4, 1 / 4, 0.0])


# --- step-0 guard --------------------------------------------------------------------------------

def test_step0_guard_is_not_fooled_by_shifts_that_cancel(tiny_model_dir, tmp_path):
    """ref_logps shifted by +0.01 nats per token on half the rows and -0.01 on the others: the
    signed mean m_theta is 0, but every row is wrong, so the guard (on mean |r|/m) must stop."""
    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(2))
    index = 0
    for part in sorted(cache.glob("part-*.parquet")):
        table = pq.read_table(part)
        metadata = table.schema.metadata  # the cache's own, kept
        shifted = []
        for ref, m in zip(table["ref_logps"].to_pylist(), table["num_tokens"].to_pylist(),
                          strict=True):
            shifted.append(ref + (0.01 if index % 2 == 0 else -0.01) * m)
            index += 1
        table = table.set_column(table.schema.get_field_index("ref_logps"), "ref_logps",
                                 pa.array(shifted, pa.float64()))
        pq.write_table(table.replace_schema_metadata(metadata), part)
    assert index == 8  # the guard's 8 rows: 4 shifted up, 4 down
    config = TrainConfig(cache=str(cache), output=str(tmp_path / "run"), batch_size=4,
                         micro_batch_size=4, max_steps=1)
    with pytest.raises(CacheError, match=r"step-0 m_theta [+-]\S+, mean \|r\|/m 0.01 ") as caught:
        run_train(config, Console(quiet=True))
    m_theta = float(str(caught.value).split("step-0 m_theta ")[1].split(",")[0])
    assert abs(m_theta) < 1e-4  # the signed mean alone would have passed


def test_a_model_with_nan_log_probs_is_stopped_at_step0_not_blamed_on_the_lr(tiny_cache,
                                                                             tmp_path):
    """NaN compares False with the tolerance: the guard let it pass, and step 0 then failed
    with "the updates diverged; train again with a lower --lr" before any update."""
    config = TrainConfig(cache=str(tiny_cache), output=str(tmp_path / "run"), batch_size=4,
                         max_steps=1)
    state = setup(config, Console(quiet=True))
    with torch.no_grad():
        state.model.model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="not all finite .* before any update"):
        check_step0(state, config, Console(quiet=True))


@pytest.mark.parametrize(("step", "cause"), [(0, "no update had happened yet"),
                                             (3, "lower --lr")])
@pytest.mark.parametrize("name", ["loss", "grad_norm"])
def test_a_non_finite_loss_or_gradient_norm_stops_training(step, cause, name):
    metrics = {"loss": 1.0, "grad_norm": 1.0, name: float("inf")}
    with pytest.raises(FloatingPointError, match=f"{name} became inf at step {step}: .*{cause}"):
        check_finite(metrics, step)
    check_finite({"loss": 1.0, "grad_norm": 1.0}, step)


def test_fp16_mixed_non_finite_loss_is_an_overflow_not_an_lr_problem():
    """The scaler skips steps with overflowing gradients; a loss that overflows fp16 in the
    forward pass is not the lr's doing."""
    check_finite({"loss": 1.0, "grad_norm": float("inf"), "skipped_step": True}, 3)
    with pytest.raises(FloatingPointError, match="overflowed fp16's range .* float32"):
        check_finite({"loss": float("inf"), "grad_norm": 1.0, "skipped_step": False}, 3)


# --- RNG state across a resume -------------------------------------------------------------------

def test_resume_with_lora_dropout_equals_an_uninterrupted_run(tiny_cache, tmp_path):
    """Dropout draws from torch's RNG every step: a resumed run equals an uninterrupted one
    only if the checkpoint restores that state (the full-fine-tuning resume tests draw none)."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    def lora_config(output, **overrides):
        settings = dict(batch_size=4, micro_batch_size=2, lr=1e-2, max_steps=4, save_every=2,
                        lora_r=4, lora_alpha=8, lora_dropout=0.5)
        return TrainConfig(cache=str(tiny_cache), output=str(output),
                           **{**settings, **overrides})

    whole = tmp_path / "whole"
    expected = run_train(lora_config(whole), Console(quiet=True))
    assert [s for s, _ in list_checkpoints(whole)] == [2, 4]
    resumed = as_killed_after(whole, 2, copy_to=tmp_path / "resumed")
    history = run_train(lora_config(resumed, resume=True), Console(quiet=True))
    assert [m["step"] for m in history] == [2, 3]
    for one, two in zip(expected[2:], history, strict=True):
        assert two["loss"] == one["loss"] and two["grad_norm"] == one["grad_norm"]
    a = load_file(whole / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Another split draws other masks: said, since the run no longer equals the uninterrupted
    # one (accumulation is exact only without dropout).
    split = as_killed_after(whole, 2, copy_to=tmp_path / "split")
    console = Console(record=True, width=300, file=open(os.devnull, "w"))  # noqa: SIM115
    run_train(lora_config(split, resume=True, micro_batch_size=1), console)
    assert ("the checkpoint's steps ran as micro-batches of 2 x 1 process(es), this run's as "
            "1 x 1: with dropout on" in console.export_text())


# --- dropout -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dropout_cache(tmp_path_factory):
    """A tiny model whose config has attention dropout 0.5 (a plain rate, not an nn.Dropout
    module), and the cache it scored of itself."""
    from .conftest import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("dropout-model")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.config.attention_dropout = 0.5
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return precompute_rows(str(folder / "model"), folder, demo_rows(2))


@pytest.mark.parametrize("keep", [False, True])
def test_dropout_is_off_while_training_unless_kept(dropout_cache, tmp_path, keep):
    """The cache is scored without dropout, so a policy trained with it starts at r != 0: the
    noise enters MinorSFT's coefficient from the first step."""
    output = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--cache", str(dropout_cache), "--output", str(output), "--max-steps", "1",
        "--batch-size", "8", "--micro-batch-size", "8", "--no-shuffle",
        *(["--keep-dropout"] if keep else [])])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("dropout off (the model's attention_dropout 0.5; --keep-dropout keeps it)"
            in text) is not keep
    (step0,) = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    # m_theta, the batch mean of r/m at step 0: 0 up to rounding when the policy computes as
    # the cache did (it is -1e-3 here with the model's rate, whose noise mostly averages out)
    assert (abs(step0["m_theta"]) > 1e-4) if keep else (abs(step0["m_theta"]) < 1e-6)
    saved = json.loads((output / "config.json").read_text())
    assert saved["attention_dropout"] == 0.5  # the model keeps its own rate
    assert json.loads((output / "run_config.json").read_text())["config"]["keep_dropout"] is keep


def test_a_checkpoint_from_before_dropout_was_turned_off_continues_only_with_it(dropout_cache,
                                                                               tmp_path):
    """minorsft < 0.4.1 trained with the model's dropout; resumed now, the run went on without
    it from half way, silently."""
    output = tmp_path / "run"

    def train(**settings):
        return run_train(TrainConfig(cache=str(dropout_cache), output=str(output), max_steps=4,
                                     batch_size=4, micro_batch_size=4, save_every=2,
                                     **settings), Console(quiet=True))

    train(keep_dropout=True)
    as_killed_after(output, 2)
    state_file = output / "checkpoints" / "step-2" / "trainer_state.json"
    trainer_state = json.loads(state_file.read_text())
    del trainer_state["settings"]["keep_dropout"]  # as minorsft 0.4.0 wrote it
    state_file.write_text(json.dumps(trainer_state))
    with pytest.raises(ValueError, match="pass --keep-dropout to continue it"):
        train(resume=True)
    assert [m["step"] for m in train(resume=True, keep_dropout=True)] == [2, 3]


def test_disable_dropout_reaches_modules_and_plain_rates():
    """GPT-2's nn.Dropout modules, OPT's plain `dropout` and `layerdrop` rates, Mixtral's
    training noise: all off, so a forward pass in train mode is the eval-mode one."""
    from transformers import (
        FalconConfig,
        FalconForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        MixtralConfig,
        MixtralForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    from minorsft.models import disable_dropout

    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                           bos_token_id=0, eos_token_id=0)),
        "opt": OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64,
                                        num_attention_heads=2, vocab_size=64,
                                        word_embed_proj_dim=32, layerdrop=0.2, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0, attention_dropout=0.3)),
        # reads its config's hidden_dropout at every forward pass
        "falcon": FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32,
                                                 num_hidden_layers=2, num_attention_heads=2,
                                                 hidden_dropout=0.3, attention_dropout=0.2,
                                                 bos_token_id=0, eos_token_id=0)),
        # multiplies its experts' input by noise while training, a rate by another name
        "mixtral": MixtralForCausalLM(MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
            num_experts_per_tok=2, router_jitter_noise=0.2, bos_token_id=0, eos_token_id=0))}
    # (OPT's attention keeps its rate as `dropout` too: both rates are named; and the configs'
    # own rates, which some models read at each forward pass, are turned off as well)
    rates = {"gpt2": {"Dropout": [0.1], "resid_pdrop": [0.1], "embd_pdrop": [0.1],
                      "attn_pdrop": [0.1], "summary_first_dropout": [0.1]},
             "opt": {"dropout": [0.1, 0.3], "layerdrop": [0.2], "attention_dropout": [0.3]},
             "falcon": {"hidden_dropout": [0.3], "Dropout": [0.2], "attention_dropout": [0.2]},
             "mixtral": {"jitter_noise": [0.2]}}
    ids = torch.randint(1, 64, (1, 12))
    for name, model in models.items():
        model.train()
        assert disable_dropout(model, turn_off=False) == rates[name]  # only read
        assert not torch.equal(model(ids).logits, model(ids).logits)
        assert disable_dropout(model) == rates[name]
        trained = model(ids).logits
        model.eval()
        assert torch.equal(trained, model(ids).logits)
        assert disable_dropout(model) == {}  # nothing left to turn off
