"""grao_kernels: fused kernels for GRAO training that never build [tokens x vocab] logits.

Public API:
    linear_logprob(hidden, weight, labels, *, bias, temperature, ignore_index, return_entropy)
    group_advantages(rewards, *, eps, reference_in_stats)
    fused_linear_grao_loss(hidden, weight, labels, rewards, *, beta, lam, eps, bias, temperature,
                           ignore_index, reference_in_stats)

CUDA tensors run Triton kernels; CPU (and float64) tensors run a chunked PyTorch path with the
same semantics. Every path is tested against the eager reference in ``grao.reference``.
"""

from grao._checks import GRAOInputError
from grao_kernels.grao_loss import fused_linear_grao_loss, group_advantages
from grao_kernels.linear_logprob import linear_logprob

__all__ = ["linear_logprob", "group_advantages", "fused_linear_grao_loss", "GRAOInputError"]
