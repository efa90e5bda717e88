"""fused_linear_grao_loss: the GRAO loss from hidden states without [tokens x vocab] logits.

Because GRAO's advantages are constants, dLoss/dlogp of every token is known before the
forward pass (docs/spec.md: -c_s / (|s| P)). So:

* CUDA (Triton): one log-prob kernel keeps the per-token log-sum-exp, one epilogue kernel
  turns log-probs and rewards into the loss, its three components and the per-token
  gradient, and one backward kernel (the log-prob backward fed that gradient) produces the
  input gradients right away, in the same call.
* CPU (the native C++ kernel, grao_kernels.cpu_native; the chunked PyTorch path for float64,
  fp16 or where the kernel cannot be built): the gradients are computed in the same pass as
  the log-probs (no recompute of the logits). The small per-prompt math is
  grao_kernels.reference's, unchanged.

Either way autograd's backward only scales the stored gradients by the incoming gradient.

Same signature, return value and errors as the eager ``grao_kernels.reference.linear_grao_loss``
(re-exported as ``grao.linear_grao_loss``).
"""

from __future__ import annotations

from typing import Optional

import torch

from grao_kernels._autocast import register_autocast_rule
from grao_kernels._backend import cuda_design, resolve_backend
from grao_kernels._checks import (
    check_grao_hyper,
    check_linear_grao_inputs,
    check_rewards,
)
from grao_kernels._handover import (
    handover_backward,
    handover_setup_context,
    known_grad_pass,
)
from grao_kernels.reference import (
    COMPONENTS,
    _group_advantages,
    compute_dtype,
    grao_objective,
    grao_row_grad,
    sequence_logprob,
)


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, reference_in_stats: bool = True,
                     backend: str = "auto") -> torch.Tensor:
    """Intra-group advantages, rewards [P, G+1] -> [P, G+1] fp32 (see grao_kernels.reference.group_advantages).

    Triton kernel for CUDA tensors, the eager reference otherwise.
    """
    check_rewards(rewards)
    eps = check_grao_hyper(0.0, 0.0, eps, 1.0)[2]
    if resolve_backend(backend, rewards) == "triton":
        from grao_kernels._triton_grao import triton_group_advantages
        return triton_group_advantages(rewards, eps=eps, reference_in_stats=reference_in_stats)
    return _group_advantages(rewards, eps, reference_in_stats)  # validated above


def _triton_pass(hidden, weight, bias, labels, rewards, beta, lam, eps, reference_in_stats, temperature,
                 ignore_index, needs):
    """Log-prob kernel -> epilogue kernel (loss, parts, per-token gradient) -> log-prob backward kernel."""
    from grao_kernels._triton_grao import triton_grao_epilogue
    from grao_kernels._triton_linear import (
        triton_logprob_backward,
        triton_logprob_forward,
    )

    rows, seq_len = labels.shape
    flat_labels = labels.reshape(-1)
    logp, lse, _ = triton_logprob_forward(hidden, weight, flat_labels, bias, temperature=temperature,
                                          ignore_index=ignore_index, return_entropy=False)
    components, adv, seq_logp, counts, grad_logp = triton_grao_epilogue(
        logp.view(rows, seq_len), labels, rewards, beta=beta, lam=lam, eps=eps,
        reference_in_stats=reference_in_stats, ignore_index=ignore_index)
    grads = (None, None, None)
    if any(needs):
        grads = triton_logprob_backward(hidden, weight, flat_labels, bias, lse, grad_logp.reshape(-1),
                                        temperature=temperature, ignore_index=ignore_index, need_hidden=needs[0],
                                        need_weight=needs[1], need_bias=needs[2])
    return components.sum(), components, adv, seq_logp, counts, grads


def _chunked_pass(hidden, weight, bias, labels, rewards, beta, lam, eps, reference_in_stats, temperature,
                  ignore_index, needs, design="torch"):
    """Advantages and per-token gradients first (the reference), then one pass for log-probs and grads
    (``known_grad_pass``: the native CPU kernel, the chunked PyTorch path, or on CUDA the "gemm" design's
    cuBLAS GEMMs with one Triton row kernel; 6·N·D·V)."""
    mask = labels != ignore_index
    counts = mask.sum(-1)
    adv_acc = _group_advantages(rewards, eps, reference_in_stats).to(compute_dtype(hidden.dtype))
    grad_logp = (grao_row_grad(adv_acc, counts, beta=beta, lam=lam).unsqueeze(1) * mask).reshape(-1)
    logp, grads = known_grad_pass(design, hidden, weight, labels.reshape(-1), bias, grad_logp,
                                  temperature=temperature, ignore_index=ignore_index, needs=needs)
    seq_logp = sequence_logprob(logp.view(labels.shape), mask)
    loss, parts = grao_objective(seq_logp, adv_acc, beta=beta, lam=lam)
    components = torch.stack([parts[name] for name in COMPONENTS])
    return loss, components, adv_acc, seq_logp, counts, tuple(grads)


# A torch.library custom op (fake implementation + autograd) so torch.compile(fullgraph=True)
# traces through it. The loss gradient w.r.t. every log-prob is known in the forward (the
# advantages are constants), so the op returns the input gradients of the loss alongside it
# whenever they are needed, and the backward only scales them by the incoming gradient.
@torch.library.custom_op("grao_kernels::fused_linear_grao", mutates_args=())
def fused_linear_grao_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, rewards: torch.Tensor, beta: float, lam: float, eps: float,
                         reference_in_stats: bool, temperature: float, ignore_index: int, need_hidden: bool,
                         need_weight: bool, need_bias: bool, backend: str) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, labels [B, T] int64, rewards [P, G+1] ->
    (loss [], components [3], advantages [P, G+1], seq_logp [B], num_tokens [B],
     dloss/dhidden [N, D] | [0], dloss/dweight [V, D] | [0], dloss/dbias [V] | [0])."""
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    args = (hidden, weight, bias, labels, rewards, beta, lam, eps, reference_in_stats, temperature, ignore_index, needs)
    if backend != "triton":
        loss, components, adv, seq_logp, counts, grads = _chunked_pass(*args, design=backend)
    elif cuda_design() == "gemm":
        loss, components, adv, seq_logp, counts, grads = _chunked_pass(*args, design="triton-gemm")
    else:
        loss, components, adv, seq_logp, counts, grads = _triton_pass(*args)
    acc = compute_dtype(hidden.dtype)
    adv = adv.to(compute_dtype(rewards.dtype))  # the reference's dtype for advantages
    dh, dw, db = (hidden.new_empty(0) if g is None else g for g in grads)
    return loss.to(acc), components.to(acc), adv, seq_logp.to(acc), counts.long(), dh, dw, db


def fake_grao_outputs(hidden, weight, bias, rewards, rows: int, need_hidden, need_weight, need_bias):
    """Meta outputs of a fused GRAO op (padded or token-packed) with ``rows`` = B sequences."""
    acc = compute_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(3, dtype=acc),
            rewards.new_empty(rewards.shape, dtype=compute_dtype(rewards.dtype)), hidden.new_empty(rows, dtype=acc),
            hidden.new_empty(rows, dtype=torch.int64),
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0))


@fused_linear_grao_op.register_fake
def _(hidden, weight, bias, labels, rewards, beta, lam, eps, reference_in_stats, temperature, ignore_index,
      need_hidden, need_weight, need_bias, backend):
    return fake_grao_outputs(hidden, weight, bias, rewards, labels.shape[0], need_hidden, need_weight, need_bias)


fused_linear_grao_op.register_autograd(handover_backward("fused_linear_grao_loss", 12),
                                      setup_context=handover_setup_context)
# Under autocast: hidden, weight, bias cast to the autocast dtype (as nn.Linear), the op run with autocast off.
register_autocast_rule("fused_linear_grao", cast_args=(0, 1, 2))


def fused_linear_grao_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor,
                           *, beta: float = 0.5, lam: float = 0.6, eps: float = 1e-6,
                           bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                           reference_in_stats: bool = True, backend: str = "auto",
                           cu_seqlens: torch.Tensor | None = None, row_index: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRAO loss from hidden states and the lm_head weight, never building [tokens x vocab] logits.

    Args:
        hidden: [B, T, D] or [B*T, D] (fp32, bf16, fp16; fp64 runs the chunked PyTorch path).
        weight: [V, D] lm_head weight, same dtype and device as hidden. bias: optional [V].
        labels: [B, T] int64 or int32, already shifted; ignore_index marks prompt and padding positions
            (flat labels [N] are token-packed input: with cu_seqlens or row_index only).
        rewards: [P, G+1] float with B = P * (G+1): R(o_1..o_G, y) then R(y, y) per prompt.
        beta, lam, eps, temperature, reference_in_stats: as in ``grao_kernels.reference.linear_grao_loss``.
        backend: "auto" (Triton on CUDA, the native kernel on CPU), "triton", "torch" (chunked PyTorch) or
            "native".
        cu_seqlens / row_index: token-packed (padding-free) inputs (``grao_kernels.packed``): hidden [N, D],
            labels [N] and either cu_seqlens [B+1] (row b's tokens are cu_seqlens[b]:cu_seqlens[b+1]) or
            row_index [N] (each token's row); only completion tokens need to be fed.

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
        from grao_kernels.packed import fused_linear_grao_loss_packed
        return fused_linear_grao_loss_packed(hidden, weight, labels, rewards, beta=beta, lam=lam, eps=eps, bias=bias,
                                             temperature=temperature, ignore_index=ignore_index,
                                             reference_in_stats=reference_in_stats, cu_seqlens=cu_seqlens,
                                             row_index=row_index, backend=backend)
    layout, _, _, (beta, lam, eps, temperature) = check_linear_grao_inputs(
        hidden, weight, labels, rewards, bias, beta=beta, lam=lam, eps=eps, temperature=temperature,
        ignore_index=ignore_index)
    chosen = resolve_backend(backend, hidden)
    flat_hidden = hidden.reshape(-1, layout.hidden_dim)
    grad_on = torch.is_grad_enabled()
    loss, components, adv, seq_logp, counts, *_ = fused_linear_grao_op(
        flat_hidden, weight, bias, labels.long(), rewards.detach(), beta, lam, eps, bool(reference_in_stats),
        temperature, int(ignore_index), grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, chosen)
    stats = {"exploration": components[0], "imitation": components[1], "alignment": components[2],
             "advantages": adv, "seq_logp": seq_logp, "num_tokens": counts}
    return loss, stats
