"""The fused ops' autograd: gradients computed in the forward and handed over, and what it refuses by name.

* :func:`handover_setup_context` / :func:`handover_backward`: for ops whose loss gradient w.r.t. every log-prob
  is known before the forward (the GRAO loss, ``fused_linear_logprob_dot``), the op's last three outputs are the
  input gradients (the dispatch table's "known_grad" pass); the backward scales them by the incoming gradient in
  place and hands them over once (no second [V, D] buffer at the peak). The idea of computing input gradients
  in the forward is Liger-Kernel's ``fused_linear_cross_entropy``; the code is our own.
* Double backward (``create_graph=True``): the gradients are closed forms evaluated by kernels, so
  :func:`refuse_double_backward` raises :class:`GRAOUnsupportedError` naming the eager equivalent. A second
  backward through one loss is refused with the same class (:class:`PendingGrads` hands over once).
* Gradients computed but never used (a grad-enabled GRAO loss freed without a backward) warn once per process,
  :class:`GRAOUnusedGradientWarning` (the deferred route exists: ``linear_logprob`` + ``reference.grao_loss``).
"""

from __future__ import annotations

import warnings

import torch


class GRAOUnsupportedError(RuntimeError):
    """A use of the fused ops' autograd that they do not support (double backward, a second backward
    through one fused GRAO loss). The message names the eager equivalent that supports it."""


class GRAOUnusedGradientWarning(UserWarning):
    """A fused GRAO loss computed with gradients enabled was freed without a backward: the gradient work
    done in its forward was wasted. Shown once per process."""


_warned_unused = False


def refuse_double_backward(op: str, eager: str, pending: PendingGrads | None = None) -> None:
    """Call at the top of a fused op's backward: raises when it runs with ``create_graph=True`` (grad mode on
    inside a backward means exactly that). ``pending`` keeps its gradients (a plain backward of the same loss
    still works) but no longer warns when freed: the error said enough."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        if pending is not None:
            pending.quiet = True
        raise GRAOUnsupportedError(
            f"{op}: double backward (create_graph=True, e.g. a gradient penalty) is not supported: the fused "
            f"gradients are closed forms computed by kernels, not differentiable torch ops. For a term you "
            f"differentiate twice use the eager {eager} (same semantics; it builds the [tokens x vocab] logits).")


def _warn_unused() -> None:
    global _warned_unused
    if _warned_unused:
        return
    _warned_unused = True
    warnings.warn(
        "fused_linear_grao_loss: a loss computed with gradients enabled was freed without a backward. Its input "
        "gradients are computed in the forward call (that call costs about as much as forward + backward, ~2.5x a "
        "torch.no_grad() call), so that work was wasted. Wrap evaluation / logging calls in torch.no_grad() or "
        "torch.inference_mode(); where a backward may not follow, grao_kernels.reference.grao_loss("
        "grao_kernels.linear_logprob(hidden, weight, labels), labels, rewards) gives the same loss and leaves the "
        "gradient work to the backward. (Shown once per process.)", GRAOUnusedGradientWarning, stacklevel=2)


class PendingGrads:
    """The input gradients a fused GRAO loss computed in its forward, held until its backward takes them.

    :meth:`take` hands them over once (None the second time). Freed with gradients still held, i.e. the
    loss's graph was dropped without a backward: :class:`GRAOUnusedGradientWarning`, once per process.
    Holds no reference to the autograd graph (no cycle: freed as soon as the graph is).
    """

    __slots__ = ("grads", "quiet")

    def __init__(self, grads: list[torch.Tensor]):
        self.grads: list[torch.Tensor] | None = grads
        self.quiet = False

    def take(self) -> list[torch.Tensor] | None:
        grads, self.grads = self.grads, None
        return grads

    def __del__(self):
        try:
            if self.grads and not self.quiet and any(g.numel() for g in self.grads):
                _warn_unused()
        except Exception:  # noqa: BLE001 - interpreter shutdown: module globals may already be gone
            pass


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


def handover_backward(op_name: str, eager: str = "grao.linear_grao_loss"):
    """The backward of such an op (its inputs start with hidden, weight, bias): the forward's gradients scaled
    by the incoming one (in place, handed over once); every later input gets None (as many as the op has,
    ``len(ctx.needs_input_grad) - 3``); ``eager`` names the eager twin that the double-backward error points to.

    Wrapped in torch.compiler.disable: when a compiled step graph-breaks at loss.backward(), the engine
    calls this Python backward with dynamo's frame hook still set (CPU autograd runs on the caller's
    thread); without it dynamo compiled it into a graph of its own (issue 13: the extra graph in
    torch._dynamo.explain). Compiled graphs are unaffected: AOTAutograd traces the backward without dynamo.
    """
    def backward(ctx, grad_loss, *_unused):
        rest = (None,) * (len(ctx.needs_input_grad) - 3)
        if ctx.grads is None:  # traced by torch.compile: functional
            return tuple(None if g.numel() == 0 and g.dim() == 1 else g * grad_loss.to(g.dtype)
                         for g in ctx.saved_tensors) + rest
        refuse_double_backward(op_name, eager, ctx.grads)
        grads = ctx.grads.take()  # ctx lets go: after return the result holds the only reference
        if grads is None:
            raise GRAOUnsupportedError(f"{op_name}: backward through the same loss twice is not supported "
                                       "(its gradients are computed in the forward and handed over once); "
                                       "call the loss again for a second backward")
        return tuple(None if g.numel() == 0 and g.dim() == 1 else g.mul_(grad_loss.to(g.dtype))
                     for g in grads) + rest

    return torch.compiler.disable(backward)
