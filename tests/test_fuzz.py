"""Hypothesis fuzzing of the fused ops against the eager reference and float64.

Random small shapes, hidden scales up to 1e3, temperatures down to 1e-3 (logits up to ~1e6),
random ignore masks (empty sample rows allowed, reference rows never empty), rewards with ties,
constant groups and near-ties, random beta / lam, bias or not, and tiny chunk budgets (many ragged
chunks). The fused result must be finite and no further from float64 than the eager path in the
same dtype, plus a small tolerance (tests/numerics.py). Bad input must raise GRAOInputError with
the eager path's message, never return NaN.

Under CI (CI set in the environment) the examples are derandomized so a run is reproducible;
elsewhere each run explores new ones.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grao
import grao_kernels
from grao import GRAOInputError
from grao_kernels import KernelOptions
from tests.numerics import IGN, TOL, assert_no_worse_than_eager, make_problem

# beta and lam are drawn from [0, 2] on purpose: their "outside [0, 1]" UserWarning is expected here
pytestmark = pytest.mark.filterwarnings(r"ignore:(beta|lam)=.* is outside \[0, 1\]:UserWarning")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FUZZ = settings(max_examples=60, deadline=None, derandomize=bool(os.environ.get("CI")), print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def log_uniform(low, high):
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: 10.0 ** e)


@st.composite
def problems(draw):
    """Sizes, scales and options of one GRAO problem, plus a seed for its tensors."""
    return {
        "prompts": draw(st.integers(1, 3)), "group": draw(st.integers(1, 4)), "seq_len": draw(st.integers(1, 6)),
        "dim": draw(st.integers(1, 16)), "vocab": draw(st.integers(2, 48)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "scale": draw(log_uniform(1e-2, 1e3)), "temperature": draw(log_uniform(1e-3, 10.0)),
        "bias": draw(st.booleans()), "ignore_frac": draw(st.sampled_from([0.0, 0.3, 0.7, 0.95])),
        "rewards": draw(st.sampled_from(["ternary", "constant", "normal", "near_tie", "large"])),
        "beta": draw(st.floats(0.0, 2.0)), "lam": draw(st.floats(0.0, 2.0)),
        "eps": draw(st.sampled_from([1e-6, 1e-3, 1.0])), "reference_in_stats": draw(st.booleans()),
        "chunk_bytes": draw(st.sampled_from([None, 64, 1024])), "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_tensors(p, device):
    """The shared builder's problem (tests/numerics.py) with the drawn sizes and scales, and rewards of the drawn
    kind (from their own generator)."""
    gen = torch.Generator().manual_seed(p["seed"] + 7)
    prompts, width = p["prompts"], p["group"] + 1
    kind = p["rewards"]
    if kind == "ternary":
        rewards = torch.randint(-1, 2, (prompts, width), generator=gen).double()
        rewards[:, -1] = 0.0  # R(y, y) = 0, as the pairwise judge gives
    elif kind == "constant":
        rewards = torch.randint(-1, 2, (prompts, 1), generator=gen).double().expand(prompts, width).clone()
    elif kind == "near_tie":
        rewards = 1.0 + 1e-6 * torch.randint(0, 3, (prompts, width), generator=gen).double()
    elif kind == "large":
        rewards = torch.randn(prompts, width, generator=gen, dtype=torch.float64) * 1e4
    else:
        rewards = torch.randn(prompts, width, generator=gen, dtype=torch.float64)
    prob = make_problem(prompts, p["group"], p["seq_len"], p["dim"], p["vocab"], dtype=p["dtype"], device=device,
                        seed=p["seed"], ignore_frac=p["ignore_frac"], bias=p["bias"], scale=p["scale"], rewards=rewards)
    return prob.hidden, prob.weight, prob.bias, prob.labels, prob.rewards


def chunk_options(nbytes):
    """The chunked path's budget for a call (None: the default); many ragged chunks when small."""
    return None if nbytes is None else KernelOptions(chunk_bytes=nbytes)


def run_loss(fn, hidden, weight, bias, labels, rewards, p, dtype=None, **kw):
    ins = [None if t is None else (t.detach().to(dtype) if dtype else t.detach()).requires_grad_()
           for t in (hidden, weight, bias)]
    r = rewards.to(dtype) if dtype else rewards
    loss, stats = fn(ins[0], ins[1], labels, r, bias=ins[2], beta=p["beta"], lam=p["lam"], eps=p["eps"],
                     temperature=p["temperature"], reference_in_stats=p["reference_in_stats"], **kw)
    grads = torch.autograd.grad(loss, [t for t in ins if t is not None])
    comps = torch.stack([stats[k].detach() for k in grao.COMPONENTS])
    return loss.detach(), comps, grads, stats


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(p=problems())
def test_fuzz_fused_grao_loss(device, p):
    hidden, weight, bias, labels, rewards = make_tensors(p, device)
    fused = run_loss(grao_kernels.fused_linear_grao_loss, hidden, weight, bias, labels, rewards, p,
                     options=chunk_options(p["chunk_bytes"]))
    eager = run_loss(grao.linear_grao_loss, hidden, weight, bias, labels, rewards, p)
    ref = run_loss(grao.linear_grao_loss, hidden, weight, bias, labels, rewards, p, dtype=torch.float64)
    atol, rtol = TOL[p["dtype"]]
    assert fused[0].dtype == (torch.float64 if p["dtype"] == torch.float64 else torch.float32)
    assert_no_worse_than_eager(fused[0], eager[0], ref[0], atol=atol, rtol=rtol, what="loss")
    assert_no_worse_than_eager(fused[1], eager[1], ref[1], atol=atol, rtol=rtol, what="components")
    for name, f, e, r in zip(("hidden", "weight", "bias"), fused[2], eager[2], ref[2], strict=False):
        assert f.dtype == p["dtype"] and f.shape == r.shape
        assert_no_worse_than_eager(f, e, r, atol=atol, rtol=rtol, what=f"d{name}")
    assert_no_worse_than_eager(fused[3]["seq_logp"], eager[3]["seq_logp"], ref[3]["seq_logp"], atol=atol,
                               rtol=rtol, what="seq_logp")
    assert_no_worse_than_eager(fused[3]["advantages"], eager[3]["advantages"], ref[3]["advantages"], atol=atol,
                               rtol=rtol, what="advantages")
    assert torch.equal(fused[3]["num_tokens"].cpu(), ref[3]["num_tokens"].cpu())
    if p["rewards"] == "constant":  # every advantage 0: loss 0, gradient 0 (spec)
        assert fused[0].item() == 0.0 and all(int(torch.count_nonzero(g)) == 0 for g in fused[2])


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(p=problems(), flat=st.booleans())
def test_fuzz_linear_logprob(device, p, flat):
    hidden, weight, bias, labels, _ = make_tensors(p, device)
    if flat:  # [N, D] hidden with [N] labels
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    grad_out = torch.randn(labels.shape, generator=gen, dtype=torch.float64).to(device)
    results = []
    for fused, dtype in ((True, None), (False, None), (False, torch.float64)):
        ins = [None if t is None else (t.detach().to(dtype) if dtype else t.detach()).requires_grad_()
               for t in (hidden, weight, bias)]
        if fused:
            logp = grao_kernels.linear_logprob(ins[0], ins[1], labels, bias=ins[2], temperature=p["temperature"],
                                               options=chunk_options(p["chunk_bytes"]))
        else:
            logits = grao.linear_logits(ins[0], ins[1], ins[2], p["temperature"])
            logp = grao.token_logprobs(logits, labels)
        grads = torch.autograd.grad((logp * grad_out.to(logp.dtype)).sum(), [t for t in ins if t is not None])
        results.append((logp.detach(), grads))
    (f_logp, f_grads), (e_logp, e_grads), (r_logp, r_grads) = results
    atol, rtol = TOL[p["dtype"]]
    assert f_logp.shape == labels.shape
    assert bool((f_logp[labels == IGN] == 0).all()) and bool((f_logp <= 0).all())
    assert_no_worse_than_eager(f_logp, e_logp, r_logp, atol=atol, rtol=rtol, what="logp")
    for name, f, e, r in zip(("hidden", "weight", "bias"), f_grads, e_grads, r_grads, strict=False):
        assert_no_worse_than_eager(f, e, r, atol=atol, rtol=rtol, what=f"d{name}")


# ------------------------------------------------------------------------------------------ bad input

CORRUPTIONS = [
    "nan_reward", "inf_reward", "rewards_1d", "rewards_width_1", "rewards_rows", "empty_reference", "label_high",
    "label_negative", "float_labels", "labels_shape", "hidden_dim", "weight_dtype", "bias_shape", "int_hidden",
    "temperature_zero", "temperature_negative", "temperature_nan", "temperature_inf", "eps_zero", "beta_nan",
    "lam_inf", "weight_1d", "hidden_4d", "backend",
]


def corrupt(kind, hidden, weight, bias, labels, rewards, gen):
    """-> kwargs of a GRAO call with exactly one thing wrong."""
    kw = dict(hidden=hidden, weight=weight, labels=labels.clone(), rewards=rewards.clone(), bias=bias,
              temperature=1.0, beta=0.5, lam=0.6, eps=1e-6)
    prompts, width = rewards.shape
    vocab = weight.shape[0]
    if kind in ("nan_reward", "inf_reward"):
        kw["rewards"].view(-1)[int(torch.randint(0, rewards.numel(), (1,), generator=gen))] = (
            math.nan if kind == "nan_reward" else -math.inf)
    elif kind == "rewards_1d":
        kw["rewards"] = rewards.flatten()
    elif kind == "rewards_width_1":
        kw["rewards"] = rewards[:, :1]
    elif kind == "rewards_rows":  # P * (G+1) != B
        kw["rewards"] = torch.cat([rewards, rewards[:1]])
    elif kind == "empty_reference":
        kw["labels"][width - 1 + width * int(torch.randint(0, prompts, (1,), generator=gen))] = IGN
    elif kind in ("label_high", "label_negative"):
        kw["labels"][-1, 0] = vocab if kind == "label_high" else -7
    elif kind == "float_labels":
        kw["labels"] = labels.to(hidden.dtype)
    elif kind == "labels_shape":
        kw["labels"] = labels[:, :-1] if labels.shape[1] > 1 else labels[:-1]
    elif kind == "hidden_dim":
        kw["hidden"] = torch.cat([hidden, hidden[..., :1]], dim=-1)
    elif kind == "weight_dtype":
        kw["weight"] = weight.to(torch.float64 if weight.dtype == torch.float32 else torch.float32)
    elif kind == "bias_shape":
        kw["bias"] = torch.zeros(vocab + 1, dtype=hidden.dtype, device=hidden.device)
    elif kind == "int_hidden":
        kw["hidden"] = hidden.long()
    elif kind.startswith("temperature"):
        kw["temperature"] = {"zero": 0.0, "negative": -0.5, "nan": math.nan, "inf": math.inf}[kind.split("_")[1]]
    elif kind == "eps_zero":
        kw["eps"] = 0.0
    elif kind == "beta_nan":
        kw["beta"] = math.nan
    elif kind == "lam_inf":
        kw["lam"] = math.inf
    elif kind == "weight_1d":
        kw["weight"] = weight[0]
    elif kind == "hidden_4d":
        kw["hidden"] = hidden.unsqueeze(0)
    return kw


@pytest.mark.parametrize("kind", CORRUPTIONS)
@settings(FUZZ, max_examples=10)
@given(p=problems())
def test_fuzz_bad_input_raises(kind, p):
    hidden, weight, bias, labels, rewards = make_tensors(p, "cpu")
    gen = torch.Generator().manual_seed(p["seed"])
    if kind == "bias_shape" and bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    kw = corrupt(kind, hidden, weight, bias, labels, rewards, gen)
    args = [kw.pop(k) for k in ("hidden", "weight", "labels", "rewards")]
    if kind == "backend":
        with pytest.raises(GRAOInputError, match="backend must be one of"):
            grao_kernels.fused_linear_grao_loss(*args, backend="cuda-please", **kw)
        return
    with pytest.raises(GRAOInputError) as eager_error:
        grao.linear_grao_loss(*args, **kw)
    with pytest.raises(GRAOInputError) as fused_error:
        grao_kernels.fused_linear_grao_loss(*args, **kw)
    assert str(fused_error.value) == str(eager_error.value)
    if kind not in ("rewards_1d", "rewards_width_1", "rewards_rows", "nan_reward", "inf_reward",
                    "empty_reference", "eps_zero", "beta_nan", "lam_inf"):
        # the checks on (hidden, weight, labels, bias, temperature) are linear_logprob's too
        with pytest.raises(GRAOInputError):
            grao_kernels.linear_logprob(args[0], args[1], args[2], bias=kw["bias"], temperature=kw["temperature"])
