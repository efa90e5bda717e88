"""Input checks of the token-packed (padding-free) loss inputs: cu_seqlens / row_index with hidden [N, D], labels [N].

Shared by the eager reference and the fused op (``grao_kernels.packed``), so both reject the same inputs
with the same :class:`GRAOInputError`; built on the checks of ``grao_kernels._checks``.
"""

from __future__ import annotations

import torch

from grao_kernels._checks import (
    _checking_values,
    _fail,
    _shape,
    check_grao_hyper,
    check_linear_inputs,
    check_reference_rows,
    check_rewards,
    check_tensor,
)


def check_packed_rows(hidden, labels, cu_seqlens, row_index, num_rows: int) -> torch.Tensor:
    """Padding-free layout: hidden [N, D], labels [N] and exactly one of ``cu_seqlens`` [num_rows + 1]
    (row r's tokens are ``cu_seqlens[r]:cu_seqlens[r + 1]``, flash-attn style) or ``row_index`` [N] (the row
    of each token). Returns the row index [N] int64 on labels' device."""
    if (cu_seqlens is None) == (row_index is None):
        _fail("pass exactly one of cu_seqlens and row_index for token-packed (padding-free) inputs")
    if hidden.dim() != 2:
        _fail(f"hidden must be [N, D] (token-packed) when cu_seqlens or row_index is given, got shape {_shape(hidden)}")
    if labels.dim() != 1:
        _fail(f"labels must be [N] (token-packed) when cu_seqlens or row_index is given, got shape {_shape(labels)}")
    n = labels.shape[0]
    name, t = ("cu_seqlens", cu_seqlens) if cu_seqlens is not None else ("row_index", row_index)
    check_tensor(name, t, floating=False)
    if t.device != labels.device:
        _fail(f"{name} must be on the device of hidden/labels {labels.device}, got {t.device}")
    want = num_rows + 1 if cu_seqlens is not None else n
    if t.dim() != 1 or t.shape[0] != want:
        what = f"[B + 1] = [{want}] (B = {num_rows} rows)" if cu_seqlens is not None else f"[N] = [{n}]"
        _fail(f"{name} must be {what}, got shape {_shape(t)}")
    t = t.long()
    if cu_seqlens is not None:
        if _checking_values():
            if int(t[0]) != 0 or int(t[-1]) != n:
                _fail(f"cu_seqlens must start at 0 and end at N = {n} (the number of tokens), got "
                      f"{int(t[0])} ... {int(t[-1])}")
            if bool((t.diff() < 0).any()):
                _fail("cu_seqlens must be non-decreasing (row r's tokens are cu_seqlens[r]:cu_seqlens[r+1])")
        return torch.repeat_interleave(torch.arange(num_rows, device=t.device), t.diff(), output_size=n)
    if _checking_values() and n > 0 and bool(((t < 0) | (t >= num_rows)).any()):
        bad = int(t[(t < 0) | (t >= num_rows)][0])
        _fail(f"row_index must be in [0, B) = [0, {num_rows}), found {bad}")
    return t


def check_packed_grao_inputs(hidden, weight, labels, rewards, bias, cu_seqlens, row_index, *, beta, lam, eps,
                             temperature, ignore_index):
    """All checks of the padding-free GRAO loss (hidden [N, D], labels [N], cu_seqlens or row_index).

    Returns (layout, G, token_counts [B], row_index [N] int64, (beta, lam, eps, temperature))."""
    layout = check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    hyper = check_grao_hyper(beta, lam, eps, temperature)
    prompts, group = check_rewards(rewards, device=hidden.device)
    rows = check_packed_rows(hidden, labels, cu_seqlens, row_index, prompts * (group + 1))
    counts = torch.zeros(prompts * (group + 1), dtype=torch.long, device=labels.device)
    counts.index_add_(0, rows, (labels != ignore_index).long())
    check_reference_rows(counts, group + 1)
    return layout, group, counts, rows, hyper
