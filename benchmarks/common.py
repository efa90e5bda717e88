"""Shared pieces of the benchmarks: problem shapes, inputs, timing and memory of one measurement.

The implementations themselves (``IMPLEMENTATIONS``) are in ``benchmarks/implementations.py``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks.implementations import IMPLEMENTATIONS, Unavailable, package_version

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


def start_peak(device: torch.device) -> int:
    """Start measuring a peak above what is held now, and return that baseline in bytes: on CUDA the
    allocator's peak is reset (after a synchronize), on CPU the kernel's peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    before = current_rss()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS counter (/proc/self/clear_refs)")
    return before


def peak_since_start(device: torch.device) -> int:
    """The peak in bytes since :func:`start_peak` (CUDA: max_memory_allocated; CPU: peak RSS)."""
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()


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


def prepare_native_cpu() -> None:
    """Build (or load) the native CPU kernel in this process before any worker needs it: a first build (about
    45 s, one stderr line, grao_kernels.cpu.native) then happens once, visibly, and not inside a measured worker
    whose output is captured. Nothing happens with GRAO_KERNELS_CPU=chunked."""
    from grao_kernels.cpu import native
    from grao_kernels.options import process_defaults

    try:
        if process_defaults().cpu != "chunked":
            native.load_native()
    except Exception as exc:  # noqa: BLE001 - GRAO_KERNELS_CPU=native without a kernel: the workers record it
        print(f"# native CPU kernel: {type(exc).__name__}: {exc}", file=sys.stderr)


# ------------------------------------------------------------------------------------ environment

def paired_floor(impl_name: str, p: Point, flops: float, *, pairs: int = 7, seed: int = 0) -> dict:
    """Time over the matmul floor on CPU, measured in pairs so that a drifting machine speed cancels.

    Each pair times one forward + backward of ``impl_name`` at ``p``, then ``flops`` worth of
    [1024 x D] x [D x V] products in the point's dtype (the floor's time at this moment); the result is the
    median of the per-pair ratios, with the medians of both times. Run it after the memory measurement
    (its buffers would count in the peak)."""
    dev = torch.device("cpu")
    loss_fn = IMPLEMENTATIONS[impl_name].load(dev)
    inputs = make_inputs(p, dev, seed=seed)
    dt = DTYPES[p.dtype]
    a, b = torch.randn(1024, p.D).to(dt), torch.randn(p.V, p.D).to(dt)
    out = torch.mm(a, b.t())
    per_mm = 2.0 * 1024 * p.D * p.V
    calls = max(1, round(flops / per_mm))
    step(loss_fn, inputs)
    ratios, t_impl, t_floor = [], [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        step(loss_fn, inputs)
        t1 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b.t(), out=out)
        t2 = time.perf_counter()
        floor = (t2 - t1) * flops / (calls * per_mm)
        ratios.append((t1 - t0) / floor)
        t_impl.append(1e3 * (t1 - t0))
        t_floor.append(1e3 * floor)
    return {"time_vs_floor": statistics.median(ratios), "time_ms": statistics.median(t_impl),
            "floor_ms": statistics.median(t_floor), "pairs": pairs}


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
