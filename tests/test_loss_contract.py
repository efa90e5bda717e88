"""The loss API as documented (README "The loss API", docs/spec.md), issue 22 item 5: every stat of the eager
and the fused GRAO loss is detached; labels carry the layout ([B, T] padded, [N] only token-packed) with
hidden [B, T, D] or flat [B*T, D]; int32 labels (and cu_seqlens / row_index) give what int64 ones give."""

from __future__ import annotations

import re

import pytest
import torch

import grao
import grao_kernels
from grao_kernels import GRAOInputError
from tests.numerics import IGN, make_problem

P, G, T, D, V = 2, 3, 5, 8, 11
B = P * (G + 1)

LOSSES = {"eager": grao.linear_grao_loss, "fused": grao_kernels.fused_linear_grao_loss}


def problem(seed=0, dtype=torch.float32):
    """The shared builder's P=2, G=3 problem of T=5 tokens: a 2-token prompt, row 0's last token padding."""
    p = make_problem(P, G, T, D, V, dtype=dtype, seed=seed, ignore_frac=0.0, prompt_len=2, weight_scale=1.0,
                     answer_token=False)
    p.labels[0, -1] = IGN  # padding
    return p.hidden, p.weight, p.labels, p.rewards.to(dtype)


def packed(labels):
    """The token-packed form of padded ``labels``: kept tokens only, with cu_seqlens and row_index."""
    keep = labels != IGN
    counts = keep.sum(-1)
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = counts.cumsum(0)
    return keep, labels[keep], cu, torch.repeat_interleave(torch.arange(B), counts)


# ------------------------------------------------------------------------------------------ stats are detached


@pytest.mark.parametrize("impl", sorted(LOSSES))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_every_stat_is_detached_and_the_loss_is_not(impl, layout):
    hidden, weight, labels, rewards = problem()
    bias = torch.zeros(V).requires_grad_()
    rewards.requires_grad_()  # even rewards that carry a graph give constant advantages
    if layout == "packed":
        keep, flat, cu, _ = packed(labels)
        h = hidden[keep].detach().requires_grad_()
        loss, stats = LOSSES[impl](h, weight.requires_grad_(), flat, rewards, bias=bias, cu_seqlens=cu)
    else:
        loss, stats = LOSSES[impl](hidden.requires_grad_(), weight.requires_grad_(), labels, rewards, bias=bias)
    assert loss.requires_grad and loss.grad_fn is not None
    assert sorted(stats) == ["advantages", "alignment", "exploration", "imitation", "num_tokens", "seq_logp"]
    for name, value in stats.items():
        assert not value.requires_grad and value.grad_fn is None, name
    parts = sum(stats[k] for k in grao.COMPONENTS)
    torch.testing.assert_close(parts, loss.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert weight.grad is not None and bias.grad is not None


def test_grao_loss_on_token_logprobs_detaches_its_stats_too():
    _, _, labels, rewards = problem()
    token_logp = (-torch.rand(B, T)).requires_grad_()
    loss, stats = grao.grao_loss(token_logp, labels, rewards)
    assert loss.requires_grad
    assert all(not v.requires_grad for v in stats.values()), [k for k, v in stats.items() if v.requires_grad]


# -------------------------------------------------------------------------------- layouts: labels carry them


@pytest.mark.parametrize("impl", sorted(LOSSES))
def test_flat_hidden_with_padded_labels_and_packed_labels_are_accepted(impl):
    hidden, weight, labels, rewards = problem()
    fn = LOSSES[impl]
    ref, ref_stats = fn(hidden, weight, labels, rewards)
    flat, flat_stats = fn(hidden.reshape(B * T, D), weight, labels, rewards)  # hidden [B*T, D], labels [B, T]
    torch.testing.assert_close(flat, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flat_stats["seq_logp"], ref_stats["seq_logp"], rtol=1e-6, atol=1e-6)
    keep, flat_labels, cu, rows = packed(labels)
    for kw in ({"cu_seqlens": cu}, {"row_index": rows}):  # labels [N] with the rows of its tokens
        got, _ = fn(hidden[keep], weight, flat_labels, rewards, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", sorted(LOSSES))
def test_flat_labels_without_rows_are_refused_naming_the_fix(impl):
    hidden, weight, labels, rewards = problem()
    fn = LOSSES[impl]
    with pytest.raises(GRAOInputError) as err:
        fn(hidden.reshape(B * T, D), weight, labels.reshape(-1), rewards)
    assert str(err.value) == (
        "labels must be [B, T] with B = P * (G+1) = 8 (rewards [2, 4]), got shape [40]: flat labels [N] are "
        "token-packed input and need cu_seqlens or row_index; padded rows go as labels.view(8, 5), hidden may "
        "stay [B*T, D]")
    keep, flat_labels, _, _ = packed(labels)  # packed tokens whose cu_seqlens was forgotten (N = 8 * 3 - 1)
    with pytest.raises(GRAOInputError) as err:
        fn(hidden[keep], weight, flat_labels, rewards)
    assert str(err.value) == (
        "labels must be [B, T] with B = P * (G+1) = 8 (rewards [2, 4]), got shape [23]: flat labels [N] are "
        "token-packed input and need cu_seqlens or row_index; padded rows go as labels [B, T] (its 23 entries do "
        "not split into 8 rows), hidden may stay [B*T, D]")
    with pytest.raises(GRAOInputError, match=re.escape(
            "labels must be [B, T] = [8, 5] to match hidden [8, 5, 8], got labels [40]")):
        fn(hidden, weight, labels.reshape(-1), rewards)
    with pytest.raises(GRAOInputError, match=re.escape(
            "hidden [N, D] must have N = labels.numel() = 40 rows (labels [8, 5]), got hidden [39, 8]")):
        fn(hidden.reshape(B * T, D)[:-1], weight, labels, rewards)
    with pytest.raises(GRAOInputError, match=re.escape(
            "hidden must be [N, D] (token-packed) when cu_seqlens or row_index is given, got shape [8, 5, 8]")):
        fn(hidden, weight, labels, rewards, cu_seqlens=packed(labels)[2])


# ---------------------------------------------------------------------------------------- int32 = int64 labels


@pytest.mark.parametrize("impl", sorted(LOSSES))
def test_int32_labels_give_the_int64_results(impl):
    hidden, weight, labels, rewards = problem(seed=1)
    fn = LOSSES[impl]

    def run(lab, **kw):
        h = (hidden[lab_keep] if kw else hidden).detach().requires_grad_()
        w = weight.detach().requires_grad_()
        loss, stats = fn(h, w, lab, rewards, **kw)
        loss.backward()
        return loss, stats, h.grad, w.grad

    lab_keep, flat, cu, rows = packed(labels)
    for kw64, kw32, lab in (({}, {}, labels),
                            ({"cu_seqlens": cu}, {"cu_seqlens": cu.int()}, flat),
                            ({"row_index": rows}, {"row_index": rows.int()}, flat)):
        a, b = run(lab, **kw64), run(lab.int(), **kw32)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
        for k in a[1]:
            assert torch.equal(a[1][k], b[1][k]), k
    for op in (grao_kernels.linear_logprob, grao.token_logprobs):
        args = (hidden, weight, labels) if op is grao_kernels.linear_logprob else (hidden @ weight.t(), labels)
        assert torch.equal(op(*args), op(*args[:-1], labels.int()))
    coef = torch.randn(B, T)
    for op in (grao_kernels.fused_linear_logprob_dot, grao.reference.linear_logprob_dot):
        v64, lp64 = op(hidden, weight, labels, coef)
        v32, lp32 = op(hidden, weight, labels.int(), coef)
        assert torch.equal(v64, v32) and torch.equal(lp64, lp32)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.bool, torch.float32])
def test_other_label_dtypes_are_refused(dtype):
    hidden, weight, labels, rewards = problem()
    bad = labels.clamp(min=0).to(dtype)
    for fn in LOSSES.values():
        with pytest.raises(GRAOInputError) as err:
            fn(hidden, weight, bad, rewards)
        assert str(err.value) == f"labels must be an integer tensor (torch.int64 or torch.int32), got dtype {dtype}"
