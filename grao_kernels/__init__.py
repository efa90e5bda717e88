"""grao_kernels: fused kernels for GRAO training that never build [tokens x vocab] logits.

Public API:
    linear_logprob(hidden, weight, labels, *, bias, temperature, ignore_index, return_entropy)
    group_advantages(rewards, *, eps, reference_in_stats)
    fused_linear_grao_loss(hidden, weight, labels, rewards, *, beta, lam, eps, bias, temperature,
                           ignore_index, reference_in_stats)
    fused_linear_logprob_dot(hidden, weight, labels, coef, *, bias, temperature, ignore_index)
        (sum(coef * logp) for per-token coefficients known before the call, gradients in the same pass)

CUDA tensors run Triton kernels; CPU fp32 / bf16 tensors the native C++ kernel of csrc/ (built on
first use, grao_kernels.cpu_native; GRAO_KERNELS_CPU=chunked|native forces a path), other CPU (and float64)
tensors a chunked PyTorch path with the same semantics. Every path is tested against the eager reference, ``grao_kernels.reference``
(the spec, docs/spec.md, in code; ``grao`` re-exports it), whose ``linear_grao_loss`` has the
same signature, return value and errors as ``fused_linear_grao_loss``. ``COMPONENTS`` names the
loss parts in the returned stats; bad input raises ``GRAOInputError`` (also ``grao.GRAOInputError``),
unsupported autograd use (double backward) ``GRAOUnsupportedError``; a fused GRAO loss whose gradients,
computed in its forward, were never used warns once (``GRAOUnusedGradientWarning``). Under
``torch.autocast`` the ops cast their float inputs as ``nn.Linear`` does (grao_kernels._autocast).

This package depends on torch, triton and the standard library only.
"""

from grao_kernels import reference
from grao_kernels._checks import GRAOInputError
from grao_kernels._limits import GRAOUnsupportedError, GRAOUnusedGradientWarning
from grao_kernels.grao_loss import fused_linear_grao_loss, group_advantages
from grao_kernels.linear_logprob import linear_logprob
from grao_kernels.logprob_dot import fused_linear_logprob_dot
from grao_kernels.reference import COMPONENTS

__all__ = ["linear_logprob", "group_advantages", "fused_linear_grao_loss", "fused_linear_logprob_dot", "GRAOInputError", "GRAOUnsupportedError",
           "GRAOUnusedGradientWarning", "COMPONENTS", "reference"]
