"""Mutation: the native module reports brgemm whenever oneDNN is enabled, on a CPU without AMX."""
import torch
from grao_kernels import cpu_native
_real = cpu_native.load_native
class Proxy:
    def __init__(self, m): self._m = m
    def __getattr__(self, k): return getattr(self._m, k)
    def has_brgemm(self): return bool(torch.backends.mkldnn.enabled)
def load():
    m = _real()
    return None if m is None else Proxy(m)
cpu_native.load_native = load
