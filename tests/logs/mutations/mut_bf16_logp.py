"""Mutation: bf16 linear_logprob's log-probs 0.7 % off (between the new bf16 rtol 4e-3 and the old 1e-2)."""
import torch
import grao_kernels
_lp = grao_kernels.linear_logprob
def lp(hidden, *a, **k):
    out = _lp(hidden, *a, **k)
    if hidden.dtype != torch.bfloat16:
        return out
    return (out[0] * 1.007, *out[1:]) if isinstance(out, tuple) else out * 1.007
grao_kernels.linear_logprob = lp
