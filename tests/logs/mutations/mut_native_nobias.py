"""Mutation: the native pass AND the chunked path both drop the bias (a shared semantics bug)."""
import dataclasses
import torch
import grao_kernels._chunked as ch
from grao_kernels import cpu_native

_real_chunked, _real_native = ch.chunked_linear_logprob, cpu_native.native_pass

def _zero_bias(res, bias):
    if bias is not None and getattr(res, "grad_bias", None) is not None:
        res.grad_bias = torch.zeros_like(res.grad_bias)
    return res

def chunked(h, w, labels, b, **kw):
    res = _real_chunked(h, w, labels, None, **kw)
    if b is not None and kw.get("grad_logp") is not None:
        res = dataclasses.replace(res, grad_bias=torch.zeros_like(b))
    return res

def native(h, w, labels, b, **kw):
    res = _real_native(h, w, labels, None, **kw)
    if b is not None and kw.get("grad_logp") is not None:
        try:
            res.grad_bias = torch.zeros_like(b)
        except AttributeError:
            res = dataclasses.replace(res, grad_bias=torch.zeros_like(b))
    return res

ch.chunked_linear_logprob = chunked
cpu_native.native_pass = native
