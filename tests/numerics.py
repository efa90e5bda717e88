"""The numerical ground rules of the suite, in one place, for tests/ and benchmarks/ alike.

* ``make_problem``: the one problem builder. A GRAO batch of ``prompts * (group + 1)`` rows of ``seq_len``
  tokens (the last row of each group the reference answer), hidden [B, T, D], weight [V, D], labels [B, T] with
  ignored tokens (a random fraction, a prompt prefix, whole empty rows, or per-row completion lengths), rewards
  [P, G+1], an optional bias and per-token coefficients. Values are drawn in float64 from ``seed`` and rounded
  once to ``dtype``: ``Problem.float64()`` is the same problem as the float64 reference sees it. Padded form as
  built; ``Problem.flat()`` is the [N, D] / [N] form and ``Problem.packed()`` the token-packed one (kept tokens
  only, with ``cu_seqlens`` and ``row_index``).
* ``TOL`` / ``tol``: the one tolerance table, keyed by dtype, and the rule of the project
  (``assert_no_worse_than_eager``): a fast result may be no further from the float64 reference than the eager
  PyTorch path in the same dtype, plus ``atol + rtol * max|reference|``.
* ``reference_logprob``: the judge of the log-prob paths: ``grao_kernels.reference`` evaluated in a given dtype
  (float64: the reference; the inputs' dtype: the eager path), with the gradients of ``sum(grad_logp * logp)``.

It lives in tests/ because it is test code (nothing here is shipped by setup.py); benchmarks/ imports it as
``tests.numerics`` (both are run from the repository root, where ``tests`` is a package): the benchmark checks
(benchmarks/test_bench_loss.py) build their problem here and use TOL. The timed inputs stay
``benchmarks.common.make_inputs``: drawn in place on the device in the timed dtype (up to N = 8192, V = 151936),
where a float64 draw on the CPU would cost gigabytes, and with no ignored tokens by design.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from grao_kernels import reference

IGN = -100

#: dtype -> (atol, rtol) of the rule above, the only tolerance table of the suite. fp32 / fp16 / bf16: the
#: bound is the eager error plus this, so it only needs to absorb a different but equally good order of sums.
#: bf16's rtol is about one bf16 ulp of the largest value (2**-8 = 3.9e-3); fp16 has three more mantissa bits
#: but a narrower range and the same fp32 accumulation, so it gets bf16's. float64: the fused and the eager
#: float64 paths both are float64 sums, apart only by rounding.
TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-6, 4e-3),
    torch.float16: (1e-6, 4e-3),
    torch.float64: (1e-12, 1e-10),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tol(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for results computed from inputs of ``dtype``."""
    return TOL[dtype]


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_no_worse_than_eager(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, *,
                               dtype: torch.dtype | None = None, atol: float | None = None,
                               rtol: float | None = None, what: str = "") -> None:
    """|fused - ref64| <= |eager - ref64| + atol + rtol * max|ref64| (max over elements).

    ``dtype`` (the inputs' dtype) takes (atol, rtol) from ``TOL``; explicit ``atol`` / ``rtol`` are for the few
    checks that are tighter than the table (a regression's own bound, one path against another)."""
    if dtype is not None:
        t_atol, t_rtol = TOL[dtype]
        atol = t_atol if atol is None else atol
        rtol = t_rtol if rtol is None else rtol
    assert atol is not None and rtol is not None, "give the inputs' dtype (TOL) or atol and rtol"
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert ref64.dtype == torch.float64, f"{what}: the reference must be float64, got {ref64.dtype}"
    assert torch.isfinite(fused).all(), f"{what}: non-finite values"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err_fused, err_eager = max_err(fused, ref64), max_err(eager, ref64)
    bound = err_eager + atol + rtol * scale
    assert err_fused <= bound, f"{what}: fused error {err_fused:.3e} > eager error {err_eager:.3e} + tol ({bound:.3e})"


# ------------------------------------------------------------------------------------------------ problems


@dataclass
class Problem:
    hidden: torch.Tensor  # [B, T, D] (or [N, D] after .flat() / .packed())
    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None  # [V]
    labels: torch.Tensor  # [B, T] int64, IGN at ignored tokens
    rewards: torch.Tensor  # [P, G+1] float32 (float64 for float64 problems)
    coef: torch.Tensor  # [B, T] float32 per-token coefficients, 123.0 at ignored tokens (must not be read)
    prompts: int
    group: int
    cu_seqlens: torch.Tensor | None = None  # packed form only: [B + 1]
    row_index: torch.Tensor | None = None  # packed form only: [N]

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def tensors(self):
        """(hidden, weight, bias, labels, rewards): the order of the fused ops' arguments."""
        return self.hidden, self.weight, self.bias, self.labels, self.rewards

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Problem:
        """The same values in ``dtype`` on ``device`` (rewards / coef float64 only for float64)."""
        float_ = (lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype))  # noqa: E731
        side = torch.float64 if dtype == torch.float64 else (None if dtype is None else torch.float32)
        other = (lambda t: None if t is None else t.to(device=device, dtype=side or t.dtype))  # noqa: E731
        move = (lambda t: None if t is None else t.to(device=device))  # noqa: E731
        return replace(self, hidden=float_(self.hidden), weight=float_(self.weight), bias=float_(self.bias),
                       labels=move(self.labels), rewards=other(self.rewards), coef=other(self.coef),
                       cu_seqlens=move(self.cu_seqlens), row_index=move(self.row_index))

    def float64(self) -> Problem:
        """The problem as the float64 reference sees it: the dtype-rounded values, exactly, in float64."""
        return self.to(torch.float64)

    def flat(self) -> Problem:
        """hidden [N, D], labels / coef [N]: every token, ignored ones included."""
        d = self.hidden.shape[-1]
        return replace(self, hidden=self.hidden.reshape(-1, d), labels=self.labels.reshape(-1),
                       coef=self.coef.reshape(-1))

    def packed(self) -> Problem:
        """Token-packed: the kept tokens only, row by row, with cu_seqlens [B + 1] and row_index [N]."""
        keep = self.labels != IGN
        counts = keep.sum(-1)
        cu = torch.zeros(self.labels.shape[0] + 1, dtype=torch.int64, device=self.labels.device)
        cu[1:] = counts.cumsum(0)
        rows = torch.repeat_interleave(torch.arange(self.labels.shape[0], device=self.labels.device), counts)
        return replace(self, hidden=self.hidden[keep], labels=self.labels[keep], coef=self.coef[keep],
                       cu_seqlens=cu, row_index=rows)


def make_problem(prompts: int, group: int, seq_len: int, dim: int, vocab: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0, ignore_frac: float = 0.3, bias: bool = False,
                 scale: float = 1.0, weight_scale: float | None = None, bias_scale: float = 1.0, prompt_len: int = 0,
                 empty_rows: tuple[int, ...] = (), lengths: list[int] | None = None, answer_token: bool = True,
                 rewards: str | torch.Tensor = "normal") -> Problem:
    """One GRAO problem; see the module docstring.

    hidden ~ N(0, scale^2), weight ~ N(0, weight_scale^2) (default 1/sqrt(dim): logits ~ N(0, scale^2)), bias ~
    N(0, bias_scale^2). labels uniform in [0, vocab) with a fraction ``ignore_frac`` ignored, then the first
    ``prompt_len`` positions of every row, and the rows ``empty_rows`` entirely; ``lengths`` (one per row) instead
    gives row r a prompt position then ``lengths[r]`` completion tokens (seq_len = max(lengths) + 2). With
    ``answer_token`` the reference row of each group keeps its last token (the reference answer is never empty).
    rewards: "normal" N(0, 1), "ternary" {-1, 0, 1} with R(y, y) = 0, "int" {0, 1, 2}, or a tensor [P, G+1].
    """
    gen = torch.Generator().manual_seed(seed)
    rows = prompts * (group + 1)
    if lengths is not None:
        assert len(lengths) == rows, (len(lengths), rows)
        seq_len = max(lengths) + 2
    f64 = dict(generator=gen, dtype=torch.float64)
    hidden = torch.randn(rows, seq_len, dim, **f64) * scale
    weight = torch.randn(vocab, dim, **f64) * (dim ** -0.5 if weight_scale is None else weight_scale)
    b = torch.randn(vocab, **f64) * bias_scale if bias else None
    labels = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    if lengths is not None:
        pos = torch.arange(seq_len)
        keep = (pos >= 1) & (pos < 1 + torch.tensor(lengths).unsqueeze(1))
        labels[~keep] = IGN
    else:
        labels[torch.rand(rows, seq_len, generator=gen) < ignore_frac] = IGN
        labels[:, :prompt_len] = IGN
        if answer_token and seq_len > prompt_len:
            labels[group::group + 1, -1] = torch.randint(0, vocab, (prompts,), generator=gen)
    for r in empty_rows:
        labels[r] = IGN
    if isinstance(rewards, torch.Tensor):
        r = rewards.double()
    elif rewards == "normal":
        r = torch.randn(prompts, group + 1, **f64)
    elif rewards == "ternary":
        r = torch.randint(-1, 2, (prompts, group + 1), generator=gen).double()
        r[:, -1] = 0.0
    elif rewards == "int":
        r = torch.randint(0, 3, (prompts, group + 1), generator=gen).double()
    else:
        raise ValueError(f"rewards: {rewards!r}")
    coef = torch.randn(rows, seq_len, **f64)
    coef[labels == IGN] = 123.0
    base = Problem(hidden, weight, b, labels, r, coef, prompts, group)
    return base.to(dtype, device)


def grad_weights(shape, *, seed: int = 1, zero_every: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The incoming gradient of the log-probs for a backward check: N(0, 1), every ``zero_every``-th one 0."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if zero_every:
        g.view(-1)[::zero_every] = 0.0
    return g.to(dtype)


# ------------------------------------------------------------------------------------------------ the judge


def reference_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) in the reference's compute dtype, 0 at ignored tokens (the spec's definition)."""
    z = logits.to(reference.compute_dtype(logits.dtype))
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1) * (labels != IGN)


def reference_logprob(hidden, weight, labels, bias=None, *, temperature: float = 1.0, grad_logp=None,
                      return_entropy: bool = False, dtype: torch.dtype = torch.float64) -> SimpleNamespace:
    """``grao_kernels.reference`` on the inputs cast to ``dtype`` (float64: the judge; the inputs' own dtype: the
    eager path): logp (and entropy) and, with ``grad_logp``, the autograd gradients of ``sum(grad_logp * logp)``,
    named as the fast paths' results are (logp, entropy, grad_hidden, grad_weight, grad_bias)."""
    ins = [None if t is None else t.detach().to(dtype).requires_grad_(grad_logp is not None)
           for t in (hidden, weight, bias)]
    with torch.enable_grad():
        logits = reference.linear_logits(ins[0], ins[1], ins[2], temperature)
        logp = reference.token_logprobs(logits, labels, ignore_index=IGN)
        entropy = reference_entropy(logits.detach(), labels) if return_entropy else None
        grads = [None, None, None]
        if grad_logp is not None:
            leaves = [t for t in ins if t is not None]
            got = iter(torch.autograd.grad((logp * grad_logp.to(logp.dtype)).sum(), leaves))
            grads = [None if t is None else next(got) for t in ins]
    return SimpleNamespace(logp=logp.detach(), entropy=entropy, grad_hidden=grads[0], grad_weight=grads[1],
                           grad_bias=grads[2])


__all__ = ["IGN", "TOL", "DTYPES", "tol", "max_err", "assert_no_worse_than_eager", "Problem", "make_problem",
           "grad_weights", "reference_entropy", "reference_logprob"]
