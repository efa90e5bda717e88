"""grao_kernels: fused kernels for GRAO training that never build [tokens x vocab] logits.

Public API (every op takes ``backend: Backend = "auto"`` and ``options: KernelOptions | None = None``):
    linear_logprob(hidden, weight, labels, *, bias, temperature, ignore_index, return_entropy)
    fused_linear_grao_loss(hidden, weight, labels, rewards, *, beta, lam, eps, bias, temperature, ignore_index,
                           reference_in_stats, cu_seqlens, row_index)
        (padded [B, T] labels, or token-packed [N] labels with cu_seqlens or row_index)
    fused_linear_logprob_dot(hidden, weight, labels, coef, *, bias, temperature, ignore_index)
        (sum(coef * logp) for per-token coefficients known before the call, gradients in the same pass)
    group_advantages(rewards, *, eps, reference_in_stats)

Backends (``Backend``): "auto", "triton-gemm" (CUDA's default), "triton-tiles", "native" (csrc/'s C++ kernel,
CPU fp32 / bf16's default, built on first use) and "chunked" (PyTorch, any device and dtype); the choice is
made in ``grao_kernels.dispatch.resolve``, and GRAO_KERNELS_CPU / GRAO_KERNELS_CUDA set what "auto" runs
(``grao_kernels.options``; docs/kernels.md). Every backend is tested against the eager reference,
``grao_kernels.reference`` (docs/spec.md in code; ``grao`` re-exports it), whose ``linear_grao_loss`` has the
same signature, return value and errors as ``fused_linear_grao_loss``. ``COMPONENTS`` names the loss parts in
the returned stats; bad input raises ``GRAOInputError``, unsupported autograd use (double backward)
``GRAOUnsupportedError``, a required native kernel that cannot be built ``NativeBuildError``; a fused GRAO loss
whose gradients, computed in its forward, were never used warns once (``GRAOUnusedGradientWarning``). Under
``torch.autocast`` the ops cast their float inputs as ``nn.Linear`` does (grao_kernels.autocast).

This package depends on torch, triton and the standard library only.
"""

from grao_kernels import reference
from grao_kernels.autograd import GRAOUnsupportedError, GRAOUnusedGradientWarning
from grao_kernels.checks import GRAOInputError
from grao_kernels.cpu.native import NativeBuildError
from grao_kernels.ops.grao_loss import fused_linear_grao_loss, group_advantages
from grao_kernels.ops.linear_logprob import linear_logprob
from grao_kernels.ops.logprob_dot import fused_linear_logprob_dot
from grao_kernels.options import Backend, KernelOptions
from grao_kernels.reference import COMPONENTS

__all__ = ["linear_logprob", "group_advantages", "fused_linear_grao_loss", "fused_linear_logprob_dot", "GRAOInputError",
           "GRAOUnsupportedError", "GRAOUnusedGradientWarning", "NativeBuildError", "KernelOptions", "Backend",
           "COMPONENTS", "reference"]
