"""The three losses of Xie et al., "Minor SFT loss for LLM fine-tune" (arXiv 2408.10642).

Every function works on per-sample tensors of shape [B]:

- ``policy_logps``: log pi_theta(y|x), the policy's log-prob of the answer, summed over its
  m answer tokens (differentiable);
- ``ref_logps``: log pi_ref(y|x), the same sum under the frozen reference (from the cache);
- ``num_tokens``: m, the number of answer tokens.

With r = policy_logps - ref_logps (the summed log-ratio), the per-sample losses are

==========  =======  ==================================  ======================================
name        paper    loss                                gradient w.r.t. log pi_theta(y|x)
==========  =======  ==================================  ======================================
sft         eq. 5    -(1/m) log pi_theta                 -(1/m)
sft-dpo     eq. 3,4  -log sigmoid(beta r)                -beta sigmoid(-beta r)
minorsft    eq. 7    -(2/(beta m)) log sigmoid(beta r)   -(2/m) sigmoid(-beta r)
==========  =======  ==================================  ======================================

MinorSFT's closed form is chosen so that its gradient is exactly eq. 7; as beta -> 0 that
gradient tends to raw SFT's. The loss's value does not: it is raw SFT's plus
2 log 2 / (beta m) + log pi_ref / m + O(beta), which grows as beta shrinks, so logged `loss`
values of different losses are not comparable (`nll` is). Note that r is a *summed* log-ratio
and beta multiplies the sum; a per-token averaged ratio is a different loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_NAMES = ("minorsft", "sft", "sft-dpo")


@dataclass
class LossOutput:
    """Per-sample losses [B] and the per-sample quantities the metrics are built from."""

    losses: torch.Tensor  # [B]
    log_ratio: torch.Tensor  # r = log pi_theta - log pi_ref, [B], detached
    coefficient: torch.Tensor  # sigmoid(-beta r), [B], detached
    reward: torch.Tensor  # beta r, [B], detached
    deviation: torch.Tensor  # r / m, [B], detached; its batch mean is m_theta (eq. 8)


def sft_loss(policy_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Raw SFT (eq. 5): the answer's mean token negative log-likelihood, -(1/m) log pi_theta."""
    return -policy_logps / num_tokens.clamp(min=1)


def sft_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """SFT using DPO (eq. 3): -log sigmoid(beta r); gradient -beta sigmoid(-beta r) (eq. 4)."""
    return -F.logsigmoid(beta * (policy_logps - ref_logps))


def minorsft_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, beta: float
) -> torch.Tensor:
    """MinorSFT (eq. 7): -(2/(beta m)) log sigmoid(beta r); gradient -(2/m) sigmoid(-beta r)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive for minorsft, got {beta}")
    log_ratio = policy_logps - ref_logps
    return -2.0 / (beta * num_tokens.clamp(min=1)) * F.logsigmoid(beta * log_ratio)


def compute_loss(
    loss_name: str,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    num_tokens: torch.Tensor,
    beta: float,
) -> LossOutput:
    """Per-sample loss for `loss_name` and the detached quantities every loss logs."""
    ref_logps = ref_logps.to(policy_logps.dtype)
    num_tokens = num_tokens.to(policy_logps.dtype)
    if loss_name == "sft":
        losses = sft_loss(policy_logps, num_tokens)
    elif loss_name == "sft-dpo":
        losses = sft_dpo_loss(policy_logps, ref_logps, beta)
    elif loss_name == "minorsft":
        losses = minorsft_loss(policy_logps, ref_logps, num_tokens, beta)
    else:
        raise ValueError(f"unknown loss {loss_name!r}; choose one of {', '.join(LOSS_NAMES)}")
    with torch.no_grad():
        log_ratio = (policy_logps - ref_logps).detach()
        return LossOutput(
            losses=losses,
            log_ratio=log_ratio,
            coefficient=torch.sigmoid(-beta * log_ratio),
            reward=beta * log_ratio,
            deviation=log_ratio / num_tokens.clamp(min=1),
        )


def deviation_metric(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor
) -> torch.Tensor:
    """m_theta (eq. 8): the batch mean of r/m, the length-normalised log-ratio."""
    return ((policy_logps - ref_logps) / num_tokens.clamp(min=1)).mean()
