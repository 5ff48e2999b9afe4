"""The losses against the paper's closed-form gradients (eq. 4, 5, 7) and known values."""

import math

import pytest
import torch

from minorsft.loss import LOSS_NAMES, compute_loss, deviation_metric, minorsft_loss, sft_loss


def random_batch(seed: int, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    num_tokens = torch.randint(1, 400, (size,), generator=generator).double()
    ref_logps = -num_tokens * torch.rand(size, generator=generator, dtype=torch.float64) * 3
    # Policies both above and below the reference, with log-ratios up to +-60 nats.
    offsets = torch.rand(size, generator=generator, dtype=torch.float64) - 0.5
    policy_logps = ref_logps + offsets * 120
    return policy_logps.requires_grad_(True), ref_logps, num_tokens


def grad_of(loss_name, policy_logps, ref_logps, num_tokens, beta):
    out = compute_loss(loss_name, policy_logps, ref_logps, num_tokens, beta)
    (gradient,) = torch.autograd.grad(out.losses.mean(), policy_logps)
    return gradient


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.01, 0.04, 0.5])
def test_gradients_equal_closed_forms(seed, beta):
    policy_logps, ref_logps, m = random_batch(seed)
    n = len(m)
    r = (policy_logps - ref_logps).detach()
    # The batch loss is the mean over N samples, hence the 1/N in every closed form.
    expected = {
        "sft": -(1 / m) / n,  # eq. 5
        "sft-dpo": -beta * torch.sigmoid(-beta * r) / n,  # eq. 4
        "minorsft": -(2 / m) * torch.sigmoid(-beta * r) / n,  # eq. 7
    }
    for name in LOSS_NAMES:
        torch.testing.assert_close(grad_of(name, policy_logps, ref_logps, m, beta), expected[name],
                                   rtol=1e-12, atol=0)


def test_minorsft_tends_to_raw_sft_as_beta_goes_to_zero():
    policy_logps, ref_logps, m = random_batch(7)
    sft_gradient = grad_of("sft", policy_logps, ref_logps, m, beta=1.0)
    for beta, tolerance in [(1e-2, 0.35), (1e-4, 4e-3), (1e-7, 4e-6)]:
        minor_gradient = grad_of("minorsft", policy_logps, ref_logps, m, beta)
        relative = ((minor_gradient - sft_gradient).abs() / sft_gradient.abs()).max().item()
        assert relative < tolerance, (beta, relative)


def test_at_step_zero_minorsft_is_raw_sft():
    """r = 0: coefficient sigmoid(0) = 0.5, 2 * 0.5 = 1, so the gradients coincide."""
    m = torch.tensor([3.0, 10.0, 250.0], dtype=torch.float64)
    logps = torch.tensor([-2.0, -17.5, -300.0], dtype=torch.float64, requires_grad=True)
    minor = grad_of("minorsft", logps, logps.detach().clone(), m, 0.04)
    sft = grad_of("sft", logps, logps.detach().clone(), m, 0.04)
    torch.testing.assert_close(minor, sft)
    out = compute_loss("minorsft", logps, logps.detach().clone(), m, 0.04)
    assert out.coefficient.tolist() == [0.5, 0.5, 0.5]


def test_hand_picked_values():
    """m = 4 tokens, log pi_theta = -2, log pi_ref = -4: r = 2, beta r = 0.08.

    sft: -(1/4)(-2) = 0.5; sft-dpo: -log sigmoid(0.08) = 0.653460;
    minorsft: -(2/(0.04*4)) log sigmoid(0.08) = 12.5 * 0.653460 = 8.168250; m_theta = 2/4.
    """
    policy, ref, m = torch.tensor([-2.0]), torch.tensor([-4.0]), torch.tensor([4.0])
    assert compute_loss("sft", policy, ref, m, 0.04).losses.item() == pytest.approx(0.5)
    dpo = -math.log(1 / (1 + math.exp(-0.08)))
    assert compute_loss("sft-dpo", policy, ref, m, 0.04).losses.item() == pytest.approx(dpo)
    assert minorsft_loss(policy, ref, m, 0.04).item() == pytest.approx(12.5 * dpo)
    assert deviation_metric(policy, ref, m).item() == pytest.approx(0.5)
    out = compute_loss("minorsft", policy, ref, m, 0.04)
    assert out.reward.item() == pytest.approx(0.08)
    assert out.coefficient.item() == pytest.approx(1 / (1 + math.exp(0.08)))


def test_all_masked_sample_gives_no_nan():
    """A sample with no answer tokens (m = 0, summed log-probs 0) gives finite losses and
    gradients (m is clamped to 1; data and cache checks refuse such rows before training)."""
    policy = torch.zeros(3, requires_grad=True)
    m = torch.zeros(3)
    for name in LOSS_NAMES:
        out = compute_loss(name, policy, torch.zeros(3), m, 0.04)
        out.losses.mean().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()
        assert torch.isfinite(out.deviation).all()
        policy.grad = None
    assert sft_loss(policy, m).sum().item() == 0


def test_unknown_loss_and_bad_beta_are_refused():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown loss"):
        compute_loss("dpo", x, x, x + 1, 0.1)
    with pytest.raises(ValueError, match="beta"):
        minorsft_loss(x, x, x + 1, 0.0)
