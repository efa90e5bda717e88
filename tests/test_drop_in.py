"""The fused ops where an ``nn.Linear`` + loss would sit: under autocast, under double backward, and
when a loss computed with grad enabled is never back-propagated (issue 13)."""

from __future__ import annotations

import gc
import re
import warnings

import pytest
import torch

import grao
import grao_kernels
import grao_kernels.autograd as limits
from tests.numerics import assert_no_worse_than_eager
from tests.numerics import make_problem

IGN = -100
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["auto", pytest.param("triton-tiles", marks=pytest.mark.triton),
            pytest.param("triton-gemm", marks=pytest.mark.triton)]
# CPU autocast takes bf16 and fp16; CUDA autocast the same.
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _grao(h, w, b, labels, rewards, backend):
    loss, stats = grao_kernels.fused_linear_grao_loss(h, w, labels, rewards, bias=b, temperature=0.8, backend=backend)
    return loss, [stats[k] for k in (*grao.COMPONENTS, "advantages", "seq_logp", "num_tokens")]


def _logprob(h, w, b, labels, rewards, backend):
    logp, ent = grao_kernels.linear_logprob(h, w, labels, bias=b, temperature=0.8, return_entropy=True,
                                            backend=backend)
    return (logp * torch.linspace(-1, 2, logp.numel(), device=logp.device).view_as(logp)).sum(), [logp, ent]


OPS = {"fused_linear_grao_loss": _grao, "linear_logprob": _logprob}


def _run(op, backend, tensors, labels, rewards):
    """-> (loss, other outputs, gradients of the leaves in ``tensors``), all detached."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss, outs = OPS[op](*leaves, labels, rewards, backend)
    loss.backward()
    return loss.detach(), [o.detach() for o in outs], [t.grad for t in leaves]


# ----------------------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
                         ids=["bf16-hidden,fp32-weight", "fp32-inputs"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_autocast_equals_the_op_on_inputs_cast_to_the_autocast_dtype(op, dtypes, amp, device, backend):
    """Under autocast the op's every output (loss or log-probs, stats, entropy, every gradient) is exactly
    the op's on hidden / weight / bias cast to the autocast dtype: one precision, as nn.Linear's; the
    gradients of fp32 leaves arrive in fp32 through the cast."""
    hidden_dtype, weight_dtype = dtypes
    hidden, weight, bias, labels, rewards = make_problem(2, 3, 5, 24, 83, dtype=torch.float32, device=device,
                                                         bias=True, seed=3).tensors
    hidden = hidden.to(hidden_dtype)
    weight, bias = weight.to(weight_dtype), bias.to(weight_dtype)
    with torch.autocast(device, dtype=amp):
        loss, outs, grads = _run(op, backend, (hidden, weight, bias), labels, rewards)
    ref_loss, ref_outs, ref_grads = _run(op, backend, (hidden.to(amp), weight.to(amp), bias.to(amp)), labels, rewards)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for o, r in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    for g, r, t in zip(grads, ref_grads, (hidden, weight, bias), strict=True):
        assert g.dtype == t.dtype  # back through the cast, like nn.Linear's under autocast
        torch.testing.assert_close(g, r.to(t.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_fused_no_worse_than_eager_autocast(device):
    """The eager reference accepts the same mixed inputs under autocast (its matmul autocasts); the fused
    loss is no further from float64 than it."""
    hidden, weight, bias, labels, rewards = make_problem(2, 3, 6, 32, 97, dtype=torch.float32, device=device,
                                                         bias=True, seed=5).tensors
    hidden = hidden.to(torch.bfloat16)
    results = []
    for fn in (grao_kernels.fused_linear_grao_loss, grao.linear_grao_loss):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = fn(leaves[0], leaves[1], labels, rewards, bias=leaves[2])
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    # float64 on the inputs as autocast rounds them: both paths compute on those (nn.Linear's semantics)
    leaves = [t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight, bias)]
    ref, _ = grao.linear_grao_loss(leaves[0], leaves[1], labels, rewards, bias=leaves[2])
    ref.backward()
    (f_loss, f_grads), (e_loss, e_grads) = results
    assert f_loss.dtype == e_loss.dtype == torch.float32
    assert_no_worse_than_eager(f_loss, e_loss, ref.detach(), atol=1e-5, rtol=1e-2, what="loss")
    for name, f, e, r in zip(("hidden", "weight", "bias"), f_grads, e_grads, leaves):
        assert f.dtype == e.dtype
        assert_no_worse_than_eager(f, e, r.grad, atol=1e-5, rtol=1e-2, what=f"d{name}")


def test_autocast_leaves_rewards_and_float64_alone():
    hidden, weight, _, labels, _ = make_problem(2, 3, 4, 8, 19, dtype=torch.float32).tensors
    rewards = torch.tensor([[0.1234567, 0.7654321, 0.3333333, 0.0], [1.0, 0.123, 0.456, 0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = grao_kernels.fused_linear_grao_loss(hidden, weight, labels, rewards)
        loss64, _ = grao_kernels.fused_linear_grao_loss(hidden.double(), weight.double(), labels, rewards)
        with pytest.raises(grao.GRAOInputError, match=r"weight dtype must equal .*float64 is not"):
            grao_kernels.fused_linear_grao_loss(hidden.double(), weight, labels, rewards)
    torch.testing.assert_close(stats["advantages"], grao.group_advantages(rewards), rtol=0, atol=0)
    assert loss64.dtype == torch.float64  # float64 is not an autocast type: computed in float64


@pytest.mark.parametrize("op", sorted(OPS))
def test_mixed_dtypes_outside_autocast_still_refused(op):
    hidden, weight, bias, labels, rewards = make_problem(1, 2, 3, 8, 11, dtype=torch.float32, bias=True).tensors
    with pytest.raises(grao.GRAOInputError, match="weight dtype must equal hidden dtype torch.bfloat16"):
        OPS[op](hidden.bfloat16(), weight, bias, labels, rewards, "auto")
    with pytest.raises(grao.GRAOInputError, match="bias dtype must equal hidden dtype"):
        OPS[op](hidden, weight, bias.bfloat16(), labels, rewards, "auto")


# -------------------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_double_backward_is_refused_by_name(op, backend):
    hidden, weight, bias, labels, rewards = make_problem(2, 3, 4, 8, 19, dtype=torch.float32, bias=True).tensors
    h = hidden.requires_grad_()
    loss, _ = OPS[op](h, weight, bias, labels, rewards, backend)
    eager = "grao.linear_grao_loss" if op == "fused_linear_grao_loss" else "grao.token_logprobs"
    with pytest.raises(grao_kernels.GRAOUnsupportedError, match=rf"{op}: double backward .*{eager}"):
        torch.autograd.grad(loss, h, create_graph=True)
    # a plain backward of the same loss still works afterwards (create_graph retained the graph)
    (g,) = torch.autograd.grad(loss, h)
    assert g.shape == h.shape and bool(g.abs().sum() > 0)


EAGER_TWIN = {  # the eager equivalent each fused op's double-backward error names, called like the op
    "fused_linear_grao_loss": lambda name: lambda h, w, b, labels, rewards: (
        getattr(grao, name)(h, w, labels, rewards, bias=b, temperature=0.8)[0]),
    "linear_logprob": lambda name: lambda h, w, b, labels, rewards: (
        _logprob_weights(labels) * getattr(grao, name)(grao.linear_logits(h, w, b, 0.8), labels)).sum(),
}


def _logprob_weights(labels):  # _logprob's
    return torch.linspace(-1, 2, labels.numel(), device=labels.device).view_as(labels)


@pytest.mark.parametrize("op", sorted(OPS))
def test_double_backward_alternative_named_in_the_error_works(op):
    """The eager function the fused op's double-backward error names is a drop-in for it: the same value and
    gradients as the fused op (float64, to rounding), and, unlike the fused op, differentiable twice: the gradient
    of a gradient penalty through it matches a central finite difference."""
    hidden, weight, bias, labels, rewards = make_problem(2, 3, 4, 8, 19, dtype=torch.float64, bias=True).tensors
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    fused, _ = OPS[op](*leaves, labels, rewards, "auto")
    with pytest.raises(grao_kernels.GRAOUnsupportedError) as refused:
        torch.autograd.grad(fused, leaves[0], create_graph=True)
    named = re.search(r"use the eager grao\.(\w+)", str(refused.value))
    assert named, str(refused.value)
    twin = EAGER_TWIN[op](named.group(1))
    fused_grads = torch.autograd.grad(fused, leaves)

    eager = twin(*leaves, labels, rewards)
    torch.testing.assert_close(eager.detach(), fused.detach(), rtol=1e-12, atol=1e-12)
    eager_grads = torch.autograd.grad(eager, leaves, create_graph=True)
    for f, e in zip(fused_grads, eager_grads, strict=True):
        torch.testing.assert_close(e.detach(), f, rtol=1e-10, atol=1e-12)

    def penalty(w):
        h = hidden.clone().requires_grad_()
        (g,) = torch.autograd.grad(twin(h, w, bias, labels, rewards), h, create_graph=True)
        return g.pow(2).sum()

    w = weight.clone().requires_grad_()
    penalty(w).backward()
    assert w.grad is not None and bool(w.grad.abs().sum() > 0)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    step = 1e-5
    with torch.enable_grad():
        numeric = (penalty(weight + step * direction) - penalty(weight - step * direction)).item() / (2 * step)
    analytic = (w.grad * direction).sum().item()
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


# ----------------------------------------------------------------------- gradients computed, never used


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(limits, "_warned_unused", False)


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
        gc.collect()
    return [w for w in caught if issubclass(w.category, grao_kernels.GRAOUnusedGradientWarning)]


def test_loss_dropped_without_backward_warns_once(fresh_warning):
    hidden, weight, _, labels, rewards = make_problem(2, 3, 4, 8, 19, dtype=torch.float32).tensors
    h = hidden.requires_grad_()

    def log_twice():
        for _ in range(2):  # e.g. logging with grad enabled: the gradients computed in the forward are dropped
            loss, _ = grao_kernels.fused_linear_grao_loss(h, weight, labels, rewards)
            float(loss)

    caught = _caught(log_twice)
    assert len(caught) == 1 and "torch.no_grad()" in str(caught[0].message)
    assert "linear_logprob" in str(caught[0].message)


def test_no_warning_when_gradients_are_used_or_not_computed(fresh_warning):
    hidden, weight, _, labels, rewards = make_problem(2, 3, 4, 8, 19, dtype=torch.float32).tensors
    h = hidden.requires_grad_()

    def used_or_not_computed():
        loss, _ = grao_kernels.fused_linear_grao_loss(h, weight, labels, rewards)
        (2.0 * loss).backward()
        del loss
        with torch.no_grad():
            grao_kernels.fused_linear_grao_loss(h, weight, labels, rewards)
        grao_kernels.fused_linear_grao_loss(hidden.detach(), weight, labels, rewards)  # nothing requires grad

    assert _caught(used_or_not_computed) == []
    assert h.grad is not None


def test_deferred_route_named_in_the_warning_equals_the_fused_loss():
    """grao_kernels.reference.grao_loss on linear_logprob: the same loss and gradients, gradient work in backward."""
    hidden, weight, _, labels, rewards = make_problem(2, 3, 5, 16, 41, dtype=torch.float64).tensors
    grads = []
    for route in ("fused", "deferred"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if route == "fused":
            loss, _ = grao_kernels.fused_linear_grao_loss(h, w, labels, rewards)
        else:
            loss, _ = grao_kernels.reference.grao_loss(grao_kernels.linear_logprob(h, w, labels), labels, rewards)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
