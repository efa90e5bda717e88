"""The triton-gemm backend (CUDA's default): token chunks through cuBLAS GEMMs, one Triton row kernel between them.

Per chunk of C active tokens (C from ``KernelOptions.gemm_chunk_bytes``): ``z = h @ W^T`` in the inputs' dtype
(one GEMM); :func:`_rows_kernel`, one program per token, forms the row's online max / sum-exp of ``(z + b) / T``
in fp32, the label's log-prob and, given dLoss/dlogp ``g``, overwrites z with ``dz = g / T * (onehot - softmax)``;
then ``dh = dz @ W`` and ``dW += dz^T @ h`` (fp32 accumulation where torch offers ``out_dtype``). With ``g`` known
before the forward (the GRAO loss) that is the whole forward and backward, 6·N·D·V FLOPs. The technique follows
Liger-Kernel's fused linear cross-entropy and the QuACK / Liger Hopper chunked cross-entropy (logits written once,
turned into dZ in place); the code is our own. History and measurements: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grao_kernels.options import DEFAULT_OPTIONS, triton_interpreting

#: The default [C, V] logits budget (KernelOptions.gemm_chunk_bytes), in the inputs' dtype.
CHUNK_BYTES = DEFAULT_OPTIONS.gemm_chunk_bytes


@triton.jit
def _scaled_block(z_row, b_ptr, cols, ok, stride_b, inv_temp, HAS_BIAS: tl.constexpr):
    """(z + b) / T in fp32 for one block of a row's columns (0 where not ok)."""
    z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=ok, other=0.0).to(tl.float32)
    return z * inv_temp


@triton.jit
def _rows_kernel(z_ptr, b_ptr, labels_ptr, g_ptr, logp_ptr, lse_ptr,
                 C, V, stride_zc, stride_b, inv_temp,
                 HAS_BIAS: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zc
    label = tl.load(labels_ptr + row).to(tl.int32)
    offs = tl.arange(0, BLOCK_V)
    # pass 1: online max and sum of exp over the scaled row, and the label's logit
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    tgt = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        z = tl.where(ok, _scaled_block(z_row, b_ptr, cols, ok, stride_b, inv_temp, HAS_BIAS), float("-inf"))
        # each lane keeps its own running max and sum; a lane that has seen no column yet stays at
        # (-inf, 0), and its shift is taken as 0 so that no inf - inf is ever formed
        m_new = tl.maximum(m, z)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
        tgt += tl.where(cols == label, z, 0.0)
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - row_max), axis=0)  # lanes at -inf add 0
    log_total = tl.log(total)
    # (z - m) - log s: a confident token's small log-prob is not swamped by rounding m + log s
    tl.store(logp_ptr + row, (tl.sum(tgt, axis=0) - row_max) - log_total)
    tl.store(lse_ptr + row, row_max)
    tl.store(lse_ptr + C + row, log_total)
    if NEED_GRAD:
        # pass 2: dz = g / T * (onehot - softmax), over the logits in place
        coef = tl.load(g_ptr + row).to(tl.float32) * inv_temp
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            ok = cols < V
            p = tl.exp((_scaled_block(z_row, b_ptr, cols, ok, stride_b, inv_temp, HAS_BIAS) - row_max) - log_total)
            dz = coef * (tl.where(cols == label, 1.0, 0.0) - p)
            tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=ok)


def rows_logprob_(z: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor | None, *,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``labels`` under softmax((z + b) / T) for the rows of raw logits z [C, V]; with g [C]
    (dLoss/dlogp per row) also overwrite z with dLoss/dz_raw = g / T * (onehot - softmax).

    labels must be valid class indices (the caller passes active tokens only). Returns (logp [C] fp32,
    lse [2, C] fp32: row max and log sum-exp of the scaled row).
    """
    c, v = z.shape
    if z.stride(1) != 1:
        raise ValueError("rows_logprob_: z must be row-major (stride 1 along V)")
    logp = torch.empty(c, dtype=torch.float32, device=z.device)
    lse = torch.empty(2, c, dtype=torch.float32, device=z.device)
    if c == 0:
        return logp, lse
    _rows_kernel[(c,)](z, bias if bias is not None else z, labels, g if g is not None else logp, logp, lse,
                       c, v, z.stride(0), bias.stride(0) if bias is not None else 0, 1.0 / float(temperature),
                       HAS_BIAS=bias is not None, NEED_GRAD=g is not None, **rows_config())
    return logp, lse


def rows_config() -> dict:
    """The row kernel's launch config: 4096 columns per step over 16 warps (8 per thread: 16-byte bf16
    loads); small blocks under the interpreter so test rows span several. Not yet tuned on a GPU."""
    if triton_interpreting():
        return {"BLOCK_V": 64, "num_warps": 1}
    return {"BLOCK_V": 4096, "num_warps": 16}


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for bf16/fp16 a, b: one GEMM with an fp32 result where torch offers it
    (``out_dtype``, CUDA), else the GEMM in the inputs' dtype added in fp32."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        acc.add_(torch.mm(a, b))


def chunk_tokens(vocab: int, itemsize: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, int(chunk_bytes) // max(1, vocab * itemsize))


def gemm_logprob_pass(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                      *, temperature: float, ignore_index: int, grad_logp: torch.Tensor | None = None,
                      need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True,
                      chunk_bytes: int = CHUNK_BYTES):
    """-> (logp [N] fp32, lse [2, N] fp32, dhidden | None, dweight | None, dbias | None).

    hidden [N, D], weight [V, D], bias [V] | None (one dtype), labels [N]. With grad_logp [N] the
    gradients of sum_n grad_logp[n] * logp[n] are returned in the input dtypes (dweight and dbias
    accumulated in fp32 and cast once). Ignored tokens (and, for gradients, tokens whose grad_logp is 0
    when no log-prob is needed of them) are never visited.
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    active = (labels != ignore_index).nonzero().flatten()
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(2, n, dtype=torch.float32, device=dev)
    want = grad_logp is not None
    dh = torch.zeros(n, dim, dtype=dtype, device=dev) if want and need_hidden else None
    dw = torch.zeros(vocab, dim, dtype=torch.float32, device=dev) if want and need_weight else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if want and need_bias and bias is not None else None
    step = max(1, min(chunk_tokens(vocab, hidden.element_size(), chunk_bytes), active.numel()))
    buf = torch.empty(step, vocab, dtype=dtype, device=dev)
    weight_t = weight.t()
    for start in range(0, active.numel(), step):
        rows = active[start:start + step]
        h = hidden.index_select(0, rows)
        z = torch.mm(h, weight_t, out=buf[:rows.numel()])
        g = grad_logp.index_select(0, rows).to(torch.float32).contiguous() if want else None
        lp, ls = rows_logprob_(z, labels.index_select(0, rows).contiguous(), bias, g, temperature=temperature)
        logp.index_copy_(0, rows, lp)
        lse.index_copy_(1, rows, ls)
        if not want:
            continue
        if dh is not None:  # z now holds dz
            dh.index_copy_(0, rows, torch.mm(z, weight))
        if dw is not None:
            _addmm_fp32_(dw, z.t(), h)
        if db is not None:
            db += z.sum(0, dtype=torch.float32)
    return (logp, lse, dh, None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
