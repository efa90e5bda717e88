"""What ``python -m benchmarks.compare`` writes: the console rows, results.md, summary.md, the CSV and plots.

Pure formatting of measured results (``benchmarks.compare`` measures; this module only renders).
"""

from __future__ import annotations

import csv
import statistics

from benchmarks.common import MIB, fmt_bytes
from benchmarks.implementations import IMPLEMENTATIONS

#: what a tiny sweep's figures are (its steps take milliseconds: a time slice of another process is most of one)
TINY_NOTE = "--sweep tiny: smoke-test shapes, its times are noise, not a speed measurement"


def _status_cell(r: dict) -> str:
    return "ok" if r["status"] == "ok" else r["status"]


def _ms(x):
    return "-" if x is None else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def _ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def time_spread(times: list[float], eager_times: list[float]) -> dict | None:
    """Time over eager's with its spread: ``ratio`` of the medians, and ``lo`` / ``hi``, the lowest and highest
    ratio any (run, eager run) pair gives; ``repeats`` / ``eager_repeats``: how many timed runs each had."""
    if not times or not eager_times:
        return None
    return {"ratio": statistics.median(times) / statistics.median(eager_times),
            "lo": min(times) / max(eager_times), "hi": max(times) / min(eager_times),
            "repeats": len(times), "eager_repeats": len(eager_times)}


def _ratio_cell(r: dict) -> str:
    """A table's time / eager cell: the ratio of the medians and, in brackets, its range over pairs of runs."""
    s = r.get("time_vs_eager_spread")
    if r.get("time_vs_eager") is None or not s or r["impl"] == "eager":
        return _ratio(r.get("time_vs_eager"))
    return f"{_ratio(r['time_vs_eager'])} ({s['lo']:.2f}-{s['hi']:.2f})"


def ratio_text(r: dict) -> str:
    """``0.91x eager (median of 5 runs, eager's of 5; range 0.85-0.97 over all pairs of runs)``: a time ratio
    never without its repeats and spread; a range that holds 1.0 is called a tie."""
    s = r.get("time_vs_eager_spread")
    if r.get("time_vs_eager") is None or not s:
        return "time vs eager: -"
    runs = (f"median of {s['repeats']} runs each" if s["repeats"] == s["eager_repeats"]
            else f"median of {s['repeats']} runs, eager's of {s['eager_repeats']}")
    if s["repeats"] < 2 or s["eager_repeats"] < 2:
        spread = "a single run: no spread measured"
    else:
        spread = f"range {s['lo']:.2f}-{s['hi']:.2f} over all pairs of runs"
        if s["lo"] <= 1.0 <= s["hi"]:
            spread += ": not distinguishable from eager"
    return f"{r['time_vs_eager']:.2f}x eager ({runs}; {spread})"


def print_row(r: dict) -> None:
    if r["status"] == "skipped":
        print(f"  {r['impl']:<11} skipped: {r['reason']}")
        return
    extra = "" if r["status"] == "ok" else f"  {r['status']}: {r.get('reason', '')}"
    print(f"  {r['impl']:<11} {_ms(r['time_ms']):>9} ms  {_ratio(r.get('time_vs_eager')):>7}  "
          f"{fmt_bytes(r['peak_extra_bytes']):>10}  {_ratio(r.get('mem_vs_eager')):>7}  "
          f"(floor: grads {fmt_bytes(r['grad_bytes'])}){extra}")


def markdown(env: dict, results: list[dict], budget: list[dict], impls: list[str]) -> str:
    lines = [f"# GRAO loss benchmark: {env['device']} ({env['device_name']})", "",
             f"- date: {env['date']}", f"- command: `{env['command']}`",
             (f"- machine: {env['device_name']}, {env['cpu_cores']} CPU cores ({env['cpu_model']}), "
             f"torch {env['torch']} ({env['torch_threads']} threads), triton {env['triton']}, Python {env['python']}"),
             "- peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["peers"].items()),
             f"- grao-kernels commit: {env.get('grao_kernels_commit')}", "",
             ("Forward + backward of the loss from hidden states and lm_head weight. Time: median of the timed runs "
             f"(column \"runs\") after {env.get('warmup', 1)} warm-up run(s), each implementation and point in its "
             "own process on CPU. Time / eager: the ratio of the medians, in brackets the lowest and highest ratio "
             "over all pairs (run, eager run): a range that holds 1.00 is a tie at these repeats. "
             "Peak extra: peak memory above the inputs, gradients included (floor = size of dhidden + dweight). "
             "Ratios are to eager at the same point in the same run."), ""]
    skipped = {}
    for r in results:
        if r["status"] == "skipped":
            skipped.setdefault(r["impl"], r["reason"])
    for impl, why in skipped.items():
        lines.append(f"- **{impl} skipped**: {why}")
    if skipped:
        lines.append("")
    computes = {name: IMPLEMENTATIONS[name].computes for name in impls}
    sweeps = []
    for r in results:
        if r["point"]["sweep"] not in sweeps:
            sweeps.append(r["point"]["sweep"])
    titles = {"headline": "Headline point", "G": "Group size G (fixed T)", "T": "Completion length T (fixed G)",
              "V": "Vocabulary V", "D": "Hidden size D", "dtype": "dtype"}
    for sw in sweeps:
        lines += [f"## {titles.get(sw, sw)}", "",
                  ("| shape | impl | computes | time (ms) | runs | time / eager | peak extra | memory / eager | "
                   "floor (grads) |"),
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            p = r["point"]
            if p["sweep"] != sw or r["status"] == "skipped":
                continue
            shape = f"P={p['P']} G={p['G']} T={p['T']} N={p['N']} D={p['D']} V={p['V']} {p['dtype']}"
            if p.get("model"):
                shape += f" ({p['model']})"
            time_cell = _ms(r["time_ms"]) if r["status"] == "ok" else f"**{r['status']}**"
            lines.append(f"| {shape} | {r['impl']} | {computes.get(r['impl'], '')} | {time_cell} | "
                         f"{len(r.get('times_ms') or [])} | "
                         f"{_ratio_cell(r)} | {fmt_bytes(r['peak_extra_bytes'])} | "
                         f"{_ratio(r.get('mem_vs_eager'))} | {fmt_bytes(r['grad_bytes'])} |")
        lines.append("")
    if budget:
        lines += [f"## Largest N within {fmt_bytes(budget[0]['budget_bytes'])} (inputs included)", "",
                  "| impl | largest N | bytes / token | fixed | how |", "|---|---:|---:|---:|---|"]
        for b in budget:
            per_token = "-" if b["bytes_per_token"] is None else f"{b['bytes_per_token'] / 1024:.1f} KiB"
            n_max = "-" if b["n_max"] is None else str(b["n_max"])
            lines.append(f"| {b['impl']} | {n_max} | {per_token} | {fmt_bytes(b['fixed_bytes'])} | {b['method']} |")
        lines.append("")
    return "\n".join(lines)


def summary(env: dict, results: list[dict], budget: list[dict], impls: list[str], out_rel: str) -> str:
    """README-ready: the headline table, peak extra memory against G and T, the budget, one plot."""
    heads = [r for r in results if r["point"]["sweep"] == "headline"]
    lines = [(f"Measured {env['date']} on {env['device_name']} ({env['cpu_cores']} cores), torch {env['torch']}, "
             f"triton {env['triton']}; command `{env['command']}`."), ""]
    if env.get("sweep") == "tiny":
        lines += [f"**{TINY_NOTE}.**", ""]
    if heads:
        p = heads[0]["point"]
        runs = sorted({len(r.get("times_ms") or []) for r in heads if r["status"] == "ok"})
        lines += [(f"Forward + backward, {p['dtype']}, N = {p['N']} (P={p['P']}, G={p['G']}, T={p['T']}), "
                  f"D = {p['D']}, V = {p['V']}. Time: median of {' / '.join(map(str, runs)) or '-'} runs after "
                  f"{env.get('warmup', 1)} warm-up, each implementation in its own process; time vs eager: the "
                  "ratio of the medians, in brackets the lowest and highest ratio over all pairs (run, eager run), "
                  "so a range that holds 1.00x is a tie at these repeats:"), "",
                  "| implementation | computes | time | vs eager | peak memory above inputs | vs eager |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in heads:
            name = f"{r['impl']} ({IMPLEMENTATIONS[r['impl']].note.split(':')[0]})"
            if r["status"] == "skipped":
                lines.append(f"| {name} | {IMPLEMENTATIONS[r['impl']].computes} | skipped (below) | | | |")
                continue
            t = _ms(r["time_ms"]) + " ms" if r["status"] == "ok" else f"**{r['status']}**"
            lines.append(f"| {name} | {IMPLEMENTATIONS[r['impl']].computes} | {t} | {_ratio_cell(r)} "
                         f"| {fmt_bytes(r['peak_extra_bytes'])} | {_ratio(r.get('mem_vs_eager'))} |")
        spreads = [f"- {r['impl']}: time {ratio_text(r)}." for r in heads
                   if r["status"] == "ok" and r["impl"] != "eager" and r.get("time_vs_eager") is not None]
        lines += [""] + spreads + ([""] if spreads else [])
        lines += [f"The floor for any implementation (dhidden + dweight) is {fmt_bytes(heads[0]['grad_bytes'])}."]
        lines += [f"- {r['impl']} skipped: {r['reason']}." for r in heads if r["status"] == "skipped"]
        lines.append("")
    for sw in ("G", "T"):
        rows = [r for r in results if r["point"]["sweep"] == sw and r["status"] != "skipped"]
        if not rows:
            continue
        xs = sorted({r["point"][sw] for r in rows})
        p = rows[0]["point"]
        other = "T" if sw == "G" else "G"
        runs = sorted({len(r.get("times_ms") or []) for r in rows if r["status"] == "ok"})
        lines += [(f"Peak memory above inputs against {sw} ({other}={p[other]}, D={p['D']}, V={p['V']}, {p['dtype']}; "
                  f"time in brackets, median of {' / '.join(map(str, runs)) or '-'} runs):"), "",
                  "| impl | " + " | ".join(f"{sw}={x} (N={next(r['point']['N'] for r in rows if r['point'][sw] == x)})"
                                            for x in xs) + " |",
                  "|---|" + "---:|" * len(xs)]
        for impl in impls:
            cells = []
            for x in xs:
                r = next((r for r in rows if r["impl"] == impl and r["point"][sw] == x), None)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(f"**{r['status']}**")
                else:
                    cells.append(f"{fmt_bytes(r['peak_extra_bytes'])} ({_ms(r['time_ms'])} ms)")
            if any(cells):
                lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        lines.append("")
    if budget:
        lines += [f"Largest N within {fmt_bytes(budget[0]['budget_bytes'])} (inputs included): " + "; ".join(
            f"{b['impl']} {b['n_max'] if b['n_max'] is not None else '-'} "
            f"({b['method'].split(':')[0]})" for b in budget) + ".", ""]
    lines += [f"![time and memory against T]({out_rel}/sweep_T.png)", ""]
    return "\n".join(lines)


def write_csv(path: str, results: list[dict]) -> None:
    cols = ["sweep", "model", "P", "G", "T", "N", "D", "V", "dtype", "impl", "computes", "status", "time_ms",
            "time_vs_eager", "time_vs_eager_lo", "time_vs_eager_hi", "peak_extra_bytes", "mem_vs_eager", "peak_total_bytes", "inputs_bytes", "grad_bytes",
            "times_ms", "reason"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in results:
            p = r["point"]
            spread = r.get("time_vs_eager_spread") or {}
            row = {**p, **r, "computes": IMPLEMENTATIONS[r["impl"]].computes,
                   "time_vs_eager_lo": spread.get("lo"), "time_vs_eager_hi": spread.get("hi"),
                   "times_ms": " ".join(f"{t:.2f}" for t in r.get("times_ms") or [])}
            w.writerow([row.get(c, "") if row.get(c) is not None else "" for c in cols])


def plot(path_prefix: str, results: list[dict], impls: list[str], env: dict) -> list[str]:
    """sweep_G.png and sweep_T.png: time and peak extra memory against G and T, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for sw, xkey, xlabel in (("G", "G", "group size G"), ("T", "T", "completion length T (tokens)")):
        rows = [r for r in results if r["point"]["sweep"] == sw]
        if not rows:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        fixed = rows[0]["point"]
        for impl in impls:
            mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["point"][xkey])
            good = [r for r in mine if r["status"] == "ok"]
            bad = [r for r in mine if r["status"] in ("OOM", "timeout", "error")]
            if not good and not bad:
                continue
            label = impl + (f" ({', '.join(sorted({r['status'] for r in bad}))} at {xkey}="
                            f"{','.join(str(r['point'][xkey]) for r in bad)})" if bad else "")
            xs = [r["point"][xkey] for r in good]
            line, = ax_t.plot(xs, [r["time_ms"] for r in good], marker="o", label=label)
            ax_m.plot(xs, [r["peak_extra_bytes"] / MIB for r in good], marker="o", color=line.get_color(), label=label)
        floor = sorted(rows, key=lambda r: r["point"][xkey])
        xs = sorted({r["point"][xkey] for r in floor})
        grads = {r["point"][xkey]: r["grad_bytes"] / MIB for r in floor}
        ax_m.plot(xs, [grads[x] for x in xs], "k--", linewidth=1, label="floor: dhidden + dweight")
        for ax, ylabel in ((ax_t, "forward + backward time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
        ax_t.legend(fontsize=8)
        ax_m.legend(fontsize=8)
        other = "T" if sw == "G" else "G"
        fig.suptitle(f"GRAO loss fwd+bwd, {other}={fixed[other]} P={fixed['P']} D={fixed['D']} V={fixed['V']} "
                     f"{fixed['dtype']} | {env['device_name']} | {env['date']}", fontsize=9)
        fig.tight_layout()
        path = f"{path_prefix}sweep_{sw}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
