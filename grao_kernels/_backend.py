"""Which implementation runs a call: the Triton kernels or the chunked PyTorch path."""

from __future__ import annotations

import os

import torch

from grao_kernels._checks import GRAOInputError

BACKENDS = ("auto", "triton", "torch")


#: The CUDA design the Triton backend runs, read per call: "tiles" (the tile kernels of _triton_linear.py,
#: the default) or "gemm" (token chunks through cuBLAS GEMMs and one Triton row kernel, _triton_gemm.py).
#: Both are kept until a GPU run has measured them side by side (benchmarks/gpu_check.py).
CUDA_DESIGN_ENV = "GRAO_KERNELS_CUDA_DESIGN"
CUDA_DESIGNS = ("tiles", "gemm")


def cuda_design() -> str:
    design = os.environ.get(CUDA_DESIGN_ENV, "tiles")
    if design not in CUDA_DESIGNS:
        raise GRAOInputError(f"{CUDA_DESIGN_ENV} must be one of {CUDA_DESIGNS}, got {design!r}")
    return design


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
