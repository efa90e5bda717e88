"""The implementations the benchmarks compare, each wrapped as one uniform callable

    loss_fn(hidden [B, T, D], weight [V, D], labels [B, T] int64, rewards [P, G+1] fp32, bias [V] | None)
        -> scalar loss, on which ``loss.backward()`` is called

so the harness (``benchmarks.common.measure``) times and measures forward + backward the same way for all.

Implementations (``IMPLEMENTATIONS``):
- ``eager``: ``grao.linear_grao_loss`` (materialises the [N, V] logits; the judge).
- ``fused``: ``grao_kernels.fused_linear_grao_loss`` (backend "auto": triton-gemm on CUDA, the native C++ kernel
  on CPU); ``fused_gemm`` / ``fused_tiles`` and ``logprob_gemm`` / ``logprob_tiles``: the two CUDA designs by
  backend name; ``fused_chunked`` / ``logprob_chunked``: the same ops with backend="chunked" (CPU rows).
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


def _fused_on(backend: str):
    """The fused GRAO loss with an explicit ``backend``: "triton-gemm" / "triton-tiles" (the two CUDA designs,
    measured side by side by benchmarks/gpu_check.py) or "chunked" (a CPU comparison row)."""
    def factory(device):
        if backend.startswith("triton") and device.type != "cuda":
            raise Unavailable(f"backend={backend!r} is a CUDA design")
        if backend == "chunked" and device.type != "cpu":
            raise Unavailable("the chunked PyTorch path row is a CPU comparison (backend='chunked')")
        from grao_kernels import fused_linear_grao_loss

        def loss_fn(hidden, weight, labels, rewards, bias=None):
            # the fused GRAO loss computes its gradients in this call
            return fused_linear_grao_loss(hidden, weight, labels, rewards, bias=bias, backend=backend)[0]

        return loss_fn

    return factory


def _logprob(backend: str = "auto"):
    """linear_logprob (its backward runs the backend its forward resolved) + reference.grao_loss."""
    def factory(device):
        if backend.startswith("triton") and device.type != "cuda":
            raise Unavailable(f"linear_logprob's backend={backend!r} is a CUDA design")
        if backend == "chunked" and device.type != "cpu":
            raise Unavailable("the chunked PyTorch path row is a CPU comparison (backend='chunked')")
        from grao_kernels import linear_logprob
        from grao_kernels.reference import grao_loss

        def loss_fn(hidden, weight, labels, rewards, bias=None):
            logp = linear_logprob(hidden, weight, labels, bias=bias, backend=backend)
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
                  "grao_kernels.fused_linear_grao_loss: triton-gemm on CUDA, native C++ kernel on CPU"),
    "liger_grpo": Impl("liger_grpo", "GRPO (GRAO-equal gradient)", _liger, ("liger-kernel",),
                       "Liger-Kernel LigerFusedLinearGRPOLoss, loss_type='grpo', beta=0, on-policy, compiled=False"),
    "cce": Impl("cce", "GRAO via CCE per-token NLL", _cce, ("cut-cross-entropy",),
                "cut_cross_entropy.linear_cross_entropy(reduction='none') + grao.grao_loss"),
    # The two CUDA designs by backend name (issue 14), measured side by side by benchmarks/gpu_check.py
    "fused_gemm": Impl("fused_gemm", "GRAO", _fused_on("triton-gemm"), ("grao-kernels",),
                       "fused_linear_grao_loss, backend='triton-gemm' (cuBLAS GEMM chunks + a Triton row kernel)"),
    "fused_tiles": Impl("fused_tiles", "GRAO", _fused_on("triton-tiles"), ("grao-kernels",),
                        "fused_linear_grao_loss, backend='triton-tiles' (Triton tile kernels)"),
    "logprob": Impl("logprob", "GRAO via linear_logprob", _logprob(), ("grao-kernels",),
                    "grao_kernels.linear_logprob (gradient in backward, recompute) + reference.grao_loss",
                    op="logprob"),
    # The CPU paths side by side (issue 11): "fused" / "logprob" take the native kernel on CPU, these the chunked one.
    "fused_chunked": Impl("fused_chunked", "GRAO", _fused_on("chunked"), ("grao-kernels",),
                          "fused_linear_grao_loss, chunked PyTorch path (backend='chunked')"),
    "logprob_chunked": Impl("logprob_chunked", "GRAO via linear_logprob", _logprob("chunked"), ("grao-kernels",),
                            "linear_logprob, chunked PyTorch path (backend='chunked') + reference.grao_loss",
                            op="logprob"),
    "logprob_gemm": Impl("logprob_gemm", "GRAO via linear_logprob", _logprob("triton-gemm"), ("grao-kernels",),
                         "linear_logprob, backend='triton-gemm' + reference.grao_loss", op="logprob"),
    "logprob_tiles": Impl("logprob_tiles", "GRAO via linear_logprob", _logprob("triton-tiles"), ("grao-kernels",),
                          "linear_logprob, backend='triton-tiles' + reference.grao_loss", op="logprob"),
}
