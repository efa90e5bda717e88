"""Padding-free (token-packed) GRAO loss: hidden [N, D], labels [N] and the row of each token.

``fused_linear_grao_loss(..., cu_seqlens=...)`` or ``(..., row_index=...)`` lands here. The rows are the
usual B = P * (G + 1) rows (each prompt's G samples, then its reference answer), but only their
completion tokens need to be fed, in any order for ``row_index`` or row after row for ``cu_seqlens``
(flash-attn style): neither padding nor prompt tokens reach the loss. Same hyper-parameters, return
value, errors and numerics as the padded call; the eager twin is
``grao_kernels.reference.linear_grao_loss`` with the same keywords.

As in the padded op, dLoss/dlogp of every token is known before the forward (the advantages are
constants, ``grao_row_grad``): per-row counts and sums are ``index_add`` over the row index, and the
input gradients come out of the same pass as the log-probs (on CPU the native kernel or the chunked
PyTorch pass, as the backend resolves; on CUDA the Triton log-prob forward kernel, then its backward
kernel fed that gradient). The small
per-prompt math is the reference's. Autograd's backward only scales the stored gradients; autocast,
double backward, a second backward and unused gradients behave as for the padded op (``_autocast``,
``_limits``).
"""

from __future__ import annotations

import torch

from grao_kernels._autocast import register_autocast_rule
from grao_kernels._handover import (
    handover_backward,
    handover_setup_context,
    known_grad_pass,
)
from grao_kernels.grao_loss import fake_grao_outputs
from grao_kernels.reference import (
    COMPONENTS,
    _group_advantages,
    compute_dtype,
    grao_objective,
    grao_row_grad,
    packed_sequence_logprob,
)


def _packed_pass(hidden, weight, bias, labels, row_index, rewards, beta, lam, eps, reference_in_stats, temperature,
                 ignore_index, needs, backend):
    acc = compute_dtype(hidden.dtype)
    rows = rewards.shape[0] * rewards.shape[1]
    mask = labels != ignore_index
    counts = torch.zeros(rows, dtype=torch.long, device=labels.device).index_add_(0, row_index, mask.long())
    adv = _group_advantages(rewards, eps, reference_in_stats).to(acc)
    grad_logp = None
    if any(needs):
        grad_logp = grao_row_grad(adv, counts, beta=beta, lam=lam).index_select(0, row_index) * mask
    logp, grads = known_grad_pass(backend, hidden, weight, labels, bias, grad_logp, temperature=temperature,
                                  ignore_index=ignore_index, needs=needs)
    seq_logp = packed_sequence_logprob(logp.to(acc), mask, row_index, rows)
    loss, parts = grao_objective(seq_logp, adv, beta=beta, lam=lam)
    return loss, torch.stack([parts[name] for name in COMPONENTS]), adv, seq_logp, counts, grads


@torch.library.custom_op("grao_kernels::fused_linear_grao_packed", mutates_args=())
def fused_linear_grao_packed_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                labels: torch.Tensor, row_index: torch.Tensor, rewards: torch.Tensor, beta: float,
                                lam: float, eps: float, reference_in_stats: bool, temperature: float,
                                ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, labels [N], row_index [N], rewards [P, G+1] ->
    (loss [], components [3], advantages [P, G+1], seq_logp [B], num_tokens [B],
     dloss/dhidden [N, D] | [0], dloss/dweight [V, D] | [0], dloss/dbias [V] | [0])."""
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    loss, components, adv, seq_logp, counts, grads = _packed_pass(
        hidden, weight, bias, labels, row_index, rewards, beta, lam, eps, reference_in_stats, temperature,
        ignore_index, needs, backend)
    acc = compute_dtype(hidden.dtype)
    dh, dw, db = (hidden.new_empty(0) if g is None else g for g in grads)
    return (loss.to(acc), components.to(acc), adv.to(compute_dtype(rewards.dtype)), seq_logp.to(acc), counts,
            dh, dw, db)


@fused_linear_grao_packed_op.register_fake
def _(hidden, weight, bias, labels, row_index, rewards, beta, lam, eps, reference_in_stats, temperature,
      ignore_index, need_hidden, need_weight, need_bias, backend):
    rows = rewards.shape[0] * rewards.shape[1]
    return fake_grao_outputs(hidden, weight, bias, rewards, rows, need_hidden, need_weight, need_bias)


# as the padded op: gradients handed over once, no dynamo frame for the eager backward; autocast casts
# hidden, weight, bias once
fused_linear_grao_packed_op.register_autograd(handover_backward("fused_linear_grao_loss (token-packed)", 13),
                                             setup_context=handover_setup_context)
register_autocast_rule("fused_linear_grao_packed", cast_args=(0, 1, 2))


def fused_linear_grao_loss_packed(hidden, weight, labels, rewards, *, beta, lam, eps, bias, temperature,
                                  ignore_index, reference_in_stats, cu_seqlens, row_index, backend):
    """The token-packed form of :func:`grao_kernels.fused_linear_grao_loss` (see the module docstring)."""
    from grao_kernels._backend import resolve_backend
    from grao_kernels._packed_checks import check_packed_grao_inputs

    _, _, _, rows, (beta, lam, eps, temperature) = check_packed_grao_inputs(
        hidden, weight, labels, rewards, bias, cu_seqlens, row_index, beta=beta, lam=lam, eps=eps,
        temperature=temperature, ignore_index=ignore_index)
    chosen = resolve_backend(backend, hidden)
    grad_on = torch.is_grad_enabled()
    loss, components, adv, seq_logp, counts, *_ = fused_linear_grao_packed_op(
        hidden, weight, bias, labels.long(), rows, rewards.detach(), beta, lam, eps, bool(reference_in_stats),
        temperature, int(ignore_index), grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, chosen)
    stats = {"exploration": components[0], "imitation": components[1], "alignment": components[2],
             "advantages": adv, "seq_logp": seq_logp, "num_tokens": counts}
    return loss, stats
