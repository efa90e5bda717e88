"""The one prepared GPU call: CUDA tests, then fused vs eager vs peers on the headline shapes.

    python benchmarks/gpu_check.py            # writes gpu_check.json / gpu_check.md to $OUT
                                              # (or runs/bench/gpu/ when OUT is not set)
    python benchmarks/gpu_check.py --cpu-smoke   # the script's code path on CPU -> runs/gpu_check_smoke/

Budgeted to finish in under 8 minutes on one H100/H200:
1. ``pytest -m "not slow" tests/`` (the CUDA-marked tests run on the device; ~3 min cap);
2. a bf16 matmul to measure the card's dense throughput (the FLOP floor's denominator);
3. forward + backward time and peak memory, each implementation in turn (``--impls``): eager, the
   fused GRAO loss in both CUDA designs by backend name (``fused_gemm`` = backend "triton-gemm", the default
   of "auto": GEMM chunks + a Triton row kernel; ``fused_tiles`` = "triton-tiles", the tile kernels),
   ``linear_logprob`` in both designs (``logprob_gemm``, ``logprob_tiles``), and the
   peers Cut Cross-Entropy and Liger-Kernel, on:
   - the issue's headline: bf16, N = 16384 (P=1, G=7, T=2048), D = 4096, V = 151936 (Qwen3-8B head);
   - the published peers' shape: bf16, N = 4096, D = 4096, V = 128256;
   - a small-D head: bf16, N = 16384, D = 896, V = 151936 (Qwen2.5-0.5B);
   - fp16 at the headline shape, and a long batch N = 65536 (eager is expected to OOM: recorded);
   For each: time / FLOP floor (6 N D V for a GRAO loss, whose per-token gradient is known before the
   forward; 8 N D V through linear_logprob) over the measured matmul rate, and peak memory
   (torch.cuda.max_memory_allocated, inputs included) against hidden + weight + their gradients
   (the issue's target: <= 1.1x, an fp32 weight-gradient buffer allowed). ``summary.json`` holds one row
   per implementation and shape in the issue's form.
4. with the time left, one GRAO update step with the shared-prompt packed layout against unshared padded
   rows (``benchmarks/prefix_sharing.py --device cuda``, issue 15), written to ``$OUT/prefix/``;
5. with the time left, shared-prompt sampling against ``generate`` (``benchmarks/rollout.py --device cuda``,
   issue 21), written to ``$OUT/rollout/``.
Every stage is guarded by the time limit and by try/except: the result files are always written.

Peers on a machine without network: put wheels in .benchmarks/wheels/ first
(``pip download --no-deps -d .benchmarks/wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1``)
and carry that folder; they are installed with ``pip install --no-deps --no-index`` when missing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def install_local_peers(log: list) -> None:
    """pip install --no-deps from .benchmarks/wheels the peers that are missing (no network needed)."""
    from benchmarks.implementations import package_version

    wheels = os.path.join(ROOT, ".benchmarks", "wheels")
    for dist, prefix in (("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy")):
        if package_version(dist):
            continue
        found = sorted(glob.glob(os.path.join(wheels, prefix + "-*.whl")))
        if not found:
            log.append(f"{dist}: not installed, no wheel in .benchmarks/wheels")
            continue
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", found[-1]],
                              capture_output=True, text=True, timeout=120, check=False)
        log.append(f"{dist}: pip install {os.path.basename(found[-1])} -> exit {proc.returncode}")


def run_tests(timeout: float, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "not slow", "tests/", "-q", "-rfEs", "-p", "no:cacheprovider"] + extra
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
        out = proc.stdout + proc.stderr
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        summary = lines[-1] if lines else ""
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        return {"command": " ".join(cmd[2:]), "exit_code": proc.returncode, "summary": summary,
                "failures": failed[:30], "seconds": round(time.perf_counter() - t0, 1), "tail": "\n".join(lines[-40:])}
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"command": " ".join(cmd[2:]), "exit_code": None, "summary": f"timeout after {timeout:.0f} s",
                "failures": [], "seconds": round(time.perf_counter() - t0, 1), "tail": out[-3000:]}


def matmul_tflops(dtype_name: str = "bf16", n: int = 8192, reps: int = 20, device: str = "cuda") -> float:
    """Dense matmul throughput of this card in TFLOP/s (median of ``reps`` n x n x n products)."""
    import torch

    from benchmarks.common import DTYPES

    dtype = DTYPES[dtype_name]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            a @ b
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2.0 * n ** 3 / (times[len(times) // 2] * 1e-3) / 1e12


ALL_IMPLS = "eager,fused_gemm,fused_tiles,logprob_gemm,logprob_tiles,cce,liger_grpo"
#: --cpu-smoke: the CUDA designs do not run on CPU; "fused" / "logprob" (backend "auto") take the same code path
SMOKE_IMPLS = "eager,fused,logprob,cce,liger_grpo"
FUSED_ONLY = ("fused", "fused_gemm", "fused_tiles", "logprob", "logprob_gemm", "logprob_tiles")


def points(smoke: bool = False):
    """(point, implementations to run there or None for all)."""
    from benchmarks.common import Point

    if smoke:  # --cpu-smoke: the same code path on tiny CPU shapes, to check the script itself
        return [(Point("headline", 1, 7, 16, 64, 1000, "bf16"), None), (Point("long", 1, 7, 64, 64, 1000, "bf16"), None)]
    return [
        (Point("headline", 1, 7, 2048, 4096, 151936, "bf16", "Qwen3-8B"), None),
        # the published peers' shape (QuACK / Liger on an H200: M=4096, H=4096, V=128256)
        (Point("peers", 1, 7, 512, 4096, 128256, "bf16", "Llama-3-8B"), None),
        (Point("small-D", 1, 7, 2048, 896, 151936, "bf16", "Qwen2.5-0.5B"), None),
        (Point("fp16", 1, 7, 2048, 4096, 151936, "fp16", "Qwen3-8B"), ("eager",) + FUSED_ONLY),
        (Point("long", 1, 7, 8192, 4096, 151936, "bf16", "Qwen3-8B"), ("eager",) + FUSED_ONLY),
    ]


def floor_flops(impl: str, p) -> float:
    """The FLOP floor of the op a row measures: 6NDV for a GRAO loss (its per-token gradient is known before
    the forward), 8NDV through linear_logprob (forward, recompute, dh, dW)."""
    from benchmarks.implementations import IMPLEMENTATIONS

    return (8.0 if IMPLEMENTATIONS[impl].op == "logprob" else 6.0) * p.N * p.D * p.V


def summary(report: dict) -> dict:
    """summary.json: one row per implementation and shape (the issue's form)."""
    from benchmarks.implementations import IMPLEMENTATIONS

    env = report.get("env", {})
    tflops = report.get("matmul_tflops_bf16")
    out = {"device": env.get("device_name"), "torch": env.get("torch"), "triton": env.get("triton"),
           "date": env.get("date"), "matmul_tflops": tflops, "rows": []}
    for r in report.get("results", []):
        p, impl = r["point"], r["impl"]
        if r["status"] in ("skipped", "not run"):
            continue
        flops = (8.0 if IMPLEMENTATIONS[impl].op == "logprob" else 6.0) * p["N"] * p["D"] * p["V"]
        row = {"op": IMPLEMENTATIONS[impl].op, "impl": impl, "N": p["N"], "D": p["D"], "V": p["V"],
               "dtype": p["dtype"], "ms": r.get("time_ms") if r["status"] == "ok" else None,
               "peak_gib": (r["peak_total_bytes"] / 2 ** 30) if r.get("peak_total_bytes") else None,
               "floor_ms": flops / (tflops * 1e12) * 1e3 if tflops else None}
        if r["status"] != "ok":
            row["error"] = f"{r['status']}: {r.get('reason', '')}"[:300]
        out["rows"].append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="results folder (default: $OUT, else runs/bench/gpu; "
                                                "--cpu-smoke: runs/gpu_check_smoke; never the committed results "
                                                "unless named)")
    ap.add_argument("--time-limit", type=float, default=450.0, help="seconds after which no new stage starts")
    ap.add_argument("--tests-timeout", type=float, default=180.0)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments (space separated)")
    ap.add_argument("--impls", default=None, help=f"comma-separated (default {ALL_IMPLS}; --cpu-smoke: {SMOKE_IMPLS})")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the script's code path on CPU with tiny shapes and no tests (checks the script only)")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        args.skip_tests = True
    if args.impls is None:
        args.impls = SMOKE_IMPLS if args.cpu_smoke else ALL_IMPLS
    if args.out is None:
        args.out = (os.path.join(ROOT, "runs", "gpu_check_smoke") if args.cpu_smoke
                    else os.environ.get("OUT") or os.path.join(ROOT, "runs", "bench", "gpu"))
    os.makedirs(args.out, exist_ok=True)
    log: list[str] = []
    report: dict = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "log": log}

    def save():
        report["elapsed_s"] = round(elapsed(), 1)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        with open(os.path.join(args.out, "gpu_check.md"), "w") as fh:
            fh.write(to_markdown(report))
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary(report), fh, indent=1)

    try:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            print("gpu_check: no CUDA device here, nothing to check (use --cpu-smoke to test the script itself)")
            return 2
        install_local_peers(log)
        from benchmarks.common import environment
        from benchmarks.implementations import IMPLEMENTATIONS

        report["env"] = environment(device, report["command"])
        report["impls"] = {n: {"computes": IMPLEMENTATIONS[n].computes, "note": IMPLEMENTATIONS[n].note,
                               "versions": IMPLEMENTATIONS[n].versions()} for n in IMPLEMENTATIONS}
        save()
        if not args.skip_tests:
            print(f"[{elapsed():.0f}s] pytest -m 'not slow' tests/", flush=True)
            report["tests"] = run_tests(args.tests_timeout, args.pytest_args.split())
            print(report["tests"]["summary"], flush=True)
            save()
        print(f"[{elapsed():.0f}s] matmul throughput", flush=True)
        report["matmul_tflops_bf16"] = (matmul_tflops("bf16", n=256, reps=3, device="cpu") if args.cpu_smoke
                                        else matmul_tflops("bf16"))
        save()
        run_points(args, report, log, save, device)
        if elapsed() < args.time_limit:
            print(f"[{elapsed():.0f}s] prefix sharing: one update step, shared vs unshared", flush=True)
            report["prefix_sharing"] = run_prefix_sharing(args, device)
            save()
        if elapsed() < args.time_limit:
            print(f"[{elapsed():.0f}s] shared-prompt sampling against generate", flush=True)
            report["rollout"] = run_rollout(args, device)
            save()
    except Exception as exc:  # noqa: BLE001 - the report is written whatever happens
        log.append(f"aborted: {type(exc).__name__}: {exc}")
    save()
    print(to_markdown(report))
    return 0


def run_prefix_sharing(args, device: str) -> dict:
    """benchmarks/prefix_sharing.py on ``device`` in the time left (each point capped), results in OUT/prefix/;
    returns its status and targets (speed-up and memory ratio at Lp=4096, longest prompt within budget)."""
    out = os.path.join(args.out, "prefix")
    left = max(30.0, args.time_limit + 60.0 - elapsed())
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "prefix_sharing.py"), "--device", device, "--out", out,
           "--timeout", str(round(left / 3))]
    if device == "cpu":  # --cpu-smoke: tiny shapes, the code path only
        cmd += ["--prompt-lens", "16,32", "--groups", "2", "--g-prompt-len", "16", "--flat-groups", "2",
                "--flat-prompt-len", "16", "--vocab", "512", "--hidden", "32", "--intermediate", "64", "--layers", "2"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=left, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(left)}
    path = os.path.join(out, "summary.json")
    targets = None
    if res.returncode == 0 and os.path.exists(path):
        with open(path) as fh:
            targets = json.load(fh)["targets"]
    return {"status": "ok" if res.returncode == 0 else "failed", "targets": targets, "out": out,
            "stderr_tail": res.stderr[-1500:] if res.returncode else ""}


def run_rollout(args, device: str) -> dict:
    """benchmarks/rollout.py on ``device`` in the time left: shared-prompt sampling against ``generate`` (the
    headline point first, then the prompt and G sweeps), results in OUT/rollout/ (issue 21)."""
    out = os.path.join(args.out, "rollout")
    left = max(30.0, args.time_limit + 90.0 - elapsed())
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "rollout.py"), "--device", device, "--out", out,
           "--point-timeout", str(round(left / 4))]
    cmd += ["--quick"] if device == "cpu" else ["--sweep", "all"]  # --cpu-smoke: tiny shapes, the code path only
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=left, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(left), "out": out}
    return {"status": "ok" if res.returncode == 0 else "failed", "out": out,
            "stdout_tail": res.stdout[-1500:], "stderr_tail": res.stderr[-1500:] if res.returncode else ""}


def run_points(args, report, log, save, device: str = "cuda") -> None:
    import torch

    from benchmarks.common import measure
    from benchmarks.implementations import IMPLEMENTATIONS

    impls = [i for i in args.impls.split(",") if i]
    peak = report.get("matmul_tflops_bf16")
    rows = report.setdefault("results", [])
    for p, only in points(smoke=device == "cpu"):
        eager_res = None
        for impl in [i for i in impls if only is None or i in only]:
            if elapsed() > args.time_limit:
                rows.append({"impl": impl, "point": p.to_dict(), "status": "not run",
                             "reason": f"time limit {args.time_limit:.0f} s reached"})
                continue
            ok, why = IMPLEMENTATIONS[impl].available(device)
            print(f"[{elapsed():.0f}s] {impl} {p.label()}", flush=True)
            if not ok:
                rows.append({"impl": impl, "point": p.to_dict(), "status": "skipped", "reason": why})
                continue
            res = measure(impl, p, device, warmup=1, repeats=args.repeats)
            res["point"] = p.to_dict()
            floor_bytes = p.grad_bytes() * 2  # hidden + weight + their gradients, in the inputs' dtype
            if res["status"] == "ok":
                flops = floor_flops(impl, p)
                res["floor_flops"] = flops
                res["tflops_floor"] = flops / (res["time_ms"] * 1e-3) / 1e12
                if peak:
                    res["floor_ms_measured_peak"] = flops / (peak * 1e12) * 1e3
                    res["time_vs_floor"] = res["time_ms"] / res["floor_ms_measured_peak"]
                res["time_vs_floor_790"] = res["time_ms"] / (flops / 790e12 * 1e3)
                res["memory_floor_bytes"] = floor_bytes
                res["memory_vs_floor"] = res["peak_total_bytes"] / floor_bytes
                res["memory_vs_floor_fp32_dw"] = res["peak_total_bytes"] / (floor_bytes + p.V * p.D * 4)
                if impl == "eager":
                    eager_res = res
                    res["time_vs_eager"] = res["mem_vs_eager"] = 1.0
                elif eager_res is not None:
                    res["time_vs_eager"] = res["time_ms"] / eager_res["time_ms"]
                    res["mem_vs_eager"] = res["peak_extra_bytes"] / eager_res["peak_extra_bytes"]
            rows.append(res)
            print(f"    {res['status']} {res.get('time_ms')} ms peak total {res.get('peak_total_bytes')}", flush=True)
            save()
            if device == "cuda":
                torch.cuda.empty_cache()


def _gib(x):
    return "-" if x is None else f"{x / 1024 ** 3:.2f} GiB"


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def to_markdown(report: dict) -> str:
    env = report.get("env", {})
    lines = ["# GPU check: fused GRAO loss vs eager and peers", "",
             f"- date: {env.get('date')}", f"- command: `{report.get('command')}`",
             (f"- device: {env.get('device_name')} ({_gib(env.get('gpu_memory_bytes'))}), CUDA {env.get('cuda')}, "
             f"torch {env.get('torch')}, triton {env.get('triton')}, CPU {env.get('cpu_model')}"),
             f"- peers: {env.get('peers')}", f"- grao-kernels commit: {env.get('grao_kernels_commit')}",
             f"- elapsed: {report.get('elapsed_s')} s", ""]
    tests = report.get("tests")
    if tests:
        lines += ["## Tests", "", (f"`{tests['command']}` -> exit {tests['exit_code']}, {tests['summary']} "
                  f"({tests['seconds']} s)"), ""]
        lines += [f"- {f}" for f in tests.get("failures", [])]
        lines.append("")
    if report.get("matmul_tflops_bf16"):
        lines += [(f"Measured bf16 matmul throughput (8192^3): {report['matmul_tflops_bf16']:.0f} TFLOP/s; "
                  "FLOP floor = 6 N D V (GRAO loss) or 8 N D V (through linear_logprob) / that."), ""]
    if report.get("results"):
        lines += ["## Forward + backward", "",
                  ("| shape | impl | status | time (ms) | / eager | / FLOP floor | TFLOP/s (of floor) | peak total | "
                  "/ (h+w+grads) | peak extra | extra / eager |"),
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["results"]:
            p = r["point"]
            shape = f"N={p['N']} D={p['D']} V={p['V']} {p['dtype']} ({p['sweep']})"
            status = r["status"] if r["status"] == "ok" else f"**{r['status']}** {r.get('reason', '')[:80]}"
            lines.append(f"| {shape} | {r['impl']} | {status} | {_f(r.get('time_ms'), '{:.1f}')} | "
                         f"{_f(r.get('time_vs_eager'))} | {_f(r.get('time_vs_floor'))} | {_f(r.get('tflops_floor'), '{:.0f}')} | "
                         f"{_gib(r.get('peak_total_bytes'))} | {_f(r.get('memory_vs_floor'))} | "
                         f"{_gib(r.get('peak_extra_bytes'))} | {_f(r.get('mem_vs_eager'))} |")
        lines.append("")
    if report.get("log"):
        lines += ["## Log", ""] + [f"- {x}" for x in report["log"]] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
