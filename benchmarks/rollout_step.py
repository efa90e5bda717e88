"""The whole ``grao train`` step with long prompts, shared-prompt sampling against ``generate``
(``python benchmarks/rollout.py --sweep step``; the sampling sweeps and the shared helpers are in
``benchmarks/rollout.py``).

The whole ``grao train`` step (P = 8, G = 8, 32 new tokens) with the sampling benchmark's Llama saved to a
folder (and a 32000-token character tokenizer), one step on a JSONL file of prompts of Lp tokens, as a
subprocess: its wall time, its peak RSS (``getrusage(RUSAGE_CHILDREN)`` in a wrapper process per point) and
the step's ``step_seconds`` / ``gen_seconds`` / ``update_seconds`` from its metrics.jsonl. Points: Lp = 4096
with today's settings (``--no-shared-sampling``) and with the defaults (shared sampling); Lp = 24576 with the
defaults and with ``--no-shared-sampling`` (expected to fail: its last line is recorded). The issue's
target: at 4096 the default step >= 3x faster with >= 3x lower peak RSS; at 24576 it trains on a 24 GB
machine. Results go to step.csv and the "step" section of summary.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.rollout import (
    REPO,
    build_model,
    child_env,
    describe_exit,
    environment_fields,
    find,
    limit_address_space,
    ratio,
    write_csv,
    write_summary,
)

ROLLOUT = Path(__file__).with_name("rollout.py")  # the command line the point processes run
STEP_COLUMNS = ("prompt_len", "engine", "step_s", "sample_s", "update_s", "peak_rss_mib", "wall_s",
                "new_tokens_mean", "error")


def prepare_step_inputs(spec: dict, folder: Path) -> tuple[Path, Path]:
    """The model + tokenizer folder and a JSONL file of prompts of exactly ``prompt_len`` tokens."""
    import gc
    import random

    from grao import demo

    tok = demo.build_tokenizer(vocab_size=spec["vocab"])  # every sampled id decodes
    model_dir = folder / "model"
    model = build_model(dict(spec, token_ids={"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                              "pad_token_id": tok.pad_token_id}))
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    gc.collect()
    rng = random.Random(spec["prompt_len"])
    alphabet = [c for c in demo.CHARS if c.isalnum()]
    data = folder / f"data_Lp{spec['prompt_len']}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for _ in range(2 * spec["P"]):
            prompt = "".join(rng.choice(alphabet) for _ in range(spec["prompt_len"]))
            n = len(tok(prompt, add_special_tokens=True)["input_ids"])
            if n != spec["prompt_len"]:
                raise RuntimeError(f"a {spec['prompt_len']}-character prompt encodes to {n} tokens")
            fh.write(json.dumps({"prompt": prompt, "reference": "".join(rng.choice("0123456789") for _ in range(4))})
                     + "\n")
    return model_dir, data


def step_point(spec: dict) -> dict:
    """Run in a fresh process: write the inputs, run ``grao train --steps 1`` as a child, report its figures."""
    import resource

    sys.path.insert(0, str(REPO))
    from grao.trainer import TrainConfig

    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    row = {"prompt_len": spec["prompt_len"], "engine": spec["engine"], "step_s": None, "sample_s": None,
           "update_s": None, "peak_rss_mib": None, "wall_s": None, "new_tokens_mean": None, "error": None}
    scratch = Path(spec["scratch"])  # the model and the data: large, regenerated, never under --out
    scratch.mkdir(parents=True, exist_ok=True)
    model_dir, data = prepare_step_inputs(spec, scratch)
    run_dir = folder / f"run_{spec['engine']}_Lp{spec['prompt_len']}"
    cmd = [sys.executable, "-m", "grao.cli", "train", "--model", str(model_dir), "--data", str(data), "--steps", "1",
           "--group-size", str(spec["G"]), "--prompts-per-step", str(spec["P"]),
           "--max-new-tokens", str(spec["completion_len"]), "--output-dir", str(run_dir), "--overwrite",
           "--no-progress", "--no-plot", "--tensorboard", "false", "--device", spec["device"]]
    default_cut = TrainConfig.__dataclass_fields__["max_prompt_length"].default
    if spec["engine"] == "generate":  # today's settings: transformers generate, the prompt not cut
        cmd += ["--no-shared-sampling", "--max-prompt-length", str(spec["prompt_len"] + 16)]
    elif default_cut and default_cut < spec["prompt_len"]:  # defaults, but a default that would cut the prompt
        cmd += ["--max-prompt-length", str(spec["prompt_len"] + 16)]
    row["command"] = " ".join(["grao"] + cmd[3:])
    limit_address_space(spec.get("memory_limit_gib", 0))  # inherited by the grao train process
    log = folder / f"run_{spec['engine']}_Lp{spec['prompt_len']}.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        try:
            rc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, timeout=spec["timeout"]).returncode
        except subprocess.TimeoutExpired:
            rc = None
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    text = log.read_text(encoding="utf-8", errors="replace")
    if rc is None:
        row["error"] = f"timeout after {spec['timeout']:g} s"
    elif rc != 0:
        row["error"] = describe_exit(rc, text)
    metrics = run_dir / "metrics.jsonl"
    if rc == 0 and metrics.exists():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            m = json.loads(line) if line.strip() else {}
            if "step_seconds" in m:
                row.update(step_s=round(m["step_seconds"], 3), sample_s=round(m["gen_seconds"], 3),
                           update_s=round(m["update_seconds"], 3),
                           new_tokens_mean=round(m.get("completion_len_mean", float("nan")), 2),
                           trainer_peak_memory_mb=round(m.get("peak_memory_mb", float("nan")), 1))
                if m.get("prompts_truncated"):
                    row["error"] = f"{m['prompts_truncated']} prompts were cut"
                break
        else:
            row["error"] = "metrics.jsonl has no step record"
    elif rc == 0:
        row["error"] = "no metrics.jsonl"
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # hundreds of MiB per point; the figures are kept
    return row


def run_step_point(args, spec: dict) -> dict:
    cmd = [sys.executable, str(ROLLOUT), "--step-point", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(args.device),
                             timeout=spec["timeout"] + 600)
    except subprocess.TimeoutExpired:
        res = None
    if res is not None and res.returncode == 0 and res.stdout.strip():
        return json.loads(res.stdout.strip().splitlines()[-1])
    err = "wrapper timeout" if res is None else describe_exit(res.returncode, res.stderr)
    return {"prompt_len": spec["prompt_len"], "engine": spec["engine"], "step_s": None, "sample_s": None,
            "update_s": None, "peak_rss_mib": None, "wall_s": None, "new_tokens_mean": None, "error": err}


def step_summary(rows: list[dict], s: dict) -> dict:
    short, long = s["step_lens"][0], s["step_lens"][-1]
    out: dict = {"rows": rows, "P": s["step_P"], "G": s["step_G"], "completion_len": s["step_completion_len"]}
    sh, ge = find(rows, "shared", prompt_len=short), find(rows, "generate", prompt_len=short)
    t = {"prompt_len": short, "speedup": ratio(ge and ge.get("step_s"), sh and sh.get("step_s")),
         "peak_rss_ratio": ratio(ge and ge.get("peak_rss_mib"), sh and sh.get("peak_rss_mib")),
         "target": "defaults >= 3x faster step and >= 3x lower peak RSS than --no-shared-sampling"}
    if t["speedup"] is not None and t["peak_rss_ratio"] is not None:
        t["met"] = t["speedup"] >= 3 and t["peak_rss_ratio"] >= 3
    out["short"] = t
    lg = find(rows, "shared", prompt_len=long)
    out["long"] = {"prompt_len": long, "trains_with_defaults": None if lg is None else lg.get("error") is None,
                   "peak_rss_mib": lg and lg.get("peak_rss_mib"), "step_s": lg and lg.get("step_s")}
    return out


def run_step(args, s: dict, out: Path) -> None:
    folder = out / "step"
    spec0 = {"vocab": s["vocab"], "hidden": s["hidden"], "intermediate": s["intermediate"], "layers": s["layers"],
             "positions": max(s["step_lens"]) + s["step_completion_len"] + 64 + 8, "P": s["step_P"], "G": s["step_G"],
             "completion_len": s["step_completion_len"], "device": args.device, "folder": str(folder),
             "scratch": str(REPO / "runs" / "bench" / "rollout_step_inputs"),
             "memory_limit_gib": args.memory_limit_gib, "timeout": args.step_timeout}
    rows: list[dict] = []
    failed: set[str] = set()
    threads = child_env(args.device).get("OMP_NUM_THREADS")  # the train processes' thread count (None: torch's)
    try:
        for lp in s["step_lens"]:
            for engine in ("generate", "shared"):
                label = f"step {engine:>8} Lp={lp:>5} P={s['step_P']} G={s['step_G']}"
                if engine in failed:
                    row = {"prompt_len": lp, "engine": engine, "step_s": None, "sample_s": None, "update_s": None,
                           "peak_rss_mib": None, "wall_s": None, "new_tokens_mean": None,
                           "error": "not run: failed at a shorter prompt"}
                    print(f"{label}: not run (failed at a shorter prompt)", flush=True)
                else:
                    row = run_step_point(args, {**spec0, "prompt_len": lp, "engine": engine})
                    if row.get("error"):
                        failed.add(engine)
                        print(f"{label}: FAILED: {row['error']} (peak RSS {row.get('peak_rss_mib')} MiB, "
                              f"{row.get('wall_s')} s)", flush=True)
                    else:
                        print(f"{label}: step {row['step_s']:8.2f} s (sampling {row['sample_s']:.2f} s, update "
                              f"{row['update_s']:.2f} s), peak RSS {row['peak_rss_mib']:8.1f} MiB, process "
                              f"{row['wall_s']} s", flush=True)
                rows.append(row)
                write_csv(out / "step.csv", rows, STEP_COLUMNS)
                write_summary(out / "summary.json", {"step": {**step_summary(rows, s), "memory_limit_gib":
                                                              args.memory_limit_gib,
                                                              **environment_fields(args.device, threads)}})
    finally:
        shutil.rmtree(Path(spec0["scratch"]) / "model", ignore_errors=True)
    summ = step_summary(rows, s)
    print(json.dumps({k: summ[k] for k in ("short", "long")}, indent=1))
    print(f"wrote {out}/step.csv, summary.json (step); logs in {folder}/")

