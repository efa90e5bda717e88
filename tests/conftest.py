"""Test configuration.

Without CUDA, the Triton kernels are exercised through the Triton interpreter: it must be
switched on before any @triton.jit function is defined, i.e. before grao_kernels' Triton
modules are imported, so it is set here, first.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton kernels (interpreter on CPU, compiled on CUDA)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: longer tests, excluded from the quick GPU check")
