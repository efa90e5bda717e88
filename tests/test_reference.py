"""The eager reference against the spec: a hand-worked example, an independent float64
computation, gradcheck, and the properties the spec states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import grao

IGN = -100


def _spec_numpy(hidden, weight, labels, rewards, beta, lam, eps, bias=None, temperature=1.0):
    """docs/spec.md written out with numpy loops in float64, independent of grao_kernels.reference."""
    h, w, lab, r = (np.asarray(x, dtype=np.float64) if i != 2 else np.asarray(x) for i, x in
                    enumerate((hidden, weight, labels, rewards)))
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    rows, seq_len = lab.shape
    prompts, width = r.shape
    group = width - 1
    seq = np.zeros(rows)
    for i in range(rows):
        total, count = 0.0, 0
        for t in range(seq_len):
            if lab[i, t] == IGN:
                continue
            z = (w @ h[i, t] + b) / temperature
            m = z.max()
            total += z[lab[i, t]] - (m + math.log(np.exp(z - m).sum()))
            count += 1
        seq[i] = total / count if count else 0.0
    loss = 0.0
    for p in range(prompts):
        mu = r[p].mean()
        sigma = math.sqrt(((r[p] - mu) ** 2).mean())
        adv = np.zeros(width) if np.all(r[p] == r[p][0]) else (r[p] - mu) / (sigma + eps)
        ll = seq[p * width:(p + 1) * width]
        objective = 0.0
        for i in range(group):
            objective += adv[i] * ll[i] + beta * adv[group] * ll[group] + lam * adv[i] * (ll[i] - ll[group])
        loss -= objective / group
    return loss / prompts


def _random_problem(prompts, group, seq_len, dim, vocab, dtype=torch.float64, seed=0, ignore_frac=0.3):
    gen = torch.Generator().manual_seed(seed)
    rows = prompts * (group + 1)
    hidden = torch.randn(rows, seq_len, dim, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=gen, dtype=dtype)
    labels = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    labels[torch.rand(rows, seq_len, generator=gen) < ignore_frac] = IGN
    labels[group::group + 1, 0] = torch.randint(0, vocab, (prompts,), generator=gen)  # references non-empty
    rewards = torch.randn(prompts, group + 1, generator=gen, dtype=dtype)
    return hidden, weight, labels, rewards


# -- hand-worked example -------------------------------------------------------------------------

def test_hand_worked_example_g2():
    # One prompt, G = 2: rewards (1, 0) for the samples, 2 for the reference.
    # mu = 1, population variance = (0 + 1 + 1) / 3 = 2/3, sigma = 0.8164966 (sqrt(2/3) = 0.816496580927726).
    # A = (0, -1, 1) / (0.816496580927726 + 1e-6) = (0, -1.2247434, 1.2247434).
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    adv = grao.group_advantages(rewards)
    a = 1.0 / (0.816496580927726 + 1e-6)
    assert abs(a - 1.2247434) < 1e-6
    torch.testing.assert_close(adv, torch.tensor([[0.0, -a, a]], dtype=torch.float64), rtol=1e-12, atol=1e-12)

    # Token log-probs: sample 1 (-1, -2, pad) -> l = -1.5; sample 2 (-0.5, pad, pad) -> -0.5;
    # reference (-3, -1, -2) -> -2.
    token_logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -1.0, -2.0]], dtype=torch.float64,
                              requires_grad=True)
    labels = torch.tensor([[1, 1, IGN], [1, IGN, IGN], [1, 1, 1]])
    loss, stats = grao.grao_loss(token_logp, labels, rewards)  # beta 0.5, lam 0.6
    # exploration J = (0 * -1.5 + (-a) * (-0.5)) / 2 = 0.25 a          -> loss part -0.25 a
    # imitation   J = 0.5 * a * (-2) = -a                               -> loss part  1.00 a
    # alignment   J = 0.6 / 2 * (0 * 0.5 + (-a) * (-0.5 + 2)) = -0.45 a -> loss part  0.45 a
    assert stats["exploration"].item() == pytest.approx(-0.25 * a, rel=1e-12)
    assert stats["imitation"].item() == pytest.approx(1.0 * a, rel=1e-12)
    assert stats["alignment"].item() == pytest.approx(0.45 * a, rel=1e-12)
    assert loss.item() == pytest.approx(1.2 * a, rel=1e-12)
    torch.testing.assert_close(stats["seq_logp"], torch.tensor([-1.5, -0.5, -2.0], dtype=torch.float64))

    # Gradient per token (spec): -c_s / (|s| P); c_o1 = 0, c_o2 = 1.6 * (-a) / 2 = -0.8 a,
    # c_y = 0.5 a - 0.6 * mean(0, -a) = 0.8 a.
    loss.backward()
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.8 * a, 0.0, 0.0], [-0.8 * a / 3] * 3], dtype=torch.float64)
    torch.testing.assert_close(token_logp.grad, expected, rtol=1e-12, atol=1e-12)


# -- against an independent float64 computation of the spec --------------------------------------

@pytest.mark.parametrize("prompts,group,seq_len", [(1, 1, 3), (2, 3, 5), (3, 2, 7), (1, 7, 4)])
@pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)])
def test_linear_grao_loss_matches_spec_float64(prompts, group, seq_len, with_bias, temperature):
    dim, vocab = 6, 11
    hidden, weight, labels, rewards = _random_problem(prompts, group, seq_len, dim, vocab, seed=prompts * 10 + group)
    bias = torch.randn(vocab, dtype=torch.float64) if with_bias else None
    loss, stats = grao.linear_grao_loss(hidden, weight, labels, rewards, bias=bias, temperature=temperature)
    expected = _spec_numpy(hidden, weight, labels, rewards, 0.5, 0.6, 1e-6, bias=bias, temperature=temperature)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected) <= 1e-10 * max(1.0, abs(expected))
    total = stats["exploration"] + stats["imitation"] + stats["alignment"]
    assert abs(total.item() - loss.item()) <= 1e-12 * max(1.0, abs(loss.item()))
    assert stats["advantages"].shape == (prompts, group + 1)
    assert stats["seq_logp"].shape == (prompts * (group + 1),)


def test_hidden_may_be_flat():
    hidden, weight, labels, rewards = _random_problem(2, 2, 4, 5, 9)
    a, _ = grao.linear_grao_loss(hidden, weight, labels, rewards)
    b, _ = grao.linear_grao_loss(hidden.reshape(-1, 5), weight, labels, rewards)
    assert a.item() == b.item()


def test_gradcheck_float64():
    hidden, weight, labels, rewards = _random_problem(2, 2, 3, 4, 7, seed=3)
    bias = torch.randn(7, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))

    def fn(h, w, b):
        return grao.linear_grao_loss(h, w, labels, rewards, bias=b, temperature=0.9)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_row_grad_closed_form_matches_autograd():
    _, _, labels, rewards = _random_problem(3, 4, 6, 2, 5, seed=5)
    token_logp = (-torch.rand(labels.shape, dtype=torch.float64)).requires_grad_()
    loss, stats = grao.grao_loss(token_logp, labels, rewards, beta=0.3, lam=0.9)
    loss.backward()
    row = grao.grao_row_grad(stats["advantages"], stats["num_tokens"], beta=0.3, lam=0.9)
    expected = row.unsqueeze(1) * (labels != IGN)
    torch.testing.assert_close(token_logp.grad, expected, rtol=1e-12, atol=1e-14)


# -- properties -----------------------------------------------------------------------------------

rewards_strategy = st.integers(1, 6).flatmap(lambda g: st.integers(1, 4).flatmap(
    lambda p: st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=g + 1, max_size=g + 1),
                       min_size=p, max_size=p)))


@settings(max_examples=60, deadline=None)
@given(rewards_strategy, st.booleans())
def test_advantages_sum_to_zero(rows, reference_in_stats):
    rewards = torch.tensor(rows, dtype=torch.float64)
    adv = grao.group_advantages(rewards, reference_in_stats=reference_in_stats)
    members = adv if reference_in_stats else adv[:, :-1]
    assert torch.all(members.sum(-1).abs() <= 1e-9 * (1 + members.abs().sum(-1)))


@settings(max_examples=40, deadline=None)
@given(rewards_strategy, st.floats(-100, 100, allow_nan=False), st.integers(0, 1000))
def test_loss_invariant_to_reward_shift(rows, shift, seed):
    rewards = torch.tensor(rows, dtype=torch.float64)
    prompts, width = rewards.shape
    hidden, weight, labels, _ = _random_problem(prompts, width - 1, 3, 4, 6, seed=seed)
    base, _ = grao.linear_grao_loss(hidden, weight, labels, rewards)
    moved, _ = grao.linear_grao_loss(hidden, weight, labels, rewards + shift)
    # Shifting changes the rewards' rounding: allow a tolerance relative to the shifted magnitude.
    assert abs(base.item() - moved.item()) <= 1e-8 * (1 + abs(shift)) * (1 + abs(base.item()))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.floats(-10, 10, allow_nan=False), st.integers(0, 1000))
def test_equal_rewards_give_zero_loss_and_gradient(prompts, group, value, seed):
    hidden, weight, labels, _ = _random_problem(prompts, group, 3, 4, 6, seed=seed)
    hidden.requires_grad_()
    weight.requires_grad_()
    rewards = torch.full((prompts, group + 1), value, dtype=torch.float64)
    loss, stats = grao.linear_grao_loss(hidden, weight, labels, rewards)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(stats["advantages"]) == 0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("group", [1, 2, 8])
def test_all_samples_failing_raises_reference_likelihood(group):
    hidden, weight, labels, _ = _random_problem(2, group, 5, 8, 13, seed=group)
    rewards = torch.zeros(2, group + 1, dtype=torch.float64)
    rewards[:, -1] = 1.0
    weight.requires_grad_()
    loss, stats = grao.linear_grao_loss(hidden, weight, labels, rewards)
    adv = stats["advantages"]
    assert torch.all(adv[:, -1] > 0) and torch.all(adv[:, :-1] < 0)
    loss.backward()
    with torch.no_grad():
        stepped = weight - 1e-3 * weight.grad
        before = stats["seq_logp"].view(2, group + 1)[:, -1]
        _, after_stats = grao.linear_grao_loss(hidden, stepped, labels, rewards)
        after = after_stats["seq_logp"].view(2, group + 1)[:, -1]
    assert torch.all(after > before), (before, after)


def test_reference_outside_stats_option():
    rewards = torch.tensor([[0.0, 2.0, 10.0]], dtype=torch.float64)
    adv = grao.group_advantages(rewards, reference_in_stats=False, eps=0.5)
    # samples only: mu = 1, sigma = 1 -> A = (r - 1) / 1.5
    torch.testing.assert_close(adv, torch.tensor([[-1 / 1.5, 1 / 1.5, 9 / 1.5]], dtype=torch.float64))


def test_empty_sample_row_contributes_nothing():
    hidden, weight, labels, rewards = _random_problem(1, 3, 4, 5, 7, seed=2)
    labels[0] = IGN  # sample 1 has no completion tokens: l = 0, no gradient
    hidden.requires_grad_()
    loss, stats = grao.linear_grao_loss(hidden, weight, labels, rewards)
    loss.backward()
    assert stats["seq_logp"][0].item() == 0.0
    assert torch.count_nonzero(hidden.grad[0]) == 0
    assert torch.isfinite(loss)


# -- validation -----------------------------------------------------------------------------------

def _good():
    return _random_problem(2, 2, 4, 5, 9, dtype=torch.float32, seed=1)


@pytest.mark.parametrize("mutate,match", [
    (lambda h, w, lab, r: (h, w, lab[:5], r), "labels must be"),
    (lambda h, w, lab, r: (h, w, lab, torch.cat([r, r[:, :1]], 1)), r"B = P \* \(G\+1\).*not a multiple"),
    (lambda h, w, lab, r: (h, w, lab, r[:1]), r"B = P \* \(G\+1\)"),
    (lambda h, w, lab, r: (h, w, lab.masked_fill(lab == 3, 9), r), r"labels must be in \[0, V\)"),
    (lambda h, w, lab, r: (h, w, lab.masked_fill(torch.arange(6).unsqueeze(1) == 0, -7), r), "labels must be in"),
    (lambda h, w, lab, r: (h, w, lab.masked_fill(torch.arange(6).unsqueeze(1) == 2, IGN), r), "reference answer of prompt 0"),
    (lambda h, w, lab, r: (h, w, lab, r.masked_fill(r > 0, float("nan"))), "rewards must be finite"),
    (lambda h, w, lab, r: (h, w, lab, r.masked_fill(r > 0, float("inf"))), "rewards must be finite"),
    (lambda h, w, lab, r: (h, w.double(), lab, r), "weight dtype must equal hidden dtype"),
    (lambda h, w, lab, r: (h, w.to("meta"), lab, r), "weight must be on hidden's device"),
    (lambda h, w, lab, r: (h, w[:, :3], lab, r), "last dimension must equal weight's D"),
    (lambda h, w, lab, r: (h, w, lab, r.reshape(-1, 1)), r"G >= 1"),
    (lambda h, w, lab, r: (h, w, lab, r.flatten()), r"rewards must be \[P, G\+1\]"),
    (lambda h, w, lab, r: (h, w, lab.float(), r), "labels must be an integer tensor"),
    (lambda h, w, lab, r: (h.long(), w, lab, r), "hidden must be a floating-point tensor"),
    (lambda h, w, lab, r: (h, w, lab, r.long()), "rewards must be a floating-point tensor"),
    (lambda h, w, lab, r: (h[0], w, lab, r), "hidden .N, D. must have N = labels.numel"),
    (lambda h, w, lab, r: (h, w.unsqueeze(0), lab, r), r"weight must be \[V, D\]"),
])
def test_validation_errors(mutate, match):
    hidden, weight, labels, rewards = mutate(*_good())
    with pytest.raises(grao.GRAOInputError, match=match):
        grao.linear_grao_loss(hidden, weight, labels, rewards)


@pytest.mark.parametrize("kwargs,match", [
    ({"bias": torch.zeros(8)}, r"bias must be \[V\] = \[9\]"),
    ({"bias": torch.zeros(9, dtype=torch.float64)}, "bias dtype must equal"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"eps": -1.0}, "eps must be > 0"),
    ({"beta": float("nan")}, "beta must be finite"),
    ({"lam": "x"}, "lam must be a real number"),
])
def test_validation_of_options(kwargs, match):
    with pytest.raises(grao.GRAOInputError, match=match):
        grao.linear_grao_loss(*_good(), **kwargs)
