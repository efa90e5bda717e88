"""The native CPU kernel against its targets (issue 11), every number from one run on this machine.

    python -m benchmarks.native_cpu            # ~45 min on 2 shared cores -> runs/bench/native_cpu/native.{json,md}
    python -m benchmarks.native_cpu --out benchmarks/results/cpu   # the committed results

At N=4096 (P=1, G=7, T=512), D=512, V=32000, fp32 and bf16, forward + backward of

* the fused GRAO loss (``fused``: native kernel, ``fused_chunked``: the chunked PyTorch path, ``eager``) and
* ``linear_logprob`` + ``reference.grao_loss`` (``logprob`` native, ``logprob_chunked``),

each in its own process (``benchmarks.compare.run_cpu_worker``: median of 3 after a warm-up, peak RSS), plus
the native rows at N = 1024 ... 8192 (fp32 and bf16) to show that the extra memory does not grow with N. Every token
is a completion token, as in ``benchmarks.compare``.

Reported per row: time; time / floor, where floor = FLOPs / this machine's matmul rate measured right before
and right after the row (the [4096 x 512] x [512 x 32000] product in the row's dtype, median of 5 each: the
faster of the two is used, i.e. the shorter floor, so load drift counts against the kernels); FLOPs =
6 N D V for the fused loss (logits, dhidden, dweight) and 8 N D V for linear_logprob (its backward recomputes the logits); extra
memory = peak RSS above the inputs minus their gradients (dhidden + dweight, which every implementation
returns), and that extra as a share of eager's. The 1-minute load average is recorded before and after.
"Paired time / floor" (``benchmarks.common.paired_floor``, in the same worker after the memory run) times the
kernel and the floor's FLOPs of matmul alternately, a second apart, and takes the median ratio: on a machine
whose speed drifts (this shared VM's does, by up to 2x between minutes) it is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch

from benchmarks.common import MIB, Point, environment, prepare_native_cpu
from benchmarks.compare import ROOT, run_cpu_worker

IMPLS = ("eager", "fused", "fused_chunked", "logprob", "logprob_chunked")
#: pairs per row of the paired time / floor (benchmarks.common.paired_floor): single pairs here ranged 0.7x-1.45x
#: of their median within a minute, so the median of 7 could move by a tenth
PAIRS = 15
FLOPS_PER_NDV = {"eager": 6, "fused": 6, "fused_chunked": 6, "logprob": 8, "logprob_chunked": 8}


def matmul_rate(dtype: str, n: int = 4096, d: int = 512, v: int = 32000, repeats: int = 5) -> float:
    """FLOP/s of one [n x d] x [d x v] torch.mm in ``dtype`` (median of ``repeats`` after a warm-up)."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, d).to(dt), torch.randn(v, d).to(dt)
    out = torch.mm(a, b.t())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b.t(), out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * n * d * v / statistics.median(times)


def load1() -> float:
    return os.getloadavg()[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.native_cpu", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "native_cpu"),
                    help="output folder (default runs/bench/native_cpu; the committed native.json / native.md "
                         "change only with --out benchmarks/results/cpu)")
    args = ap.parse_args(argv)
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    prepare_native_cpu()  # a first build of the kernel (~45 s) here, announced, not inside a measured worker
    env = environment("cpu", " ".join(["python -m benchmarks.native_cpu"] + [shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:])]))
    env["load1_start"] = load1()
    rates = {dt: [matmul_rate(dt)] for dt in ("fp32", "bf16")}
    print(f"# {env['date']} load {env['load1_start']:.2f}; matmul GFLOP/s "
          + ", ".join(f"{k} {v[0] / 1e9:.0f}" for k, v in rates.items()), flush=True)
    jobs = [(impl, Point("headline", 1, 7, 512, 512, 32000, dt)) for dt in ("fp32", "bf16") for impl in IMPLS]
    jobs += [(impl, Point("N", 1, 7, t, 512, 32000, dt)) for dt in ("fp32", "bf16") for impl in ("fused", "logprob")
             for t in (128, 256, 1024)]
    rows = []
    latest = {dt: v[0] for dt, v in rates.items()}  # the rate measured last, while nothing ran since, per dtype
    for impl, p in jobs:
        before = latest.pop(p.dtype, None) or matmul_rate(p.dtype)
        res = run_cpu_worker(impl, p, warmup=1, repeats=3, timeout=600,
                             paired_flops=FLOPS_PER_NDV[impl] * p.N * p.D * p.V, pairs=PAIRS)
        latest = {p.dtype: matmul_rate(p.dtype)}  # the next row of this dtype starts from it
        res.update(point=p.to_dict(), load1_after=load1(), matmul_rate_adjacent=[before, latest[p.dtype]])
        rows.append(res)
        print(f"  {impl:<16} {p.label():<40} {res['status']:<6} "
              f"{(res['time_ms'] or 0):8.0f} ms  peak extra {(res['peak_extra_bytes'] or 0) / MIB:7.0f} MiB",
              flush=True)
    for dt, measured in rates.items():
        measured.append(latest.get(dt) or matmul_rate(dt))
    env["load1_end"] = load1()
    eager = {(r["point"]["dtype"], r["point"]["N"]): r for r in rows if r["impl"] == "eager" and r["status"] == "ok"}
    for r in rows:
        p = r["point"]
        if r["status"] != "ok":
            continue
        # the matmul rate measured right before and right after this row (this machine's speed drifts from
        # minute to minute, so a rate from the start or end of the run can be far from the row's); the higher
        # one, the stricter floor
        rate = max(r["matmul_rate_adjacent"])
        floor_s = FLOPS_PER_NDV[r["impl"]] * p["N"] * p["D"] * p["V"] / rate
        r["floor_ms"] = 1e3 * floor_s
        r["time_vs_floor"] = r["time_ms"] / r["floor_ms"]
        r["paired_time_vs_floor"] = (r.get("paired") or {}).get("time_vs_floor")
        r["extra_bytes"] = r["peak_extra_bytes"] - r["grad_bytes"]  # the definition: gradients excluded
        e = eager.get((p["dtype"], p["N"]))
        if e is not None:
            r["time_vs_eager"] = r["time_ms"] / e["time_ms"]
            r["extra_vs_eager"] = r["extra_bytes"] / (e["peak_extra_bytes"] - e["grad_bytes"])
    with open(os.path.join(out_dir, "native.json"), "w") as fh:
        json.dump({"env": env, "matmul_flops_per_s": rates, "rows": rows}, fh, indent=1)
    with open(os.path.join(out_dir, "native.md"), "w") as fh:
        fh.write(markdown(env, rates, rows))
    print(markdown(env, rates, rows))
    return 0


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown(env: dict, rates: dict, rows: list[dict]) -> str:
    measured = (f"Measured {env['date']} on {env['cpu_model']} ({env['cpu_cores']} cores, {env['torch_threads']} "
                f"threads), torch {env['torch']}, commit {env.get('grao_kernels_commit')}; `{env['command']}`. "
                f"1-minute load average {env['load1_start']:.2f} at the start, {env['load1_end']:.2f} at the end "
                "(other processes shared the machine when it is above ~0.5). \"load after\" is read right after each row "
                "and includes this benchmark's own 2-thread workers.")
    matmul = ("Matmul rate of a [4096 x 512] x [512 x 32000] torch.mm in the row's dtype, measured in the parent "
              "process right before and right after each row (median of 5 each); a row's floor uses the higher of "
              "its two, the stricter floor (column \"matmul\"). At the start / end of the run: "
              + "; ".join(f"{dt} {r[0] / 1e9:.0f} / {r[1] / 1e9:.0f} GFLOP/s" for dt, r in rates.items()) + ".")
    method = ("Forward + backward; every token a completion token. Floor = FLOPs / matmul rate, FLOPs = 6 N D V "
              "(fused GRAO loss) or 8 N D V (linear_logprob, whose backward recomputes the logits; eager is charged "
              "6). Extra memory = peak RSS above the inputs minus dhidden + dweight.")
    paired = (f"\"Paired time / floor\" is measured in the worker after the memory run: {PAIRS} pairs, each one forward + "
              "backward, then the row's FLOPs of [1024 x D] x [D x V] products in the row's dtype; the median of the "
              "per-pair ratios. The machine's speed drifts on a scale of seconds to minutes (this VM shares its host), "
              "and a pair a second apart sees the same speed: this is the column to read for the time target.")
    header = ("| point | impl | time (ms) | matmul (GFLOP/s) | floor (ms) | time / floor | paired time / floor "
              "| time / eager | extra memory | extra / eager's | load after |")
    lines = ["# Native CPU kernel: time against the matmul floor, memory against eager", "", measured, "", matmul, "",
             method, "", paired, "", header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["point"]
        shape = f"N={p['N']} D={p['D']} V={p['V']} {p['dtype']}"
        if r["status"] != "ok":
            lines.append(f"| {shape} | {r['impl']} | **{r['status']}** {r.get('reason', '')} | | | | | | | | |")
            continue
        lines.append(f"| {shape} | {r['impl']} | {r['time_ms']:.0f} | {max(r['matmul_rate_adjacent']) / 1e9:.0f} | "
                     f"{r['floor_ms']:.0f} | "
                     f"{r['time_vs_floor']:.2f} | {_f(r.get('paired_time_vs_floor'), '.2f')} | "
                     f"{_f(r.get('time_vs_eager'), '.2f')} | "
                     f"{r['extra_bytes'] / MIB:.0f} MiB | {_f(r.get('extra_vs_eager'), '.1%')} | "
                     f"{r['load1_after']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
