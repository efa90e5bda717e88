"""linear_logprob: per-token log-probs of labels straight from hidden states and the lm_head.

Two torch.library custom ops (fake implementations, autograd, autocast rule) run the dispatch table's "forward"
pass, which keeps only the per-token normaliser, and its "backward" pass, which recomputes the logits. Every
backend is tested against ``grao_kernels.reference.token_logprobs`` on full logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from grao_kernels.autocast import register_autocast_rule
from grao_kernels.autograd import refuse_double_backward
from grao_kernels.checks import check_linear_inputs, check_scalar
from grao_kernels.dispatch import lookup, resolve
from grao_kernels.options import Backend, KernelOptions
from grao_kernels.reference import compute_dtype


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# The forward and backward are torch.library custom ops with fake (meta) implementations and
# autograd, so torch.compile(fullgraph=True) traces through them (issue: compile support).
@torch.library.custom_op("grao_kernels::linear_logprob_forward", mutates_args=())
def linear_logprob_forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              labels: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool,
                              backend: str, chunk_bytes: int, dot_precision: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64 -> (logp [N], lse [2, N], entropy [N] | [0]).
    backend, chunk_bytes, dot_precision: a resolved ``dispatch.Plan``."""
    logp, lse, entropy = lookup("forward", backend)(
        hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, chunk_bytes=chunk_bytes, dot_precision=dot_precision)
    return logp, lse, _empty(logp) if entropy is None else entropy


@linear_logprob_forward_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, return_entropy, backend, chunk_bytes, dot_precision):
    n, acc = hidden.shape[0], compute_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty((2, n), dtype=acc),
            hidden.new_empty(n if return_entropy else 0, dtype=acc))


@torch.library.custom_op("grao_kernels::linear_logprob_backward", mutates_args=())
def linear_logprob_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, temperature: float,
                               ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                               backend: str, chunk_bytes: int, dot_precision: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dhidden [N, D] | [0], dweight [V, D] | [0], dbias [V] | [0]) for grad_logp [N]."""
    dh, dw, db = lookup("backward", backend)(
        hidden, weight, labels, bias, lse, grad_logp, temperature=temperature, ignore_index=ignore_index,
        needs=(need_hidden, need_weight, need_bias and bias is not None), chunk_bytes=chunk_bytes,
        dot_precision=dot_precision)
    return (_empty(hidden) if dh is None else dh, _empty(weight) if dw is None else dw,
            _empty(weight) if db is None else db)


@linear_logprob_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, grad_logp, temperature, ignore_index, need_hidden, need_weight, need_bias,
      backend, chunk_bytes, dot_precision):
    return (torch.empty_like(hidden) if need_hidden else _empty(hidden),
            torch.empty_like(weight) if need_weight else _empty(weight),
            torch.empty_like(bias) if need_bias and bias is not None else _empty(weight))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, _, *plan = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.config = (temperature, ignore_index, *plan)  # the backward runs the forward's backend and options
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero tensors for the lse / entropy outputs


def _autograd_backward(ctx, grad_logp, _grad_lse, _grad_entropy):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    temperature, ignore_index, backend, chunk_bytes, dot_precision = ctx.config
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    rest = (None,) * (len(ctx.needs_input_grad) - 3)
    if grad_logp is None:
        return (None, None, None) + rest
    refuse_double_backward("linear_logprob", "grao.token_logprobs(grao.linear_logits(hidden, weight, bias), labels)")
    dh, dw, db = linear_logprob_backward_op(hidden, weight, bias, labels, lse, grad_logp.to(lse.dtype).contiguous(),
                                            temperature, ignore_index, need_hidden, need_weight,
                                            bool(need_bias and bias is not None), backend=backend,
                                            chunk_bytes=chunk_bytes, dot_precision=dot_precision)
    return (dh if need_hidden else None, dw if need_weight else None,
            db if need_bias and bias is not None else None) + rest


# torch.compiler.disable: no graph of its own for this Python backward when an eager backward runs under
# dynamo's frame hook (see grao_kernels.autograd.handover_backward); compiled graphs trace it through AOTAutograd.
linear_logprob_forward_op.register_autograd(torch.compiler.disable(_autograd_backward), setup_context=_setup_context)
# Under autocast: hidden, weight, bias cast to the autocast dtype (as nn.Linear), the op run with autocast off;
# the backward op (saved inputs already cast) just runs with autocast off.
register_autocast_rule("linear_logprob_forward", cast_args=(0, 1, 2))
register_autocast_rule("linear_logprob_backward", cast_args=())


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False, backend: Backend = "auto", options: KernelOptions | None = None):
    """log softmax((hidden @ weight.T + bias) / temperature)[labels] without materialising the logits.

    Args:
        hidden: [B, T, D] or [N, D] (fp32, bf16, fp16; fp64 runs the chunked PyTorch path).
        weight: [V, D] lm_head weight (may be tied to the input embedding), same dtype/device.
        labels: [B, T] or [N] int64/int32 (shape of the output); ``ignore_index`` marks skipped tokens.
        bias: optional [V]. temperature: logits are divided by it.
        return_entropy: also return the per-token entropy of the softmax (no gradient), for logging.
        backend: "auto" (CUDA: triton-gemm; CPU fp32 / bf16: the native kernel; else chunked), "triton-gemm",
            "triton-tiles", "native" or "chunked" (grao_kernels.dispatch.resolve).
        options: ``KernelOptions`` (chunk budgets, fp32 dot precision), or None for the defaults.

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
    plan = resolve(backend, hidden, options)  # fixed per call: the backward runs the same backend
    flat_hidden = hidden.reshape(-1, layout.hidden_dim)
    flat_labels = labels.reshape(-1).long().contiguous()
    logp, _, entropy = linear_logprob_forward_op(flat_hidden, weight, bias, flat_labels, temperature,
                                                 int(ignore_index), bool(return_entropy), backend=plan.backend,
                                                 chunk_bytes=plan.chunk_bytes, dot_precision=plan.dot_precision)
    if return_entropy:
        return logp.view(labels.shape), entropy.view(labels.shape)
    return logp.view(labels.shape)
