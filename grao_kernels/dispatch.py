"""Which implementation runs a call: :func:`resolve` (the only place a backend is chosen) and the table of passes.

Every public op resolves ``backend`` (and ``options``) once, in Python, into a :class:`Plan` of primitives that
travels through the torch.library custom op; the op body then looks its pass up in :data:`TABLE`, keyed by
(pass, backend). The three passes:

* "forward": (logp [N], lse [2, N], entropy [N] | None) of per-token log-probs;
* "backward": (dhidden, dweight, dbias) of ``sum(grad_logp * logp)``, given the forward's saved lse;
* "known_grad": the log-probs and those gradients in one pass, for losses whose dLoss/dlogp is known before the
  forward (the GRAO loss, ``fused_linear_logprob_dot``).

The concrete backends are "triton-gemm", "triton-tiles", "native" and "chunked" (grao_kernels.options.Backend);
"auto" is resolved here and never reaches the table. (ml-cross-entropy's ``linear_cross_entropy`` picks its
``impl`` in one if/elif; this is the same idea as a table, so tests can check and spy on every entry.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from grao_kernels.checks import GRAOInputError
from grao_kernels.options import (
    CPU_ENV,
    DEFAULT_OPTIONS,
    KernelOptions,
    ProcessDefaults,
    check_backend,
    check_options,
    process_defaults,
    triton_interpreting,
)

PASSES = ("forward", "backward", "known_grad")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Plan(NamedTuple):
    """A resolved call: the concrete backend and the one byte budget and dot precision its passes read."""

    backend: str
    chunk_bytes: int
    dot_precision: str


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _budget(backend: str, options: KernelOptions) -> int:
    return {"chunked": options.chunk_bytes, "native": options.native_tile_bytes,
            "triton-gemm": options.gemm_chunk_bytes}.get(backend, 0)


def resolve(backend, tensor: torch.Tensor, options: KernelOptions | None = None, *,
            defaults: ProcessDefaults | None = None) -> Plan:
    """The concrete backend for a call on ``tensor`` (hidden's device and dtype), with its options.

    "auto": on CUDA the process default (GRAO_KERNELS_CUDA, "triton-gemm" unless set) for fp32 / bf16 / fp16
    tensors with triton installed; on CPU, fp32 / bf16 tensors run the native kernel (GRAO_KERNELS_CPU: "auto"
    falls back to "chunked" with one warning when it cannot be built, "native" raises NativeBuildError,
    "chunked" never builds it); everything else runs "chunked". An explicit backend is checked, not changed:
    "native" needs a CPU tensor and a built kernel; "triton-*" need triton, fp32 / bf16 / fp16 and CUDA (or
    TRITON_INTERPRET=1 for CPU tensors). ``defaults`` replaces the environment's (tests)."""
    name = check_backend(backend)
    options = check_options(options)
    if name == "auto":
        name = _auto(tensor, process_defaults() if defaults is None else defaults)
    elif name == "native":
        from grao_kernels.cpu import native
        native.require_native(tensor)
    elif name.startswith("triton-"):
        if tensor.dtype not in TRITON_DTYPES or not triton_available():
            raise GRAOInputError(f"backend={name!r} needs triton installed and fp32/bf16/fp16 inputs, "
                                 f"got dtype {tensor.dtype}")
        if not tensor.is_cuda and not triton_interpreting():
            raise GRAOInputError(f"backend={name!r} on CPU tensors needs TRITON_INTERPRET=1 set before "
                                 "grao_kernels is imported (the Triton interpreter); use backend='auto'")
    return Plan(name, _budget(name, options), options.fp32_dot_precision)


def _auto(tensor: torch.Tensor, defaults: ProcessDefaults) -> str:
    if tensor.is_cuda:
        usable = defaults.cuda != "chunked" and tensor.dtype in TRITON_DTYPES and triton_available()
        return defaults.cuda if usable else "chunked"
    from grao_kernels.cpu import native

    if tensor.device.type != "cpu" or tensor.dtype not in native.DTYPES or defaults.cpu == "chunked":
        return "chunked"
    if native.native_built():  # a traced constant under torch.compile
        return "native"
    if defaults.cpu == "native":
        raise native.NativeBuildError(f"{CPU_ENV}=native but the native CPU kernel could not be built: "
                                      f"{native.build_error()}")
    return "chunked"


# ---------------------------------------------------------------------------------------------------------------
# The passes. Every entry of a pass takes the same arguments: (hidden [N, D], weight [V, D], labels [N], bias,
# [lse,] [grad_logp,] *, temperature, ignore_index, return_entropy | needs, chunk_bytes, dot_precision).
# ---------------------------------------------------------------------------------------------------------------


def _cpu_run(backend, hidden, weight, labels, bias, *, chunk_bytes, **kw):
    """native: csrc/'s kernel for the dtypes it serves (CPU fp32 / bf16), else the chunked path at its default
    budget (float64, or fp16 reaching the op under autocast); chunked: the chunked PyTorch path."""
    if backend == "native":
        from grao_kernels.cpu import native
        if native.serves(hidden):
            return native.native_pass(hidden, weight, labels, bias, tile_bytes=chunk_bytes, **kw)
        chunk_bytes = DEFAULT_OPTIONS.chunk_bytes
    from grao_kernels.cpu.chunked import chunked_linear_logprob
    return chunked_linear_logprob(hidden, weight, labels, bias, chunk_bytes=chunk_bytes, **kw)


def _cpu_passes(backend: str):
    def forward(hidden, weight, labels, bias, *, temperature, ignore_index, return_entropy, chunk_bytes,
                dot_precision):
        out = _cpu_run(backend, hidden, weight, labels, bias, chunk_bytes=chunk_bytes, temperature=temperature,
                       ignore_index=ignore_index, return_entropy=return_entropy)
        return out.logp, out.lse, out.entropy

    def backward(hidden, weight, labels, bias, lse, grad_logp, *, temperature, ignore_index, needs, chunk_bytes,
                 dot_precision):  # recomputes its own normaliser from each chunk's logits (cpu/chunked.py)
        out = _cpu_run(backend, hidden, weight, labels, bias, chunk_bytes=chunk_bytes, temperature=temperature,
                       ignore_index=ignore_index, grad_logp=grad_logp, backward_only=True, need_hidden=needs[0],
                       need_weight=needs[1], need_bias=needs[2])
        return out.grad_hidden, out.grad_weight, out.grad_bias

    def known_grad(hidden, weight, labels, bias, grad_logp, *, temperature, ignore_index, needs, chunk_bytes,
                   dot_precision):
        grad = grad_logp if grad_logp is not None and any(needs) else None
        out = _cpu_run(backend, hidden, weight, labels, bias, chunk_bytes=chunk_bytes, temperature=temperature,
                       ignore_index=ignore_index, grad_logp=grad, need_hidden=needs[0], need_weight=needs[1],
                       need_bias=needs[2])
        return out.logp, (out.grad_hidden, out.grad_weight, out.grad_bias)

    return forward, backward, known_grad


def _tiles_forward(hidden, weight, labels, bias, *, temperature, ignore_index, return_entropy, chunk_bytes,
                   dot_precision):
    from grao_kernels.triton.tiles import triton_logprob_forward
    return triton_logprob_forward(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
                                  return_entropy=return_entropy, fp32_precision=dot_precision)


def _tiles_backward(hidden, weight, labels, bias, lse, grad_logp, *, temperature, ignore_index, needs, chunk_bytes,
                    dot_precision):
    from grao_kernels.triton.tiles import triton_logprob_backward
    return triton_logprob_backward(hidden, weight, labels, bias, lse, grad_logp.float().contiguous(),
                                   temperature=temperature, ignore_index=ignore_index, need_hidden=needs[0],
                                   need_weight=needs[1], need_bias=needs[2], fp32_precision=dot_precision)


def _tiles_known_grad(hidden, weight, labels, bias, grad_logp, *, temperature, ignore_index, needs, chunk_bytes,
                      dot_precision):
    """The tile design has no fused pass: its forward kernel, then its backward kernel fed grad_logp (8·N·D·V)."""
    kw = dict(temperature=temperature, ignore_index=ignore_index, chunk_bytes=chunk_bytes, dot_precision=dot_precision)
    logp, lse, _ = _tiles_forward(hidden, weight, labels, bias, return_entropy=False, **kw)
    grads = (None, None, None)
    if grad_logp is not None and any(needs):
        grads = _tiles_backward(hidden, weight, labels, bias, lse, grad_logp, needs=needs, **kw)
    return logp, tuple(grads)


def _gemm_forward(hidden, weight, labels, bias, *, temperature, ignore_index, return_entropy, chunk_bytes,
                  dot_precision):
    if return_entropy:
        # The one place this is decided: the GEMM design's row kernel computes no entropy, so linear_logprob(...,
        # return_entropy=True) on "triton-gemm" runs the tile kernels' forward; its backward is still the GEMM
        # design's, which recomputes its own normaliser (the lse saved by either forward is not read).
        return _tiles_forward(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
                              return_entropy=True, chunk_bytes=chunk_bytes, dot_precision=dot_precision)
    from grao_kernels.triton.gemm import gemm_logprob_pass
    logp, lse, *_ = gemm_logprob_pass(hidden, weight, labels, bias, temperature=temperature,
                                      ignore_index=ignore_index, chunk_bytes=chunk_bytes)
    return logp, lse, None


def _gemm_backward(hidden, weight, labels, bias, lse, grad_logp, *, temperature, ignore_index, needs, chunk_bytes,
                   dot_precision):
    from grao_kernels.triton.gemm import gemm_logprob_pass
    return tuple(gemm_logprob_pass(hidden, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
                                   grad_logp=grad_logp, need_hidden=needs[0], need_weight=needs[1],
                                   need_bias=needs[2], chunk_bytes=chunk_bytes)[2:])


def _gemm_known_grad(hidden, weight, labels, bias, grad_logp, *, temperature, ignore_index, needs, chunk_bytes,
                     dot_precision):
    from grao_kernels.triton.gemm import gemm_logprob_pass
    grad = grad_logp if grad_logp is not None and any(needs) else None
    logp, _, *grads = gemm_logprob_pass(hidden, weight, labels, bias, temperature=temperature,
                                        ignore_index=ignore_index, grad_logp=grad, need_hidden=needs[0],
                                        need_weight=needs[1], need_bias=needs[2], chunk_bytes=chunk_bytes)
    return logp, tuple(grads)


_native = _cpu_passes("native")
_chunked = _cpu_passes("chunked")

#: (pass, backend) -> the function that runs it. Looked up per call (see :func:`lookup`), so a test may replace
#: an entry with a spy.
TABLE: dict[tuple[str, str], Callable] = {
    ("forward", "triton-gemm"): _gemm_forward,
    ("backward", "triton-gemm"): _gemm_backward,
    ("known_grad", "triton-gemm"): _gemm_known_grad,
    ("forward", "triton-tiles"): _tiles_forward,
    ("backward", "triton-tiles"): _tiles_backward,
    ("known_grad", "triton-tiles"): _tiles_known_grad,
    ("forward", "native"): _native[0],
    ("backward", "native"): _native[1],
    ("known_grad", "native"): _native[2],
    ("forward", "chunked"): _chunked[0],
    ("backward", "chunked"): _chunked[1],
    ("known_grad", "chunked"): _chunked[2],
}


def lookup(pass_name: str, backend: str) -> Callable:
    """The function of ``pass_name`` for the concrete ``backend`` (as resolved by :func:`resolve`)."""
    try:
        return TABLE[(pass_name, backend)]
    except KeyError:
        raise GRAOInputError(f"no {pass_name!r} pass for backend {backend!r}: passes are {PASSES}, backends "
                             f"{sorted({b for _, b in TABLE})} (resolve 'auto' first)") from None
