"""fused_linear_logprob_dot: ``sum(coef * logp)`` from hidden states and the lm_head, gradients in the same pass.

Many losses are linear in the per-token log-probs with coefficients fixed before the forward: GRAO on part
of a group (``grao_row_grad``, the spec's closed-form dLoss/dlogp), SFT's token mean (``-1 / tokens``), a
policy gradient at importance ratio 1 (the advantage). For them ``linear_logprob`` followed by a backward
costs 8·N·D·V FLOPs (its backward recomputes the logits); this op knows ``dLoss/dlogp = coef`` in the
forward and returns the input gradients from the same pass: the dispatch table's "known_grad" pass (6·N·D·V on
native, chunked and triton-gemm; triton-tiles runs its forward then its backward kernel), handed over by
``grao_kernels.autograd``. The eager twin, with the same signature and return value, is
``grao_kernels.reference.linear_logprob_dot``.
"""

from __future__ import annotations

import torch

from grao_kernels.autocast import register_autocast_rule
from grao_kernels.autograd import handover_backward, handover_setup_context
from grao_kernels.checks import check_linear_inputs, check_logprob_coef, check_scalar
from grao_kernels.dispatch import lookup, resolve
from grao_kernels.options import Backend, KernelOptions
from grao_kernels.reference import compute_dtype


@torch.library.custom_op("grao_kernels::fused_linear_logprob_dot", mutates_args=())
def fused_linear_logprob_dot_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                labels: torch.Tensor, coef: torch.Tensor, temperature: float, ignore_index: int,
                                need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
                                chunk_bytes: int, dot_precision: str
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, labels [N], coef [N] ->
    (value [], logp [N], dvalue/dhidden [N, D] | [0], dvalue/dweight [V, D] | [0], dvalue/dbias [V] | [0])."""
    acc = compute_dtype(hidden.dtype)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    grad_logp = (coef.to(acc) * (labels != ignore_index)).contiguous()
    logp, grads = lookup("known_grad", backend)(hidden, weight, labels, bias, grad_logp, temperature=temperature,
                                                ignore_index=ignore_index, needs=needs, chunk_bytes=chunk_bytes,
                                                dot_precision=dot_precision)
    logp = logp.to(acc)
    dh, dw, db = (hidden.new_empty(0) if g is None else g for g in grads)
    return (grad_logp * logp).sum(), logp, dh, dw, db


@fused_linear_logprob_dot_op.register_fake
def _(hidden, weight, bias, labels, coef, temperature, ignore_index, need_hidden, need_weight, need_bias, backend,
      chunk_bytes, dot_precision):
    acc = compute_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc),
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0))


fused_linear_logprob_dot_op.register_autograd(
    handover_backward("fused_linear_logprob_dot", eager="grao_kernels.reference.linear_logprob_dot"),
    setup_context=handover_setup_context)
# Under autocast: hidden, weight, bias cast to the autocast dtype (as nn.Linear), the op run with autocast off.
register_autocast_rule("fused_linear_logprob_dot", cast_args=(0, 1, 2))


def fused_linear_logprob_dot(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor,
                             *, bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                             backend: Backend = "auto", options: KernelOptions | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum over tokens of coef * log softmax((hidden @ weight.T + bias) / temperature)[labels]``, one pass.

    Args:
        hidden: [B, T, D] or [N, D] (fp32, bf16, fp16; fp64 runs the chunked PyTorch path).
        weight: [V, D] lm_head weight, same dtype/device. bias: optional [V]. temperature: logits / it.
        labels: [B, T] or [N] int; ``ignore_index`` marks tokens that add nothing.
        coef: float, shaped like ``labels``, finite, not requiring grad: the loss's constant dLoss/dlogp per
            token (entries at ignored tokens are not used).
        backend, options: as in ``grao_kernels.linear_logprob``.

    Returns:
        (value, logp): ``value`` a float32 scalar (float64 for float64 inputs) differentiable w.r.t. hidden,
        weight and bias, for one backward (as ``fused_linear_grao_loss``: its gradients are computed in this
        call, so wrap calls that will not be back-propagated in ``torch.no_grad()``); ``logp`` the detached
        per-token log-probs shaped like ``labels`` (0 at ignored tokens).
    """
    layout = check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    check_logprob_coef(coef, labels)
    temperature = check_scalar("temperature", temperature, positive=True)
    plan = resolve(backend, hidden, options)
    grad_on = torch.is_grad_enabled()
    value, logp, *_ = fused_linear_logprob_dot_op(
        hidden.reshape(-1, layout.hidden_dim), weight, bias, labels.reshape(-1).long().contiguous(),
        coef.reshape(-1), temperature, int(ignore_index), grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad, backend=plan.backend,
        chunk_bytes=plan.chunk_bytes, dot_precision=plan.dot_precision)
    return value, logp.view(labels.shape)
