"""Losses as pure tensor math (no Ray, no models): DPO and its variants, SFT (and its token-level confidence
form), WSPO, and weak-to-strong generalization's (naive, auxiliary confidence, product) on a head's logits.

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


def pair_conflict_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                       ref_rejected: torch.Tensor, toward_chosen: torch.Tensor, beta: float) -> torch.Tensor:
    """The deception analysis's explicit conflict on preference pairs (the official code's "reverse" reward), per
    pair: -log sigmoid(beta * h toward the conflicting response), where the policy already prefers that response by
    its own log-probs (the gate; not a gradient path), else 0. h as in dpo_loss; `toward_chosen` [B] bool: the
    conflicting response is the chosen one (else the rejected one). The caller weights it by alpha."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    toward = torch.where(toward_chosen, h, -h)
    prefers = torch.where(toward_chosen, policy_chosen >= policy_rejected, policy_chosen < policy_rejected)
    return -F.logsigmoid(beta * toward) * prefers.detach().to(h.dtype)


def masked_mean_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token, averaged over the masked tokens of the whole batch."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def token_confidence_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, a: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Burns et al.'s auxiliary confidence loss on generation, token by token (MACPO's "confident loss" baseline):

    per token t: (1 - a) * -log p(y_t) + a * -log p(argmax p)
    the weak label's token y_t, and the model's own prediction made hard (the argmax: a vocabulary has no class
    balance to threshold by). Averaged over the masked tokens of the whole batch, as masked_mean_nll; at a = 0 it
    is that NLL. `logits` [B, T, V] predict `targets` [B, T]; `mask` [B, T] is 1 on response tokens. Returns the
    loss and the share of the masked tokens where the label is the model's own argmax (detached)."""
    logits = logits.float()
    norm = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    top, argmax = logits.max(dim=-1)  # the argmax token's logit: CE against a hard label, which gets no gradient
    mask = mask.to(logits.dtype)
    per_token = norm - (1 - a) * target - a * top
    tokens = mask.sum().clamp(min=1)
    agreement = ((argmax == targets).to(logits.dtype) * mask).sum() / tokens
    return (per_token * mask).sum() / tokens, agreement.detach()


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


# ---- weak-to-strong generalization (Burns et al. 2024; ALGORITHMS.md section 4) ------------------------------
# A head gives one logit z per example: p = sigmoid(z) is the probability of class 1 (for a pairwise reward head,
# z = r(a) - r(b), the Bradley-Terry probability that a is the better response). With two-class logits [0, z],
# the official code's softmax cross-entropy against soft targets is exactly binary cross-entropy on z.
W2SG_LOSSES = ("xent", "confidence", "product", "conflict")


def confidence_weight(step_frac: float, aux_weight: float, warmup_frac: float) -> float:
    """The auxiliary confidence loss's weight at `step_frac` of training: linear from 0 to `aux_weight` over the
    first `warmup_frac`, then `aux_weight` (the paper's warm-up). The official code's warm-up differs: its weight is
    step_frac x aux_weight during warm-up (at most 0.1 x aux_weight), then jumps to aux_weight."""
    if warmup_frac <= 0 or step_frac >= warmup_frac:
        return aux_weight
    return aux_weight * step_frac / warmup_frac


def harden_by_balance(probs: torch.Tensor, weak_labels: torch.Tensor) -> torch.Tensor:
    """The strong model's own predictions made hard with the batch's class-balance threshold (as the official
    code does): class 1 for the examples whose p lies above the (1 - q) quantile of the batch's p, q being the
    weak labels' mean, so the hardened labels have about the weak labels' share of class 1."""
    share = weak_labels.detach().to(probs.dtype).mean()
    threshold = torch.quantile(probs.detach(), 1 - share)
    return (probs.detach() > threshold).to(probs.dtype)


def w2sg_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, step_frac: float = 1.0, aux_weight: float = 0.5,
              warmup_frac: float = 0.1, weak_power: float = 1.0, strong_power: float = 1.0, alpha: float = 0.5,
              toward: int = 1) -> torch.Tensor:
    """Per-example loss [B] of a head's logits [B] against soft labels [B] in [0, 1] (weak labels, or gold 0/1).

    xent:       CE(p, y)                                            naive training on weak labels
    confidence: (1 - a) CE(p, y) + a CE(p, hard(p)), a = confidence_weight(step_frac, ...), hard = harden_by_balance
    product:    CE(p, t), t proportional to p^strong_power * y^weak_power per class, t detached (official repo)
    conflict:   CE(p, y) + alpha * 1[p on the side of `toward`] * CE(p, toward): the deception analysis's explicit
                conflict, the conflicting behaviour rewarded where the model already predicts it
    """
    logits, labels = logits.float(), labels.float()
    if kind == "xent":
        target = labels
    elif kind == "confidence":
        a = confidence_weight(step_frac, aux_weight, warmup_frac)
        target = (1 - a) * labels + a * harden_by_balance(torch.sigmoid(logits), labels)
    elif kind == "product":
        p = torch.sigmoid(logits.detach())
        one = p.pow(strong_power) * labels.pow(weak_power)
        zero = (1 - p).pow(strong_power) * (1 - labels).pow(weak_power)
        target = one / (one + zero).clamp(min=1e-12)
    elif kind == "conflict":
        opposite = torch.full_like(logits, float(toward))
        gate = ((logits.detach() > 0) == bool(toward)).to(logits.dtype)
        return (F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
                + alpha * gate * F.binary_cross_entropy_with_logits(logits, opposite, reduction="none"))
    else:
        raise ValueError(f"w2sg loss {kind!r}: expected one of {W2SG_LOSSES}")
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none")
