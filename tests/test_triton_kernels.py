"""The triton-tiles kernels (grao_kernels/triton/tiles.py) against float64 references (grao_kernels.reference), on CPU via the interpreter or on CUDA.

The standard (tests/numerics.py): a kernel's result may be no further from the float64 result than the
eager PyTorch path in the same dtype, plus 1e-5 absolute and relative (fp32, and half dtypes under the
interpreter, which runs the dots in fp32), or 1e-2 for bf16/fp16 on a GPU.

Shapes are tiny and odd (N=37, D=24, V=83: no tile divides them) because the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch

from grao_kernels.reference import linear_logits, token_logprobs
from tests.numerics import assert_no_worse_than_eager, grad_weights, make_problem, max_err, tol

pytestmark = pytest.mark.triton

triton = pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cuda"] if HAS_CUDA else []) + (["cpu"] if INTERPRETING else [])
if not DEVICES:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from grao_kernels.triton.tiles import triton_logprob_backward, triton_logprob_forward

IGNORE = -100


def _tol(dtype: torch.dtype, device: str) -> tuple[float, float]:
    """(atol, rtol) from tests/numerics.py's TOL. The interpreter forms bf16 inputs' products in fp32: on CPU
    these kernels are held to fp32's tolerance, tighter than bf16's."""
    return tol(torch.float32 if device == "cpu" else dtype)


def _with_layout(hidden: torch.Tensor, layout: str) -> torch.Tensor:
    """The same [N, D] values with other strides: "transposed" (1, N), "sliced" (2D, 2) and an offset."""
    if layout == "transposed":
        return hidden.t().contiguous().t()
    if layout == "sliced":
        buf = torch.zeros(hidden.shape[0], 2 * hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device)
        buf[:, 1::2] = hidden
        return buf[:, 1::2]
    return hidden


def _mark_labels(labels: torch.Tensor, v: int) -> torch.Tensor:
    labels[:17] = IGNORE  # the first token block (16 tokens under the interpreter) is all ignored
    labels[labels.shape[0] // 2] = IGNORE
    labels[17], labels[18] = 0, v - 1  # first and last vocabulary column
    return labels


def _entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, -1)
    return -(logp.exp() * logp).sum(-1) * (labels != IGNORE)


def _eager(hidden, weight, bias, labels, temperature, grad_logp):
    """Per-token logp, entropy and autograd grads of sum(grad_logp * logp) through full logits."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    logits = linear_logits(leaves[0], leaves[1], leaves[2] if bias is not None else None, temperature)
    logp = token_logprobs(logits, labels, ignore_index=IGNORE)
    grads = torch.autograd.grad(logp, leaves, grad_outputs=grad_logp.to(logp.dtype))
    grads = list(grads) + ([None] if bias is None else [])
    return logp.detach(), _entropy(logits.detach(), labels), grads


CASES = [
    # dtype, bias, temperature, hidden layout, weight transposed
    (torch.float32, True, 0.7, "transposed", False),
    (torch.float32, False, 1.0, "contiguous", True),
    (torch.float32, True, 1.0, "sliced", False),
    (torch.bfloat16, True, 1.0, "sliced", False),
    (torch.bfloat16, False, 1.3, "transposed", True),
    (torch.float16, True, 0.7, "contiguous", False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,has_bias,temperature,layout,weight_t", CASES)
def test_logprob_forward_backward(device, dtype, has_bias, temperature, layout, weight_t):
    n, d, v = 37, 24, 83
    p = make_problem(1, 0, n, d, v, dtype=dtype, device=device, seed=1234, ignore_frac=0.0, bias=has_bias,
                     weight_scale=0.5, answer_token=False).flat()
    hidden = _with_layout(p.hidden, layout)
    weight = p.weight.t().contiguous().t() if weight_t else p.weight  # e.g. a weight stored transposed: (1, V)
    assert hidden.is_contiguous() == (layout == "contiguous") and weight.is_contiguous() != weight_t
    bias = p.bias
    labels = _mark_labels(p.labels, v)
    grad_logp = grad_weights(n, seed=1235).to(device)  # nonzero at ignored tokens too: must not matter
    weight_before = weight.clone()

    lp64, ent64, g64 = _eager(hidden.double(), weight.double(), None if bias is None else bias.double(), labels,
                              temperature, grad_logp.double())
    lp_e, ent_e, g_e = _eager(hidden, weight, bias, labels, temperature, grad_logp)
    atol, rtol = _tol(dtype, device)

    logp, lse, ent = triton_logprob_forward(hidden, weight, labels, bias, temperature=temperature,
                                            ignore_index=IGNORE, return_entropy=True)
    assert logp.dtype == torch.float32 and lse.dtype == torch.float32 and ent.dtype == torch.float32
    assert_no_worse_than_eager(logp, lp_e, lp64, atol=atol, rtol=rtol, what="logp")
    assert_no_worse_than_eager(ent, ent_e, ent64, atol=atol, rtol=rtol, what="entropy")
    ignored = labels == IGNORE
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()

    logp2, _, none = triton_logprob_forward(hidden, weight, labels, bias, temperature=temperature,
                                               ignore_index=IGNORE, return_entropy=False)
    assert none is None
    torch.testing.assert_close(logp2, logp, rtol=0, atol=0)

    grads = triton_logprob_backward(hidden, weight, labels, bias, lse, grad_logp, temperature=temperature,
                                    ignore_index=IGNORE, need_hidden=True, need_weight=True, need_bias=has_bias)
    for name, got, eager, ref, inp in zip(("hidden", "weight", "bias"), grads, g_e, g64, (hidden, weight, bias)):
        if inp is None:
            assert got is None
            continue
        assert got.dtype == inp.dtype and got.shape == inp.shape
        assert_no_worse_than_eager(got, eager, ref, atol=atol, rtol=rtol, what=f"d{name}")
    assert torch.equal(weight, weight_before), "the kernels must not write into the weight"


@pytest.mark.parametrize("device", DEVICES)
def test_logprob_vocab_splits_and_partial_grads(device):
    """Forward with 1..3 vocabulary splits agree; need_* flags compute only what is asked."""
    gen = torch.Generator().manual_seed(7)
    n, d, v = 21, 40, 83 if device == "cpu" else 333
    hidden = torch.randn(n, d, generator=gen).to(device)
    weight = torch.randn(v, d, generator=gen).to(device)
    bias = (50.0 + torch.randn(v, generator=gen)).to(device)  # large logits: entropy must not cancel
    labels = torch.randint(0, v, (n,), generator=gen, dtype=torch.int32).to(device)
    logits64 = linear_logits(hidden.double(), weight.double(), bias.double())
    lp64 = token_logprobs(logits64, labels, ignore_index=IGNORE)
    ent64 = _entropy(logits64, labels)
    lse64 = torch.logsumexp(logits64, -1)
    for splits in (1, 2, 3):
        logp, lse, ent = triton_logprob_forward(hidden, weight, labels, bias, temperature=1.0, ignore_index=IGNORE,
                                                return_entropy=True, num_v_splits=splits)
        assert max_err(logp, lp64) < 1e-5 * (1 + lp64.abs().max().item())
        assert lse.shape == (2, n)  # (row max, log-sum): their sum is the log-sum-exp
        assert max_err(lse.sum(0), lse64) < 1e-5 * (1 + lse64.abs().max().item())
        assert max_err(ent, ent64) < 1e-5 * (1 + ent64.abs().max().item())
    g = torch.randn(n, generator=gen).to(device)
    full = triton_logprob_backward(hidden, weight, labels, bias, lse, g, temperature=1.0, ignore_index=IGNORE,
                                   need_hidden=True, need_weight=True, need_bias=True)
    only_h = triton_logprob_backward(hidden, weight, labels, bias, lse, g, temperature=1.0, ignore_index=IGNORE,
                                     need_hidden=True, need_weight=False, need_bias=False)
    only_w = triton_logprob_backward(hidden, weight, labels, bias, lse, g, temperature=1.0, ignore_index=IGNORE,
                                     need_hidden=False, need_weight=True, need_bias=False)
    assert only_h[1] is None and only_h[2] is None and only_w[0] is None and only_w[2] is None
    _, _, g64 = _eager(hidden.double(), weight.double(), bias.double(), labels, 1.0, g.double())
    for got, ref in zip(full, g64):
        assert max_err(got, ref) < 1e-5 * (1 + ref.abs().max().item())
    torch.testing.assert_close(only_h[0], full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(only_w[1], full[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_logprob_all_ignored_and_empty(device):
    gen = torch.Generator().manual_seed(3)
    n, d, v = 19, 16, 50
    hidden = torch.randn(n, d, generator=gen).to(device)
    weight = torch.randn(v, d, generator=gen).to(device)
    bias = torch.randn(v, generator=gen).to(device)
    labels = torch.full((n,), IGNORE, device=device)
    logp, lse, ent = triton_logprob_forward(hidden, weight, labels, bias, temperature=1.0, ignore_index=IGNORE,
                                            return_entropy=True)
    assert (logp == 0).all() and (ent == 0).all()
    dh, dw, db = triton_logprob_backward(hidden, weight, labels, bias, lse, torch.ones(n, device=device),
                                         temperature=1.0, ignore_index=IGNORE, need_hidden=True, need_weight=True,
                                         need_bias=True)
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()
    assert triton_logprob_backward(hidden, weight, labels, None, lse, torch.ones(n, device=device), temperature=1.0,
                                   ignore_index=IGNORE, need_hidden=False, need_weight=False, need_bias=True) == (
        None, None, None)
    # N == 0: empty results, nothing launched
    logp, lse, ent = triton_logprob_forward(hidden[:0], weight, labels[:0], bias, temperature=1.0,
                                            ignore_index=IGNORE, return_entropy=True)
    assert logp.shape == ent.shape == (0,) and lse.shape == (2, 0)
    dh, dw, db = triton_logprob_backward(hidden[:0], weight, labels[:0], bias, lse, logp, temperature=1.0,
                                         ignore_index=IGNORE, need_hidden=True, need_weight=True, need_bias=True)
    assert dh.shape == (0, d) and (dw == 0).all() and (db == 0).all()


# ------------------------------------------------------------------------------------------------
# GPU only: large grids and 64-bit offsets
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (too large for the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_large_n_grid(dtype):
    """N > 65536 tokens: the 1-D grids must cover every token block."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = 70_001, 32, 96
    hidden = torch.randn(n, d, generator=gen).to("cuda", dtype)
    weight = torch.randn(v, d, generator=gen).to("cuda", dtype)
    bias = torch.randn(v, generator=gen).to("cuda", dtype)
    labels = torch.randint(0, v, (n,), generator=gen).to("cuda")
    labels[::7] = IGNORE
    labels[:1000] = IGNORE  # whole token blocks with nothing to do
    g = torch.randn(n, generator=gen).to("cuda")
    lp64, ent64, g64 = _eager(hidden.double(), weight.double(), bias.double(), labels, 0.9, g.double())
    lp_e, ent_e, g_e = _eager(hidden, weight, bias, labels, 0.9, g)
    atol, rtol = _tol(dtype, "cuda")
    logp, lse, ent = triton_logprob_forward(hidden, weight, labels, bias, temperature=0.9, ignore_index=IGNORE,
                                            return_entropy=True)
    assert_no_worse_than_eager(logp, lp_e, lp64, atol=atol, rtol=rtol, what="logp")
    assert_no_worse_than_eager(ent, ent_e, ent64, atol=atol, rtol=rtol, what="entropy")
    grads = triton_logprob_backward(hidden, weight, labels, bias, lse, g, temperature=0.9, ignore_index=IGNORE,
                                    need_hidden=True, need_weight=True, need_bias=True)
    for name, got, eager, ref in zip(("hidden", "weight", "bias"), grads, g_e, g64):
        assert_no_worse_than_eager(got, eager, ref, atol=atol, rtol=rtol, what=f"d{name}")


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA and ~20 GB of GPU memory")
def test_logprob_int64_offsets():
    """N * D > 2**31 elements: hidden offsets (and the fp32 dhidden buffer) overflow int32."""
    d, v = 64, 128
    n = (2**31) // d + 4099
    need = n * d * (2 + 4 + 2) + n * 8 * 3
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.3:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.empty(n, d, device="cuda", dtype=torch.bfloat16)
    hidden.normal_(generator=gen)
    weight = torch.randn(v, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    labels = torch.full((n,), IGNORE, device="cuda", dtype=torch.long)
    live = torch.cat([torch.arange(0, 40), torch.arange(n - 300, n)]).cuda()  # tail offsets > 2**31
    labels[live] = torch.randint(0, v, (live.numel(),), device="cuda", generator=gen)
    g = torch.zeros(n, device="cuda")
    g[live] = torch.randn(live.numel(), device="cuda", generator=gen)
    logp, lse, _ = triton_logprob_forward(hidden, weight, labels, None, temperature=1.0, ignore_index=IGNORE,
                                          return_entropy=False)
    h_live = hidden[live]
    lp64, _, g64 = _eager(h_live.double(), weight.double(), None, labels[live], 1.0, g[live].double())
    lp_e, _, g_e = _eager(h_live, weight, None, labels[live], 1.0, g[live])
    assert_no_worse_than_eager(logp[live], lp_e, lp64, dtype=torch.bfloat16, what="logp")
    dh, dw, _ = triton_logprob_backward(hidden, weight, labels, None, lse, g, temperature=1.0, ignore_index=IGNORE,
                                        need_hidden=True, need_weight=True, need_bias=False)
    assert_no_worse_than_eager(dh[live], g_e[0], g64[0], dtype=torch.bfloat16, what="dhidden")
    assert_no_worse_than_eager(dw, g_e[1], g64[1], dtype=torch.bfloat16, what="dweight")
    dh[live] = 0
    assert not dh.any(), "tokens with an ignored label must get no gradient"
