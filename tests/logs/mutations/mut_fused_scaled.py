"""Mutation: the fused GRAO loss and linear_logprob are off by 0.1 % (value and gradients)."""
import grao_kernels
_loss, _lp = grao_kernels.fused_linear_grao_loss, grao_kernels.linear_logprob
def loss(*a, **k):
    l, s = _loss(*a, **k)
    return l * 1.001, s
def lp(*a, **k):
    out = _lp(*a, **k)
    return (out[0] * 1.001, *out[1:]) if isinstance(out, tuple) else out * 1.001
grao_kernels.fused_linear_grao_loss = loss
grao_kernels.linear_logprob = lp
