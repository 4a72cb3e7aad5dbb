"""Losses as pure tensor math (no Ray, no models): DPO and its variants, SFT, WSPO.

Inputs are sequence log-probs already reduced over response tokens; the trainer decides the
reduction (sum for sigmoid/hinge as in DPO, per-token mean for IPO as in TRL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit reward margin.

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
    sigmoid (Rafailov et al.): -log sigmoid(beta * h)
    hinge (SLiC):              max(0, 1 - beta * h)
    ipo (Azar et al.):         (h - 1 / (2 * beta))^2
    Returns (losses [B], margins beta*h [B]).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {DPO_LOSSES}")
    return losses, beta * h.detach()


def masked_mean_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token, averaged over the masked tokens of the whole batch."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def wspo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, weak_aligned_logps: torch.Tensor,
              weak_base_logps: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sequence WSPO loss (Zhu et al., ICLR 2025), a regression on per-token log-ratios.

    loss_i = (1/|y_i|) * sum_t ( gamma * (log pi_s - log pi_s_ref) - (log pi_w_aligned - log pi_w_base) )^2
    All inputs are [B, T] over the same token positions; `mask` is 1 on response tokens. The mean
    is per sequence (not over all tokens of the batch), so short and long responses weigh the same;
    the caller takes the batch mean. At the optimum the strong log-ratio is (1/gamma) x the weak one.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    mask = mask.to(policy_logps.dtype)
    residual = gamma * (policy_logps - ref_logps) - (weak_aligned_logps - weak_base_logps)
    return (residual.pow(2) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
