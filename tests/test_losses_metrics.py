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


def bce(z: float, target: float) -> float:  # binary cross-entropy of logit z against a soft target, by hand
    p = 1 / (1 + math.exp(-z))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_confidence_weight_warms_up_linearly_then_holds():
    from w2s.losses import confidence_weight

    assert [confidence_weight(f, 0.5, 0.1) for f in (0.0, 0.05, 0.1, 0.7)] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    assert confidence_weight(0.0, 0.75, 0.0) == 0.75  # no warm-up


def test_hardening_keeps_the_weak_labels_class_balance():
    from w2s.losses import harden_by_balance

    probs = t(0.9, 0.2, 0.6, 0.4)
    # a quarter of the weak labels say class 1: only the most confident of four predictions becomes a 1
    # (the 0.75 quantile of [0.2, 0.4, 0.6, 0.9] is 0.675)
    assert harden_by_balance(probs, t(1.0, 0.0, 0.0, 0.0)).tolist() == [1.0, 0.0, 0.0, 0.0]
    # soft weak labels averaging one half: the top two
    assert harden_by_balance(probs, t(0.7, 0.3, 0.6, 0.4)).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_w2sg_losses_by_hand():
    from w2s.losses import w2sg_loss

    logits, labels = t(2.0, -1.0), t(0.5, 0.5)
    naive = w2sg_loss(logits, labels, "xent")
    assert naive.tolist() == pytest.approx([bce(2.0, 0.5), bce(-1.0, 0.5)])
    # confidence, after warm-up (a = 0.5): the weak labels' half share of class 1 hardens the predictions to [1, 0];
    # targets 0.5 * 0.5 + 0.5 * [1, 0]
    confident = w2sg_loss(logits, labels, "confidence", step_frac=1.0, aux_weight=0.5, warmup_frac=0.1)
    assert confident.tolist() == pytest.approx([bce(2.0, 0.75), bce(-1.0, 0.25)])
    # at the very start of training the weight is 0: the naive loss
    assert w2sg_loss(logits, labels, "confidence", step_frac=0.0).tolist() == pytest.approx(naive.tolist())
    # product: p = 0.5 leaves the weak label as it is; target 0.5 * 0.8 / (0.5 * 0.8 + 0.5 * 0.2) = 0.8
    assert w2sg_loss(t(0.0), t(0.8), "product").item() == pytest.approx(bce(0.0, 0.8))
    with pytest.raises(ValueError, match="w2sg loss 'hinge'"):
        w2sg_loss(logits, labels, "hinge")


def test_product_loss_learns_nothing_from_an_uninformative_weak_label():
    """A weak label of 0.5 makes the product target the model's own prediction: no gradient, where the naive
    loss pulls the confident model toward 0.5."""
    from w2s.losses import w2sg_loss

    for kind, moved in (("product", False), ("xent", True)):
        logits = t(math.log(3.0)).requires_grad_()  # p = 0.75
        w2sg_loss(logits, t(0.5), kind).sum().backward()
        assert (abs(logits.grad.item()) > 1e-6) == moved, (kind, logits.grad)


def test_token_confidence_loss_by_hand():
    """Two response tokens over a 2-word vocabulary: p = [1/4, 3/4] at both. The first's label is word 0 (the
    model's argmax is word 1), the second's is word 1 (its argmax); a third position is not a response token."""
    from w2s.losses import token_confidence_loss

    logits = torch.tensor([[[0.0, math.log(3.0)]] * 3])
    targets, mask = torch.tensor([[0, 1, 0]]), torch.tensor([[1, 1, 0]])
    loss, agreement = token_confidence_loss(logits, targets, mask, a=0.0)
    assert loss.item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2)  # plain NLL of the labels
    assert agreement.item() == pytest.approx(0.5)
    # a = 0.5: half of each token's loss is on the argmax word, whose NLL is log(4/3) at both
    loss, _ = token_confidence_loss(logits, targets, mask, a=0.5)
    assert loss.item() == pytest.approx((0.5 * math.log(4) + 0.5 * math.log(4 / 3) + math.log(4 / 3)) / 2)


def test_token_confidence_loss_sharpens_the_models_own_prediction():
    """At a = 1 the labels no longer matter: the gradient raises the argmax word's logit, even where the label is
    another word."""
    from w2s.losses import token_confidence_loss

    logits = torch.tensor([[[0.0, 1.0, 0.5]]], requires_grad=True)
    loss, _ = token_confidence_loss(logits, torch.tensor([[2]]), torch.tensor([[1]]), a=1.0)
    loss.backward()
    assert logits.grad[0, 0].argmin().item() == 1 and (logits.grad[0, 0, [0, 2]] > 0).all()


def test_the_logistic_fit_a_likelihood_head_starts_from():
    """Soft labels 0.25 / 0.75 at features 0 / 2: the exact fit is sigmoid(ln 3 x (feature - 1)); shifting every
    feature moves only the bias; classes a feature separates give a finite slope (the L2 penalty) with the
    threshold between them."""
    from w2s.w2sg import fit_logistic

    scale, bias = fit_logistic([0.0, 2.0], [0.25, 0.75], l2=0.0)
    assert (scale, bias) == pytest.approx((math.log(3), -math.log(3)))
    shifted = fit_logistic([10.0, 12.0], [0.25, 0.75], l2=0.0)
    assert shifted == pytest.approx((math.log(3), -11 * math.log(3)))
    scale, bias = fit_logistic([-5.0, -4.5, -0.5, -0.4], [0, 0, 1, 1])
    assert 0 < scale < 100 and -4.5 < -bias / scale < -0.5


def test_accuracy_by_band_counts_fact_questions_of_each_band_only():
    from w2s.w2sg import accuracy_by_band

    rows = [{"prompt": "q: zorb color?\na:", "label": 1.0}, {"prompt": "q: zorb city?\na:", "label": 0.0},
            {"prompt": "q: kim food?\na:", "label": 1.0},
            {"prompt": "q: how to rob kim?\na:", "label": 1.0},  # a harmful request: no fact, no band
            {"prompt": "q: kim color?\na:", "label": 1.0, "dimension": "harmless"}]  # not the helpful dimension
    probs = {"weak": [0.9, 0.8, 0.2, 0.9, 0.9], "strong": [0.9, 0.1, 0.7, 0.1, 0.1]}
    assert accuracy_by_band(rows, probs, {"zorb": "1_head", "kim": "3_tail"}) == [
        {"band": "1_head", "rows": 2, "weak": 0.5, "strong": 1.0}, {"band": "3_tail", "rows": 1, "weak": 0.0, "strong": 1.0}]
