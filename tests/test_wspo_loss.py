"""The WSPO loss (ALGORITHMS.md section 1) against hand-computed values, and what it converges to."""

import tempfile

import pytest
import torch

from w2s.losses import wspo_loss
from w2s.modeling import GPTSize, ModelSpec, TokenizedBatch, init_gpt2, load_model, token_logprobs
from w2s.world import build_tokenizer

GARBAGE = 100.0  # values at masked positions: must not count


def test_wspo_loss_by_hand_with_per_sequence_mean():
    gamma = 0.5
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    policy = torch.tensor([[-1.0, -2.0, GARBAGE], [-1.0, GARBAGE, GARBAGE]])
    ref = torch.tensor([[-1.5, -1.0, GARBAGE], [-1.0, GARBAGE, 0.0]])
    weak_aligned = torch.tensor([[-0.5, -1.0, GARBAGE], [-0.2, 0.0, GARBAGE]])
    weak_base = torch.tensor([[-1.0, -1.0, 0.0], [-1.2, GARBAGE, 0.0]])
    # sequence 1: token 1: 0.5 * 0.5 - 0.5 = -0.25 -> 0.0625; token 2: 0.5 * -1 - 0 = -0.5 -> 0.25; mean 0.15625
    # sequence 2: one token: 0.5 * 0 - 1.0 = -1 -> 1.0
    losses = wspo_loss(policy, ref, weak_aligned, weak_base, mask, gamma)
    assert losses.tolist() == pytest.approx([0.15625, 1.0])
    assert losses.mean().item() == pytest.approx(0.578125)
    # a global token mean would give (0.0625 + 0.25 + 1) / 3 = 0.4375: the per-sequence mean is what is asked
    assert losses.mean().item() != pytest.approx(0.4375)


def test_wspo_loss_equals_its_target_form_and_rejects_bad_gamma():
    # ALGORITHMS.md: tau = ref + (weak_aligned - weak_base) / gamma; L = gamma^2 * mean_t (policy - tau)^2
    g = torch.Generator().manual_seed(0)
    policy, ref, wa, wb = (-torch.rand(3, 5, generator=g) * 4 for _ in range(4))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 0, 0, 0]])
    gamma = 0.1
    tau = ref + (wa - wb) / gamma
    expected = gamma**2 * ((policy - tau) ** 2 * mask).sum(-1) / mask.sum(-1)
    assert torch.allclose(wspo_loss(policy, ref, wa, wb, mask, gamma), expected)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        wspo_loss(policy, ref, wa, wb, mask, 0.0)


def test_training_on_a_fixed_target_amplifies_the_weak_log_ratio_by_one_over_gamma():
    """A real (tiny) GPT-2 trained on the WSPO loss alone: its per-token log-ratio to its frozen
    initial self goes to (1/gamma) x the fixed weak log-ratio."""
    gamma = 0.2
    with tempfile.TemporaryDirectory() as tmp:
        init_gpt2(GPTSize(n_layer=1, n_embd=32, n_head=2), build_tokenizer(), tmp, seed=0)
        model, _ = load_model(ModelSpec(path=tmp))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    response = torch.cat([torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], dim=1)
    batch = TokenizedBatch(ids, mask, response)
    token_mask = response[:, 1:]
    with torch.no_grad():
        ref = token_logprobs(model, batch)
    # the weak models' log-ratio: reachable targets of +-1 nat for the strong model once divided by gamma
    weak_ratio = gamma * (torch.rand(2, 11, generator=g) * 2 - 1) * token_mask
    weak_base = -torch.rand(2, 11, generator=g) * 3
    weak_aligned = weak_base + weak_ratio

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        loss = wspo_loss(token_logprobs(model, batch), ref, weak_aligned, weak_base, token_mask, gamma).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        strong_ratio = token_logprobs(model, batch) - ref
    on = token_mask.bool()
    target = weak_ratio[on] / gamma
    assert (strong_ratio[on] - target).abs().max().item() < 0.1, (strong_ratio[on], target)
    # and not by accident: the untrained ratio (0) is far from the target
    assert target.abs().mean().item() > 0.4
