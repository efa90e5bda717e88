"""Baselines against small independent computations (python loops over float64 numbers)."""

from __future__ import annotations

import math

import pytest
import torch

import grao


def _logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_sft_is_mean_token_nll():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert grao.sft_loss(logp, mask).item() == pytest.approx((1.0 + 2.0 + 0.5) / 3, rel=1e-15)
    with pytest.raises(grao.GRAOInputError, match="selects no token"):
        grao.sft_loss(logp, torch.zeros_like(mask))


def test_dpo_matches_formula():
    c, r = torch.tensor([-3.0, -1.0], dtype=torch.float64), torch.tensor([-2.0, -4.0], dtype=torch.float64)
    cr, rr = torch.tensor([-2.5, -1.5], dtype=torch.float64), torch.tensor([-2.5, -3.0], dtype=torch.float64)
    loss, stats = grao.dpo_loss(c, r, cr, rr, beta=0.2)
    expected = 0.0
    for i in range(2):
        margin = 0.2 * ((c[i].item() - cr[i].item()) - (r[i].item() - rr[i].item()))
        expected -= _logsigmoid(margin) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx(0.5)


def test_grpo_advantages_use_sample_std():
    rewards = torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64)
    mean = 3.0
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)  # Bessel-corrected, as TRL
    adv = grao.grpo_advantages(rewards)
    expected = [(x - mean) / (std + 1e-4) for x in (1.0, 2.0, 6.0)]
    assert adv.flatten().tolist() == pytest.approx(expected, rel=1e-12)
    assert grao.grpo_advantages(rewards, scale_rewards=False).flatten().tolist() == pytest.approx([-2, -1, 3])


def _grpo_by_hand(logp, old, ref, mask, adv, kl_beta, lo, hi, loss_type, max_len):
    rows, cols = len(logp), len(logp[0])
    per_token = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        for t in range(cols):
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - lo), 1 + hi)
            value = -min(ratio * adv[i], clipped * adv[i])
            if kl_beta:
                d = ref[i][t] - logp[i][t]
                value += kl_beta * (math.exp(d) - d - 1)
            per_token[i][t] = value
    if loss_type == "grpo":
        return sum(sum(per_token[i][t] for t in range(cols) if mask[i][t]) / max(1, sum(mask[i]))
                   for i in range(rows)) / rows
    total = sum(per_token[i][t] for i in range(rows) for t in range(cols) if mask[i][t])
    if loss_type == "dr_grpo":
        return total / (rows * max_len)
    return total / sum(sum(m) for m in mask)


@pytest.mark.parametrize("loss_type", grao.baselines.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
def test_grpo_loss_matches_hand_computation(loss_type, kl_beta):
    gen = torch.Generator().manual_seed(7)
    logp = -torch.rand(4, 5, generator=gen, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(4, 5, generator=gen, dtype=torch.float64)  # ratios outside the clip range too
    ref = logp + 0.2 * torch.randn(4, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=gen) > 0.3
    mask[:, 0] = True
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    loss, stats = grao.grpo_loss(logp, mask, adv, old_token_logp=old, ref_token_logp=ref, kl_beta=kl_beta,
                                 epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=8)
    expected = _grpo_by_hand(logp.tolist(), old.tolist(), ref.tolist(), mask.tolist(), adv.tolist(), kl_beta,
                             0.2, 0.28, loss_type, 8)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert 0.0 < stats["clip_ratio"].item() < 1.0


def test_grpo_on_policy_gradient_is_advantage_weighted_logprob():
    # With old = current (ratio 1) and no KL, d loss / d logp = -A / |o| / B for the "grpo" type.
    logp = (-torch.rand(2, 3, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, _ = grao.grpo_loss(logp, mask, adv)
    loss.backward()
    expected = torch.tensor([[-1.0 / 2, -1.0 / 2, 0.0], [1.0 / 6, 1.0 / 6, 1.0 / 6]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_baselines_accept_fused_logprobs():
    import grao_kernels
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 3, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen)
    labels = torch.randint(0, 11, (4, 3), generator=gen)
    fused = grao_kernels.linear_logprob(hidden, weight, labels)
    eager = grao.token_logprobs(grao.linear_logits(hidden, weight), labels)
    mask = torch.ones(4, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    a = grao.grpo_loss(fused, mask, adv)[0]
    b = grao.grpo_loss(eager, mask, adv)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grao.sft_loss(fused, mask), grao.sft_loss(eager, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: grao.grpo_loss(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(3)), r"advantages must be \[B\]"),
    (lambda: grao.grpo_loss(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2), loss_type="x"), "loss_type"),
    (lambda: grao.grpo_loss(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2), kl_beta=0.1), "ref_token_logp"),
    (lambda: grao.grpo_loss(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool), torch.zeros(2)), "mask must have the shape"),
    (lambda: grao.dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2)), "rejected_logp must have"),
    (lambda: grao.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0), "beta must be > 0"),
])
def test_baseline_validation(call, match):
    with pytest.raises(grao.GRAOInputError, match=match):
        call()
