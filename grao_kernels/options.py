"""The kernels' names and knobs: ``Backend``, ``KernelOptions`` and the process defaults read from the environment.

``Backend`` names the implementations a call can ask for; ``KernelOptions`` (a small frozen dataclass, passed as
``options=`` to every public op) holds the kernels' tuning values. The environment is read here only, once at
import: ``GRAO_KERNELS_CPU`` (what ``backend="auto"`` runs for CPU fp32 / bf16 tensors) and ``GRAO_KERNELS_CUDA``
(what it runs on CUDA); a bad value, or the old ``GRAO_KERNELS_CUDA_DESIGN``, is reported when a backend is
first resolved. (The enum-plus-small-options-dataclass shape follows Apple's ml-cross-entropy
``linear_cross_entropy``; the code is our own.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal, get_args

from grao_kernels.checks import GRAOInputError

#: "auto": chosen per tensor (see grao_kernels.dispatch.resolve). "triton-gemm": CUDA, cuBLAS GEMM chunks + one
#: Triton row kernel. "triton-tiles": CUDA, the Triton tile kernels. "native": the C++ CPU kernel of csrc/.
#: "chunked": the chunked PyTorch path (any device and dtype).
Backend = Literal["auto", "triton-gemm", "triton-tiles", "native", "chunked"]
BACKENDS: tuple[str, ...] = get_args(Backend)
#: Names of earlier releases, refused with the name that replaced them.
RENAMED_BACKENDS = {"triton": "'triton-gemm' or 'triton-tiles'", "torch": "'chunked'"}

CPU_ENV = "GRAO_KERNELS_CPU"
CPU_CHOICES = ("auto", "native", "chunked")
CUDA_ENV = "GRAO_KERNELS_CUDA"
CUDA_CHOICES = ("triton-gemm", "triton-tiles", "chunked")
OLD_CUDA_ENV = "GRAO_KERNELS_CUDA_DESIGN"

MiB = 2 ** 20
DOT_PRECISIONS = ("ieee", "tf32")


@dataclass(frozen=True)
class KernelOptions:
    """Tuning values of the kernels; each backend reads the ones that concern it (docs/kernels.md).

    chunk_bytes: the chunked PyTorch path's fp32 logits budget per token chunk.
    native_tile_bytes: the native CPU kernel's fp32 [tile x V] workspace (the default keeps tiles >= 128 rows;
        another value is taken as given, down to 1-row tiles).
    gemm_chunk_bytes: the triton-gemm design's [chunk x V] logits buffer, in the inputs' dtype.
    fp32_dot_precision: "ieee" (exact fp32) or "tf32" for fp32 dots of the triton-tiles kernels.
    """

    chunk_bytes: int = 48 * MiB
    native_tile_bytes: int = 32 * MiB
    gemm_chunk_bytes: int = 256 * MiB
    fp32_dot_precision: str = "ieee"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "fp32_dot_precision":
                if value not in DOT_PRECISIONS:
                    raise GRAOInputError(f"KernelOptions.fp32_dot_precision must be one of {DOT_PRECISIONS}, "
                                         f"got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GRAOInputError(f"KernelOptions.{f.name} must be a positive int (bytes), got {value!r}")


DEFAULT_OPTIONS = KernelOptions()


def check_backend(backend) -> str:
    """``backend`` if it is one of BACKENDS; else a GRAOInputError naming the valid (or the renamed) names."""
    if backend in RENAMED_BACKENDS:
        raise GRAOInputError(f"backend={backend!r} was renamed: use {RENAMED_BACKENDS[backend]} "
                             f"(backend must be one of {BACKENDS})")
    if backend not in BACKENDS:
        raise GRAOInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_options(options) -> KernelOptions:
    if options is None:
        return DEFAULT_OPTIONS
    if not isinstance(options, KernelOptions):
        raise GRAOInputError(f"options must be a grao_kernels.KernelOptions or None, got {type(options).__name__}")
    return options


@dataclass(frozen=True)
class ProcessDefaults:
    """What backend="auto" runs: ``cpu`` for CPU fp32 / bf16 tensors (auto | native | chunked), ``cuda`` on CUDA."""

    cpu: str = "auto"
    cuda: str = "triton-gemm"


def read_env(environ: Mapping[str, str]) -> ProcessDefaults:
    """The process defaults that ``environ`` sets (GRAOInputError for a bad value or the renamed variable)."""
    if OLD_CUDA_ENV in environ:
        raise GRAOInputError(f"{OLD_CUDA_ENV} was renamed: set {CUDA_ENV}=triton-gemm|triton-tiles|chunked "
                             f"(tiles -> triton-tiles, gemm -> triton-gemm) or pass backend= to the call")
    cpu = environ.get(CPU_ENV, "auto")
    if cpu not in CPU_CHOICES:
        raise GRAOInputError(f"{CPU_ENV} must be one of {CPU_CHOICES}, got {cpu!r}")
    cuda = environ.get(CUDA_ENV, "triton-gemm")
    if cuda not in CUDA_CHOICES:
        raise GRAOInputError(f"{CUDA_ENV} must be one of {CUDA_CHOICES}, got {cuda!r}")
    return ProcessDefaults(cpu=cpu, cuda=cuda)


def _read_process_env() -> ProcessDefaults | GRAOInputError:
    try:
        return read_env(os.environ)
    except GRAOInputError as exc:  # raised at the first resolve, not at import (an import error would be hidden)
        return exc


_PROCESS = _read_process_env()


def process_defaults() -> ProcessDefaults:
    """The defaults read from this process's environment at import."""
    if isinstance(_PROCESS, GRAOInputError):
        raise GRAOInputError(str(_PROCESS))
    return _PROCESS


def triton_interpreting() -> bool:
    """Triton's own switch (its CPU interpreter), not an option of ours: small test tiles when it is on."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
