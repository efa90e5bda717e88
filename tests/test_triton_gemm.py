"""The triton-gemm backend, CUDA's default (grao_kernels/triton/gemm.py) against float64 references and the eager path.

Its Triton row kernel has no ``tl.dot``, so the interpreter runs it in the real dtypes; the GEMMs are
torch's (CPU here, cuBLAS on a GPU). Numerics standard of tests/numerics.py: no further from float64
than the eager path in the same dtype, plus the tolerance of its table (TOL, keyed by dtype).
"""

from __future__ import annotations

import os

import pytest
import torch

from grao_kernels.reference import linear_grao_loss, linear_logits, token_logprobs
from tests.numerics import assert_no_worse_than_eager, grad_weights, make_problem, tol

pytestmark = pytest.mark.triton
pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
DEVICES = (["cuda"] if HAS_CUDA else []) + (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
if not DEVICES:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import grao_kernels
from grao_kernels.checks import GRAOInputError
from grao_kernels.options import read_env
from grao_kernels.triton.gemm import gemm_logprob_pass, rows_logprob_

IGNORE = -100




def _inputs(n, d, v, dtype, device, seed, *, bias=True, scale=1.0):
    """n tokens of the shared builder (flat form): every 5th ignored, the first and last vocabulary columns used."""
    p = make_problem(1, 0, n, d, v, dtype=dtype, device=device, seed=seed, ignore_frac=0.0, bias=bias, scale=scale,
                     answer_token=False).flat()
    labels = p.labels
    labels[::5] = IGNORE
    labels[1], labels[2] = 0, v - 1
    return p.hidden, p.weight, p.bias, labels, grad_weights(n, seed=seed + 1).to(device)


def _eager(hidden, weight, bias, labels, grad, temperature):
    """The eager path in the inputs' dtype: full logits, autograd gradients of sum(grad * logp)."""
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    b = bias.detach().requires_grad_() if bias is not None else None
    logp = token_logprobs(linear_logits(h, w, b, temperature), labels, ignore_index=IGNORE)
    (grad.to(logp.dtype) * logp).sum().backward()
    return logp.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernel_logprob_and_dz(device, dtype):
    """rows_logprob_ on raw logits: log-probs and, in place, dz = g / T * (onehot - softmax)."""
    g = torch.Generator().manual_seed(0)
    c, v, temperature = 7, 300, 0.7
    z = (torch.randn(c, v, generator=g) * 8).to(device=device, dtype=dtype)
    z[0, 5] = 60.0  # a confident token: its log-prob is tiny and must not be swamped by rounding
    bias = torch.randn(v, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (c,), generator=g).to(device)
    labels[0] = 5
    coef = torch.randn(c, generator=g).to(device)
    scaled64 = (z.double() + bias.double()) / temperature
    logsm = torch.log_softmax(scaled64, -1)
    ref_logp = logsm.gather(1, labels[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(labels, v).double()
    ref_dz = coef.double()[:, None] / temperature * (onehot - logsm.exp())
    eager_logsm = torch.log_softmax(((z + bias).float() / temperature), -1)  # the eager rounding of the logits
    eager_logp = eager_logsm.gather(1, labels[:, None]).squeeze(1)
    eager_dz = (coef[:, None] / temperature * (onehot.float() - eager_logsm.exp())).to(dtype)

    zz = z.clone()
    logp, lse = rows_logprob_(zz, labels, bias, coef, temperature=temperature)
    atol, rtol = tol(dtype)
    assert_no_worse_than_eager(logp, eager_logp, ref_logp, atol=atol, rtol=rtol, what="logp")
    assert abs(logp[0].item() - ref_logp[0].item()) < 1e-6 + abs(eager_logp[0].item() - ref_logp[0].item())
    assert_no_worse_than_eager(zz, eager_dz, ref_dz, atol=atol, rtol=rtol, what="dz")
    torch.testing.assert_close(lse[0] + lse[1], torch.logsumexp(scaled64, -1).float(), rtol=1e-5, atol=1e-5)
    z2 = z.clone()
    logp2, _ = rows_logprob_(z2, labels, bias, None, temperature=temperature)  # no gradient: z untouched
    assert torch.equal(z2, z) and torch.equal(logp2, logp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.6)])
def test_gemm_pass_matches_float64(device, dtype, bias, temperature):
    """Several chunks (a ragged last one), ignored tokens, first/last vocabulary columns."""
    hidden, weight, b, labels, grad = _inputs(41, 24, 131, dtype, device, seed=3, bias=bias, scale=3.0)
    chunk = 7 * 131 * hidden.element_size()  # 7 tokens per chunk
    logp, _, dh, dw, db = gemm_logprob_pass(hidden, weight, labels, b, temperature=temperature,
                                              ignore_index=IGNORE, grad_logp=grad, chunk_bytes=chunk)
    e_logp, e_dh, e_dw, e_db = _eager(hidden, weight, b, labels, grad, temperature)
    r_logp, r_dh, r_dw, r_db = _eager(hidden.double(), weight.double(), None if b is None else b.double(), labels,
                                      grad.double(), temperature)
    atol, rtol = tol(dtype)
    assert logp.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    assert_no_worse_than_eager(logp, e_logp, r_logp, atol=atol, rtol=rtol, what="logp")
    assert (logp[labels == IGNORE] == 0).all() and (dh[labels == IGNORE] == 0).all()
    assert_no_worse_than_eager(dh, e_dh, r_dh, atol=atol, rtol=rtol, what="dhidden")
    assert_no_worse_than_eager(dw, e_dw, r_dw, atol=atol, rtol=rtol, what="dweight")
    if bias:
        assert_no_worse_than_eager(db, e_db, r_db, atol=atol, rtol=rtol, what="dbias")
    else:
        assert db is None


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_pass_all_ignored_and_gradient_subsets(device):
    hidden, weight, b, labels, grad = _inputs(9, 8, 33, torch.float32, device, seed=4)
    labels[:] = IGNORE
    logp, _, dh, dw, db = gemm_logprob_pass(hidden, weight, labels, b, temperature=1.0, ignore_index=IGNORE,
                                              grad_logp=grad)
    assert not logp.any() and not dh.any() and not dw.any() and not db.any()
    labels[0] = 3
    out = gemm_logprob_pass(hidden, weight, labels, b, temperature=1.0, ignore_index=IGNORE, grad_logp=grad,
                            need_hidden=False, need_bias=False)
    assert out[2] is None and out[4] is None and out[3].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_ops_run_the_gemm_design_when_asked(device, dtype, monkeypatch):
    """backend="triton-gemm" routes both public ops through triton/gemm.py: same loss, log-probs and gradients,
    judged (as the chunked PyTorch path is) against grao_kernels.reference in float64."""
    from grao_kernels.triton import gemm

    calls = []
    real = gemm.gemm_logprob_pass
    monkeypatch.setattr(gemm, "gemm_logprob_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    prob = make_problem(2, 3, 6, 16, 97, dtype=dtype, device=device, seed=5, ignore_frac=0.0, prompt_len=2,
                        weight_scale=0.25, answer_token=False)
    hidden, weight, labels, rewards = prob.hidden, prob.weight, prob.labels, prob.rewards
    results = {}
    for design, backend in (("gemm", "triton-gemm"), ("tiles", "chunked")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = grao_kernels.fused_linear_grao_loss(h, w, labels, rewards, backend=backend)
        loss.backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = grao_kernels.linear_logprob(h2, w2, labels, backend=backend)
        (logp * torch.linspace(-1, 1, logp.numel(), device=device).view_as(logp)).sum().backward()
        results[design] = (loss.detach(), h.grad, w.grad, logp.detach(), h2.grad, w2.grad)
    assert len(calls) == 3  # the GRAO pass, linear_logprob's forward and its backward
    coef = torch.linspace(-1, 1, labels.numel(), device=device).view_as(labels)

    def both_ops(dt=None):  # the eager reference's run of the same two calls, in ``dt`` (None: the inputs')
        h, w = (t.detach().to(dt or t.dtype).clone().requires_grad_() for t in (hidden, weight))
        loss, _ = linear_grao_loss(h, w, labels, rewards.to(torch.float64 if dt == torch.float64 else rewards.dtype))
        loss.backward()
        h2, w2 = (t.detach().to(dt or t.dtype).clone().requires_grad_() for t in (hidden, weight))
        logp = token_logprobs(linear_logits(h2, w2), labels, ignore_index=IGNORE)
        (logp * coef.to(logp.dtype)).sum().backward()
        return loss.detach(), h.grad, w.grad, logp.detach(), h2.grad, w2.grad

    eager, ref = both_ops(), both_ops(torch.float64)
    names = ("loss", "dhidden", "dweight", "logp", "logprob dhidden", "logprob dweight")
    for design in ("gemm", "tiles"):  # each judged by the reference, neither by the other
        for name, f, e, r in zip(names, results[design], eager, ref, strict=True):
            assert_no_worse_than_eager(f, e, r, dtype=dtype, what=f"{design} {name}")


def test_unknown_design_is_refused():
    with pytest.raises(GRAOInputError,
                       match="GRAO_KERNELS_CUDA must be one of .*'triton-gemm', 'triton-tiles'.*'fast'"):
        read_env({"GRAO_KERNELS_CUDA": "fast"})


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="a realistic vocabulary is too slow for the interpreter")
@pytest.mark.parametrize("design", ["triton-tiles", "triton-gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_at_a_real_vocabulary(design, dtype):
    """fp16 at V = 32000: dz = g * p reaches fp16's subnormal range (g ~ 1e-4, p < 1e-3), which V = 83
    never shows. Both CUDA designs against float64, no worse than eager fp16 / bf16 plus 1e-2."""
    gen = torch.Generator().manual_seed(11)
    P, G, T, D, V = 2, 7, 96, 256, 32000
    hidden = torch.randn(P * (G + 1), T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) / D ** 0.5
    labels = torch.randint(0, V, (P * (G + 1), T), generator=gen)
    labels[:, :16] = IGNORE
    rewards = torch.randint(-1, 2, (P, G + 1), generator=gen).float()
    dev = "cuda"

    def run(fn, dt):
        h = hidden.to(dev, dt).requires_grad_()
        w = weight.to(dev, dt).requires_grad_()
        loss = fn(h, w, labels.to(dev), rewards.to(dev))[0]
        loss.backward()
        return loss.detach(), h.grad, w.grad

    from grao_kernels.reference import linear_grao_loss
    ref = run(linear_grao_loss, torch.float64)
    eager = run(linear_grao_loss, dtype)
    fused = run(lambda *a: grao_kernels.fused_linear_grao_loss(*a, backend=design), dtype)
    for name, f, e, r in zip(("loss", "dhidden", "dweight"), fused, eager, ref):
        assert_no_worse_than_eager(f, e, r, dtype=dtype, what=f"{design} {dtype} {name}")
        assert f.abs().max() > 0, name  # gradients did not underflow to zero
