"""Public fused API (backend="auto": the native kernel on CPU, triton-gemm on CUDA) against the eager
reference and float64: loss, components and gradients of hidden, weight and bias."""

from __future__ import annotations

import functools

import pytest
import torch

import grao
import grao_kernels
from grao_kernels import KernelOptions
from grao_kernels.cpu import chunked
from tests.numerics import IGN, assert_no_worse_than_eager, reference_entropy, tol
from tests import numerics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# On CPU the triton-* backends run the kernels in the Triton interpreter (tests/conftest.py).
BACKENDS = ["auto", "chunked", pytest.param("triton-gemm", marks=pytest.mark.triton),
            pytest.param("triton-tiles", marks=pytest.mark.triton)]


def make_problem(*args, **kwargs):
    """tests.numerics.make_problem as (hidden, weight, bias, labels, rewards)."""
    return numerics.make_problem(*args, **kwargs).tensors


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def run_three_ways(fn_fused, fn_eager, hidden, weight, bias, *args, **kwargs):
    """-> (fused, eager, float64) results of (loss, components, grads)."""
    out = []
    for fn, dt in ((fn_fused, None), (fn_eager, None), (fn_eager, torch.float64)):
        ins = [None if t is None else (t.detach().to(dt) if dt else t.detach()).requires_grad_()
               for t in (hidden, weight, bias)]
        loss, stats = fn(ins[0], ins[1], *args, bias=ins[2], **kwargs)
        comps = torch.stack([stats[k].detach() for k in grao.COMPONENTS])
        out.append((loss.detach(), comps, _grads(loss, ins), stats))
    return out


CASES = [
    # prompts, group, seq_len, dim, vocab, temperature, bias
    (2, 3, 5, 24, 83, 1.0, False),
    (1, 1, 7, 17, 101, 0.7, True),
    (3, 2, 9, 40, 257, 1.3, True),
    (1, 16, 3, 12, 37, 1.0, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_fused_grao_no_worse_than_eager(case, dtype, device, backend):
    small = KernelOptions(chunk_bytes=8 * 1024)  # many chunks, ragged last chunk (chunked path)
    prompts, group, seq_len, dim, vocab, temperature, with_bias = case
    hidden, weight, bias, labels, rewards = make_problem(prompts, group, seq_len, dim, vocab, dtype=dtype,
                                                         device=device, bias=with_bias, seed=sum(case[:5]))
    fused_fn = functools.partial(grao_kernels.fused_linear_grao_loss, backend=backend, options=small)
    fused, eager, ref = run_three_ways(fused_fn, grao.linear_grao_loss, hidden, weight, bias, labels, rewards,
                                       temperature=temperature)
    atol, rtol = tol(dtype)
    assert_no_worse_than_eager(fused[0], eager[0], ref[0], atol=atol, rtol=rtol, what="loss")
    assert_no_worse_than_eager(fused[1], eager[1], ref[1], atol=atol, rtol=rtol, what="components")
    assert abs(fused[1].sum().item() - fused[0].item()) <= 1e-5 * (1 + abs(fused[0].item()))
    for name, f, e, r in zip(("hidden", "weight", "bias"), fused[2], eager[2], ref[2]):
        assert f.dtype == dtype and f.shape == r.shape
        assert_no_worse_than_eager(f, e, r, atol=atol, rtol=rtol, what=f"d{name}")
    torch.testing.assert_close(fused[3]["advantages"].double(), ref[3]["advantages"].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[3]["num_tokens"].cpu(), ref[3]["num_tokens"].cpu())
    assert_no_worse_than_eager(fused[3]["seq_logp"], eager[3]["seq_logp"], ref[3]["seq_logp"], atol=atol, rtol=rtol,
                               what="seq_logp")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprob_no_worse_than_eager(dtype, device, backend):
    small = KernelOptions(chunk_bytes=4 * 1024)
    hidden, weight, bias, labels, _ = make_problem(2, 2, 11, 33, 129, dtype=dtype, device=device, bias=True, seed=4)
    labels[0] = IGN  # an empty row
    grad_out = torch.randn(labels.shape, device=device)
    results = []
    for fn, dt in ((grao_kernels.linear_logprob, None), (None, None), (None, torch.float64)):
        ins = [(t.detach().to(dt) if dt else t.detach()).requires_grad_() for t in (hidden, weight, bias)]
        if fn is None:  # the eager reference in the inputs' dtype, then in float64
            logits = grao.linear_logits(ins[0], ins[1], ins[2], 0.8)
            logp, ent = grao.token_logprobs(logits, labels), reference_entropy(logits.detach(), labels)
        else:
            logp, ent = fn(ins[0], ins[1], labels, bias=ins[2], temperature=0.8, return_entropy=True,
                           backend=backend, options=small)
        grads = torch.autograd.grad((logp * grad_out.to(logp.dtype)).sum(), ins)
        results.append((logp.detach(), ent.detach(), grads))
    (f_logp, f_ent, f_grads), (e_logp, e_ent, e_grads), (r_logp, r_ent, r_grads) = results
    atol, rtol = tol(dtype)
    assert f_logp.dtype == torch.float32 and f_logp.shape == labels.shape
    assert torch.count_nonzero(f_logp[0]) == 0
    assert_no_worse_than_eager(f_logp, e_logp, r_logp, atol=atol, rtol=rtol, what="logp")
    assert_no_worse_than_eager(f_ent, e_ent, r_ent, atol=atol, rtol=rtol, what="entropy")
    for name, f, e, r in zip(("hidden", "weight", "bias"), f_grads, e_grads, r_grads):
        assert_no_worse_than_eager(f, e, r, atol=atol, rtol=rtol, what=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_token_keeps_precision(backend):
    # Regression (found by tests/test_fuzz.py): with logits ~46 and the label the likely token,
    # log p = -3.7e-4; forming it as z - (m + log s) in fp32 lost 0.4 % where eager loses 0.01 %.
    hidden = torch.tensor([[0.0, 1.0]])
    weight = torch.tensor([[0.0, 46.1357], [0.0, 38.2304]])
    labels = torch.tensor([0])
    results = []
    for h, w in ((hidden, weight), (hidden.double(), weight.double())):
        w = w.clone().requires_grad_()
        fused = grao_kernels.linear_logprob(h, w, labels, backend=backend if h.dtype == torch.float32 else "auto")
        eager = grao.token_logprobs(grao.linear_logits(h, w), labels)
        results.append([(x, torch.autograd.grad(x.sum(), w)[0]) for x in (fused, eager)])
    (f, f_grad), (e, e_grad) = results[0]
    (ref, ref_grad), _ = results[1]
    assert_no_worse_than_eager(f.detach(), e.detach(), ref.detach(), atol=0, rtol=1e-3 * 1e-4, what="logp")
    assert_no_worse_than_eager(f_grad, e_grad, ref_grad, atol=0, rtol=1e-3 * 1e-4, what="dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprob_backward_with_all_zero_gradient(backend):
    # Regression: a chunk of rows whose incoming gradient is all zero (e.g. GRPO micro-batch whose
    # advantages are all 0) left the chunked backward with no active token and a zero loop step.
    hidden, weight, _, labels, _ = make_problem(1, 3, 4, 8, 19, dtype=torch.float32)
    hidden.requires_grad_()
    logp = grao_kernels.linear_logprob(hidden, weight, labels, backend=backend)
    (logp * 0.0).sum().backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_float64_matches_eager_to_rounding():
    hidden, weight, bias, labels, rewards = make_problem(2, 4, 6, 9, 31, dtype=torch.float64, bias=True)
    fused, eager, _ = run_three_ways(grao_kernels.fused_linear_grao_loss, grao.linear_grao_loss, hidden, weight,
                                     bias, labels, rewards, temperature=0.5, beta=0.3, lam=1.1)
    assert fused[0].dtype == torch.float64
    assert abs(fused[0].item() - eager[0].item()) <= 1e-12
    for f, e in zip(fused[2], eager[2]):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-12)


def test_reference_outside_stats_and_options_pass_through():
    hidden, weight, _, labels, rewards = make_problem(2, 3, 4, 8, 19, dtype=torch.float64)
    kwargs = dict(beta=0.2, lam=0.1, eps=1e-3, reference_in_stats=False)
    a, sa = grao_kernels.fused_linear_grao_loss(hidden, weight, labels, rewards, **kwargs)
    b, sb = grao.linear_grao_loss(hidden, weight, labels, rewards, **kwargs)
    assert abs(a.item() - b.item()) <= 1e-12
    torch.testing.assert_close(sa["advantages"], sb["advantages"])


def test_noncontiguous_hidden_and_tied_weight():
    torch.manual_seed(0)
    vocab, dim, prompts, group, seq_len = 23, 10, 2, 2, 5
    embedding = torch.nn.Embedding(vocab, dim).double()
    tokens = torch.randint(0, vocab, (prompts * (group + 1), seq_len))
    labels = torch.randint(0, vocab, tokens.shape)
    rewards = torch.randn(prompts, group + 1, dtype=torch.float64)
    grads = []
    for fn in (grao_kernels.fused_linear_grao_loss, grao.linear_grao_loss):
        embedding.zero_grad()
        # Hidden states as a transposed view (non-contiguous), lm_head tied to the embedding.
        hidden = embedding(tokens).transpose(0, 1).contiguous().transpose(0, 1)
        assert not hidden.is_contiguous()
        loss, _ = fn(hidden, embedding.weight, labels, rewards)
        loss.backward()
        grads.append(embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_equal_rewards_zero_gradient_fused():
    hidden, weight, _, labels, _ = make_problem(2, 3, 4, 8, 19, dtype=torch.float32)
    hidden.requires_grad_()
    rewards = torch.full((2, 4), 0.3)
    loss, _ = grao_kernels.fused_linear_grao_loss(hidden, weight, labels, rewards)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_no_grad_forward_and_double_backward_scaling():
    hidden, weight, _, labels, rewards = make_problem(2, 3, 4, 8, 19, dtype=torch.float64)
    with torch.no_grad():
        a, _ = grao_kernels.fused_linear_grao_loss(hidden, weight, labels, rewards)
    h = hidden.clone().requires_grad_()
    b, _ = grao_kernels.fused_linear_grao_loss(h, weight, labels, rewards)
    (3.0 * b).backward()
    h2 = hidden.clone().requires_grad_()
    c, _ = grao.linear_grao_loss(h2, weight, labels, rewards)
    (3.0 * c).backward()
    assert abs(a.item() - c.item()) <= 1e-12
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_through_one_loss_is_refused(backend):
    hidden, weight, _, labels, rewards = make_problem(2, 3, 4, 8, 19, dtype=torch.float32)
    hidden.requires_grad_()
    loss, _ = grao_kernels.fused_linear_grao_loss(hidden, weight, labels, rewards, backend=backend)
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()
    torch.testing.assert_close(hidden.grad, first)  # nothing was accumulated twice


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_advantages_public(backend):
    rewards = torch.randn(5, 9)
    rewards[1] = 0.25  # a constant group: exactly zero
    expected = grao.group_advantages(rewards)
    got = grao_kernels.group_advantages(rewards, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(got[1]) == 0


@pytest.mark.parametrize("bad", [
    dict(rewards=torch.full((2, 4), float("nan")), match="rewards must be finite"),
    dict(rewards=torch.zeros(3, 4), match=r"B = P \* \(G\+1\)"),
    dict(backend="cuda-please", match="backend must be one of"),
])
def test_fused_validation_matches_eager(bad):
    hidden, weight, _, labels, rewards = make_problem(2, 3, 4, 8, 19, dtype=torch.float32)
    match = bad.pop("match")
    rewards = bad.pop("rewards", rewards)
    with pytest.raises(grao.GRAOInputError, match=match):
        grao_kernels.fused_linear_grao_loss(hidden, weight, labels, rewards, **bad)
    if not bad:
        with pytest.raises(grao.GRAOInputError, match=match):
            grao.linear_grao_loss(hidden, weight, labels, rewards)


def test_chunk_rows_from_budget():
    assert chunked.chunk_rows(32000, 48 * 2**20) == 393
    assert chunked.chunk_rows(10**9, 1) == 1
