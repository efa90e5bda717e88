"""The eager reference lives in grao_kernels.reference; re-exported here.

``grao_kernels.reference`` is docs/spec.md in code and the judge of every fast path; it sits in
the kernel package so that the math is written once and dependencies point one way
(``grao`` -> ``grao_kernels`` -> torch/triton). This module keeps ``grao.reference`` imports working.
"""

from grao_kernels.reference import (
    COMPONENTS,
    GRAOInputError,
    _grao_loss,
    _group_advantages,
    compute_dtype,
    grao_loss,
    grao_objective,
    grao_row_grad,
    group_advantages,
    linear_grao_loss,
    linear_logits,
    linear_logprob_dot,
    packed_sequence_logprob,
    sequence_logprob,
    token_logprobs,
)

__all__ = [
    "COMPONENTS", "GRAOInputError", "_grao_loss", "_group_advantages", "compute_dtype", "grao_loss",
    "grao_objective", "grao_row_grad", "group_advantages", "linear_grao_loss", "linear_logits",
    "linear_logprob_dot", "packed_sequence_logprob", "sequence_logprob", "token_logprobs",
]
