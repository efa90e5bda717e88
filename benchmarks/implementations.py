"""The implementations the benchmarks compare, each wrapped as one uniform callable

    loss_fn(hidden [B, T, D], weight [V, D], labels [B, T] int64, rewards [P, G+1] fp32, bias [V] | None)
        -> scalar loss, on which ``loss.backward()`` is called

so the harness (``benchmarks.common.measure``) times and measures forward + backward the same way for all.

Implementations (``IMPLEMENTATIONS``):
- ``eager``: ``grao.linear_grao_loss`` (materialises the [N, V] logits; the judge).
- ``fused``: ``grao_kernels.fused_linear_grao_loss`` (Triton on CUDA, the native C++ kernel on CPU);
  ``fused_chunked`` / ``logprob_chunked``: the same ops on the chunked PyTorch CPU path (GRAO_KERNELS_CPU=chunked).
- ``liger_grpo``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked PyTorch, github.com/linkedin/Liger-Kernel).
  It computes GRPO, not GRAO. It is fed the GRPO problem of the same N, D, V, on-policy, no KL,
  ``loss_type="grpo"``, with one advantage per row chosen so that its gradient equals GRAO's
  (``benchmarks/test_bench_loss.py`` checks this), i.e. the same work a GRAO step needs.
- ``cce``: Apple's Cut Cross-Entropy (github.com/apple/ml-cross-entropy):
  ``linear_cross_entropy(hidden, weight, labels, reduction="none")`` gives the per-token NLL,
  ``grao.grao_loss`` turns those per-token log-probs into the GRAO loss (per-token weights).
  Its kernels are Triton-on-CUDA only; it has no bias argument; its default gradient filtering
  (``filter_eps="high"``) is kept, as a user would run it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import torch


@dataclass
class Impl:
    """An implementation: ``factory(device)`` returns the uniform loss callable or raises
    :class:`Unavailable` with the reason (missing package, unsupported device)."""

    name: str
    computes: str  # what it computes, for the table
    factory: Callable[[torch.device], Callable]
    packages: tuple = ()  # distribution names whose versions are recorded
    note: str = ""
    op: str = "grao"  # "grao": a GRAO loss (floor 6NDV) | "logprob": through linear_logprob (floor 8NDV)
    _cache: dict = field(default_factory=dict, repr=False)

    def load(self, device: str | torch.device) -> Callable:
        device = torch.device(device)
        if device.type not in self._cache:
            try:
                self._cache[device.type] = self.factory(device)
            except Unavailable as exc:
                self._cache[device.type] = exc
            except Exception as exc:  # noqa: BLE001 - a failing import inside a peer is "unavailable" too
                self._cache[device.type] = Unavailable(f"{type(exc).__name__}: {exc}")
        got = self._cache[device.type]
        if isinstance(got, Unavailable):
            raise got
        return got

    def available(self, device: str | torch.device) -> tuple[bool, str]:
        try:
            self.load(device)
            return True, ""
        except Unavailable as exc:
            return False, str(exc)

    def versions(self) -> dict:
        return {pkg: package_version(pkg) for pkg in self.packages}


class Unavailable(RuntimeError):
    """The implementation cannot run here; the message says why (printed as the skip line)."""


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _eager(device):
    import grao

    def loss_fn(hidden, weight, labels, rewards, bias=None):
        return grao.linear_grao_loss(hidden, weight, labels, rewards, bias=bias)[0]

    return loss_fn


def _fused(device):
    try:
        from grao_kernels import fused_linear_grao_loss
    except ImportError as exc:
        raise Unavailable(f"grao_kernels.fused_linear_grao_loss is not importable ({exc})") from exc

    def loss_fn(hidden, weight, labels, rewards, bias=None):
        return fused_linear_grao_loss(hidden, weight, labels, rewards, bias=bias)[0]

    return loss_fn


@contextlib.contextmanager
def env_override(var: str, value: str):
    """Environment variable ``var`` set to ``value`` for the duration, restored (or removed) after."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


def cuda_design(design: str):
    """GRAO_KERNELS_CUDA_DESIGN for the duration (the Triton backend's design: "tiles" or "gemm")."""
    from grao_kernels._backend import CUDA_DESIGN_ENV
    return env_override(CUDA_DESIGN_ENV, design)


def cpu_path(path: str):
    """GRAO_KERNELS_CPU for the duration: "native" (csrc/grao_cpu.cpp) or "chunked" (the PyTorch chunked path)."""
    from grao_kernels.cpu_native import CPU_PATH_ENV
    return env_override(CPU_PATH_ENV, path)


def _cpu_chunked(op: str):
    def factory(device):
        if device.type != "cpu":
            raise Unavailable("the chunked PyTorch path row is a CPU comparison (GRAO_KERNELS_CPU=chunked)")
        inner = _fused(device) if op == "grao" else _logprob(None)(device)

        def loss_fn(hidden, weight, labels, rewards, bias=None):
            with cpu_path("chunked"):  # linear_logprob's backward runs the backend chosen in its forward
                return inner(hidden, weight, labels, rewards, bias)

        return loss_fn

    return factory


def _fused_gemm(device):
    if device.type != "cuda":
        raise Unavailable("the GEMM-chunk design is a CUDA path (cuBLAS GEMMs + a Triton row kernel)")
    from grao_kernels import fused_linear_grao_loss

    def loss_fn(hidden, weight, labels, rewards, bias=None):
        with cuda_design("gemm"):  # the fused GRAO loss computes its gradients in this call
            return fused_linear_grao_loss(hidden, weight, labels, rewards, bias=bias)[0]

    return loss_fn


def _logprob(design: str | None):
    def factory(device):
        if design is not None and device.type != "cuda":
            raise Unavailable(f"linear_logprob's '{design}' design is a CUDA path")
        from grao_kernels import linear_logprob
        from grao_kernels.reference import grao_loss

        def loss_fn(hidden, weight, labels, rewards, bias=None):
            # the design is fixed when linear_logprob is called; its backward runs the same one
            with cuda_design(design) if design else contextlib.nullcontext():
                logp = linear_logprob(hidden, weight, labels, bias=bias)
            return grao_loss(logp, labels, rewards)[0]

        return loss_fn

    return factory


def grao_equivalent_advantages(labels: torch.Tensor, rewards: torch.Tensor, *, beta: float = 0.5, lam: float = 0.6,
                               eps: float = 1e-6, ignore_index: int = -100) -> torch.Tensor:
    """Per-row advantages [B] that make an on-policy, KL-free, ``loss_type="grpo"`` GRPO loss have
    exactly the GRAO gradient with respect to every token log-prob.

    GRPO ("grpo" reduction, ratio = 1 on-policy): dLoss/dlogp(s, t) = -A_s / (|s| * B).
    GRAO (spec): dLoss/dlogp(s, t) = grao_row_grad_s = -c_s / (|s| * P). So A_s = -grao_row_grad_s * |s| * B.
    The GRAO math is taken from ``grao_kernels.reference`` (not rewritten here).
    """
    from grao_kernels.reference import grao_row_grad, group_advantages

    counts = (labels != ignore_index).sum(-1)
    adv = group_advantages(rewards, eps=eps)
    row_grad = grao_row_grad(adv, counts, beta=beta, lam=lam)
    return -row_grad * counts.to(row_grad.dtype) * labels.shape[0]


def _liger(device):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel is not installed ({exc}); pip install --no-deps liger-kernel") from exc
    # compiled=False: Liger compiles only its small per-chunk loss math with torch.compile; leaving it
    # eager avoids compile time inside the measurement and a C++ toolchain dependency on CPU.
    module = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="grpo",
                                      epsilon_low=0.2, epsilon_high=0.2)

    def loss_fn(hidden, weight, labels, rewards, bias=None):
        mask = labels != -100
        ids = torch.where(mask, labels, torch.zeros_like(labels))
        adv = grao_equivalent_advantages(labels, rewards)
        loss, _metrics = module(hidden, weight, ids, mask.to(torch.float32), adv, bias)
        return loss

    return loss_fn


def _cce(device):
    if device.type != "cuda":
        raise Unavailable("Cut Cross-Entropy's kernels are Triton-on-CUDA only (its impl='torch_compile' "
                          "fallback materialises the full logits, so it is not CCE); needs a CUDA device")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"cut-cross-entropy is not installed ({exc}); pip install --no-deps cut-cross-entropy") from exc
    import grao

    def loss_fn(hidden, weight, labels, rewards, bias=None):
        if bias is not None:
            raise Unavailable("Cut Cross-Entropy has no bias argument")
        nll = linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="none")
        return grao.grao_loss(-nll.float(), labels, rewards)[0]

    return loss_fn


IMPLEMENTATIONS: dict[str, Impl] = {
    "eager": Impl("eager", "GRAO", _eager, ("grao-kernels",), "grao.linear_grao_loss: full [N, V] logits"),
    "fused": Impl("fused", "GRAO", _fused, ("grao-kernels",),
                  "grao_kernels.fused_linear_grao_loss: Triton on CUDA, native C++ kernel on CPU"),
    "liger_grpo": Impl("liger_grpo", "GRPO (GRAO-equal gradient)", _liger, ("liger-kernel",),
                       "Liger-Kernel LigerFusedLinearGRPOLoss, loss_type='grpo', beta=0, on-policy, compiled=False"),
    "cce": Impl("cce", "GRAO via CCE per-token NLL", _cce, ("cut-cross-entropy",),
                "cut_cross_entropy.linear_cross_entropy(reduction='none') + grao.grao_loss"),
    # CUDA design candidates (issue 14), measured side by side by benchmarks/gpu_check.py
    "fused_gemm": Impl("fused_gemm", "GRAO", _fused_gemm, ("grao-kernels",),
                       "fused_linear_grao_loss, GEMM-chunk design (GRAO_KERNELS_CUDA_DESIGN=gemm)"),
    "logprob": Impl("logprob", "GRAO via linear_logprob", _logprob(None), ("grao-kernels",),
                    "grao_kernels.linear_logprob (gradient in backward, recompute) + reference.grao_loss",
                    op="logprob"),
    # The CPU paths side by side (issue 11): "fused" / "logprob" take the native kernel on CPU, these the chunked one.
    "fused_chunked": Impl("fused_chunked", "GRAO", _cpu_chunked("grao"), ("grao-kernels",),
                          "fused_linear_grao_loss, chunked PyTorch path (GRAO_KERNELS_CPU=chunked)"),
    "logprob_chunked": Impl("logprob_chunked", "GRAO via linear_logprob", _cpu_chunked("logprob"), ("grao-kernels",),
                            "linear_logprob, chunked PyTorch path (GRAO_KERNELS_CPU=chunked) + reference.grao_loss",
                            op="logprob"),
    "logprob_gemm": Impl("logprob_gemm", "GRAO via linear_logprob", _logprob("gemm"), ("grao-kernels",),
                         "linear_logprob, GEMM-chunk design + reference.grao_loss", op="logprob"),
}
