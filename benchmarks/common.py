"""Shared pieces of the benchmarks: problem shapes, inputs, the implementations, timing and memory.

Every implementation is wrapped as one uniform callable

    loss_fn(hidden [B, T, D], weight [V, D], labels [B, T] int64, rewards [P, G+1] fp32, bias [V] | None)
        -> scalar loss, on which ``loss.backward()`` is called

so the harness times and measures forward + backward the same way for all of them.

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

import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 1024 ** 2


# --------------------------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Point:
    """One problem shape. B = P * (G + 1) rows of T tokens, N = B * T tokens; every token is a
    completion token (no ignored positions), so N is also the number of log-probs computed."""

    sweep: str  # which sweep it belongs to: "headline", "G", "T", "V", "D", "dtype", "budget"
    P: int  # prompts
    G: int  # sampled completions per prompt (plus one reference answer)
    T: int  # tokens per row
    D: int  # hidden size
    V: int  # vocabulary size
    dtype: str = "fp32"  # "fp32" | "bf16" | "fp16"
    model: str = ""  # real model config the (D, V) pair comes from, if any

    @property
    def B(self) -> int:
        return self.P * (self.G + 1)

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def flops(self) -> float:
        """8 N D V: logits forward (2NDV), logits recomputed in backward (2NDV), dhidden and dweight (2NDV each)."""
        return 8.0 * self.N * self.D * self.V

    def input_bytes(self) -> int:
        """hidden + weight (in dtype) + labels (int64) + rewards (fp32)."""
        esize = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return (self.N * self.D + self.V * self.D) * esize + self.N * 8 + self.P * (self.G + 1) * 4

    def grad_bytes(self) -> int:
        """dhidden + dweight in the inputs' dtype: the memory any implementation must add."""
        esize = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return (self.N * self.D + self.V * self.D) * esize

    def label(self) -> str:
        m = f" {self.model}" if self.model else ""
        return f"P={self.P} G={self.G} T={self.T} (N={self.N}) D={self.D} V={self.V} {self.dtype}{m}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(B=self.B, N=self.N)
        return d


def make_inputs(p: Point, device: str | torch.device, *, seed: int = 0, bias: bool = False) -> dict:
    """Random inputs of shape ``p`` on ``device``, generated in place (no large temporaries).

    hidden [B, T, D] ~ N(0, 1) and weight [V, D] ~ N(0, 1/D) in p.dtype (logits ~ N(0, 1)), both
    requiring grad; labels [B, T] int64 uniform in [0, V); rewards [P, G+1] fp32 in {-1, 0, 1} with
    R(o_1, y) = 1 and R(y, y) = 0 so no group is constant; bias [V] if asked.
    """
    device = torch.device(device)
    dtype = DTYPES[p.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(p.B, p.T, p.D, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(p.V, p.D, device=device, dtype=dtype, generator=gen).mul_(p.D ** -0.5)
    labels = torch.randint(0, p.V, (p.B, p.T), device=device, generator=gen)
    rewards = torch.randint(-1, 2, (p.P, p.G + 1), device=device, generator=gen).float()
    rewards[:, 0] = 1.0
    rewards[:, -1] = 0.0
    b = torch.randn(p.V, device=device, dtype=dtype, generator=gen).mul_(0.1) if bias else None
    for t in (hidden, weight, b):
        if t is not None:
            t.requires_grad_(True)
    return {"hidden": hidden, "weight": weight, "labels": labels, "rewards": rewards, "bias": b}


# ------------------------------------------------------------------------------------ implementations

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
def cuda_design(design: str):
    """GRAO_KERNELS_CUDA_DESIGN for the duration (the Triton backend's design: "tiles" or "gemm")."""
    from grao_kernels._backend import CUDA_DESIGN_ENV

    old = os.environ.get(CUDA_DESIGN_ENV)
    os.environ[CUDA_DESIGN_ENV] = design
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CUDA_DESIGN_ENV, None)
        else:
            os.environ[CUDA_DESIGN_ENV] = old


@contextlib.contextmanager
def cpu_path(path: str):
    """GRAO_KERNELS_CPU for the duration: "native" (csrc/grao_cpu.cpp) or "chunked" (the PyTorch chunked path)."""
    from grao_kernels.cpu_native import CPU_PATH_ENV

    old = os.environ.get(CPU_PATH_ENV)
    os.environ[CPU_PATH_ENV] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CPU_PATH_ENV, None)
        else:
            os.environ[CPU_PATH_ENV] = old


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


# ------------------------------------------------------------------------------------ measurement

def _clear_grads(inputs: dict) -> None:
    for k in ("hidden", "weight", "bias"):
        t = inputs.get(k)
        if t is not None:
            t.grad = None


def step(loss_fn: Callable, inputs: dict) -> float:
    """One forward + backward from fresh gradients (as after ``zero_grad(set_to_none=True)``)."""
    _clear_grads(inputs)
    loss = loss_fn(inputs["hidden"], inputs["weight"], inputs["labels"], inputs["rewards"], inputs["bias"])
    loss.backward()
    return float(loss.detach())


def _proc_status(key: str) -> int | None:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, VmSize), None where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process: ``echo 5 > /proc/self/clear_refs``."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss() -> int:
    rss = _proc_status("VmRSS")
    return rss if rss is not None else peak_rss()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "cannot allocate memory" in msg or "failed to allocate" in msg)


def measure(impl_name: str, p: Point, device: str, *, warmup: int = 1, repeats: int = 3, seed: int = 0,
            budget_bytes: int | None = None) -> dict:
    """Time and memory of forward + backward for one implementation at one point, in this process.

    Time: median over ``repeats`` runs after ``warmup`` runs (CPU: time.perf_counter; CUDA: CUDA events).
    Memory ("peak extra"): the peak above the memory held right after the inputs were built, over the
    warm-up and timed runs; it includes the gradients. CUDA: torch.cuda.max_memory_allocated after
    reset_peak_memory_stats minus memory_allocated. CPU: peak RSS (VmHWM, reset through
    /proc/self/clear_refs once the inputs exist) minus the RSS then; call this in a fresh process
    (``python -m benchmarks._worker``) so one implementation's allocator state cannot leak into another's.
    budget_bytes (CPU): address-space limit (RLIMIT_AS) of the size before the inputs plus the budget,
    so inputs + everything the step allocates must fit; an allocation past it is recorded as OOM.
    Returns a dict with status "ok" | "OOM" | "error" | "skipped" and the figures.
    """
    dev = torch.device(device)
    impl = IMPLEMENTATIONS[impl_name]
    out = {"impl": impl_name, "status": "ok", "time_ms": None, "times_ms": [], "peak_extra_bytes": None,
           "peak_total_bytes": None, "inputs_bytes": p.input_bytes(), "grad_bytes": p.grad_bytes(), "reason": ""}
    try:
        loss_fn = impl.load(dev)
    except Unavailable as exc:
        out.update(status="skipped", reason=str(exc))
        return out
    cuda = dev.type == "cuda"
    inputs = None
    try:
        # A tiny call first, so lazy imports and one-time set-up are neither timed nor counted as memory.
        step(loss_fn, make_inputs(Point("warm", 1, 1, 4, 8, 16, p.dtype), dev, seed=seed))
        if budget_bytes is not None and not cuda:
            import resource

            vm = _proc_status("VmSize")
            if vm is None:
                raise Unavailable("no /proc/self/status: cannot apply an address-space budget")
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (vm + budget_bytes, hard))
        inputs = make_inputs(p, dev, seed=seed)
        gc.collect()
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            base = current_rss()
            out["peak_reset"] = reset_peak_rss()
        times = []
        for i in range(warmup + repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out["loss"] = step(loss_fn, inputs)  # float() synchronises
                end.record()
                torch.cuda.synchronize(dev)
                elapsed = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                out["loss"] = step(loss_fn, inputs)
                elapsed = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(elapsed)
        if cuda:
            peak = torch.cuda.max_memory_allocated(dev) - base
            out["peak_total_bytes"] = torch.cuda.max_memory_allocated(dev)
        else:
            peak = peak_rss() - base
            out["peak_total_bytes"] = peak + out["inputs_bytes"]
        out.update(time_ms=statistics.median(times) if times else None, times_ms=times, peak_extra_bytes=peak)
    except Unavailable as exc:
        out.update(status="skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never dropped
        if is_oom(exc):
            out.update(status="OOM", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        else:
            out.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        del inputs
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------ environment

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: str) -> str | None:
    """The checked-out commit, read from .git files (no git command is run)."""
    def read(*parts: str) -> str:
        with open(os.path.join(root, ".git", *parts)) as fh:
            return fh.read()

    try:
        head = read("HEAD").strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        if os.path.exists(os.path.join(root, ".git", ref)):
            return read(ref).strip()
        for line in read("packed-refs").splitlines():
            if line.strip().endswith(ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def environment(device: str, command: str | None = None) -> dict:
    """Everything a reader needs to know where numbers came from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # noqa: UP017 - Python 3.10 has no datetime.UTC
        "command": command if command is not None else " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device,
        "device_name": cpu_model() if device == "cpu" else torch.cuda.get_device_name(0),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "grao_kernels_commit": git_commit(root),
        "peers": {name: package_version(name) for name in ("liger-kernel", "cut-cross-entropy")},
        "platform": platform.platform(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        try:
            env["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return env


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if abs(n) >= 1024 ** 3:
        return f"{n / 1024 ** 3:.2f} GiB"
    return f"{n / MIB:.0f} MiB"
