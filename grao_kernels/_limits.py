"""What the fused ops' autograd does not do, said by name rather than by a generic PyTorch error.

* Double backward (``create_graph=True``, e.g. a gradient penalty on the gradients): the fused ops'
  gradients come from closed forms evaluated by kernels, not from differentiable torch ops, so there is
  no graph to differentiate again. :func:`refuse_double_backward` raises :class:`GRAOUnsupportedError`
  naming the eager equivalent, which supports it (it builds the [tokens x vocab] logits).
* A second backward through one fused GRAO loss: its gradients were computed in the forward and are
  handed over once (:class:`PendingGrads`), so a second one is refused with the same error class.
* Gradients computed but never used: ``fused_linear_grao_loss`` computes its input gradients during the
  forward (they are known there, the advantages being constants), so a call with grad enabled whose loss
  never reaches a backward has paid for them for nothing. When such gradients are freed unused,
  :class:`GRAOUnusedGradientWarning` says so, once per process (a warning rather than an option to defer
  the work: see the README's "Limits"; the deferred route exists already, ``linear_logprob`` +
  ``reference.grao_loss``).
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
