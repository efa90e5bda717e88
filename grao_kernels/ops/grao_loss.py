"""fused_linear_grao_loss (padded and token-packed) and group_advantages: the GRAO loss without [tokens x vocab] logits.

One core for both layouts: a padded call [B, T] is the packed loss with row_index = arange(B) repeated T times
and flat labels. GRAO's advantages are constants, so dLoss/dlogp of every token is known before the forward
(docs/spec.md: -c_s / (|s| P)): the op forms it with the reference's math (advantages, ``grao_row_grad``), runs
the dispatch table's "known_grad" pass (log-probs and input gradients in one call), and finishes with the
reference's objective. Autograd's backward only scales the gradients handed over (grao_kernels.autograd). Same
signature, return value and errors as ``grao_kernels.reference.linear_grao_loss``.
"""

from __future__ import annotations

from typing import Optional

import torch

from grao_kernels.autocast import register_autocast_rule
from grao_kernels.autograd import handover_backward, handover_setup_context
from grao_kernels.checks import (
    check_grao_hyper,
    check_linear_grao_inputs,
    check_packed_grao_inputs,
    check_rewards,
)
from grao_kernels.dispatch import lookup, resolve
from grao_kernels.options import Backend, KernelOptions, check_backend
from grao_kernels.reference import (
    COMPONENTS,
    _group_advantages,
    compute_dtype,
    grao_objective,
    grao_row_grad,
    packed_sequence_logprob,
)


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, reference_in_stats: bool = True,
                     backend: Backend = "auto") -> torch.Tensor:
    """Intra-group advantages, rewards [P, G+1] -> [P, G+1] (``grao_kernels.reference.group_advantages``).

    O(P·G) work: the reference's on every device and backend (``backend`` is checked, for symmetry with the ops).
    """
    check_backend(backend)
    check_rewards(rewards)
    eps = check_grao_hyper(0.0, 0.0, eps, 1.0)[2]
    return _group_advantages(rewards, eps, reference_in_stats)  # validated above


# A torch.library custom op (fake implementation + autograd) so torch.compile(fullgraph=True) traces through it.
# Its last three outputs are the loss's input gradients, computed in the forward (grao_kernels.autograd).
@torch.library.custom_op("grao_kernels::fused_linear_grao", mutates_args=())
def fused_linear_grao_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, row_index: torch.Tensor, rewards: torch.Tensor, beta: float,
                         lam: float, eps: float, reference_in_stats: bool, temperature: float, ignore_index: int,
                         need_hidden: bool, need_weight: bool, need_bias: bool, backend: str, chunk_bytes: int,
                         dot_precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64, row_index [N] int64 (each token's row),
    rewards [P, G+1]; backend, chunk_bytes, dot_precision a resolved ``dispatch.Plan`` ->
    (loss [], components [3], advantages [P, G+1], seq_logp [B], num_tokens [B],
     dloss/dhidden [N, D] | [0], dloss/dweight [V, D] | [0], dloss/dbias [V] | [0])."""
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    acc = compute_dtype(hidden.dtype)
    rows = rewards.shape[0] * rewards.shape[1]
    mask = labels != ignore_index
    counts = torch.zeros(rows, dtype=torch.long, device=labels.device).index_add_(0, row_index, mask.long())
    adv = _group_advantages(rewards, eps, reference_in_stats).to(acc)
    grad_logp = None
    if any(needs):
        grad_logp = grao_row_grad(adv, counts, beta=beta, lam=lam).index_select(0, row_index) * mask
    logp, grads = lookup("known_grad", backend)(hidden, weight, labels, bias, grad_logp, temperature=temperature,
                                                ignore_index=ignore_index, needs=needs, chunk_bytes=chunk_bytes,
                                                dot_precision=dot_precision)
    seq_logp = packed_sequence_logprob(logp.to(acc), mask, row_index, rows)
    loss, parts = grao_objective(seq_logp, adv, beta=beta, lam=lam)
    components = torch.stack([parts[name] for name in COMPONENTS])
    dh, dw, db = (hidden.new_empty(0) if g is None else g for g in grads)
    return (loss.to(acc), components.to(acc), adv.to(compute_dtype(rewards.dtype)), seq_logp.to(acc), counts,
            dh, dw, db)


@fused_linear_grao_op.register_fake
def _(hidden, weight, bias, labels, row_index, rewards, beta, lam, eps, reference_in_stats, temperature,
      ignore_index, need_hidden, need_weight, need_bias, backend, chunk_bytes, dot_precision):
    acc = compute_dtype(hidden.dtype)
    rows = rewards.shape[0] * rewards.shape[1]
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(3, dtype=acc),
            rewards.new_empty(rewards.shape, dtype=compute_dtype(rewards.dtype)), hidden.new_empty(rows, dtype=acc),
            hidden.new_empty(rows, dtype=torch.int64),
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0))


fused_linear_grao_op.register_autograd(handover_backward("fused_linear_grao_loss"),
                                      setup_context=handover_setup_context)
# Under autocast: hidden, weight, bias cast to the autocast dtype (as nn.Linear), the op run with autocast off.
register_autocast_rule("fused_linear_grao", cast_args=(0, 1, 2))


def fused_linear_grao_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor,
                           *, beta: float = 0.5, lam: float = 0.6, eps: float = 1e-6,
                           bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                           reference_in_stats: bool = True, backend: Backend = "auto",
                           cu_seqlens: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
                           options: KernelOptions | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRAO loss from hidden states and the lm_head weight, never building [tokens x vocab] logits.

    Args:
        hidden: [B, T, D] or [B*T, D] (fp32, bf16, fp16; fp64 runs the chunked PyTorch path).
        weight: [V, D] lm_head weight, same dtype and device as hidden. bias: optional [V].
        labels: [B, T] int64 or int32, already shifted; ignore_index marks prompt and padding positions
            (flat labels [N] are token-packed input: with cu_seqlens or row_index only).
        rewards: [P, G+1] float with B = P * (G+1): R(o_1..o_G, y) then R(y, y) per prompt.
        beta, lam, eps, temperature, reference_in_stats: as in ``grao_kernels.reference.linear_grao_loss``.
        backend: "auto" (CUDA: triton-gemm; CPU fp32 / bf16: the native kernel; else chunked), "triton-gemm",
            "triton-tiles", "native" or "chunked" (grao_kernels.dispatch.resolve).
        cu_seqlens / row_index: token-packed (padding-free) inputs: hidden [N, D], labels [N] and either
            cu_seqlens [B+1] (row b's tokens are cu_seqlens[b]:cu_seqlens[b+1]) or row_index [N] (each token's
            row, any order); only completion tokens need to be fed. Same numerics as the padded call.
        options: ``KernelOptions`` (chunk budgets, fp32 dot precision), or None for the defaults.

    Returns:
        (loss, stats): loss a float32 scalar (float64 for float64 inputs) differentiable w.r.t.
        hidden, weight and bias; stats {"exploration", "imitation", "alignment"} (scalars summing to
        loss), "advantages" [P, G+1], "seq_logp" [B], "num_tokens" [B], all detached.

    The gradients are computed during the forward call when any input requires grad (they are
    known then: the advantages are constants), so a forward without backward costs the backward's
    work too (about 2.5x a ``torch.no_grad()`` call): wrap evaluation and logging in ``torch.no_grad()``.
    A loss freed without a backward warns once (``GRAOUnusedGradientWarning``). Only ``loss`` carries a
    gradient, for one backward; double backward (``create_graph=True``) raises ``GRAOUnsupportedError``.

    Under ``torch.autocast`` (CPU or CUDA) hidden, weight and bias (fp32/bf16/fp16) are cast once to the
    autocast dtype, as ``nn.Linear`` would, so they may differ in dtype there; the result is exactly the
    op's on the cast inputs (fp32 log-probs and gradient sums), and rewards are not cast.
    """
    if cu_seqlens is not None or row_index is not None:
        _, _, _, rows, (beta, lam, eps, temperature) = check_packed_grao_inputs(
            hidden, weight, labels, rewards, bias, cu_seqlens, row_index, beta=beta, lam=lam, eps=eps,
            temperature=temperature, ignore_index=ignore_index)
        flat_hidden, flat_labels = hidden, labels.long()
    else:
        layout, _, _, (beta, lam, eps, temperature) = check_linear_grao_inputs(
            hidden, weight, labels, rewards, bias, beta=beta, lam=lam, eps=eps, temperature=temperature,
            ignore_index=ignore_index)
        flat_hidden = hidden.reshape(-1, layout.hidden_dim)
        flat_labels = labels.reshape(-1).long()
        rows = torch.arange(layout.rows, device=labels.device).repeat_interleave(layout.seq_len)
    plan = resolve(backend, hidden, options)
    grad_on = torch.is_grad_enabled()
    loss, components, adv, seq_logp, counts, *_ = fused_linear_grao_op(
        flat_hidden, weight, bias, flat_labels, rows, rewards.detach(), beta, lam, eps, bool(reference_in_stats),
        temperature, int(ignore_index), grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, backend=plan.backend, chunk_bytes=plan.chunk_bytes,
        dot_precision=plan.dot_precision)
    stats = {"exploration": components[0], "imitation": components[1], "alignment": components[2],
             "advantages": adv, "seq_logp": seq_logp, "num_tokens": counts}
    return loss, stats
