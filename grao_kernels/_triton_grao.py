"""Triton kernels for the GRAO epilogue: advantages, sequence log-likelihoods, loss parts, dLoss/dlogp.

The math is the spec's (``grao_kernels.reference``: group_advantages, sequence_logprob, grao_objective,
grao_row_grad); the kernels are tested against those functions in float64.

* :func:`triton_group_advantages` -> advantages [P, G+1] fp32.
* :func:`triton_grao_epilogue` -> (components [3], advantages [P, G+1], seq_logp [B], token_counts [B],
  grad_logp [B, T]).

Organisation: one program per prompt (1-D grid over P). A program holds the G+1 rows of its
group as the first axis of a [BLOCK_G, BLOCK_T] tile (BLOCK_G = next power of two >= G+1) and
walks T in BLOCK_T slices twice: once to sum token log-probs and count completion tokens per row,
once, after the advantages and per-row coefficients are known, to write grad_logp. The advantage
math is one ``@triton.jit`` device function shared with the stand-alone advantage kernel. Each
program stores its prompt's three objective parts into a [P, 3] buffer; the mean over prompts is
a deterministic torch reduction afterwards (no float atomics).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from grao_kernels._backend import triton_interpreting


@triton.jit
def _group_advantages_row(r, offs, G, eps, REF_IN_STATS: tl.constexpr):
    """Advantages of one group. r [BLOCK_G] fp32 rewards (lanes >= G+1 are padding), offs = arange.

    mu, sigma: mean and population std over the G+1 rewards (the G samples if not REF_IN_STATS);
    A = (r - mu) / (sigma + eps), exactly 0 when the statistics rewards are all equal.
    """
    if REF_IN_STATS:
        n = G + 1
    else:
        n = G
    in_stats = offs < n
    mu = tl.sum(tl.where(in_stats, r, 0.0), axis=0) / n
    diff = tl.where(in_stats, r - mu, 0.0)
    sigma = tl.sqrt_rn(tl.sum(diff * diff, axis=0) / n)
    r_max = tl.max(tl.where(in_stats, r, float("-inf")), axis=0)
    r_min = tl.min(tl.where(in_stats, r, float("inf")), axis=0)
    adv = (r - mu) / (sigma + eps)
    adv = tl.where(r_max == r_min, 0.0, adv)
    return tl.where(offs < G + 1, adv, 0.0)


@triton.jit
def _group_advantages_kernel(r_ptr, adv_ptr, G, stride_rp, stride_rg, eps,
                             REF_IN_STATS: tl.constexpr, BLOCK_G: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    ok = offs < G + 1
    r = tl.load(r_ptr + p * stride_rp + offs * stride_rg, mask=ok, other=0.0).to(tl.float32)
    adv = _group_advantages_row(r, offs, G, eps, REF_IN_STATS)
    tl.store(adv_ptr + p * (G + 1) + offs, adv, mask=ok)


@triton.jit
def _grao_epilogue_kernel(
    logp_ptr, labels_ptr, r_ptr,
    adv_ptr, seq_ptr, counts_ptr, parts_ptr, grad_ptr,
    P, G, T,
    stride_lb, stride_lt, stride_yb, stride_yt, stride_rp, stride_rg,
    beta, lam, eps, ignore_index,
    REF_IN_STATS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G + 1
    rows = p * (G + 1) + offs_g.to(tl.int64)
    offs_t0 = tl.arange(0, BLOCK_T)

    # pass 1: per-row token sums and counts
    tot = tl.zeros((BLOCK_G,), tl.float32)
    cnt = tl.zeros((BLOCK_G,), tl.int32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + offs_t0).to(tl.int64)
        m = g_ok[:, None] & (offs_t < T)[None, :]
        lab = tl.load(labels_ptr + rows[:, None] * stride_yb + offs_t[None, :] * stride_yt, mask=m,
                      other=ignore_index)
        valid = m & (lab != ignore_index)
        lp = tl.load(logp_ptr + rows[:, None] * stride_lb + offs_t[None, :] * stride_lt, mask=valid, other=0.0)
        tot += tl.sum(lp.to(tl.float32), axis=1)
        cnt += tl.sum(valid.to(tl.int32), axis=1)
    has = cnt > 0
    seq = tl.where(has, tot / tl.maximum(cnt, 1).to(tl.float32), 0.0)

    r = tl.load(r_ptr + p * stride_rp + offs_g * stride_rg, mask=g_ok, other=0.0).to(tl.float32)
    adv = _group_advantages_row(r, offs_g, G, eps, REF_IN_STATS)

    is_ref = offs_g == G
    is_sample = offs_g < G
    a_ref = tl.sum(tl.where(is_ref, adv, 0.0), axis=0)
    l_ref = tl.sum(tl.where(is_ref, seq, 0.0), axis=0)
    a_mean = tl.sum(tl.where(is_sample, adv, 0.0), axis=0) / G
    exploration = -tl.sum(tl.where(is_sample, adv * seq, 0.0), axis=0) / G
    imitation = -beta * a_ref * l_ref
    alignment = -lam * tl.sum(tl.where(is_sample, adv * (seq - l_ref), 0.0), axis=0) / G
    tl.store(parts_ptr + p * 3 + 0, exploration)
    tl.store(parts_ptr + p * 3 + 1, imitation)
    tl.store(parts_ptr + p * 3 + 2, alignment)

    # per-row dLoss/dlogp coefficient: -c_s / (|s| P), c_o = (1 + lam) A_i / G, c_y = beta A_y - lam mean_i A_i
    coef = tl.where(is_sample, (1.0 + lam) * adv / G, beta * a_ref - lam * a_mean)
    gcoef = tl.where(has, -coef / (tl.maximum(cnt, 1).to(tl.float32) * P), 0.0)

    tl.store(adv_ptr + rows, adv, mask=g_ok)
    tl.store(seq_ptr + rows, seq, mask=g_ok)
    tl.store(counts_ptr + rows, cnt.to(tl.int64), mask=g_ok)

    # pass 2: grad_logp (contiguous [B, T] output)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + offs_t0).to(tl.int64)
        m = g_ok[:, None] & (offs_t < T)[None, :]
        lab = tl.load(labels_ptr + rows[:, None] * stride_yb + offs_t[None, :] * stride_yt, mask=m,
                      other=ignore_index)
        valid = lab != ignore_index
        grad = tl.where(valid, gcoef[:, None], 0.0)
        tl.store(grad_ptr + rows[:, None] * T + offs_t[None, :], grad, mask=m)


def _block_g(group: int) -> int:
    return max(2, triton.next_power_of_2(group + 1))


def _block_t(seq_len: int, block_g: int) -> int:
    if triton_interpreting():
        return 8  # small, so the tests exercise several T slices and a ragged last one
    return max(16, min(triton.next_power_of_2(max(seq_len, 1)), 4096 // block_g))


def triton_group_advantages(rewards: torch.Tensor, *, eps: float, reference_in_stats: bool) -> torch.Tensor:
    """Group advantages (spec eq. 4; ``grao_kernels.reference.group_advantages``) on the device.

    rewards [P, G+1] float (G sample rewards, then R(y, y)) -> advantages [P, G+1] fp32.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, G+1] with G >= 1, got shape {list(rewards.shape)}")
    prompts, width = rewards.shape
    adv = torch.empty((prompts, width), dtype=torch.float32, device=rewards.device)
    if prompts == 0:
        return adv
    group = width - 1
    _group_advantages_kernel[(prompts,)](
        rewards, adv, group, rewards.stride(0), rewards.stride(1), float(eps),
        REF_IN_STATS=bool(reference_in_stats), BLOCK_G=_block_g(group), num_warps=1 if triton_interpreting() else 4,
    )
    return adv


def triton_grao_epilogue(token_logp: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor, *, beta: float,
                         lam: float, eps: float, reference_in_stats: bool, ignore_index: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole GRAO loss from per-token log-probs, and its gradient w.r.t. them, in one kernel.

    Args:
        token_logp: [B, T] fp32 per-token log-probs (0 or anything at ignored positions).
        labels: [B, T] int; ``ignore_index`` marks prompt and padding positions.
        rewards: [P, G+1] float, B = P * (G+1): each prompt's G samples first, its reference last.
        beta, lam, eps, reference_in_stats: as in ``grao_kernels.reference.grao_loss``.

    Returns:
        components fp32 [3] (exploration, imitation, alignment; mean over prompts, summing to the loss),
        advantages fp32 [P, G+1], seq_logp fp32 [B] (0 for empty rows), token_counts int64 [B],
        grad_logp fp32 [B, T] = dLoss/dlogp (-c_s / (|s| P) at completion tokens, 0 elsewhere).
    """
    if token_logp.dim() != 2 or labels.shape != token_logp.shape:
        raise ValueError(f"token_logp and labels must both be [B, T]; got {list(token_logp.shape)} and "
                         f"{list(labels.shape)}")
    if rewards.dim() != 2 or rewards.shape[1] < 2 or rewards.shape[0] * rewards.shape[1] != token_logp.shape[0]:
        raise ValueError(f"rewards must be [P, G+1] with P * (G+1) = B = {token_logp.shape[0]}, got "
                         f"{list(rewards.shape)}")
    rows, seq_len = token_logp.shape
    prompts, width = rewards.shape
    group = width - 1
    dev = token_logp.device
    f32 = torch.float32
    adv = torch.empty((prompts, width), dtype=f32, device=dev)
    seq = torch.empty((rows,), dtype=f32, device=dev)
    counts = torch.empty((rows,), dtype=torch.int64, device=dev)
    parts = torch.empty((prompts, 3), dtype=f32, device=dev)
    grad = torch.empty((rows, seq_len), dtype=f32, device=dev)
    if prompts == 0:
        return torch.zeros(3, dtype=f32, device=dev), adv, seq, counts, grad
    block_g = _block_g(group)
    _grao_epilogue_kernel[(prompts,)](
        token_logp, labels, rewards,
        adv, seq, counts, parts, grad,
        prompts, group, seq_len,
        token_logp.stride(0), token_logp.stride(1), labels.stride(0), labels.stride(1),
        rewards.stride(0), rewards.stride(1),
        float(beta), float(lam), float(eps), int(ignore_index),
        REF_IN_STATS=bool(reference_in_stats), BLOCK_G=block_g, BLOCK_T=_block_t(seq_len, block_g),
        num_warps=1 if triton_interpreting() else 4,
    )
    components = parts.mean(0)
    return components, adv, seq, counts, grad
