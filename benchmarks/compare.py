"""Compare the GRAO loss implementations: forward + backward time and peak memory over sweeps.

    python -m benchmarks.compare --device cpu                 # small CPU sweep (~9 min on 2 shared cores, 8.3 GB)
    python -m benchmarks.compare --device cpu --out benchmarks/results/cpu   # the same, as the committed results
    python -m benchmarks.compare --device cuda --sweep full   # the GPU sweep
    python -m benchmarks.compare --device cpu --only headline --impls eager,fused
    python -m benchmarks.compare --sweep tiny                 # smoke run of every code path (~2.5 min)

Prints the table and writes ``results.json``, ``results.csv``, ``results.md``, ``summary.md`` and the plots
``sweep_G.png`` / ``sweep_T.png`` to ``--out`` (default ``runs/bench/compare/<device>/``, ``--sweep tiny`` adds
``tiny/``: the committed ``benchmarks/results/`` change only when ``--out`` names them), with the
device, CPU model, torch / triton / peer versions, the date and the exact command.

How it measures (details in benchmarks/README.md):
- time: median of ``--repeats`` forward + backward runs after ``--warmup`` runs (CPU perf_counter,
  CUDA events), gradients freshly allocated each run;
- memory: peak above what is held once the inputs exist, gradients included. On CPU every
  (implementation, point) runs in its own process (``benchmarks._worker``) and the peak RSS is read;
  on CUDA ``torch.cuda.max_memory_allocated``;
- ratios to eager are taken within the same run, with their spread (the lowest and highest ratio over all
  pairs of timed runs) wherever one is reported; OOM, timeouts and errors stay in the table;
- the largest N under a memory budget is fitted (total memory = a + b N) over the T sweep and then
  checked by a real run under the budget when that run is predicted to be short enough; otherwise it
  is reported as extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from benchmarks.common import Point, environment, fmt_bytes, measure, prepare_native_cpu
from benchmarks.implementations import IMPLEMENTATIONS
from benchmarks.report import (
    TINY_NOTE,
    markdown,
    plot,
    print_row,
    ratio_text,
    summary,
    time_spread,
    write_csv,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the tiny sweep's default budget search: a small budget and short verifying runs, so that a smoke run stays
#: short (with the 8 GiB CPU default, its verifying runs took most of a 5 min 47 s, 4.8 GB run: issue 22)
TINY_BUDGET_GB = 0.25
TINY_VERIFY_LIMIT_S = 5.0

# (D, V) of real model configs (config.json: hidden_size, vocab_size).
MODELS = {
    "Qwen2.5-0.5B": (896, 151936),
    "Llama-3.2-1B": (2048, 128256),
    "Qwen2.5-7B": (3584, 152064),
    "Qwen3-8B": (4096, 151936),
    "Llama-3.1-8B": (4096, 128256),
}


def sweep_points(device: str, sweep: str) -> list[Point]:
    """The points of a sweep. ``small`` is the CPU default (N scaled down to a few thousand tokens so
    that it runs in minutes on 2 cores); ``full`` is the GPU sweep with the issue's ranges; ``tiny``
    is a smoke run of every code path (2-3 minutes on 2 shared cores, mostly process start-up: one worker
    per point and implementation, ~3 s each), whose budget search is capped (TINY_BUDGET_GB, TINY_VERIFY_LIMIT_S)."""
    pts: list[Point] = []
    if sweep == "tiny":
        pts.append(Point("headline", 1, 7, 32, 64, 1000))
        # one worker process per (point, implementation), ~3 s each on 2 cores: few points, each sweep present
        pts += [Point("G", 1, g, 16, 64, 1000) for g in (2, 8)]
        pts += [Point("T", 1, 3, t, 64, 1000) for t in (16, 32, 64)]  # three: the budget search fits a line
        pts.append(Point("V", 1, 7, 16, 64, 3000))
        pts.append(Point("D", 1, 7, 16, 96, 1000))
        pts.append(Point("dtype", 1, 7, 16, 64, 1000, "bf16"))
        return pts
    if sweep == "small":
        # The CPU headline: fp32, N = 4096, D = 512, V = 32000.
        pts.append(Point("headline", 1, 7, 512, 512, 32000))
        # Sweeps scaled down from the GPU ranges (N of a few hundred to 4096 tokens).
        pts += [Point("G", 1, g, 32, 512, 32000) for g in (2, 4, 8, 16, 32, 64)]
        pts += [Point("T", 1, 3, t, 512, 32000) for t in (128, 256, 512, 1024)]
        pts += [Point("V", 1, 7, 64, 512, v) for v in (32000, 128256, 151936)]
        pts += [Point("D", 1, 7, 32, d, 32000) for d in (896, 2048, 3584, 4096)]
        pts += [Point("dtype", 1, 7, 64, 512, 32000, dt) for dt in ("fp32", "bf16")]
        return pts
    if sweep == "full":
        d, v = MODELS["Qwen3-8B"]
        # The GPU headline: bf16, N = 16384, D = 4096, V = 151936.
        pts.append(Point("headline", 1, 7, 2048, d, v, "bf16", "Qwen3-8B"))
        pts += [Point("G", 1, g, 1024, d, v, "bf16", "Qwen3-8B") for g in (2, 4, 8, 16, 32, 64)]
        pts += [Point("T", 1, 7, t, d, v, "bf16", "Qwen3-8B") for t in (256, 1024, 2048, 4096, 8192, 16384, 32768)]
        pts += [Point("V", 1, 7, 1024, d, vv, "bf16") for vv in (32000, 128256, 151936)]
        pts += [Point("D", 1, 7, 1024, dd, vv, "bf16", name) for name, (dd, vv) in MODELS.items()]
        pts += [Point("dtype", 1, 7, 512, d, v, dt, "Qwen3-8B") for dt in ("fp32", "bf16")]
        return pts
    raise ValueError(f"unknown sweep {sweep!r}; expected tiny, small or full")


# ------------------------------------------------------------------------------------------ running

def run_cpu_worker(impl: str, p: Point, *, warmup: int, repeats: int, timeout: float,
                   budget_bytes: int | None = None, paired_flops: float | None = None, pairs: int = 7) -> dict:
    """One measurement in a fresh Python process (so peak RSS belongs to that implementation alone);
    ``paired_flops``: also time against that many FLOPs of matmul, ``pairs`` pairs (``benchmarks._worker``)."""
    spec = dict(p.to_dict(), impl=impl, device="cpu", warmup=warmup, repeats=repeats, budget_bytes=budget_bytes,
                paired_flops=paired_flops, pairs=pairs)
    cmd = [sys.executable, "-m", "benchmarks._worker", json.dumps(spec)]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    base = {"impl": impl, "time_ms": None, "times_ms": [], "peak_extra_bytes": None, "peak_total_bytes": None,
            "inputs_bytes": p.input_bytes(), "grad_bytes": p.grad_bytes()}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False)
    except subprocess.TimeoutExpired:
        return dict(base, status="timeout", reason=f"no result within {timeout:.0f} s")
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["process_wall_s"] = wall
            return res
    if proc.returncode in (-9, 137):  # killed, most likely by the kernel's OOM killer
        return dict(base, status="OOM", reason="worker killed (SIGKILL; out of memory?)")
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(base, status="error", reason=f"worker exit {proc.returncode}: {' | '.join(tail)[:300]}")


def run_one(device: str, impl: str, p: Point, *, warmup: int, repeats: int, timeout: float,
            budget_bytes: int | None = None) -> dict:
    if device == "cpu":
        res = run_cpu_worker(impl, p, warmup=warmup, repeats=repeats, timeout=timeout, budget_bytes=budget_bytes)
    else:
        res = measure(impl, p, device, warmup=warmup, repeats=repeats)
    res["point"] = p.to_dict()
    return res


def add_ratios(results: list[dict]) -> None:
    """time_vs_eager and mem_vs_eager: each implementation over eager at the same point, same run."""
    eager = {json.dumps(r["point"], sort_keys=True): r for r in results if r["impl"] == "eager" and r["status"] == "ok"}
    for r in results:
        e = eager.get(json.dumps(r["point"], sort_keys=True))
        ok = e is not None and r["status"] == "ok"
        r["time_vs_eager"] = r["time_ms"] / e["time_ms"] if ok and e["time_ms"] else None
        r["time_vs_eager_spread"] = time_spread(r["times_ms"], e["times_ms"]) if ok and e["time_ms"] else None
        r["mem_vs_eager"] = (r["peak_extra_bytes"] / e["peak_extra_bytes"]
                             if ok and e["peak_extra_bytes"] else None)


# ------------------------------------------------------------------------------------- memory budget

def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


def total_bytes(r: dict) -> int:
    """Inputs plus the peak above them: what the step needs in all (CUDA: max_memory_allocated)."""
    return r["peak_total_bytes"] if r.get("peak_total_bytes") else r["inputs_bytes"] + r["peak_extra_bytes"]


def largest_n(device: str, results: list[dict], impls: list[str], budget_bytes: int, *, verify_limit_s: float,
              timeout: float, log=print) -> list[dict]:
    """Largest N = P (G + 1) T each implementation runs within ``budget_bytes`` (inputs included).

    Over the T sweep (fixed P, G, D, V, dtype) total memory is fitted as a + b N; N_max = (budget - a) / b,
    rounded down to a multiple of 64 T. If the fitted time at N_max is under ``verify_limit_s`` a real run
    checks it (CPU: in a worker whose address space is limited to its size before the inputs plus the
    budget; CUDA: the card itself), stepping down 10% at a time on OOM. Otherwise the figure is marked
    "extrapolated".
    """
    out = []
    for impl in impls:
        rows = [r for r in results if r["impl"] == impl and r["point"]["sweep"] == "T"]
        ok = [r for r in rows if r["status"] == "ok"]
        entry = {"impl": impl, "budget_bytes": budget_bytes, "n_max": None, "method": "", "bytes_per_token": None,
                 "fixed_bytes": None}
        if len(ok) < 2:
            entry["method"] = "not enough T-sweep points ran (" + ", ".join(
                sorted({r["status"] for r in rows})) + ")"
            out.append(entry)
            continue
        ns = [r["point"]["N"] for r in ok]
        a, b = _fit(ns, [total_bytes(r) for r in ok])
        ta, tb = _fit(ns, [r["time_ms"] for r in ok])
        entry.update(bytes_per_token=b, fixed_bytes=a, fit_points=ns)
        base = ok[0]["point"]
        rows_per_t = base["B"]
        if b <= 0:
            entry["method"] = "memory does not grow with N in the T sweep; no bound found"
            out.append(entry)
            continue
        n_pred = (budget_bytes - a) / b
        t_max = int(n_pred // rows_per_t // 64 * 64)
        entry["n_predicted"] = int(n_pred)
        if t_max < 64:
            entry["method"] = "fit says the budget is exceeded below T = 64"
            out.append(entry)
            continue
        # time of the largest T-sweep run scaled by N (work is linear in N), or the fit if larger
        last = max(ok, key=lambda r: r["point"]["N"])
        pred_s = max(ta + tb * rows_per_t * t_max, last["time_ms"] * rows_per_t * t_max / last["point"]["N"]) / 1e3
        if pred_s > verify_limit_s:
            entry.update(n_max=rows_per_t * t_max, method=f"extrapolated: fit over N={ns} "
                         f"(a verifying run would take ~{pred_s:.0f} s > {verify_limit_s:.0f} s)")
            out.append(entry)
            continue
        tried = []
        for _ in range(4):
            p = Point("budget", base["P"], base["G"], t_max, base["D"], base["V"], base["dtype"], base["model"])
            log(f"  budget check: {impl} at {p.label()} (predicted {pred_s:.0f} s)")
            res = run_one(device, impl, p, warmup=0, repeats=1, timeout=timeout,
                          budget_bytes=budget_bytes if device == "cpu" else None)
            tried.append({"N": p.N, "status": res["status"], "peak_total_bytes": res.get("peak_total_bytes")})
            if res["status"] == "ok" and (device == "cpu" or total_bytes(res) <= budget_bytes):
                entry.update(n_max=p.N, method=f"verified: ran at N={p.N} within the budget "
                             f"(fit over N={ns} predicted {int(n_pred)})")
                break
            t_max = int(t_max * 0.9 // 64 * 64)
            if t_max < 64:
                break
        else:
            entry["method"] = "no verifying run fitted the budget"
        if entry["n_max"] is None and not entry["method"]:
            entry["method"] = "no verifying run fitted the budget"
        entry["verify_runs"] = tried
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--sweep", choices=("tiny", "small", "full"), default=None,
                    help="default: small on cpu, full on cuda")
    ap.add_argument("--only", default="", help="comma list of sweeps to keep: headline,G,T,V,D,dtype")
    ap.add_argument("--impls", default="eager,fused,liger_grpo,cce", help="comma list of " + ",".join(IMPLEMENTATIONS))
    ap.add_argument("--out", default=None, help="results folder (default runs/bench/compare/<device>, --sweep tiny "
                    "adds tiny/; the committed results change only with --out benchmarks/results/<device>)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per point (default: 3 headline, 2 others "
                    "on cpu; 5 on cuda)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per CPU worker before 'timeout'")
    ap.add_argument("--budget-gb", type=float, default=None,
                    help="memory budget (GiB, inputs included) for the largest-N search; default 8 on cpu, the "
                         f"card's memory on cuda, {TINY_BUDGET_GB} in --sweep tiny; 0 turns it off")
    ap.add_argument("--verify-limit", type=float, default=None,
                    help="largest predicted seconds for a verifying run of the budget search (default 60 cpu, 30 cuda, "
                         f"{TINY_VERIFY_LIMIT_S:.0f} in --sweep tiny)")
    ap.add_argument("--no-plots", action="store_true")
    return ap.parse_args(argv)


def default_out(device: str, sweep: str) -> str:
    """Scratch by default: runs/bench/compare/<device>/ (tiny/ below it for --sweep tiny). The committed
    benchmarks/results/<device>/ are written only when --out names them."""
    return os.path.join(ROOT, "runs", "bench", "compare", device, *(["tiny"] if sweep == "tiny" else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    sweep = args.sweep or ("small" if device == "cpu" else "full")
    points = sweep_points(device, sweep)
    if args.only:
        keep = {s.strip() for s in args.only.split(",") if s.strip()}
        points = [p for p in points if p.sweep in keep]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLEMENTATIONS:
            print(f"unknown implementation {i!r}; known: {', '.join(IMPLEMENTATIONS)}", file=sys.stderr)
            return 2
    if "eager" in impls:  # eager first at each point: it is the ratio's denominator
        impls = ["eager"] + [i for i in impls if i != "eager"]
    out = args.out or default_out(device, sweep)
    os.makedirs(out, exist_ok=True)
    command = " ".join(["python -m benchmarks.compare"] + [shlex.quote(a) for a in (argv if argv is not None
                                                                                    else sys.argv[1:])])
    env = environment(device, command)
    env["warmup"] = args.warmup
    print(f"# {env['date']} | {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"peers {env['peers']}\n# {command}")

    # availability (in this process; on CPU the workers re-check)
    live = []
    for name in impls:
        ok, why = IMPLEMENTATIONS[name].available(device)
        if ok:
            live.append(name)
        else:
            print(f"# {name}: skipped: {why}")
    if device == "cpu" and any(name in live for name in ("fused", "logprob")):
        prepare_native_cpu()  # a first build of the native kernel (~45 s) here, announced, not in a worker
    results: list[dict] = []

    def skipped(name: str, p: Point) -> dict:
        _, why = IMPLEMENTATIONS[name].available(device)
        return {"impl": name, "status": "skipped", "reason": why, "time_ms": None, "times_ms": [],
                "peak_extra_bytes": None, "peak_total_bytes": None, "inputs_bytes": p.input_bytes(),
                "grad_bytes": p.grad_bytes(), "point": p.to_dict()}

    t_start = time.perf_counter()
    print(f"  {'impl':<11} {'time':>12}  {'/eager':>7}  {'peak extra':>10}  {'/eager':>7}")
    for p in points:
        repeats = args.repeats or (5 if device == "cuda" else (3 if p.sweep == "headline" else 2))
        print(f"[{p.sweep}] {p.label()}")
        row_results = []
        for name in impls:
            if name in live:
                row_results.append(run_one(device, name, p, warmup=args.warmup, repeats=repeats, timeout=args.timeout))
            else:
                row_results.append(skipped(name, p))
        add_ratios(row_results)
        for r in row_results:
            if r["status"] != "skipped" or r["impl"] in live:
                print_row(r)
        results.extend(row_results)
        sys.stdout.flush()
    add_ratios(results)
    sweep_s = time.perf_counter() - t_start

    budget_gb = args.budget_gb
    if budget_gb is None and sweep == "tiny":
        budget_gb = TINY_BUDGET_GB
    if budget_gb is None:
        if device == "cuda":
            import torch

            budget_bytes = torch.cuda.get_device_properties(0).total_memory
        else:
            budget_bytes = 8 * 1024 ** 3
    else:
        budget_bytes = int(budget_gb * 1024 ** 3) if budget_gb > 0 else 0
    budget = []
    if budget_bytes and any(p.sweep == "T" for p in points):
        verify = args.verify_limit if args.verify_limit is not None else (
            TINY_VERIFY_LIMIT_S if sweep == "tiny" else 60.0 if device == "cpu" else 30.0)
        print(f"# largest N within {fmt_bytes(budget_bytes)} (inputs included)")
        budget = largest_n(device, results, live, budget_bytes, verify_limit_s=verify, timeout=args.timeout)
        for b in budget:
            print(f"  {b['impl']:<11} N_max = {b['n_max']}  ({b['method']})")
    total_s = time.perf_counter() - t_start
    env["sweep"] = sweep
    env["elapsed_s"] = {"sweep": round(sweep_s, 1), "total": round(total_s, 1)}

    headline = [r for r in results if r["point"]["sweep"] == "headline" and r["status"] == "ok"]
    verdict = {}
    for r in headline:
        if r["impl"] != "eager" and r.get("time_vs_eager") is not None:
            verdict[r["impl"]] = {"time_vs_eager": r["time_vs_eager"], "time_vs_eager_spread": r["time_vs_eager_spread"],
                                  "mem_vs_eager": r["mem_vs_eager"]}
            mem = "-" if r["mem_vs_eager"] is None else f"{100 * r['mem_vs_eager']:.1f}%"
            print(f"# headline {r['impl']}: time {ratio_text(r)}, extra memory {mem} of eager's"
                  + (f" [{TINY_NOTE}]" if sweep == "tiny" else ""))

    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"env": env, "impls": {n: {"computes": IMPLEMENTATIONS[n].computes, "note": IMPLEMENTATIONS[n].note,
                                             "versions": IMPLEMENTATIONS[n].versions()} for n in impls},
                   "results": results, "largest_n": budget, "headline_vs_eager": verdict}, fh, indent=1)
    write_csv(os.path.join(out, "results.csv"), results)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(markdown(env, results, budget, impls))
    out_rel = os.path.relpath(out, ROOT)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(summary(env, results, budget, impls, out_rel))
    written = [] if args.no_plots else plot(os.path.join(out, ""), results, live, env)
    print(f"# wrote {out}/results.json, results.csv, results.md, summary.md" + (", " + ", ".join(
        os.path.basename(w) for w in written) if written else "") + f" in {total_s:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
