"""linear_logprob: per-token log-probs of labels straight from hidden states and the lm_head.

Forward keeps only the per-token log-sum-exp; backward recomputes the logit tiles. CUDA
tensors run the Triton kernels (grao_kernels/_triton_linear.py), CPU and float64 tensors the
chunked PyTorch path (grao_kernels/_chunked.py); both have the same semantics and are tested
against ``grao.token_logprobs`` on full logits.
"""

from __future__ import annotations

import torch

from grao._checks import check_linear_inputs, check_scalar
from grao_kernels._backend import resolve_backend
from grao_kernels._chunked import chunked_linear_logprob


def _forward(backend, hidden, weight, labels, bias, temperature, ignore_index, return_entropy):
    """-> (logp [N] fp32, lse [N], entropy [N] | None)."""
    if backend == "triton":
        from grao_kernels._triton_linear import triton_logprob_forward
        return triton_logprob_forward(hidden, weight, labels, bias, temperature=temperature,
                                      ignore_index=ignore_index, return_entropy=return_entropy)
    out = chunked_linear_logprob(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
                                 return_entropy=return_entropy)
    return out.logp, out.lse, out.entropy


def _backward(backend, hidden, weight, labels, bias, lse, grad_logp, temperature, ignore_index, needs):
    """-> (dhidden [N, D] | None, dweight [V, D] | None, dbias [V] | None) for per-token grad_logp [N]."""
    need_hidden, need_weight, need_bias = needs
    if backend == "triton":
        from grao_kernels._triton_linear import triton_logprob_backward
        return triton_logprob_backward(hidden, weight, labels, bias, lse, grad_logp, temperature=temperature,
                                       ignore_index=ignore_index, need_hidden=need_hidden,
                                       need_weight=need_weight, need_bias=need_bias and bias is not None)
    out = chunked_linear_logprob(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
                                 grad_logp=grad_logp, lse=lse, need_hidden=need_hidden, need_weight=need_weight,
                                 need_bias=need_bias)
    return out.grad_hidden, out.grad_weight, out.grad_bias


class LinearLogprobFunction(torch.autograd.Function):
    """Autograd for hidden [N, D], weight [V, D], bias [V] | None, labels [N] -> logp [N] fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, ignore_index: int, return_entropy: bool,
                backend: str):
        logp, lse, entropy = _forward(backend, hidden, weight, labels, bias, temperature, ignore_index,
                                      return_entropy)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.config = (temperature, ignore_index, backend)
        if entropy is None:
            return logp
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, *unused):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        temperature, ignore_index, backend = ctx.config
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        grad_logp = grad_logp.to(lse.dtype).contiguous()
        dh, dw, db = _backward(backend, hidden, weight, labels, bias, lse, grad_logp, temperature, ignore_index,
                               needs)
        return dh, dw, db, None, None, None, None, None


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
        differentiable w.r.t. hidden, weight and bias; and ``entropy`` of the same shape if asked.
    """
    layout = check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    temperature = check_scalar("temperature", temperature, positive=True)
    chosen = resolve_backend(backend, hidden)
    flat_hidden = hidden.reshape(-1, layout.hidden_dim)
    flat_labels = labels.reshape(-1).long().contiguous()
    out = LinearLogprobFunction.apply(flat_hidden, weight, bias, flat_labels, temperature, int(ignore_index),
                                      bool(return_entropy), chosen)
    if return_entropy:
        logp, entropy = out
        return logp.view(labels.shape), entropy.view(labels.shape)
    return out.view(labels.shape)
