"""The training optimizer is AdamW as the paper trains with it, fused where torch can fuse it."""

import torch

from minorsft.train import TrainConfig, make_optimizer


def test_fused_adamw_takes_the_closed_form_first_and_second_steps():
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(1000))
    start = weights.detach().clone()
    config = TrainConfig(cache="-", output="-", lr=1e-2, weight_decay=0.1)
    optimizer = make_optimizer([weights], config)
    assert optimizer.defaults["fused"] is True  # the CPU has a fused kernel (torch >= 2.4)

    grads = [torch.randn(1000) + 0.5, torch.randn(1000) - 0.5]
    expected = start.clone()
    first, second = torch.zeros(1000), torch.zeros(1000)
    for step, grad in enumerate(grads, start=1):
        weights.grad = grad.clone()
        optimizer.step()
        # AdamW (decoupled weight decay), betas (0.9, 0.999), eps 1e-8, bias-corrected moments
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad**2
        expected = expected * (1 - 1e-2 * 0.1)
        corrected = (first / (1 - 0.9**step)) / ((second / (1 - 0.999**step)).sqrt() + 1e-8)
        expected = expected - 1e-2 * corrected
        torch.testing.assert_close(weights.detach(), expected, rtol=1e-5, atol=1e-6)
    assert (weights.detach() - start).abs().max() > 1e-2  # it moved: not a trivial pass


def test_devices_without_a_fused_kernel_get_the_plain_adamw():
    # torch would refuse fused=True only at the first step; make_optimizer must not ask for it.
    weights = torch.nn.Parameter(torch.randn(8, device="meta"))
    optimizer = make_optimizer([weights], TrainConfig(cache="-", output="-", lr=1e-3))
    assert not optimizer.defaults["fused"]
    weights.grad = torch.ones(8, device="meta")
    optimizer.step()
