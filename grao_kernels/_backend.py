"""Which implementation runs a call: the Triton kernels, the native CPU kernel or the chunked PyTorch path."""

from __future__ import annotations

import os

import torch

from grao_kernels._checks import GRAOInputError

BACKENDS = ("auto", "triton", "torch", "native")


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
    """"auto": Triton for CUDA tensors of fp32/bf16/fp16; for CPU fp32/bf16 tensors the native C++ kernel
    (grao_kernels.cpu_native: built on first use, GRAO_KERNELS_CPU=chunked|native forces either path); the
    chunked PyTorch path otherwise (float64, fp16, or when the native kernel cannot be built). "torch" is
    the chunked path, "native" the C++ kernel. "triton" on CPU tensors needs TRITON_INTERPRET=1."""
    if backend not in BACKENDS:
        raise GRAOInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "native" or (backend == "auto" and tensor.device.type == "cpu"):
        from grao_kernels import cpu_native

        if backend == "native":
            cpu_native.require_native(tensor)
            return "native"
        return "native" if cpu_native.use_native(tensor) else "torch"
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
