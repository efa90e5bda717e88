"""Sampling G completions per prompt, shared prompt cache vs transformers ``generate``: time and peak memory.

Issue 21, item 5. ``grao train`` samples through ``grao.trainer.rollout.RolloutEngine.generate(prompt_ids, G)``.
With ``TrainConfig.shared_sampling`` on ("shared") each prompt is prefilled once and its G samples decode
against one copy of its keys and values; off ("generate"), transformers ``generate(num_return_sequences=G)``
copies every prompt G times. This script times that one call for both engines on a Llama built from a
config (4 layers, hidden 256, vocabulary 32000, untied head: 19.5M parameters; float32 on CPU, bf16 autocast
on CUDA as ``grao train`` runs it) with random prompt token ids, temperature 0.7, 32 new tokens.

Each point runs in a fresh process (peaks do not leak between points): the model is built under a fixed
seed, one tiny warm-up call runs (16-token prompt, G = 2, 2 new tokens: lazy imports, kernel set-up), then
the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and ``peak_mib`` is the peak RSS during
the measured call minus the RSS just before it, i.e. the peak above the weights (CUDA:
``max_memory_allocated`` minus ``memory_allocated`` before the call). ``sample_s`` is that call's wall time;
``new_tokens_mean`` the mean number of tokens a sample got (below ``completion_len`` when samples hit EOS,
rare with a random 32000-token vocabulary). Points run with ``MALLOC_MMAP_THRESHOLD_=1048576`` (freed large
buffers leave the RSS) and on CPU with ``OMP_NUM_THREADS=1`` unless it is set (on a shared 2-core machine a
2-thread op stalls for a time slice whenever another process holds a core; set it yourself on a machine of
your own). A point whose engine already went over ``--budget-mib`` or failed (an exception, a killed
process, ``--point-timeout``) at a smaller point (no longer prompt, no larger G) is not run and is recorded
with ``sample_s``/``peak_mib`` empty and ``error`` "over_budget" or "not run: ...". On CPU each point's
address space is capped (``--memory-limit-gib``, default 90% of this machine's memory) so that an engine
that runs out fails with "not enough memory" instead of calling the kernel's OOM killer on the machine.

Sweeps (completion length 32, P = 2 prompts): ``prompt``: Lp = 512 ... 32768 at G = 8; ``G``: G = 4 ... 32
at Lp = 2048; ``headline``: Lp = 8192, G = 8 (the issue's target: shared >= 5x faster and >= 5x lower
peak); ``all``: the three. ``longest_within_4gib`` (summary.json) is the longest prompt of the ``prompt``
sweep whose peak stayed within 4096 MiB, per engine.

``--sweep step``: the whole ``grao train`` step, ``benchmarks/rollout_step.py``.

    python benchmarks/rollout.py --quick                        # smoke run, seconds -> runs/bench/rollout/quick/
    python benchmarks/rollout.py                                # all sampling sweeps, CPU -> runs/bench/rollout/
    python benchmarks/rollout.py --sweep step                   # the grao train step -> same folder
    python benchmarks/rollout.py --out benchmarks/results/rollout   # the committed results
    python benchmarks/rollout.py --device cuda                  # a GPU (writes <out>/cuda/)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("shared", "generate")
KEY = ("prompt_len", "completion_len", "G", "P", "engine")
FIELDS = KEY + ("sample_s", "peak_mib")  # summary.json rows
COLUMNS = FIELDS + ("new_tokens_mean", "error")  # results.csv
LONGEST_BUDGET_MIB = 4096  # "the longest prompt it samples within 4 GiB"

# sizes: the model and sweeps, and the --quick smoke version of each
FULL = {"vocab": 32000, "hidden": 256, "intermediate": 688, "layers": 4, "completion_len": 32, "P": 2,
        "prompt_lens": [512, 1024, 2048, 4096, 8192, 16384, 32768], "prompt_G": 8,
        "groups": [4, 8, 16, 32], "g_prompt_len": 2048, "headline": (8192, 8),
        "step_lens": [4096, 24576], "step_P": 8, "step_G": 8, "step_completion_len": 32}
QUICK = {"vocab": 512, "hidden": 64, "intermediate": 172, "layers": 2, "completion_len": 4, "P": 2,
         "prompt_lens": [64, 128], "prompt_G": 2, "groups": [2], "g_prompt_len": 64, "headline": (128, 2),
         "step_lens": [256, 512], "step_P": 8, "step_G": 8, "step_completion_len": 4}


# ------------------------------------------------------------------------------------------ the model

def build_model(spec: dict):
    """The benchmark's Llama, seeded (the global RNG is left untouched), eval mode, float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                      num_hidden_layers=spec["layers"], num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=spec["positions"], tie_word_embeddings=False,
                      **spec.get("token_ids", {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    return model.float().eval()


def limit_address_space(gib: float) -> None:
    """Cap this process's (and its children's) address space at ``gib`` GiB (0: no cap): an allocation past
    it fails with "not enough memory" rather than waking the OOM killer on a shared machine."""
    if gib and gib > 0:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = int(gib * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------ one sampling point

def one_point(spec: dict) -> dict:
    """Run in a fresh process: build the model, warm up, then time one ``RolloutEngine.generate`` call."""
    limit_address_space(spec.get("memory_limit_gib", 0))
    import dataclasses

    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.common import peak_since_start, start_peak
    from grao import demo
    from grao.trainer import TrainConfig
    from grao.trainer.model import autocast_dtype
    from grao.trainer.rollout import RolloutEngine

    row = {k: spec[k] for k in KEY}
    row.update(sample_s=None, peak_mib=None, new_tokens_mean=None, error=None, threads=torch.get_num_threads())
    device = torch.device(spec["device"])
    Lp, Lc, G, P = spec["prompt_len"], spec["completion_len"], spec["G"], spec["P"]
    extra = {} if spec.get("sample_memory_mib") is None else {"sample_memory_mib": spec["sample_memory_mib"]}
    try:
        model = build_model(spec).to(device)
        tok = demo.build_tokenizer()  # only its pad / eos ids are used: prompts are token ids already
        cfg = TrainConfig(group_size=G, prompts_per_step=P, max_new_tokens=Lc, temperature=0.7, top_p=1.0,
                          shared_sampling=spec["engine"] == "shared", device=spec["device"], progress=False,
                          plot=False, tensorboard="false", output_dir="runs/rollout_bench", **extra)
        reward = lambda **k: [0.0] * len(k["completions"])  # never called by generate
        amp = autocast_dtype(cfg, device)
        engine = RolloutEngine(model, tok, cfg, reward_fn=reward, device=device, autocast_dtype=amp)
        warm = RolloutEngine(model, tok, dataclasses.replace(cfg, group_size=2, prompts_per_step=1, max_new_tokens=2),
                             reward_fn=reward, device=device, autocast_dtype=amp)
        g = torch.Generator().manual_seed(1)
        toks = lambda n: torch.randint(4, spec["vocab"], (n,), generator=g).tolist()
        with torch.no_grad():
            warm.generate([toks(16)], 2)  # lazy imports, kernel set-up: neither timed nor counted
        prompt_ids = [toks(Lp) for _ in range(P)]
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        before = start_peak(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            samples = engine.generate(prompt_ids, G)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = peak_since_start(device)
    except Exception as exc:  # noqa: BLE001 - every failure is a row (MemoryError, "not enough memory", ...)
        row["error"] = first_line(exc)
        return row
    lens = [len(s) for group in samples for s in group]
    if len(samples) != P or any(len(group) != G for group in samples):
        row["error"] = f"generate returned {len(samples)} groups of sizes {[len(x) for x in samples]}, not {P} x {G}"
        return row
    row.update(sample_s=round(seconds, 3), peak_mib=round((peak - before) / 2 ** 20, 1),
               new_tokens_mean=round(sum(lens) / len(lens), 2))
    return row


def point_list(sweeps: list[str], s: dict) -> list[tuple[int, int, int, int]]:
    """(prompt_len, completion_len, G, P) of the chosen sweeps, each once, smaller points first."""
    pts = set()
    if "prompt" in sweeps:
        pts |= {(lp, s["completion_len"], s["prompt_G"], s["P"]) for lp in s["prompt_lens"]}
    if "G" in sweeps:
        pts |= {(s["g_prompt_len"], s["completion_len"], G, s["P"]) for G in s["groups"]}
    if "headline" in sweeps:
        pts.add((s["headline"][0], s["completion_len"], s["headline"][1], s["P"]))
    return sorted(pts)


def dominated_by(p: tuple, q: tuple) -> bool:
    """q is a smaller point than p: no longer prompt or completion, no larger G or P, and not p itself."""
    return q != p and all(b <= a for a, b in zip(p, q))


def child_env(device: str) -> dict:
    # a fixed mmap threshold: large buffers are returned to the OS when freed, so RSS follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576"))
    if device == "cpu":  # one thread: on a shared machine 2-thread ops stall whenever another process runs
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def describe_exit(rc: int, stderr: str) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return f"killed by signal {-rc} ({name})"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return f"exit {rc}: {lines[-1].strip()[:300]}" if lines else f"exit {rc}"


def run_point(args, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--point", json.dumps(spec)]
    row = {k: spec[k] for k in KEY}
    row.update(sample_s=None, peak_mib=None, new_tokens_mean=None, error=None)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(args.device),
                             timeout=args.point_timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timeout after {args.point_timeout:g} s"
        return row
    out = res.stdout.strip().splitlines()
    if res.returncode != 0 or not out:
        row["error"] = describe_exit(res.returncode, res.stderr)
        return row
    row = json.loads(out[-1])
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


# ------------------------------------------------------------------------------------ grao train step

# ------------------------------------------------------------------------------------------ summaries

def find(rows: list[dict], engine: str, **kw) -> dict | None:
    for r in rows:
        if r["engine"] == engine and all(r[k] == v for k, v in kw.items()):
            return r
    return None


def ratio(a, b):
    return round(a / b, 2) if a is not None and b is not None and b > 0 else None


def sampling_summary(rows: list[dict], s: dict) -> dict:
    lp, G = s["headline"]
    where = {"prompt_len": lp, "completion_len": s["completion_len"], "G": G, "P": s["P"]}
    sh, ge = find(rows, "shared", **where), find(rows, "generate", **where)
    headline = dict(where)
    for name, r in (("shared", sh), ("generate", ge)):
        headline[name] = None if r is None else {k: r.get(k) for k in ("sample_s", "peak_mib", "error")}
    headline["speedup"] = ratio(ge and ge.get("sample_s"), sh and sh.get("sample_s"))  # generate / shared time
    headline["peak_ratio"] = ratio(ge and ge.get("peak_mib"), sh and sh.get("peak_mib"))  # generate / shared peak
    headline["target"] = "shared >= 5x faster and >= 5x lower peak than generate"
    if headline["speedup"] is not None and headline["peak_ratio"] is not None:
        headline["met"] = headline["speedup"] >= 5 and headline["peak_ratio"] >= 5
    longest = {}
    for engine in ENGINES:
        ok = [r["prompt_len"] for r in rows if r["engine"] == engine and r["G"] == s["prompt_G"]
              and r["P"] == s["P"] and r["completion_len"] == s["completion_len"] and r["prompt_len"] in s["prompt_lens"]
              and r.get("peak_mib") is not None and r["peak_mib"] <= LONGEST_BUDGET_MIB]
        longest[engine] = max(ok) if ok else None
    return {"headline": headline, "longest_within_4gib": longest}


def environment_fields(device: str, threads) -> dict:
    import torch
    import transformers

    from benchmarks.common import cpu_model, environment, git_commit
    env = environment(device, "python benchmarks/rollout.py " + " ".join(sys.argv[1:]))
    return {"device": env["device_name"] if device == "cpu" else f"{device}: {env['device_name']}",
            "torch": torch.__version__, "transformers": transformers.__version__, "date": env["date"],
            "git_commit": git_commit(str(REPO)), "cpu": cpu_model(), "threads": threads, "environment": env}


def write_summary(path: Path, update: dict) -> None:
    """Merge ``update`` into summary.json (a sampling run keeps an earlier step section and the other way round)."""
    summary = {}
    if path.exists():
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            summary = {}
    summary.update(update)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_csv(path: Path, rows: list[dict], cols) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerows(["" if r.get(c) is None else r.get(c) for c in cols] for r in rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict]:
    """Rows of an earlier results.csv (for --resume)."""
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k, v in r.items():
                if k in ("prompt_len", "completion_len", "G", "P"):
                    row[k] = int(v)
                elif k in ("sample_s", "peak_mib", "new_tokens_mean"):
                    row[k] = float(v) if v != "" else None
                else:
                    row[k] = v if v != "" else None
            rows.append(row)
    return rows


def plot(rows: list[dict], s: dict, path: Path, title: str, budget_mib: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.4))
    styles = {"shared": ("tab:blue", "o-"), "generate": ("tab:red", "s--")}
    sweeps = ((0, "prompt_len", lambda r: r["G"] == s["prompt_G"] and r["prompt_len"] in s["prompt_lens"],
               f"prompt length (G = {s['prompt_G']}, P = {s['P']}, {s['completion_len']} new tokens)"),
              (1, "G", lambda r: r["prompt_len"] == s["g_prompt_len"] and r["G"] in s["groups"],
               f"G (prompt length {s['g_prompt_len']}, P = {s['P']}, {s['completion_len']} new tokens)"))
    for i, xkey, keep, xlabel in sweeps:
        for j, (ykey, ylabel) in enumerate((("sample_s", "sampling time (s)"),
                                            ("peak_mib", "peak above the weights (MiB)"))):
            ax = axes[i][j]
            drawn = False
            for engine, (color, fmt) in styles.items():
                sel = sorted((r for r in rows if r["engine"] == engine and r["completion_len"] == s["completion_len"]
                              and r["P"] == s["P"] and keep(r)), key=lambda r: r[xkey])
                ok = [r for r in sel if r.get(ykey) is not None]
                bad = [r for r in sel if r.get(ykey) is None]
                if ok:
                    ax.plot([r[xkey] for r in ok], [max(r[ykey], 1e-3) for r in ok], fmt, color=color, label=engine)
                    drawn = True
                if bad:  # failed / over budget / not run: a cross along the top of the panel
                    ax.plot([r[xkey] for r in bad], [0.96] * len(bad), "x", color=color, markersize=9, mew=2,
                            transform=ax.get_xaxis_transform(), label=f"{engine}: failed / over budget / not run")
            if ykey == "peak_mib" and any((r.get("peak_mib") or 0) > budget_mib / 8 for r in rows):
                ax.axhline(budget_mib, color="grey", lw=0.8, ls=":", label=f"budget {budget_mib:g} MiB")
            ax.set_xscale("log", base=2)
            if drawn:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main

def default_memory_limit_gib(device: str) -> float:
    if device != "cpu":  # CUDA reserves a large address space: an RLIMIT_AS cap would break it
        return 0.0
    try:
        return round(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def run_sampling(args, s: dict, out: Path, sweeps: list[str]) -> None:
    model = {k: s[k] for k in ("vocab", "hidden", "intermediate", "layers")}
    positions = max(max(s["prompt_lens"] + [s["g_prompt_len"], s["headline"][0]]) + 64,
                    max(s["prompt_lens"]) + s["completion_len"] + 8)
    done = {}
    if args.resume and (out / "results.csv").exists():
        done = {tuple(r[k] for k in KEY): r for r in read_csv(out / "results.csv")}
    rows: list[dict] = []
    threads = None
    failed: dict[str, list[tuple]] = {e: [] for e in ENGINES}  # points an engine failed or went over the budget
    engines = [e for e in args.engines.split(",") if e]
    title = (f"RolloutEngine.generate, {args.device}: Llama {s['layers']}x{s['hidden']}, V={s['vocab']}; "
             f"shared prompt cache vs transformers generate")

    def flush():
        write_csv(out / "results.csv", rows, COLUMNS)
        write_summary(out / "summary.json", {
            "rows": [{k: r.get(k) for k in FIELDS} for r in rows], **sampling_summary(rows, s),
            "budget_mib": args.budget_mib, "model": {**model, "heads": 4, "tied": False, "positions": positions,
                                                     "dtype": "fp32" if args.device == "cpu" else "bf16 autocast"},
            "sample_memory_mib": args.sample_memory_mib, "memory_limit_gib": args.memory_limit_gib,
            **environment_fields(args.device, threads)})

    try:
        for pt in point_list(sweeps, s):
            lp, lc, G, P = pt
            for engine in engines:
                key = (lp, lc, G, P, engine)
                label = f"{engine:>8} Lp={lp:>5} Lc={lc} G={G:>2} P={P}"
                if key in done:
                    row = done[key]
                    print(f"{label}: kept from the earlier results.csv", flush=True)
                else:
                    smaller = [q for q in failed[engine] if dominated_by(pt, q)]
                    if smaller:
                        q = smaller[0]
                        prev = next(r for r in rows if tuple(r[k] for k in KEY) == q + (engine,))
                        err = prev.get("error")
                        why = ("over_budget" if err in (None, "over_budget") else err if err.startswith("not run")
                               else f"not run: failed at Lp={q[0]} G={q[2]} ({err})")
                        row = {**dict(zip(KEY, key)), "sample_s": None, "peak_mib": None, "new_tokens_mean": None,
                               "error": why}
                        print(f"{label}: {why if why.startswith('not run') else 'not run (' + why + ')'}", flush=True)
                    else:
                        spec = {**dict(zip(KEY, key)), **model, "positions": positions, "device": args.device,
                                "memory_limit_gib": args.memory_limit_gib, "sample_memory_mib": args.sample_memory_mib}
                        row = run_point(args, spec)
                        threads = row.get("threads", threads)
                        if row.get("error"):
                            print(f"{label}: FAILED: {row['error']}", flush=True)
                        else:
                            print(f"{label}: {row['sample_s']:8.2f} s, peak {row['peak_mib']:8.1f} MiB, "
                                  f"{row['new_tokens_mean']:g} new tokens/sample ({row.get('wall_s')} s)", flush=True)
                if row.get("error") or (row.get("peak_mib") is not None and row["peak_mib"] > args.budget_mib):
                    failed[engine].append(pt)
                rows.append(row)
                flush()  # after every point: an interrupted sweep keeps what it measured
    finally:
        if rows:
            flush()
            plot(rows, s, out / "rollout.png", title, args.budget_mib)
    summ = sampling_summary(rows, s)
    print(json.dumps(summ, indent=1))
    print(f"wrote {out}/results.csv, summary.json, rollout.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", default="all", choices=("prompt", "G", "headline", "all", "step"),
                   help="all: prompt, G and headline (the step sweep runs on its own)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None, help="output folder (default runs/bench/rollout; --quick adds quick/, "
                                               "CUDA adds cuda/)")
    p.add_argument("--budget-mib", type=float, default=4096.0, help="an engine over this peak at a smaller point "
                                                                    "is not run at larger ones")
    p.add_argument("--point-timeout", type=float, default=900.0, help="seconds per sampling point")
    p.add_argument("--step-timeout", type=float, default=3600.0, help="seconds per grao train step point")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="address-space cap of each point's process (default: 90%% of memory on CPU, none on CUDA; "
                        "0: none)")
    p.add_argument("--sample-memory-mib", type=int, default=None,
                   help="TrainConfig.sample_memory_mib of the sampling points (default: the config's default)")
    p.add_argument("--engines", default=",".join(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="keep the points of an earlier results.csv in --out")
    p.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes (seconds)")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-point", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    if args.point:
        print(json.dumps(one_point(json.loads(args.point))))
        return 0
    if args.step_point:
        from benchmarks.rollout_step import step_point
        print(json.dumps(step_point(json.loads(args.step_point))))
        return 0
    if args.memory_limit_gib is None:
        args.memory_limit_gib = default_memory_limit_gib(args.device)
    s = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else REPO / "runs" / "bench" / "rollout"
    out = out / ("quick" if args.quick and not args.out else "") / ("cuda" if args.device == "cuda" else "")
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep == "step":
        from benchmarks.rollout_step import run_step
        run_step(args, s, out)
    else:
        run_sampling(args, s, out, ["prompt", "G", "headline"] if args.sweep == "all" else [args.sweep])
    return 0


if __name__ == "__main__":
    sys.exit(main())
