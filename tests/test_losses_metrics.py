"""Pure math against values computed by hand."""

import math

import pytest
import torch

from w2s.losses import dpo_loss, masked_mean_nll
from w2s.metrics import gold_scores, median_pgr, pgr


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_variants_by_hand():
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2
    pc, pr, rc, rr = t(-1.0), t(-3.0), t(-2.0), t(-2.0)
    beta = 0.5
    sig, margin = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    assert sig.item() == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(0.5 * 2)
    assert margin.item() == pytest.approx(1.0)
    hinge, _ = dpo_loss(pc, pr, rc, rr, beta, "hinge")
    assert hinge.item() == pytest.approx(0.0)  # max(0, 1 - 1)
    hinge, _ = dpo_loss(pc, pr, rc, rr, 0.25, "hinge")
    assert hinge.item() == pytest.approx(0.5)  # max(0, 1 - 0.5)
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * beta)) ** 2)  # (2 - 1)^2 = 1


def test_dpo_gradient_prefers_chosen():
    pc, pr = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    loss, _ = dpo_loss(pc, pr, t(-2.0), t(-2.0), 0.1, "sigmoid")
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="loss_type 'nope'"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, "nope")


def test_masked_mean_nll():
    logp = t(-1.0, -3.0, -100.0)
    assert masked_mean_nll(logp, t(1, 1, 0)).item() == pytest.approx(2.0)


def test_pgr():
    assert pgr(0.6, 0.4, 0.8) == pytest.approx(0.5)
    assert pgr(0.9, 0.4, 0.8) == pytest.approx(1.25)
    assert pgr(0.5, 0.8, 0.8) is None  # ceiling must beat weak
    assert median_pgr([0.1, None, 0.5, 0.3]) == pytest.approx(0.3)
    assert median_pgr([None]) is None


def test_gold_scores():
    rows = [{"kind": "helpful", "gold_reward": 1.0}, {"kind": "helpful", "gold_reward": 0.0},
            {"kind": "harmful", "gold_reward": 1.0}]
    assert gold_scores(rows) == {"helpful": 0.5, "harmless": 1.0, "total": 0.75}
