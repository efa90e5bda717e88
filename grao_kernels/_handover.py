"""Ops whose loss gradient w.r.t. every log-prob is known before the forward: one pass, gradients handed over.

Three public ops are linear in the per-token log-probs with coefficients fixed before the call: the GRAO loss
(padded and token-packed; its advantages are constants) and ``fused_linear_logprob_dot`` (any such loss:
GRAO on part of a group, SFT's token mean, a policy gradient at ratio 1). For them:

* :func:`known_grad_pass` computes the log-probs and the input gradients of ``sum(grad_logp * logp)`` in the
  same call, per backend (6·N·D·V FLOPs where the backend fuses them: native CPU, chunked PyTorch, the CUDA
  "gemm" design; the CUDA "tiles" design runs its log-prob kernel, then its backward kernel fed that gradient);
* :func:`handover_setup_context` / :func:`handover_backward` are the autograd side: the op's last three
  outputs are those gradients, and its backward scales them by the incoming gradient in place and hands them
  over once (no second [V, D] buffer at the peak).

The idea of computing the input gradients in the forward when the loss gradient is known there is
Liger-Kernel's ``fused_linear_cross_entropy``; the code is our own.
"""

from __future__ import annotations

import torch

from grao_kernels._chunked import chunked_linear_logprob
from grao_kernels._limits import (
    GRAOUnsupportedError,
    PendingGrads,
    refuse_double_backward,
)
from grao_kernels.cpu_native import cpu_pass


def known_grad_pass(design: str, hidden, weight, labels, bias, grad_logp, *, temperature: float, ignore_index: int,
                    needs: tuple[bool, bool, bool]):
    """-> (logp [N] fp32/fp64, (dhidden | None, dweight | None, dbias | None)) of ``sum(grad_logp * logp)``.

    ``design``: "native" (csrc/ kernel; chunked for dtypes it does not serve), "torch" (chunked PyTorch),
    "triton-gemm" (cuBLAS GEMMs + one Triton row kernel) or "triton" (tile kernels). hidden [N, D],
    labels [N]; ``grad_logp`` [N] (0 at ignored tokens) or None when no gradient is needed."""
    want = grad_logp is not None and any(needs)
    grad = grad_logp if want else None
    if design == "triton-gemm":
        from grao_kernels._triton_gemm import gemm_logprob_pass
        logp, _, *grads = gemm_logprob_pass(hidden, weight, labels, bias, temperature=temperature,
                                            ignore_index=ignore_index, grad_logp=grad, need_hidden=needs[0],
                                            need_weight=needs[1], need_bias=needs[2])
        return logp, tuple(grads)
    if design == "triton":
        from grao_kernels._triton_linear import (
            triton_logprob_backward,
            triton_logprob_forward,
        )
        logp, lse, _ = triton_logprob_forward(hidden, weight, labels, bias, temperature=temperature,
                                              ignore_index=ignore_index, return_entropy=False)
        grads = (None, None, None)
        if want:
            grads = triton_logprob_backward(hidden, weight, labels, bias, lse, grad.float().contiguous(),
                                            temperature=temperature, ignore_index=ignore_index,
                                            need_hidden=needs[0], need_weight=needs[1], need_bias=needs[2])
        return logp, tuple(grads)
    run = cpu_pass if design == "native" else chunked_linear_logprob
    out = run(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index, grad_logp=grad,
              need_hidden=needs[0], need_weight=needs[1], need_bias=needs[2])
    return out.logp, (out.grad_hidden, out.grad_weight, out.grad_bias)


def handover_setup_context(ctx, inputs, output):
    """setup_context of an op whose first output is the loss and whose last three are its input gradients."""
    ctx.mark_non_differentiable(*output[1:])
    # Only the loss receives a gradient; without this autograd would materialise zero "gradients"
    # for the other outputs, dweight's shape among them (a transient [V, D] buffer at the peak).
    ctx.set_materialize_grads(False)
    if torch.compiler.is_compiling():
        ctx.save_for_backward(*output[-3:])
        ctx.grads = None
    else:
        # Eager: hold the gradients on ctx (not save_for_backward) so backward can scale them in
        # place and hand over the only reference; autograd then adopts them as .grad without a
        # copy. Either a product or that copy would hold a second [V, D] fp32 dweight at the peak.
        # Freed without a backward, PendingGrads warns once that the gradient work was wasted.
        ctx.grads = PendingGrads(list(output[-3:]))


def handover_backward(op_name: str, non_tensor_args: int, eager: str = "grao.linear_grao_loss"):
    """The backward of such an op: the forward's gradients scaled by the incoming one (in place, handed
    over once); ``non_tensor_args`` inputs after hidden, weight, bias get no gradient; ``eager`` names the
    eager twin that the double-backward error points to.

    Wrapped in torch.compiler.disable: when a compiled step graph-breaks at loss.backward(), the engine
    calls this Python backward with dynamo's frame hook still set (CPU autograd runs on the caller's
    thread); without it dynamo compiled it into a graph of its own (issue 13: the extra graph in
    torch._dynamo.explain). Compiled graphs are unaffected: AOTAutograd traces the backward without dynamo.
    """
    def backward(ctx, grad_loss, *_unused):
        if ctx.grads is None:  # traced by torch.compile: functional
            return tuple(None if g.numel() == 0 and g.dim() == 1 else g * grad_loss.to(g.dtype)
                         for g in ctx.saved_tensors) + (None,) * non_tensor_args
        refuse_double_backward(op_name, eager, ctx.grads)
        grads = ctx.grads.take()  # ctx lets go: after return the result holds the only reference
        if grads is None:
            raise GRAOUnsupportedError(f"{op_name}: backward through the same loss twice is not supported "
                                       "(its gradients are computed in the forward and handed over once); "
                                       "call the loss again for a second backward")
        return tuple(None if g.numel() == 0 and g.dim() == 1 else g.mul_(grad_loss.to(g.dtype))
                     for g in grads) + (None,) * non_tensor_args

    return torch.compiler.disable(backward)
