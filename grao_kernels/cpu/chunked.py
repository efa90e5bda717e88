"""The chunked PyTorch backend: per-token log-probs (and, given dLoss/dlogp, input gradients) without [N x V] logits.

It walks the non-ignored tokens in chunks whose fp32 logits fit ``KernelOptions.chunk_bytes`` (one reused
[rows x V] buffer), so peak memory is O(chunk x V); it runs any device and float dtype (float64 included). The
idea of chunking the lm_head + loss and computing the input gradients inside the forward when the loss gradient
is known there comes from Liger-Kernel's fused_linear_cross_entropy; this is our own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grao_kernels.options import DEFAULT_OPTIONS
from grao_kernels.reference import compute_dtype

#: The default budget (KernelOptions.chunk_bytes; how it was chosen: docs/kernels.md).
DEFAULT_CHUNK_BYTES = DEFAULT_OPTIONS.chunk_bytes


def chunk_rows(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one fp32 [rows x vocab] buffer fits in ``chunk_bytes``."""
    return max(1, int(chunk_bytes) // (4 * max(1, vocab)))


@dataclass
class ChunkedResult:
    logp: torch.Tensor  # [N] fp32 (fp64 for fp64 inputs), 0 at ignored tokens
    lse: torch.Tensor  # [2, N]: row max m and log sum exp(z - m) of the scaled logits (0 at ignored tokens)
    entropy: torch.Tensor | None  # [N] or None
    grad_hidden: torch.Tensor | None  # [N, D] in hidden's dtype
    grad_weight: torch.Tensor | None  # [V, D] in weight's dtype
    grad_bias: torch.Tensor | None  # [V] in bias's dtype


def chunked_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           bias: torch.Tensor | None, *, temperature: float, ignore_index: int,
                           return_entropy: bool = False, grad_logp: torch.Tensor | None = None,
                           backward_only: bool = False, need_hidden: bool = True, need_weight: bool = True,
                           need_bias: bool = True, chunk_bytes: int | None = None) -> ChunkedResult:
    """One chunked pass over the completion tokens; optionally also the input gradients.

    hidden [N, D], weight [V, D], bias [V] | None (one float dtype), labels [N] int.
    grad_logp [N] fp32: when given, the pass also returns dLoss/dhidden, dLoss/dweight,
    dLoss/dbias for loss gradients ``grad_logp`` w.r.t. the log-probs (accumulated in
    fp32/fp64 and cast once). backward_only: the log-probs are not needed (autograd's
    backward), so tokens with grad_logp == 0 are skipped.

    The normaliser of each chunk is recomputed from the logits of that same chunk, never taken
    from a saved log-sum-exp: the backward's chunks hold other tokens than the forward's, and a
    matmul over other rows may round the logits differently; with large logits a saved lse would
    then no longer normalise them (softmax off by |z| * 1e-7 relative, far more than eager's
    error). The log-prob is formed as (z - m) - log s, which keeps a confident token's tiny
    log-prob accurate where z - (m + log s) in fp32 would not.
    Logits are formed in the inputs' dtype and upcast, exactly as the eager path does.
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    dtype = hidden.dtype
    acc = compute_dtype(dtype)
    device = hidden.device
    mask = labels != ignore_index
    active = mask.nonzero().flatten()
    if grad_logp is not None and backward_only:
        # Backward pass (log-probs already known): tokens with no incoming gradient add nothing.
        active = active[grad_logp.index_select(0, active) != 0]
    out_logp = torch.zeros(n, dtype=acc, device=device)
    out_lse = torch.zeros(2, n, dtype=acc, device=device)
    out_ent = torch.zeros(n, dtype=acc, device=device) if return_entropy else None
    want_grads = grad_logp is not None
    g_hidden = torch.zeros(n, dim, dtype=dtype, device=device) if want_grads and need_hidden else None
    g_weight = torch.zeros(vocab, dim, dtype=acc, device=device) if want_grads and need_weight else None
    g_bias = torch.zeros(vocab, dtype=acc, device=device) if want_grads and need_bias and bias is not None else None
    weight_t = weight.t()
    bias_acc = bias.to(acc) if bias is not None else None
    step = max(1, min(chunk_rows(vocab, DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes),
                       active.numel()))  # no active token: the loop below runs zero times
    # One logits buffer for all chunks (the matmul writes into it): no allocator churn, and never
    # two chunks' logits alive at once.
    logits_buf = torch.empty(step, vocab, dtype=acc, device=device) if dtype == acc else None
    for start in range(0, active.numel(), step):
        rows = active[start:start + step]
        h = hidden.index_select(0, rows)
        target = labels.index_select(0, rows).long()
        if logits_buf is not None:
            z = torch.mm(h, weight_t, out=logits_buf[:rows.numel()])
        else:  # bf16/fp16: the matmul in the inputs' dtype, then upcast, as the eager path does
            z = probs = dz = None
            z = torch.mm(h, weight_t).to(acc)
        if bias_acc is not None:
            z += bias_acc
        if temperature != 1.0:
            z /= temperature
        picked = z.gather(1, target.unsqueeze(1)).squeeze(1)
        if return_entropy:
            log_softmax = torch.log_softmax(z, dim=-1)
            out_ent.index_copy_(0, rows, -(log_softmax.exp() * log_softmax).sum(-1))
            del log_softmax
        # One exp pass over the chunk: exp(z - shift) serves both the log-sum-exp and the softmax.
        shift = z.amax(dim=-1, keepdim=True)
        z -= shift
        probs = z.exp_()
        total = probs.sum(dim=-1, keepdim=True)
        shift, log_total = shift.squeeze(1), total.log().squeeze(1)
        out_lse.index_copy_(1, rows, torch.stack([shift, log_total]))
        out_logp.index_copy_(0, rows, (picked - shift) - log_total)
        if not want_grads:
            continue
        coef = (grad_logp.index_select(0, rows).to(acc) / temperature).unsqueeze(1)
        # dlogp_t/dz = onehot(label) - softmax(z), times the incoming g and 1/temperature;
        # the softmax normalisation is folded into the same in-place multiply.
        dz = probs
        dz *= -coef / total
        dz.scatter_add_(1, target.unsqueeze(1), coef)
        if g_hidden is not None:
            g_hidden.index_copy_(0, rows, torch.mm(dz.to(dtype), weight).to(dtype))
        if g_weight is not None:
            g_weight.addmm_(dz.t(), h.to(acc))
        if g_bias is not None:
            g_bias += dz.sum(0)
    return ChunkedResult(
        logp=out_logp.to(torch.float32) if acc == torch.float32 else out_logp,
        lse=out_lse,
        entropy=out_ent,
        grad_hidden=g_hidden,
        grad_weight=None if g_weight is None else g_weight.to(weight.dtype),
        grad_bias=None if g_bias is None else g_bias.to(bias.dtype),
    )
