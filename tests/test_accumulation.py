"""Gradient accumulation is exact: micro-batch 8 x 1 gives the same update as 2 x 4.

Each micro-batch's summed loss is divided by the step's sample count, so the accumulated gradient
is the gradient of the mean over the whole step, however it is split.
"""

import copy

import pytest
import torch
from rich.console import Console

from minorsft.train import TrainConfig, setup, train_step, training_batches

from .conftest import demo_rows, precompute_rows


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("accumulation")
    return precompute_rows(str(tiny_model_dir), folder, demo_rows(2))


def one_step(cache, tmp_path, loss, micro_batch_size):
    config = TrainConfig(cache=str(cache), output=str(tmp_path), loss=loss, batch_size=8,
                         micro_batch_size=micro_batch_size, lr=1e-2, warmup_ratio=0.0, seed=3,
                         max_grad_norm=1e9)  # no clipping: it would hide a wrong scale
    state = setup(config, Console(quiet=True))
    # Move away from the reference first so that the coefficients are not all 0.5.
    with torch.no_grad():
        for parameter in state.model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    # Plain SGD makes the update lr x (clipped) gradient, so comparing weights compares gradients
    # exactly; Adam's first step, g / (|g| + eps), would amplify float noise where g ~ eps.
    state.optimizer = torch.optim.SGD(state.model.parameters(), lr=config.lr)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 1.0)
    rows = next(training_batches(cache, 3, True, 64, 1, 8))
    metrics = train_step(state, config, rows)
    return metrics, {name: p.detach().clone() for name, p in state.model.named_parameters()}


@pytest.mark.parametrize("loss", ["minorsft", "sft", "sft-dpo"])
def test_micro_batch_8x1_equals_2x4(tiny_cache, tmp_path, loss):
    whole_metrics, whole = one_step(tiny_cache, tmp_path, loss, micro_batch_size=8)
    split_metrics, split = one_step(tiny_cache, tmp_path, loss, micro_batch_size=2)
    assert whole_metrics["coefficient"] != pytest.approx(0.5, abs=1e-4)  # not a trivial case
    for key in ("loss", "m_theta", "coefficient", "reward", "grad_norm"):
        assert split_metrics[key] == pytest.approx(whole_metrics[key], rel=1e-4, abs=1e-6), key
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-5, atol=1e-6)


class GradientRecorder(torch.optim.SGD):
    """An optimizer whose step keeps the gradients it was given, and changes nothing."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().clone() for group in self.param_groups
                     for p in group["params"] if p.grad is not None}


def record_gradients_away_from_the_reference(state):
    """`state` with its policy moved off the reference (so that r differs from row to row) and
    an optimizer that records the gradients instead of stepping."""
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in state.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    state.optimizer = GradientRecorder(state.model.parameters(), lr=1.0)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 1.0)
    return state


def paper_mean_loss_gradient(model, rows, loss, beta):
    """The gradient of the mean per-sample loss, from the paper's formulas in float64, on the
    model's own full logits (none of minorsft's log-prob or loss code)."""
    model64 = copy.deepcopy(model).double()
    losses = []
    for row in rows:
        ids = row["input_ids"]
        logp = torch.log_softmax(model64(input_ids=torch.tensor([ids])).logits[0], -1)
        picked = [logp[t - 1, ids[t]] for t in range(1, len(ids)) if row["answer_mask"][t]]
        policy, m = torch.stack(picked).sum(), len(picked)
        assert m == row["num_tokens"]
        r = policy - row["ref_logps"]
        losses.append({"sft": -policy / m,  # eq. 5
                       "sft-dpo": -torch.nn.functional.logsigmoid(beta * r),  # eq. 3
                       "minorsft": -2 / (beta * m) * torch.nn.functional.logsigmoid(beta * r),
                       }[loss])  # eq. 7
    torch.stack(losses).mean().backward()
    return [p.grad for p in model64.parameters()]


@pytest.mark.parametrize("loss", ["minorsft", "sft", "sft-dpo"])
def test_a_split_short_batch_gives_the_paper_gradient_of_the_mean(tiny_cache, tmp_path, loss):
    """5 rows (a short last batch) in micro-batches of 3 and 2: the accumulated gradient is the
    float64 gradient of the mean of eqs. 5/3/7, not only equal to another split of itself."""
    config = TrainConfig(cache=str(tiny_cache), output=str(tmp_path), loss=loss, batch_size=6,
                         micro_batch_size=3, warmup_ratio=0.0, max_grad_norm=1e12)
    state = record_gradients_away_from_the_reference(setup(config, Console(quiet=True)))
    rows = next(training_batches(tiny_cache, 3, True, 64, 1, 5))
    want = paper_mean_loss_gradient(state.model, rows, loss, config.beta)
    train_step(state, config, rows)
    for parameter, expected in zip(state.model.parameters(), want, strict=True):
        got = state.optimizer.seen[id(parameter)].double()
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-9
