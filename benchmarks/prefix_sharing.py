"""One GRAO update step, shared-prompt packed layout vs unshared padded rows: time and peak memory.

Each point runs in a fresh process (peaks do not leak between points) and does one full update of a
Llama built from a config (4 layers, hidden 256, vocabulary 32000, untied head: 19.5M parameters) on a
fixed rollout of 1 prompt with G sampled completions and its reference answer (random tokens; generation
is left out): forward, fused GRAO loss, backward, clipping and an AdamW step, through
``grao.trainer.Trainer.accumulate_gradients``, as ``grao train`` runs it with ``prefix_sharing`` on
("shared") or off ("unshared").

Memory: ``peak_mib`` is the peak above the model's weights and optimizer state. A small warm-up update
first allocates the AdamW state; then the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``)
and the peak RSS during the measured step minus the RSS just before it is reported (CUDA:
``max_memory_allocated`` minus ``memory_allocated`` before the step). Points run with
``MALLOC_MMAP_THRESHOLD_=1048576`` so freed large buffers leave the RSS, and on CPU with ``OMP_NUM_THREADS=1``
(on a shared 2-core machine a 2-thread op stalls for a time slice whenever another process holds a core:
measured ~8 ms per op whatever its size; unset it on a machine of your own). ``step_s`` is that step's
wall time.

Sweeps (completion length 128 unless said): prompt length at G = 8; G at prompt length 1024; and with
the trainer's default settings (token-budget micro-batches) G at 512-token completions, where peak memory
should stay flat, and the 4096-token prompt at G = 8 (its group split into passes that share one forward
of the prompt). The layout comparison runs the whole step in one forward/backward
(``micro_batch_tokens=0``), so it measures the layout, not micro-batching. A point whose layout already
went over ``--budget-mib`` at a shorter prompt is not run (recorded as ``over_budget``).

    python benchmarks/prefix_sharing.py                 # CPU -> runs/bench/prefix/
    python benchmarks/prefix_sharing.py --device cuda   # a GPU -> runs/bench/prefix/cuda/
    python benchmarks/prefix_sharing.py --out benchmarks/results/prefix   # the committed results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("prompt_len", "completion_len", "G", "layout", "step_s", "peak_mib")


def one_point(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from benchmarks.common import peak_since_start, start_peak
    from grao import demo
    from grao.trainer import Rollout, TrainConfig, Trainer

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg_model = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=args.prompt_len + args.completion_len + 8,
                            tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(cfg_model, attn_implementation="sdpa").to(device)
    tok = demo.build_tokenizer()  # only pad/eos ids are used: rows are token ids already
    budget = {} if args.defaults else {"micro_batch_tokens": 0}
    cfg = TrainConfig(method="grao", loss_impl="fused", group_size=args.G, prompts_per_step=1,
                      prefix_sharing=args.layout == "shared", output_dir="runs/prefix_bench", progress=False,
                      plot=False, tensorboard="false", device=args.device,
                      bf16="auto" if device.type == "cuda" else "false", **budget)
    records = [{"prompt": "x", "reference": "y"}]
    trainer = Trainer(cfg, model=model, tokenizer=tok, train_records=records)
    g = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(4, args.vocab, (n,), generator=g).tolist()

    def rollout(prompt_len, completion_len, G):
        return Rollout(records, ["x"], [toks(prompt_len)], [[toks(completion_len) for _ in range(G)]], [[""] * G],
                       [toks(completion_len)], torch.rand(1, G + 1, generator=g))

    def update(ro):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.accumulate_gradients(ro)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    update(rollout(8, 4, args.G))  # warm-up: AdamW state, lazy imports, kernel set-up
    ro = rollout(args.prompt_len, args.completion_len, args.G)
    before = start_peak(device)
    t0 = time.perf_counter()
    update(ro)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = peak_since_start(device)
    return {"prompt_len": args.prompt_len, "completion_len": args.completion_len, "G": args.G, "layout": args.layout,
            "step_s": round(seconds, 3), "peak_mib": round((peak - before) / 2 ** 20, 1),
            "settings": "defaults" if args.defaults else "one pass"}


def points(args) -> list[tuple[str, int, int, int, bool]]:
    """(sweep, prompt_len, completion_len, G, defaults), in the order they run (shorter prompts first)."""
    out = [("prompt", lp, 128, 8, False) for lp in args.prompt_lens]
    out += [("G", args.g_prompt_len, 128, G, False) for G in args.groups if G != 8 or args.g_prompt_len not in
            args.prompt_lens]
    out += [("defaults", args.flat_prompt_len, 512, G, True) for G in args.flat_groups]
    # the headline point with the default budget: the group is split, its prompt forwarded once (PromptKV)
    out += [("defaults, long prompt", lp, 128, 8, True) for lp in args.prompt_lens if lp == 4096]
    # the same, the whole step in one pass: what the token budget bounds
    out += [("one pass", args.flat_prompt_len, 512, G, False) for G in (min(args.flat_groups), max(args.flat_groups))]
    return out


def run_point(args, sweep, lp, lc, G, defaults, layout) -> dict:
    cmd = [sys.executable, __file__, "--point", "--layout", layout, "--prompt-len", str(lp), "--completion-len",
           str(lc), "--G", str(G), "--device", args.device, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--intermediate", str(args.intermediate), "--layers", str(args.layers)] + (["--defaults"] if defaults else [])
    t0 = time.perf_counter()
    # a fixed mmap threshold: large buffers are returned to the OS when freed, so RSS follows live memory
    # (glibc's dynamic threshold otherwise moves peaks by ~one [V x D] buffer between runs; README)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576"))
    if args.device == "cpu":  # one thread: on a shared machine 2-thread ops stall whenever another process runs
        env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=args.timeout)
    if res.returncode != 0:
        raise RuntimeError(f"point {sweep} {layout} Lp={lp} Lc={lc} G={G} failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["sweep"], row["wall_s"] = sweep, round(time.perf_counter() - t0, 1)
    return row


def summarise(rows: list[dict], budget_mib: float) -> dict:
    def find(sweep, layout, **kw):
        for r in rows:
            if r["sweep"] == sweep and r["layout"] == layout and all(r[k] == v for k, v in kw.items()):
                return r
        return None

    targets = {}
    sh, un = find("prompt", "shared", prompt_len=4096), find("prompt", "unshared", prompt_len=4096)
    if sh and un and un.get("step_s") is not None and sh.get("step_s") is not None:
        targets["Lp4096_Lc128_G8"] = {"speedup": round(un["step_s"] / sh["step_s"], 2),
                                      "peak_ratio": round(un["peak_mib"] / sh["peak_mib"], 2)}
    longest = {}
    for layout in ("shared", "unshared"):
        ok = [r["prompt_len"] for r in rows if r["sweep"] == "prompt" and r["layout"] == layout
              and r.get("peak_mib") is not None and r["peak_mib"] <= budget_mib]
        longest[layout] = max(ok) if ok else None
    targets["longest_prompt_within_budget"] = {"budget_mib": budget_mib, **longest}
    flat = [r["peak_mib"] for r in rows if r["sweep"] == "defaults" and r.get("peak_mib") is not None]
    if flat:
        targets["defaults_Lc512_peak_max_over_min"] = round(max(flat) / min(flat), 3)
    long = find("defaults, long prompt", "shared", prompt_len=4096)
    if long and sh and long.get("step_s") is not None and sh.get("step_s") is not None:
        targets["defaults_Lp4096_Lc128_G8"] = {"step_s": long["step_s"], "peak_mib": long["peak_mib"],
                                               "step_vs_one_pass": round(long["step_s"] / sh["step_s"], 2),
                                               "peak_vs_one_pass": round(long["peak_mib"] / sh["peak_mib"], 2)}
    whole = [r["peak_mib"] for r in rows if r["sweep"] == "one pass" and r.get("peak_mib") is not None]
    if len(whole) == 2:
        targets["one_pass_Lc512_peak_max_over_min"] = round(max(whole) / min(whole), 3)
    return targets


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"shared": ("tab:blue", "o-"), "unshared": ("tab:red", "s--")}
    for layout, (color, fmt) in styles.items():
        pr = sorted((r for r in rows if r["sweep"] == "prompt" and r["layout"] == layout and r.get("step_s") is not None),
                    key=lambda r: r["prompt_len"])
        if pr:
            axes[0].plot([r["prompt_len"] for r in pr], [r["step_s"] for r in pr], fmt, color=color, label=layout)
            axes[1].plot([r["prompt_len"] for r in pr], [r["peak_mib"] for r in pr], fmt, color=color, label=layout)
    for ax, what in ((axes[0], "update step (s)"), (axes[1], "peak above weights + optimizer (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (G = 8, completions 128)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for layout, (color, fmt) in styles.items():
        gr = sorted((r for r in rows if r["sweep"] in ("G", "prompt") and r["layout"] == layout and r.get("step_s") is not None
                     and r["prompt_len"] == rows_g_prompt(rows)), key=lambda r: r["G"])
        if gr:
            axes[2].plot([r["G"] for r in gr], [r["peak_mib"] for r in gr], fmt, color=color,
                         label=f"{layout}, one pass (completions 128, prompt {gr[0]['prompt_len']})")
    for sweep, fmt, color in (("defaults", "^-", "tab:green"), ("one pass", "v:", "tab:olive")):
        fl = sorted((r for r in rows if r["sweep"] == sweep and r.get("step_s") is not None), key=lambda r: r["G"])
        if fl:
            axes[2].plot([r["G"] for r in fl], [r["peak_mib"] for r in fl], fmt, color=color,
                         label=f"shared, {sweep} (completions {fl[0]['completion_len']}, prompt {fl[0]['prompt_len']})")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("G")
    axes[2].set_ylabel("peak above weights + optimizer (MiB)")
    axes[2].grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def rows_g_prompt(rows: list[dict]) -> int | None:
    gs = [r["prompt_len"] for r in rows if r["sweep"] == "G"]
    return gs[0] if gs else None


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-lens", type=ints, default=ints("256,1024,2048,4096,8192"))
    p.add_argument("--groups", type=ints, default=ints("4,8,16,32"))
    p.add_argument("--g-prompt-len", type=int, default=1024)
    p.add_argument("--flat-groups", type=ints, default=ints("4,8,16,32"))
    p.add_argument("--flat-prompt-len", type=int, default=256)
    p.add_argument("--layouts", default="shared,unshared")
    p.add_argument("--budget-mib", type=float, default=2048.0, help="memory budget for 'longest prompt that trains'")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per point")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/prefix, CUDA adds cuda/; the "
                   "committed results change only with --out benchmarks/results/prefix)")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="shared", help=argparse.SUPPRESS)
    p.add_argument("--prompt-len", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--completion-len", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--G", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--defaults", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point:
        print(json.dumps(one_point(args)))
        return 0
    sys.path.insert(0, str(REPO))
    from benchmarks.common import environment
    out = Path(args.out) if args.out else REPO / "runs" / "bench" / "prefix" / (
        "" if args.device == "cpu" else "cuda")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    over: set[tuple[str, str]] = set()  # (sweep, layout) that went over the budget
    for sweep, lp, lc, G, defaults in points(args):
        for layout in args.layouts.split(","):
            if (defaults or sweep == "one pass") and layout != "shared":
                continue
            if (sweep, layout) in over:
                rows.append({"sweep": sweep, "prompt_len": lp, "completion_len": lc, "G": G, "layout": layout,
                             "step_s": None, "peak_mib": None, "status": "over_budget"})
                print(f"{sweep:>8} {layout:>8} Lp={lp:>5} Lc={lc} G={G:>2}: not run (over the budget at a "
                      f"smaller point)", flush=True)
                continue
            try:
                row = run_point(args, sweep, lp, lc, G, defaults, layout)
                row["status"] = "ok"
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # recorded, never dropped
                status = "timeout" if isinstance(exc, subprocess.TimeoutExpired) else "failed"
                print(f"{sweep:>8} {layout:>8} Lp={lp:>5} Lc={lc} G={G:>2}: {status}: {str(exc)[-500:]}", flush=True)
                rows.append({"sweep": sweep, "prompt_len": lp, "completion_len": lc, "G": G, "layout": layout,
                             "step_s": None, "peak_mib": None, "status": status})
                over.add((sweep, layout))
                continue
            rows.append(row)
            print(f"{sweep:>8} {layout:>8} Lp={lp:>5} Lc={lc} G={G:>2}: step {row['step_s']:7.2f} s, peak "
                  f"{row['peak_mib']:8.1f} MiB ({row['wall_s']} s)", flush=True)
            if sweep == "prompt" and row["peak_mib"] > args.budget_mib:
                over.add((sweep, layout))
    targets = summarise(rows, args.budget_mib)
    env = environment(args.device, "python benchmarks/prefix_sharing.py " + " ".join(sys.argv[1:]))
    model = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab,
             "heads": 4, "tied": False, "dtype": "fp32" if args.device == "cpu" else "bf16 autocast"}
    summary = {"rows": [{k: r[k] for k in FIELDS} for r in rows], "targets": targets, "model": model,
               "environment": env}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    cols = ["sweep", "prompt_len", "completion_len", "G", "layout", "settings", "step_s", "peak_mib", "status"]
    with open(out / "results.csv", "w", encoding="utf-8") as fh:
        fh.write(",".join(cols) + "\n")
        fh.writelines(",".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + "\n" for r in rows)
    plot(rows, out / "prefix_sharing.png",
         f"one GRAO update step, {args.device}: Llama {args.layers}x{args.hidden}, V={args.vocab}; shared prompt vs "
         f"unshared rows")
    print(json.dumps(targets, indent=1))
    print(f"wrote {out}/summary.json, results.csv, prefix_sharing.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
