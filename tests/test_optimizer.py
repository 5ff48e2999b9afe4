"""The training optimizer: AdamW as the paper trains with it, fused where torch can fuse it,
on fp32 master weights of bf16 models."""

import pytest
import torch

from minorsft.optim import MasterWeightsAdamW, make_optimizer


def test_fused_adamw_takes_the_closed_form_first_and_second_steps():
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(10, 100))  # a matrix: weight decay applies
    start = weights.detach().clone()
    optimizer = make_optimizer([weights], lr=1e-2, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True  # the CPU has a fused kernel (torch >= 2.4)

    grads = [torch.randn(10, 100) + 0.5, torch.randn(10, 100) - 0.5]
    expected = start.clone()
    first, second = torch.zeros(10, 100), torch.zeros(10, 100)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_decay_leaves_biases_and_norm_gains_alone(dtype):
    """One group decayed every parameter: a norm gain of 1 shrank towards 0 under zero
    gradients. transformers' Trainer and TRL leave biases and norm gains out."""
    from minorsft.optim import optimizer_order

    layer, norm = torch.nn.Linear(16, 16).to(dtype), torch.nn.LayerNorm(16).to(dtype)
    named = [*(("layer." + n, p) for n, p in layer.named_parameters()),
             *(("norm." + n, p) for n, p in norm.named_parameters())]
    ordered = optimizer_order(named, weight_decay=0.1)
    assert [n for n, _ in ordered] == ["layer.weight", "layer.bias", "norm.weight", "norm.bias"]
    assert optimizer_order(named, weight_decay=0.0) == named  # no decay: one group, as given
    before = {n: p.detach().clone() for n, p in named}
    optimizer = make_optimizer([p for _, p in ordered], lr=0.1, weight_decay=0.5)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    for _ in range(5):
        for _, p in named:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    for name, p in named:
        if name == "layer.weight":  # decayed by (1 - lr wd)^5, Adam's step being 0 here
            torch.testing.assert_close(p.detach().float(), before[name].float() * 0.95**5,
                                       rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
        else:
            assert torch.equal(p.detach(), before[name]), name
    with pytest.raises(ValueError, match="optimizer_order"):
        make_optimizer([norm.weight, layer.weight], lr=0.1, weight_decay=0.5)


def test_devices_without_a_fused_kernel_get_the_plain_adamw():
    # torch would refuse fused=True only at the first step; make_optimizer must not ask for it.
    weights = torch.nn.Parameter(torch.randn(8, device="meta"))
    optimizer = make_optimizer([weights], lr=1e-3)
    assert not optimizer.defaults["fused"]
    weights.grad = torch.ones(8, device="meta")
    optimizer.step()


def _bf16_weights(seed: int = 0) -> torch.nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    # Magnitudes like a trained layer's (0.02): a bf16 grid step there is 2**-13 = 1.2e-4.
    return torch.nn.Parameter((0.02 * torch.randn(4096, generator=generator)).bfloat16())


def _grads(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [(1e-3 * torch.randn(4096, generator=generator)).bfloat16() for _ in range(steps)]


def test_master_weights_follow_fp32_adamw_and_move_bf16_weights():
    weights = _bf16_weights()
    start = weights.detach().clone()
    optimizer = make_optimizer([weights], lr=2e-5)  # the paper's lr for MinorSFT
    assert isinstance(optimizer, MasterWeightsAdamW)
    reference = torch.nn.Parameter(start.float())  # fp32 AdamW on the same gradients
    reference_optimizer = torch.optim.AdamW([reference], lr=2e-5, weight_decay=0.0, fused=True)
    pure = _bf16_weights()  # what bf16 AdamW without master weights does
    pure_optimizer = make_optimizer([pure], lr=2e-5, master_weights=False)
    assert not isinstance(pure_optimizer, MasterWeightsAdamW)
    for grad in _grads(20):
        weights.grad, reference.grad, pure.grad = grad.clone(), grad.float(), grad.clone()
        for opt in (optimizer, reference_optimizer, pure_optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert weights.grad is None  # the model's own gradients are cleared too
    torch.testing.assert_close(optimizer.masters[0], reference.detach(), rtol=0, atol=0)
    assert torch.equal(weights.detach(), reference.detach().bfloat16())  # rounded copy
    # Pure bf16 AdamW rounds each small update on its own: most are lost, some overshoot by a
    # whole grid step. The master weights' bf16 copy is off fp32 AdamW by its rounding only.
    want = reference.detach() - start.float()
    got = weights.detach().float() - start.float()
    got_pure = pure.detach().float() - start.float()
    cosine = torch.nn.functional.cosine_similarity
    # (measured: cosine 0.955 and norm ratio 1.04 with master weights; 0.49 and 0.49 without)
    assert cosine(got, want, dim=0) > 0.9
    assert cosine(got_pure, want, dim=0) < 0.7 and got_pure.norm() < 0.7 * want.norm()


def test_master_weights_resume_exactly_and_are_required():
    grads = _grads(4)
    straight = _bf16_weights()
    optimizer = make_optimizer([straight], lr=1e-3)
    resumed = _bf16_weights()
    first = make_optimizer([resumed], lr=1e-3)
    for step, grad in enumerate(grads):
        straight.grad = grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        if step < 2:
            resumed.grad = grad.clone()
            first.step()
            first.zero_grad()
    saved = first.state_dict()
    second = make_optimizer([resumed], lr=1e-3)
    second.load_state_dict(saved)
    for grad in grads[2:]:
        resumed.grad = grad.clone()
        second.step()
        second.zero_grad()
    assert torch.equal(second.masters[0], optimizer.masters[0])
    assert torch.equal(resumed.detach(), straight.detach())
    without = {k: v for k, v in saved.items() if k != "master_weights"}
    with pytest.raises(ValueError, match="no fp32 master weights"):
        make_optimizer([resumed], lr=1e-3).load_state_dict(without)


def test_fp32_parameters_beside_bf16_ones_are_updated_in_place():
    adapter = torch.nn.Parameter(torch.zeros(8))  # an fp32 LoRA adapter on a bf16 model, say
    weights = _bf16_weights()
    optimizer = make_optimizer([weights, adapter], lr=1e-2)
    assert optimizer.masters[1] is adapter and len(optimizer.masters) == 2
    weights.grad, adapter.grad = _grads(1)[0], torch.ones(8)
    optimizer.step()
    torch.testing.assert_close(adapter.detach(), torch.full((8,), -1e-2), rtol=1e-4, atol=1e-7)
