"""linear_logprob: per-token log-probs of labels straight from hidden states and the lm_head.

Forward keeps only the per-token log-sum-exp; backward recomputes the logit tiles. CUDA
tensors run the Triton kernels (grao_kernels/_triton_linear.py), CPU and float64 tensors the
chunked PyTorch path (grao_kernels/_chunked.py); both have the same semantics and are tested
against ``grao_kernels.reference.token_logprobs`` on full logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from grao_kernels._autocast import register_autocast_rule
from grao_kernels._backend import cuda_design, resolve_backend
from grao_kernels._checks import check_linear_inputs, check_scalar
from grao_kernels._chunked import chunked_linear_logprob
from grao_kernels._limits import refuse_double_backward
from grao_kernels.cpu_native import cpu_pass
from grao_kernels.reference import compute_dtype


def _forward(backend, hidden, weight, labels, bias, temperature, ignore_index, return_entropy):
    """-> (logp [N] fp32, lse [2, N] (row max, log-sum; see _chunked), entropy [N] | None)."""
    if backend == "triton-gemm" and not return_entropy:
        from grao_kernels._triton_gemm import gemm_logprob_pass
        logp, lse, *_ = gemm_logprob_pass(hidden, weight, labels, bias, temperature=temperature,
                                          ignore_index=ignore_index)
        return logp, lse, None
    if backend in ("triton", "triton-gemm"):
        from grao_kernels._triton_linear import triton_logprob_forward
        return triton_logprob_forward(hidden, weight, labels, bias, temperature=temperature,
                                      ignore_index=ignore_index, return_entropy=return_entropy)
    run = cpu_pass if backend == "native" else chunked_linear_logprob  # native: csrc/grao_cpu.cpp
    out = run(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
              return_entropy=return_entropy)
    return out.logp, out.lse, out.entropy


def _backward(backend, hidden, weight, labels, bias, lse, grad_logp, temperature, ignore_index, needs):
    """-> (dhidden [N, D] | None, dweight [V, D] | None, dbias [V] | None) for per-token grad_logp [N]."""
    need_hidden, need_weight, need_bias = needs
    if backend == "triton-gemm":  # recomputes the logits and their normaliser: the forward's design may differ
        from grao_kernels._triton_gemm import gemm_logprob_pass
        return tuple(gemm_logprob_pass(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
                                       grad_logp=grad_logp, need_hidden=need_hidden, need_weight=need_weight,
                                       need_bias=need_bias and bias is not None)[2:])
    if backend == "triton":
        from grao_kernels._triton_linear import triton_logprob_backward
        return triton_logprob_backward(hidden, weight, labels, bias, lse, grad_logp, temperature=temperature,
                                       ignore_index=ignore_index, need_hidden=need_hidden,
                                       need_weight=need_weight, need_bias=need_bias and bias is not None)
    run = cpu_pass if backend == "native" else chunked_linear_logprob
    out = run(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
              grad_logp=grad_logp, backward_only=True, need_hidden=need_hidden,
              need_weight=need_weight, need_bias=need_bias)  # recomputes its own lse
    return out.grad_hidden, out.grad_weight, out.grad_bias


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# The forward and backward are torch.library custom ops with fake (meta) implementations and
# autograd, so torch.compile(fullgraph=True) traces through them (issue: compile support).
@torch.library.custom_op("grao_kernels::linear_logprob_forward", mutates_args=())
def linear_logprob_forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              labels: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool,
                              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64 -> (logp [N], lse [2, N], entropy [N] | [0])."""
    logp, lse, entropy = _forward(backend, hidden, weight, labels, bias, temperature, ignore_index, return_entropy)
    return logp, lse, _empty(logp) if entropy is None else entropy


@linear_logprob_forward_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, return_entropy, backend):
    n, acc = hidden.shape[0], compute_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty((2, n), dtype=acc),
            hidden.new_empty(n if return_entropy else 0, dtype=acc))


@torch.library.custom_op("grao_kernels::linear_logprob_backward", mutates_args=())
def linear_logprob_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, temperature: float,
                               ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dhidden [N, D] | [0], dweight [V, D] | [0], dbias [V] | [0]) for grad_logp [N]."""
    dh, dw, db = _backward(backend, hidden, weight, labels, bias, lse, grad_logp, temperature, ignore_index,
                           (need_hidden, need_weight, need_bias and bias is not None))
    return (_empty(hidden) if dh is None else dh, _empty(weight) if dw is None else dw,
            _empty(weight) if db is None else db)


@linear_logprob_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, grad_logp, temperature, ignore_index, need_hidden, need_weight, need_bias,
      backend):
    return (torch.empty_like(hidden) if need_hidden else _empty(hidden),
            torch.empty_like(weight) if need_weight else _empty(weight),
            torch.empty_like(bias) if need_bias and bias is not None else _empty(weight))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, _, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.config = (temperature, ignore_index, backend)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero tensors for the lse / entropy outputs


def _autograd_backward(ctx, grad_logp, _grad_lse, _grad_entropy):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    temperature, ignore_index, backend = ctx.config
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_logp is None:
        return (None,) * 8
    refuse_double_backward("linear_logprob", "grao.token_logprobs(grao.linear_logits(hidden, weight, bias), labels)")
    dh, dw, db = linear_logprob_backward_op(hidden, weight, bias, labels, lse, grad_logp.to(lse.dtype).contiguous(),
                                            temperature, ignore_index, need_hidden, need_weight,
                                            bool(need_bias and bias is not None), backend)
    return (dh if need_hidden else None, dw if need_weight else None,
            db if need_bias and bias is not None else None, None, None, None, None, None)


# torch.compiler.disable: no graph of its own for this Python backward when an eager backward runs under
# dynamo's frame hook (see grao_loss.py); compiled graphs trace it through AOTAutograd as before.
linear_logprob_forward_op.register_autograd(torch.compiler.disable(_autograd_backward), setup_context=_setup_context)
# Under autocast: hidden, weight, bias cast to the autocast dtype (as nn.Linear), the op run with autocast off;
# the backward op (saved inputs already cast) just runs with autocast off.
register_autocast_rule("linear_logprob_forward", cast_args=(0, 1, 2))
register_autocast_rule("linear_logprob_backward", cast_args=())


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False, backend: str = "auto"):
    """log softmax((hidden @ weight.T + bias) / temperature)[labels] without materialising the logits.

    Args:
        hidden: [B, T, D] or [N, D] (fp32, bf16, fp16; fp64 runs the chunked PyTorch path).
        weight: [V, D] lm_head weight (may be tied to the input embedding), same dtype/device.
        labels: [B, T] or [N] int64/int32 (shape of the output); ``ignore_index`` marks skipped tokens.
        bias: optional [V]. temperature: logits are divided by it.
        return_entropy: also return the per-token entropy of the softmax (no gradient), for logging.
        backend: "auto" (Triton on CUDA, chunked PyTorch on CPU), "triton" or "torch".

    Returns:
        logp: float32 (float64 for float64 inputs), shaped like ``labels``, 0 at ignored tokens,
        differentiable w.r.t. hidden, weight and bias (once: double backward raises
        ``GRAOUnsupportedError``); and ``entropy`` of the same shape if asked.

    The forward keeps a per-token normaliser only; the gradient work happens in the backward. Under
    ``torch.autocast`` (CPU or CUDA) hidden, weight and bias are cast once to the autocast dtype, as
    ``nn.Linear`` would, and the op runs on them with autocast off.
    """
    layout = check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    temperature = check_scalar("temperature", temperature, positive=True)
    chosen = resolve_backend(backend, hidden)
    if chosen == "triton" and cuda_design() == "gemm":  # fixed per call: the backward runs the same design
        chosen = "triton-gemm"
    flat_hidden = hidden.reshape(-1, layout.hidden_dim)
    flat_labels = labels.reshape(-1).long().contiguous()
    logp, _, entropy = linear_logprob_forward_op(flat_hidden, weight, bias, flat_labels, temperature,
                                                 int(ignore_index), bool(return_entropy), chosen)
    if return_entropy:
        return logp.view(labels.shape), entropy.view(labels.shape)
    return logp.view(labels.shape)
