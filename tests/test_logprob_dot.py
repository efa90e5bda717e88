"""fused_linear_logprob_dot: sum(coef * logp) with its gradients from the forward pass, against float64.

Every backend (native CPU kernel / chunked PyTorch via "auto" and "chunked", and through the interpreter
"triton-tiles" and "triton-gemm") is held to the rule of tests/numerics.py: no further from float64
than the eager path (``grao_kernels.reference.linear_logprob_dot``) in the same dtype, plus a small tolerance.
"""

from __future__ import annotations

import pytest
import torch

import grao_kernels
from grao_kernels import GRAOInputError, GRAOUnsupportedError, KernelOptions
from grao_kernels.reference import linear_logprob_dot
from tests.numerics import IGN, assert_no_worse_than_eager, make_problem, tol

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["auto", "chunked", pytest.param("triton-tiles", marks=pytest.mark.triton),
            pytest.param("triton-gemm", marks=pytest.mark.triton)]
SMALL_CHUNKS = KernelOptions(chunk_bytes=8 * 1024)  # many chunks, ragged last chunk (chunked path)
CASES = [
    # rows, seq_len, dim, vocab, temperature, bias, packed labels [N]
    (3, 5, 24, 83, 1.0, False, False),
    (2, 7, 17, 101, 0.7, True, True),
    (4, 9, 40, 257, 1.3, True, False),
    (1, 1, 12, 37, 1.0, False, True),
]


def make(rows, seq_len, dim, vocab, *, bias, packed, dtype, device, seed):
    """The shared builder's problem with ``rows`` rows, row 0 empty; ``packed``: labels [N] (the flat form)."""
    p = make_problem(1, rows - 1, seq_len, dim, vocab, dtype=dtype, device=device, seed=seed, bias=bias,
                     empty_rows=(0,), answer_token=False)
    p = p.flat() if packed else p
    return p.hidden, p.weight, p.bias, p.labels, p.coef


def three_ways(backend, hidden, weight, bias, labels, coef, temperature):
    """(value, logp, grads) of the fused op, the eager twin in the same dtype, and the eager twin in float64."""
    out = []
    for fn, dt in ((grao_kernels.fused_linear_logprob_dot, None), (linear_logprob_dot, None),
                   (linear_logprob_dot, torch.float64)):
        ins = [None if t is None else (t.detach().to(dt) if dt else t.detach()).requires_grad_()
               for t in (hidden, weight, bias)]
        kw = {"backend": backend, "options": SMALL_CHUNKS} if fn is grao_kernels.fused_linear_logprob_dot else {}
        value, logp = fn(ins[0], ins[1], labels, coef, bias=ins[2], temperature=temperature, **kw)
        assert not logp.requires_grad
        grads = torch.autograd.grad(value * 1.5, [t for t in ins if t is not None])
        out.append((value.detach(), logp, grads))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_no_worse_than_eager(case, dtype, device, backend):
    if backend.startswith("triton") and dtype == torch.float16 and device == "cpu":
        pytest.skip("fp16 on CPU runs the chunked path whatever the backend; the interpreter adds nothing")
    rows, seq_len, dim, vocab, temperature, with_bias, packed = case
    hidden, weight, bias, labels, coef = make(rows, seq_len, dim, vocab, bias=with_bias, packed=packed, dtype=dtype,
                                              device=device, seed=sum(case[:4]))
    fused, eager, ref = three_ways(backend, hidden, weight, bias, labels, coef, temperature)
    atol, rtol = tol(dtype)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.float32 and fused[1].shape == labels.shape
    assert torch.count_nonzero(fused[1][labels == IGN]) == 0
    assert_no_worse_than_eager(fused[0], eager[0], ref[0], atol=atol, rtol=rtol, what="value")
    assert_no_worse_than_eager(fused[1], eager[1], ref[1], atol=atol, rtol=rtol, what="logp")
    for name, f, e, r in zip(("hidden", "weight", "bias"), fused[2], eager[2], ref[2]):
        assert f.dtype == dtype and f.shape == r.shape
        assert_no_worse_than_eager(f, e, r, atol=atol, rtol=rtol, what=f"d{name}")


def test_float64_matches_reference_to_rounding():
    hidden, weight, bias, labels, coef = make(3, 6, 20, 61, bias=True, packed=False, dtype=torch.float64,
                                              device="cpu", seed=3)
    fused, eager, _ = three_ways("auto", hidden, weight, bias, labels, coef, 0.9)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-12, atol=1e-12)
    for f, e in zip(fused[2], eager[2]):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-12)


def test_equals_linear_logprob_backward():
    """The same gradients as linear_logprob with a backward of sum(coef * logp) (which recomputes the logits)."""
    hidden, weight, bias, labels, coef = make(3, 8, 32, 97, bias=True, packed=True, dtype=torch.float32,
                                              device="cpu", seed=5)
    coef = coef * (labels != IGN)
    a = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    b = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    value, logp = grao_kernels.fused_linear_logprob_dot(a[0], a[1], labels, coef, bias=a[2])
    value.backward()
    lp = grao_kernels.linear_logprob(b[0], b[1], labels, bias=b[2])
    (coef * lp).sum().backward()
    torch.testing.assert_close(logp, lp.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(value.detach(), (coef * lp).sum().detach(), rtol=1e-6, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


def test_tied_weight_and_noncontiguous_hidden():
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.Embedding(53, 16)
    base = torch.randn(16, 20, generator=gen)
    hidden = base.t()  # [20, 16], non-contiguous
    assert not hidden.is_contiguous()
    labels = torch.randint(0, 53, (20,), generator=gen)
    coef = torch.randn(20, generator=gen)
    runs = []
    for fn, dt in ((grao_kernels.fused_linear_logprob_dot, torch.float32), (linear_logprob_dot, torch.float32),
                   (linear_logprob_dot, torch.float64)):  # the fused op, the eager reference in fp32, in float64
        h = hidden.clone().to(dt).requires_grad_()
        w = emb.weight if fn is grao_kernels.fused_linear_logprob_dot else emb.weight.detach().to(dt).requires_grad_()
        value, _ = fn(h, w, labels, coef)
        value.backward()
        runs.append((value.detach(), h.grad, w.grad))
    for name, f, e, r in zip(("value", "dhidden", "dweight"), *runs):
        assert_no_worse_than_eager(f, e, r, dtype=torch.float32, what=name)


def test_no_grad_and_frozen_inputs():
    hidden, weight, _, labels, coef = make(2, 5, 8, 29, bias=False, packed=False, dtype=torch.float32, device="cpu",
                                           seed=1)
    with torch.no_grad():
        v0, lp0 = grao_kernels.fused_linear_logprob_dot(hidden.requires_grad_(), weight, labels, coef)
    assert not v0.requires_grad
    h = hidden.detach().requires_grad_()
    v1, lp1 = grao_kernels.fused_linear_logprob_dot(h, weight, labels, coef)  # weight frozen: no dW work
    v1.backward()
    assert h.grad is not None and weight.grad is None
    torch.testing.assert_close(v0, v1.detach())
    torch.testing.assert_close(lp0, lp1)


def test_second_backward_is_refused():
    hidden, weight, _, labels, coef = make(2, 4, 8, 17, bias=False, packed=False, dtype=torch.float32, device="cpu",
                                           seed=2)
    h = hidden.requires_grad_()
    value, _ = grao_kernels.fused_linear_logprob_dot(h, weight, labels, coef)
    value.backward(retain_graph=True)
    with pytest.raises(GRAOUnsupportedError, match="backward through the same loss twice"):
        value.backward()


@pytest.mark.parametrize("coef, match", [
    (lambda lab: torch.zeros(lab.shape[0], lab.shape[1] + 1), r"coef must be shaped like labels \[3, 4\]"),
    (lambda lab: torch.zeros(lab.shape, dtype=torch.long), "coef must be a floating-point tensor"),
    (lambda lab: torch.full(lab.shape, float("nan")), "coef must be finite"),
    (lambda lab: torch.zeros(lab.shape, requires_grad=True), "coef must not require grad"),
])
def test_bad_coef_is_named(coef, match):
    hidden, weight, _, labels, _ = make(3, 4, 8, 17, bias=False, packed=False, dtype=torch.float32, device="cpu",
                                        seed=0)
    for fn in (grao_kernels.fused_linear_logprob_dot, linear_logprob_dot):
        with pytest.raises(GRAOInputError, match=match):
            fn(hidden, weight, labels, coef(labels))
