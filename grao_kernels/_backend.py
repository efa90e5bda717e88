"""Which implementation runs a call: the Triton kernels or the chunked PyTorch path."""

from __future__ import annotations

import os

import torch

from grao_kernels._checks import GRAOInputError

BACKENDS = ("auto", "triton", "torch")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """"auto": Triton for CUDA tensors of fp32/bf16/fp16, the chunked PyTorch path otherwise
    (CPU, float64). "triton" on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)."""
    if backend not in BACKENDS:
        raise GRAOInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    usable = tensor.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_available()
    if backend == "auto":
        return "triton" if usable and tensor.is_cuda else "torch"
    if not usable:
        raise GRAOInputError(f"backend='triton' needs triton installed and fp32/bf16/fp16 inputs, "
                             f"got dtype {tensor.dtype}")
    if not tensor.is_cuda and not triton_interpreting():
        raise GRAOInputError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "grao_kernels is imported (the Triton interpreter); use backend='auto'")
    return "triton"
