"""fused_linear_grao_loss: the GRAO loss from hidden states without [tokens x vocab] logits.

Because GRAO's advantages are constants, dLoss/dlogp of every token is known before the
forward pass (GRAO_SPEC.md: -c_s / (|s| P)). So:

* CUDA (Triton): one log-prob kernel keeps the per-token log-sum-exp, one epilogue kernel
  turns log-probs and rewards into the loss, its three components and the per-token
  gradient; the backward is a single kernel (the log-prob backward fed that gradient).
* CPU / float64 (chunked PyTorch): the gradients are computed in the same chunked pass as
  the log-probs (no recompute of the logits), and backward only scales them by the
  incoming gradient. The small per-prompt math is grao.reference's, unchanged.

Same signature, return value and errors as the eager ``grao.linear_grao_loss``.
"""

from __future__ import annotations

import torch

from grao._checks import check_grao_hyper, check_linear_grao_inputs, check_rewards
from grao.reference import grao_objective, grao_row_grad, group_advantages as eager_group_advantages
from grao.reference import sequence_logprob
from grao_kernels._backend import resolve_backend
from grao_kernels._chunked import chunked_linear_logprob


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, reference_in_stats: bool = True,
                     backend: str = "auto") -> torch.Tensor:
    """Intra-group advantages, rewards [P, G+1] -> [P, G+1] fp32 (see grao.reference.group_advantages).

    Triton kernel for CUDA tensors, the eager reference otherwise.
    """
    check_rewards(rewards)
    eps = check_grao_hyper(0.0, 0.0, eps, 1.0)[2]
    if resolve_backend(backend, rewards) == "triton":
        from grao_kernels._triton_grao import triton_group_advantages
        return triton_group_advantages(rewards, eps=eps, reference_in_stats=reference_in_stats)
    return eager_group_advantages(rewards, eps=eps, reference_in_stats=reference_in_stats)


def _triton_forward(hidden, weight, bias, labels, rewards, beta, lam, eps, reference_in_stats, temperature,
                    ignore_index):
    from grao_kernels._triton_grao import triton_grao_epilogue
    from grao_kernels._triton_linear import triton_logprob_forward

    rows, seq_len = labels.shape
    logp, lse, _ = triton_logprob_forward(hidden, weight, labels.reshape(-1), bias, temperature=temperature,
                                          ignore_index=ignore_index, return_entropy=False)
    components, adv, seq_logp, counts, grad_logp = triton_grao_epilogue(
        logp.view(rows, seq_len), labels, rewards, beta=beta, lam=lam, eps=eps,
        reference_in_stats=reference_in_stats, ignore_index=ignore_index)
    return components, adv, seq_logp, counts, grad_logp.reshape(-1), lse


class FusedLinearGRAOFunction(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, labels [B, T], rewards [P, G+1] -> loss and stats."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rewards, beta, lam, eps, reference_in_stats, temperature,
                ignore_index, backend):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        flat_labels = labels.reshape(-1)
        ctx.backend = backend
        if backend == "triton":
            components, adv, seq_logp, counts, grad_logp, lse = _triton_forward(
                hidden, weight, bias, labels, rewards, beta, lam, eps, reference_in_stats, temperature, ignore_index)
            ctx.save_for_backward(hidden, weight, bias, flat_labels, lse, grad_logp)
            ctx.config = (temperature, ignore_index, needs)
            loss = components.sum()
        else:
            mask = labels != ignore_index
            counts = mask.sum(-1)
            adv = eager_group_advantages(rewards, eps=eps, reference_in_stats=reference_in_stats)
            acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            adv_acc = adv.to(acc)
            grad_logp = (grao_row_grad(adv_acc, counts, beta=beta, lam=lam).unsqueeze(1) * mask).reshape(-1)
            out = chunked_linear_logprob(hidden, weight, flat_labels, bias, temperature=temperature,
                                         ignore_index=ignore_index, grad_logp=grad_logp if any(needs) else None,
                                         need_hidden=needs[0], need_weight=needs[1], need_bias=needs[2])
            seq_logp = sequence_logprob(out.logp.view(labels.shape), mask)
            loss, parts = grao_objective(seq_logp, adv_acc, beta=beta, lam=lam)
            components = torch.stack([parts["exploration"], parts["imitation"], parts["alignment"]])
            ctx.save_for_backward(out.grad_hidden, out.grad_weight, out.grad_bias)
        ctx.mark_non_differentiable(components, adv, seq_logp, counts)
        return loss, components, adv, seq_logp, counts

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.backend == "triton":
            from grao_kernels._triton_linear import triton_logprob_backward
            hidden, weight, bias, labels, lse, grad_logp = ctx.saved_tensors
            temperature, ignore_index, (need_h, need_w, need_b) = ctx.config
            dh, dw, db = triton_logprob_backward(hidden, weight, labels, bias, lse, grad_logp * grad_loss.float(),
                                                 temperature=temperature, ignore_index=ignore_index,
                                                 need_hidden=need_h, need_weight=need_w, need_bias=need_b)
        else:
            dh, dw, db = ctx.saved_tensors
            scale = grad_loss
            dh = None if dh is None else dh * scale.to(dh.dtype)
            dw = None if dw is None else dw * scale.to(dw.dtype)
            db = None if db is None else db * scale.to(db.dtype)
        return dh, dw, db, None, None, None, None, None, None, None, None, None


def fused_linear_grao_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor,
                           *, beta: float = 0.5, lam: float = 0.6, eps: float = 1e-6,
                           bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                           reference_in_stats: bool = True, backend: str = "auto"
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRAO loss from hidden states and the lm_head weight, never building [tokens x vocab] logits.

    Args:
        hidden: [B, T, D] or [B*T, D] (fp32, bf16, fp16; fp64 runs the chunked PyTorch path).
        weight: [V, D] lm_head weight, same dtype and device as hidden. bias: optional [V].
        labels: [B, T] int, already shifted; ignore_index marks prompt and padding positions.
        rewards: [P, G+1] float with B = P * (G+1): R(o_1..o_G, y) then R(y, y) per prompt.
        beta, lam, eps, temperature, reference_in_stats: as in ``grao.linear_grao_loss``.
        backend: "auto" (Triton on CUDA, chunked PyTorch on CPU), "triton" or "torch".

    Returns:
        (loss, stats): loss a float32 scalar (float64 for float64 inputs) differentiable w.r.t.
        hidden, weight and bias; stats {"exploration", "imitation", "alignment"} (detached scalars
        summing to loss), "advantages" [P, G+1], "seq_logp" [B], "num_tokens" [B].

    On CPU the gradients are computed during the forward call when any input requires grad
    (they are known then), so a forward without backward costs the backward's work too: wrap
    evaluation in ``torch.no_grad()``.
    """
    layout, _, _, (beta, lam, eps, temperature) = check_linear_grao_inputs(
        hidden, weight, labels, rewards, bias, beta=beta, lam=lam, eps=eps, temperature=temperature,
        ignore_index=ignore_index)
    chosen = resolve_backend(backend, hidden)
    flat_hidden = hidden.reshape(-1, layout.hidden_dim)
    loss, components, adv, seq_logp, counts = FusedLinearGRAOFunction.apply(
        flat_hidden, weight, bias, labels.long(), rewards.detach(), beta, lam, eps, bool(reference_in_stats),
        temperature, int(ignore_index), chosen)
    stats = {"exploration": components[0], "imitation": components[1], "alignment": components[2],
             "advantages": adv, "seq_logp": seq_logp, "num_tokens": counts}
    return loss, stats
