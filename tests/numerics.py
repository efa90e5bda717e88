"""Shared numerical checks: a fused result may be no further from float64 than eager in its dtype."""

from __future__ import annotations

import torch


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_no_worse_than_eager(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, *, atol: float,
                               rtol: float, what: str = "") -> None:
    """|fused - ref64| <= |eager - ref64| + atol + rtol * max|ref64| (max over elements)."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fused).all(), f"{what}: non-finite values"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err_fused, err_eager = max_err(fused, ref64), max_err(eager, ref64)
    bound = err_eager + atol + rtol * scale
    assert err_fused <= bound, f"{what}: fused error {err_fused:.3e} > eager error {err_eager:.3e} + tol ({bound:.3e})"
