"""Input validation shared by the eager reference and the fused kernels (padded and token-packed inputs).

Every public op validates its inputs here, so the eager and fused paths raise the same
:class:`GRAOInputError` (exported by ``grao_kernels``, re-exported by ``grao``) for the same
bad input, naming the argument and the expected and actual shape / dtype / device. Nothing
is broadcast, truncated or repaired.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from grao_kernels.autocast import autocast_dtype, effective_dtype


def _checking_values() -> bool:
    """Value checks (label range, finite rewards, empty references) read tensor data; under
    torch.compile they would break the graph, so only shape/dtype/device checks run there."""
    return not torch.compiler.is_compiling()


INDEX_DTYPES = (torch.int64, torch.int32)  # labels, cu_seqlens, row_index


class GRAOInputError(ValueError):
    """Raised for inputs that do not match the documented layout (see docs/spec.md)."""


def _fail(msg: str) -> None:
    raise GRAOInputError(msg)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t, *, floating: bool | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating is True and not t.is_floating_point():
        _fail(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if floating is False and t.dtype not in INDEX_DTYPES:
        # int64 or int32 (converted where used; both give the same results): narrower integers and uint8
        # could not hold every token id or ignore_index = -100
        _fail(f"{name} must be an integer tensor (torch.int64 or torch.int32), got dtype {t.dtype}")


def check_scalar(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        _fail(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(v):
        _fail(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        _fail(f"{name} must be > 0, got {v}")
    if nonnegative and v < 0:
        _fail(f"{name} must be >= 0, got {v}")
    return v


def _autocast_note(hidden: torch.Tensor) -> str:
    cast = autocast_dtype(hidden.device.type)
    return f" (under autocast fp32/bf16/fp16 inputs are cast to {cast}; float64 is not)" if cast else ""


@dataclass(frozen=True)
class LinearLayout:
    """Sizes of a validated (hidden, weight, labels) triple: hidden is [N, D] after flattening."""

    rows: int  # B (labels.shape[0]) or N for 1-D labels
    seq_len: int  # T (1 for 1-D labels)
    hidden_dim: int  # D
    vocab: int  # V


def check_linear_inputs(hidden, weight, labels, bias=None, *, ignore_index: int = -100,
                        check_label_values: bool = True) -> LinearLayout:
    """Validate hidden [B, T, D] | [B*T, D] | [N, D], weight [V, D], labels [B, T] | [N], bias [V].

    hidden, weight and bias share one floating dtype and one device; labels are int64 or int32
    on the same device with values in [0, V) or equal to ignore_index. Under autocast on their device
    their dtypes are compared after autocast's cast (fp32/bf16/fp16 -> the autocast dtype), as the ops
    and ``nn.Linear`` cast them (grao_kernels.autocast).
    """
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    check_tensor("labels", labels, floating=False)
    if weight.dim() != 2:
        _fail(f"weight must be [V, D] (the lm_head weight), got shape {_shape(weight)}")
    vocab, dim = weight.shape
    if vocab == 0 or dim == 0:
        _fail(f"weight must have V > 0 and D > 0, got shape {_shape(weight)}")
    if labels.dim() not in (1, 2):
        _fail(f"labels must be [B, T] or [N], got shape {_shape(labels)}")
    if hidden.dim() not in (2, 3):
        _fail(f"hidden must be [B, T, D] or [B*T, D], got shape {_shape(hidden)}")
    if hidden.shape[-1] != dim:
        _fail(f"hidden's last dimension must equal weight's D = {dim} (weight {_shape(weight)}), "
              f"got hidden {_shape(hidden)}")
    if hidden.dim() == 3 and tuple(hidden.shape[:2]) != tuple(labels.shape):
        _fail(f"labels must be [B, T] = [{hidden.shape[0]}, {hidden.shape[1]}] to match hidden "
              f"{_shape(hidden)}, got labels {_shape(labels)}")
    if hidden.dim() == 2 and hidden.shape[0] != labels.numel():
        _fail(f"hidden [N, D] must have N = labels.numel() = {labels.numel()} rows "
              f"(labels {_shape(labels)}), got hidden {_shape(hidden)}")
    if weight.dtype != hidden.dtype and effective_dtype(weight) != effective_dtype(hidden):
        _fail(f"weight dtype must equal hidden dtype {hidden.dtype}, got {weight.dtype}{_autocast_note(hidden)}")
    if weight.device != hidden.device:
        _fail(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if labels.device != hidden.device:
        _fail(f"labels must be on hidden's device {hidden.device}, got {labels.device}")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (vocab,):
            _fail(f"bias must be [V] = [{vocab}], got shape {_shape(bias)}")
        if bias.dtype != hidden.dtype and effective_dtype(bias) != effective_dtype(hidden):
            _fail(f"bias dtype must equal hidden dtype {hidden.dtype}, got {bias.dtype}{_autocast_note(hidden)}")
        if bias.device != hidden.device:
            _fail(f"bias must be on hidden's device {hidden.device}, got {bias.device}")
    if check_label_values and labels.numel() > 0 and _checking_values():
        valid = labels != ignore_index
        bad = valid & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            _fail(f"labels must be in [0, V) = [0, {vocab}) or equal ignore_index = {ignore_index}; "
                  f"found {first}")
    rows = labels.shape[0] if labels.dim() == 2 else labels.numel()
    seq_len = labels.shape[1] if labels.dim() == 2 else 1
    return LinearLayout(rows=rows, seq_len=seq_len, hidden_dim=dim, vocab=vocab)


def check_logprob_coef(coef, labels: torch.Tensor) -> None:
    """Validate the per-token coefficients of ``fused_linear_logprob_dot``: floating, shaped like labels, on
    their device, finite, and constant (no gradient flows to them)."""
    check_tensor("coef", coef, floating=True)
    if tuple(coef.shape) != tuple(labels.shape):
        _fail(f"coef must be shaped like labels {_shape(labels)}, got {_shape(coef)}")
    if coef.device != labels.device:
        _fail(f"coef must be on labels' device {labels.device}, got {coef.device}")
    if coef.requires_grad:
        _fail("coef must not require grad: it is the loss's constant dLoss/dlogp per token (detach it)")
    if coef.numel() > 0 and _checking_values() and not bool(torch.isfinite(coef).all()):
        _fail("coef must be finite; found a NaN or inf entry")


def check_rewards(rewards, num_rows: int | None = None, *, device=None) -> tuple[int, int]:
    """Validate rewards [P, G+1] (G >= 1, finite, floating); return (P, G)."""
    check_tensor("rewards", rewards, floating=True)
    if rewards.dim() != 2:
        _fail(f"rewards must be [P, G+1] (G samples then the reference), got shape {_shape(rewards)}")
    prompts, width = rewards.shape
    if width < 2:
        _fail(f"rewards must be [P, G+1] with G >= 1 (at least one sample and the reference), "
              f"got shape {_shape(rewards)}")
    if prompts == 0:
        _fail(f"rewards must hold at least one prompt, got shape {_shape(rewards)}")
    if num_rows is not None and num_rows != prompts * width:
        _fail(f"the batch must hold B = P * (G+1) rows; rewards {_shape(rewards)} gives "
              f"P * (G+1) = {prompts * width}, but labels have B = {num_rows} rows"
              + (" (B is not a multiple of G+1)" if num_rows % width else ""))
    if device is not None and rewards.device != device:
        _fail(f"rewards must be on the device of hidden/labels {device}, got {rewards.device}")
    if _checking_values() and not bool(torch.isfinite(rewards).all()):
        _fail("rewards must be finite; found NaN or inf")
    return prompts, width - 1


def check_reference_rows(token_counts: torch.Tensor, group_width: int) -> None:
    """token_counts [B]: completion tokens per row. Every reference row (last of each group) needs one."""
    if not _checking_values():
        return
    ref_counts = token_counts.view(-1, group_width)[:, -1]
    empty = (ref_counts == 0).nonzero().flatten()
    if empty.numel() > 0:
        p = int(empty[0])
        _fail(f"labels: the reference answer of prompt {p} (row {p * group_width + group_width - 1}) "
              f"has no completion tokens (all positions equal ignore_index); an empty reference "
              f"answer is invalid")


def check_flat_labels(labels: torch.Tensor, rewards, *, device) -> None:
    """Refuse 1-D labels in the padded GRAO loss, saying what to pass instead.

    Labels carry the layout: [B, T] is padded rows (hidden [B, T, D] or flattened [B*T, D]), [N] is
    token-packed input, whose rows only cu_seqlens / row_index can give. Reading a flat [B*T] labels
    tensor as B equal rows instead would turn a forgotten cu_seqlens into silently wrong rows."""
    prompts, group = check_rewards(rewards, device=device)
    rows, n = prompts * (group + 1), labels.numel()
    padded = (f"labels.view({rows}, {n // rows})" if n % rows == 0
              else f"labels [B, T] (its {n} entries do not split into {rows} rows)")
    _fail(f"labels must be [B, T] with B = P * (G+1) = {rows} (rewards {_shape(rewards)}), got shape "
          f"{_shape(labels)}: flat labels [N] are token-packed input and need cu_seqlens or row_index; padded "
          f"rows go as {padded}, hidden may stay [B*T, D]")


def check_grao_hyper(beta, lam, eps, temperature) -> tuple[float, float, float, float]:
    hyper = (check_scalar("beta", beta), check_scalar("lam", lam),
             check_scalar("eps", eps, positive=True), check_scalar("temperature", temperature, positive=True))
    warn_unusual_weights(hyper[0], hyper[1])
    return hyper


def warn_unusual_weights(beta: float, lam: float) -> None:
    """Any finite beta / lam is accepted (docs/spec.md), but one outside [0, 1] is rarely meant: a UserWarning
    says so, once per value and process (the trainer's config check and every step's loss share it)."""
    if not _checking_values():
        return
    for name, value, paper, term in (("beta", beta, 0.5, "imitation"), ("lam", lam, 0.6, "alignment")):
        if not 0 <= value <= 1 and (name, value) not in _warned_weights:
            _warned_weights.add((name, value))
            why = f"a negative weight reverses the {term} term" if value < 0 else f"the {term} term outweighs exploration (weight 1)"
            warnings.warn(f"{name}={value:g} is outside [0, 1] (paper: {paper}): {why}", UserWarning, stacklevel=2)


_warned_weights: set[tuple[str, float]] = set()  # (name, value) pairs already warned about in this process


def check_linear_grao_inputs(hidden, weight, labels, rewards, bias, *, beta, lam, eps, temperature,
                             ignore_index) -> tuple[LinearLayout, int, torch.Tensor, tuple[float, float, float, float]]:
    """All checks of the GRAO loss on (hidden, weight, labels, rewards, bias), shared by eager and fused paths.

    Returns (layout, G, token_counts [B], (beta, lam, eps, temperature)).
    """
    layout = check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    if labels.dim() != 2:
        check_flat_labels(labels, rewards, device=hidden.device)
    hyper = check_grao_hyper(beta, lam, eps, temperature)
    _, group = check_rewards(rewards, layout.rows, device=hidden.device)
    counts = (labels != ignore_index).sum(-1)
    check_reference_rows(counts, group + 1)
    return layout, group, counts, hyper


# Token-packed (padding-free) inputs: cu_seqlens / row_index with hidden [N, D], labels [N].


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
