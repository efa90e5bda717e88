"""The triton-tiles backend: Triton tile kernels for per-token log-probs through the lm_head, no [N, V] logits.

:func:`triton_logprob_forward` -> (logp [N], lse [2, N], entropy [N] | None) computes logit tiles with an online
log-sum-exp (vocabulary splits add parallelism for few tokens); :func:`triton_logprob_backward` -> (dhidden,
dweight, dbias) recomputes each tile, forms dz = g * (onehot - softmax) / T and accumulates the gradients with
fp32 atomics (run-to-run nondeterministic in the last bits on a GPU). fp32 dots are "ieee" unless
``KernelOptions.fp32_dot_precision`` says "tf32"; under TRITON_INTERPRET=1 every dot operand is cast to fp32 (the
interpreter's bf16 ``tl.dot`` is wrong in triton 3.9). The technique follows Apple's ml-cross-entropy kernels and
the flash-attention online softmax; the code is our own. The full design: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grao_kernels.options import triton_interpreting

# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scaled_logit_tile(h_rows, w_rows, b_ptr, cols64, row_ok, col_ok, D, stride_hd, stride_wd, stride_b, inv_temp,
                       HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = (h @ W^T + b) / T for one [BLOCK_N, BLOCK_V] tile: h_rows [BLOCK_N] and w_rows [BLOCK_V] are
    row pointers (int64 offsets), the product is accumulated over D in BLOCK_D slices in fp32. Shared
    by the forward and backward kernels so both form (and round) the logits the same way."""
    offs_d0 = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        d_ok = offs_d < D
        d64 = offs_d.to(tl.int64)
        h = tl.load(h_rows[:, None] + (d64 * stride_hd)[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_rows[:, None] + (d64 * stride_wd)[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols64 * stride_b, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * inv_temp


@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr,
    max_part_ptr, logs_part_ptr, ent_part_ptr, tgt_ptr,
    N, D, V, cols_per_split, n_blocks,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_l,
    inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, NEED_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid // n_blocks  # token blocks of one split are neighbours: they share W tiles in L2
    nb = pid % n_blocks
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows64 = offs_n.to(tl.int64)
    labels = tl.load(labels_ptr + rows64 * stride_l, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (labels != ignore_index)
    labels32 = tl.where(valid, labels, -1).to(tl.int32)  # in [0, V) or -1: 32-bit compares in the tile
    part_off = split.to(tl.int64) * N + rows64
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    if n_valid > 0:
        v_start = split * cols_per_split
        v_stop = tl.minimum(v_start + cols_per_split, V)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        t = tl.zeros((BLOCK_N,), tl.float32)
        tgt = tl.zeros((BLOCK_N,), tl.float32)
        h_rows = h_ptr + rows64 * stride_hn  # [BLOCK_N] row pointers, int64 offsets
        for v0 in range(v_start, v_stop, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            col_ok = offs_v < v_stop
            cols64 = offs_v.to(tl.int64)
            w_rows = w_ptr + cols64 * stride_wv
            z = _scaled_logit_tile(h_rows, w_rows, b_ptr, cols64, row_ok, col_ok, D, stride_hd, stride_wd, stride_b,
                                   inv_temp, HAS_BIAS, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            if NEED_ENTROPY:
                # t = sum exp(z - m) * (z - m), kept relative to the running max (no cancellation of
                # large logits): rebasing from m to m_new adds s * (m - m_new) before the rescale.
                rebase = s * tl.where(s > 0.0, m - m_new, 0.0)
                t = (t + rebase) * alpha + tl.sum(p * tl.where(col_ok[None, :], z - m_new[:, None], 0.0), axis=1)
            s = s * alpha + tl.sum(p, axis=1)
            m = m_new
            hit = (labels32[:, None] == offs_v[None, :]) & col_ok[None, :]
            tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        # m and log s are stored apart (not m + log s): for a confident token the target's
        # log-prob (z - m) - log s is tiny, and rounding m + log s to fp32 would swamp it.
        tl.store(max_part_ptr + part_off, m, mask=row_ok)
        tl.store(logs_part_ptr + part_off, tl.log(s), mask=row_ok)
        if NEED_ENTROPY:  # the entropy of the split's own softmax: log s - E[z - m]
            tl.store(ent_part_ptr + part_off, tl.log(s) - t / s, mask=row_ok)
        # the label column lies in exactly one split: only that split writes the target logit
        own = valid & (labels >= v_start) & (labels < v_stop)
        tl.store(tgt_ptr + rows64, tgt, mask=own)
    else:
        zero = tl.zeros((BLOCK_N,), tl.float32)
        tl.store(max_part_ptr + part_off, zero, mask=row_ok)
        tl.store(logs_part_ptr + part_off, zero, mask=row_ok)
        if NEED_ENTROPY:
            tl.store(ent_part_ptr + part_off, zero, mask=row_ok)


def _fwd_config(dtype: torch.dtype) -> dict:
    # GPU tiles: the largest that compile for sm_90 without register spills (checked with ptxas under
    # triton 3.9; not timed on a GPU). Interpreter tiles are small so odd test shapes span several tiles.
    if triton_interpreting():
        return {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1}
    # BLOCK_D equals the backward's: the backward recomputes the logits and normalises them with
    # the forward's (max, log-sum); the same D slicing makes the recomputed logits round the same
    # way (with large logits a mismatch of |z| * 1e-7 would show in the softmax).
    if dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3}


def _bwd_config(dtype: torch.dtype) -> dict:
    if triton_interpreting():
        return {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16, "GROUP": 2, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16, "GROUP": 8, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32, "GROUP": 8, "num_warps": 8, "num_stages": 2}


def _dot_precision(dtype: torch.dtype, fp32_precision: str) -> str:
    # input_precision only matters for fp32 operands ("ieee", the default, holds fp32 results to 1e-5; "tf32"
    # is faster on GPU); bf16/fp16 keep Triton's default ("tf32").
    if triton_interpreting():
        return "ieee"
    return fp32_precision if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _check_common(hidden, weight, labels, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D]; got hidden {list(hidden.shape)}, "
                         f"weight {list(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {list(labels.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"hidden, weight and bias must share one dtype; got {hidden.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {list(bias.shape)}")


def triton_logprob_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           bias: torch.Tensor | None, *, temperature: float, ignore_index: int,
                           return_entropy: bool, num_v_splits: int | None = None, fp32_precision: str = "ieee"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of ``labels`` under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [N, D] fp32/bf16/fp16, any strides. weight: [V, D] same dtype (may be tied to an
            embedding; it is only read). labels: [N] int64/int32, ``ignore_index`` or in [0, V).
        bias: [V] or None. temperature: > 0. return_entropy: also return the softmax entropy.
        num_v_splits: optional override of how many vocabulary splits the forward uses
            (default: chosen from the device's SM count; mainly for tests).
        fp32_precision: "ieee" or "tf32", the dots' precision for fp32 inputs (KernelOptions.fp32_dot_precision).

    Returns:
        logp [N] fp32 (0 where labels == ignore_index), lse [2, N] fp32: the row max m of the
        temperature-scaled logits and log sum exp(z - m), saved for the backward (their sum is the
        log-sum-exp; kept apart so confident tokens keep their precision; 0 at ignored token blocks),
        entropy [N] fp32 (0 at ignored tokens) or None.
    """
    _check_common(hidden, weight, labels, bias)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=dev)
        return empty, torch.zeros(2, 0, dtype=torch.float32, device=dev), (empty.clone() if return_entropy else None)
    cfg = _fwd_config(hidden.dtype)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks = triton.cdiv(n, bn)
    v_blocks = triton.cdiv(v, bv)
    if num_v_splits is None:
        # enough programs to fill the GPU twice; 1 split for large N
        num_v_splits = max(1, min(v_blocks, triton.cdiv(2 * _num_sms(dev), n_blocks)))
    num_v_splits = max(1, min(int(num_v_splits), v_blocks))
    blocks_per_split = triton.cdiv(v_blocks, num_v_splits)
    cols_per_split = blocks_per_split * bv
    splits = triton.cdiv(v, cols_per_split)  # every split has at least one column

    max_part = torch.empty((splits, n), dtype=torch.float32, device=dev)
    logs_part = torch.empty((splits, n), dtype=torch.float32, device=dev)
    ent_part = torch.empty((splits, n), dtype=torch.float32, device=dev) if return_entropy else max_part
    tgt = torch.zeros(n, dtype=torch.float32, device=dev)
    b_arg = bias if bias is not None else weight
    stride_b = bias.stride(0) if bias is not None else 0
    grid = (n_blocks * splits,)
    _logprob_fwd_kernel[grid](
        hidden, weight, b_arg, labels,
        max_part, logs_part, ent_part, tgt,
        n, d, v, cols_per_split, n_blocks,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), stride_b, labels.stride(0),
        1.0 / float(temperature), int(ignore_index),
        HAS_BIAS=bias is not None, NEED_ENTROPY=bool(return_entropy), DOT_FP32=triton_interpreting(),
        PRECISION=_dot_precision(hidden.dtype, fp32_precision),
        **cfg,
    )
    valid = labels != ignore_index
    row_max = max_part.amax(dim=0)
    # each split's log-sum-exp relative to the row max: lse_k - m = (m_k - m) + log s_k
    rel_part = (max_part - row_max) + logs_part
    log_sum = rel_part[0] if splits == 1 else torch.logsumexp(rel_part, dim=0)
    logp = torch.where(valid, (tgt - row_max) - log_sum, torch.zeros_like(tgt))
    entropy = None
    if return_entropy:
        if splits == 1:
            ent = ent_part[0]
        else:  # H = sum_k w_k (H_k + lse - lse_k), w_k = exp(lse_k - lse) the mass of split k
            ent = (torch.exp(rel_part - log_sum) * (ent_part + (log_sum - rel_part))).sum(0)
        entropy = torch.where(valid, ent, torch.zeros_like(log_sum))
    return logp, torch.stack([row_max, log_sum]), entropy


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logprob_bwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, g_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, D, V, n_blocks, v_blocks,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_l, stride_lse, stride_g,
    inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    # grouped ordering (as in the Triton matmul tutorial): GROUP token blocks walk the vocab
    # together so the weight tiles they read stay in L2.
    pid = tl.program_id(0)
    per_group = GROUP * v_blocks
    group_id = pid // per_group
    first_nb = group_id * GROUP
    group_size = tl.minimum(n_blocks - first_nb, GROUP)
    nb = first_nb + (pid % per_group) % group_size
    vb = (pid % per_group) // group_size

    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows64 = offs_n.to(tl.int64)
    labels = tl.load(labels_ptr + rows64 * stride_l, mask=row_ok, other=ignore_index).to(tl.int64)
    g = tl.load(g_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(tl.float32)
    valid = row_ok & (labels != ignore_index)
    g = tl.where(valid, g, 0.0)
    n_live = tl.sum((g != 0.0).to(tl.int32), axis=0)
    if n_live > 0:
        row_max = tl.load(lse_ptr + rows64 * stride_lse, mask=valid, other=0.0)
        log_sum = tl.load(lse_ptr + N * stride_lse + rows64 * stride_lse, mask=valid, other=0.0)
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        cols64 = offs_v.to(tl.int64)
        offs_d0 = tl.arange(0, BLOCK_D)
        h_rows = h_ptr + rows64 * stride_hn  # [BLOCK_N] row pointers, int64 offsets
        w_rows = w_ptr + cols64 * stride_wv
        z = _scaled_logit_tile(h_rows, w_rows, b_ptr, cols64, row_ok, col_ok, D, stride_hd, stride_wd, stride_b,
                               inv_temp, HAS_BIAS, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        p = tl.exp((z - row_max[:, None]) - log_sum[:, None])
        labels32 = tl.where(valid, labels, -1).to(tl.int32)  # in [0, V) or -1
        onehot = (labels32[:, None] == offs_v[None, :]).to(tl.float32)
        # d logp / d raw_logit = (onehot - softmax) / T; g folded in before any sum over tokens
        dz = (g * inv_temp)[:, None] * (onehot - p)
        dz = tl.where(valid[:, None] & col_ok[None, :], dz, 0.0)
        if NEED_B:
            tl.atomic_add(db_ptr + cols64, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
        if NEED_H or NEED_W:
            if DOT_FP32:
                dz_op = dz
            else:
                dz_op = dz.to(h_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                d_ok = offs_d < D
                d64 = offs_d.to(tl.int64)
                if NEED_H:
                    w = tl.load(w_rows[:, None] + (d64 * stride_wd)[None, :], mask=col_ok[:, None] & d_ok[None, :],
                                other=0.0)
                    if DOT_FP32:
                        w = w.to(tl.float32)
                    dh = tl.dot(dz_op, w, input_precision=PRECISION)
                    tl.atomic_add(dh_ptr + rows64[:, None] * D + d64[None, :], dh,
                                  mask=valid[:, None] & d_ok[None, :], sem="relaxed")
                if NEED_W:
                    h = tl.load(h_rows[:, None] + (d64 * stride_hd)[None, :], mask=row_ok[:, None] & d_ok[None, :],
                                other=0.0)
                    if DOT_FP32:
                        h = h.to(tl.float32)
                    dw = tl.dot(tl.trans(dz_op), h, input_precision=PRECISION)
                    tl.atomic_add(dw_ptr + cols64[:, None] * D + d64[None, :], dw,
                                  mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")


def triton_logprob_backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            bias: torch.Tensor | None, lse: torch.Tensor, grad_logp: torch.Tensor, *,
                            temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
                            need_bias: bool, fp32_precision: str = "ieee"
                            ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_n grad_logp[n] * logp[n] w.r.t. hidden, weight and bias.

    Args:
        hidden [N, D], weight [V, D], labels [N], bias [V] | None: as in :func:`triton_logprob_forward`.
        lse: [2, N] fp32, the forward's normaliser (row max, log-sum). grad_logp: [N] float, dLoss/dlogp per token
            (ignored tokens contribute nothing whatever their grad_logp).
        need_hidden / need_weight / need_bias: which gradients to compute.

    Returns:
        (dhidden [N, D] in hidden.dtype, dweight [V, D] in weight.dtype, dbias [V] in bias.dtype),
        each None when not requested. Accumulated in fp32 buffers, cast once at the end.
    """
    _check_common(hidden, weight, labels, bias)
    need_bias = bool(need_bias) and bias is not None
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    dh = torch.zeros((n, d), dtype=f32, device=dev) if need_hidden else None
    dw = torch.zeros((v, d), dtype=f32, device=dev) if need_weight else None
    db = torch.zeros((v,), dtype=f32, device=dev) if need_bias else None
    if n > 0 and (need_hidden or need_weight or need_bias):
        if lse.shape != (2, n) or grad_logp.shape != (n,):
            raise ValueError(f"lse must be [2, N] and grad_logp [N] with N = {n}; got {list(lse.shape)}, "
                             f"{list(grad_logp.shape)}")
        lse = lse.to(f32).contiguous()
        cfg = _bwd_config(hidden.dtype)
        n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
        v_blocks = triton.cdiv(v, cfg["BLOCK_V"])
        dummy = lse
        grid = (n_blocks * v_blocks,)
        _logprob_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, labels, lse, grad_logp,
            dh if dh is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
            n, d, v, n_blocks, v_blocks,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, labels.stride(0), lse.stride(1), grad_logp.stride(0),
            1.0 / float(temperature), int(ignore_index),
            HAS_BIAS=bias is not None, NEED_H=bool(need_hidden), NEED_W=bool(need_weight), NEED_B=need_bias,
            DOT_FP32=triton_interpreting(), PRECISION=_dot_precision(hidden.dtype, fp32_precision),
            **cfg,
        )
    if dh is not None and hidden.dtype != f32:
        dh = dh.to(hidden.dtype)
    if dw is not None and weight.dtype != f32:
        dw = dw.to(weight.dtype)
    if db is not None and bias.dtype != f32:
        db = db.to(bias.dtype)
    return dh, dw, db
