"""One ``grao train`` step of a Qwen2.5-0.5B-shaped model: full fine-tuning in fp32 against LoRA on bf16 weights.

    python benchmarks/lora_memory.py                     # writes runs/bench/lora_memory/
    python benchmarks/lora_memory.py --out benchmarks/results/lora
    python benchmarks/lora_memory.py --quick             # a tiny model, a smoke run (seconds)

The model is built from a config (Qwen2Config: 24 layers, hidden 896, intermediate 4864, 14 heads, 2 key/value
heads, vocabulary 151936, tied head; random weights, nothing downloaded) and saved to
runs/bench/lora_memory_inputs/ with a character tokenizer padded to that vocabulary (``grao.demo``); the data
are 2 prompts of exactly 256 tokens with 63-digit references. The model is saved in bf16, as the published
Qwen checkpoints are (full fine-tuning loads it into fp32). Each configuration runs ``grao train --steps 1``
(P = 2, G = 4, 64 new tokens) in a fresh process of its own, in which ``grao.cli.main`` runs with the
trainer's phases instrumented (``Trainer.__init__``, ``sample``, ``compute_gradients``, ``apply_update``,
``save_checkpoint``): after each one the process's resident set size and the peak since the previous phase
(VmHWM, reset between phases) are read. ``MALLOC_MMAP_THRESHOLD_=1048576`` makes freed buffers leave the RSS,
so that it follows live memory (docs/trainer.md: glibc's dynamic threshold otherwise moves peaks by a buffer).

Where the peak goes (results.json "breakdown"; "measured" or "computed" per entry):

* interpreter and libraries: the RSS before the trainer is built (measured);
* weights: the RSS the trainer's construction adds, every parameter read once (measured; the parameter
  bytes beside it, computed); loading (a bf16 file into fp32, say) may peak higher: that is the "load" peak;
* gradients: what ``compute_gradients`` leaves held (measured: the gradients, and what the allocator and the
  libraries keep of the phase: no tensor but the parameters and their gradients is alive after it, checked
  with ``gc`` on a 2-layer model; trainable parameters x 4 bytes, computed);
* optimizer state: what AdamW's first step adds (measured; 2 x trainable x 4 bytes, computed);
* activations: the peak of ``compute_gradients`` above the RSS it ends with (measured: activations and the
  loss's temporaries of its largest pass, with the gradients accumulated so far);
* sampling: the peak of ``sample`` above the weights (measured: keys/values, decode rows, logits).

Beside it, the arithmetic for Qwen2.5-1.5B and Qwen3-8B on an 80 GB GPU (:func:`gpu_estimate`; formulas and
assumptions in the table it writes). Results: results.json, table.md, one log per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
GIB = 2 ** 30

FULL = {"layers": 24, "hidden": 896, "intermediate": 4864, "heads": 14, "kv_heads": 2, "vocab": 151936,
        "prompt_len": 256, "completion_len": 64, "P": 2, "G": 4, "lora_r": 16}
QUICK = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 512,
         "prompt_len": 32, "completion_len": 8, "P": 2, "G": 4, "lora_r": 4}
# name -> (what it is, extra grao train flags)
CONFIGS = {
    "full_fp32": ("full fine-tuning, fp32 weights", ["--model-dtype", "fp32"]),
    "lora_fp32": ("LoRA r = {r}, fp32 weights", ["--lora-r", "{r}", "--model-dtype", "fp32"]),
    "lora_bf16": ("LoRA r = {r}, bf16 weights (adapters fp32)", ["--lora-r", "{r}", "--model-dtype", "bf16"]),
}


# ------------------------------------------------------------------------------------------------ inputs


def prepare(spec: dict, folder: Path) -> tuple[Path, Path]:
    """Save the model (built from a Qwen2Config, seeded) and tokenizer to ``folder/model``; write the data."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grao import demo

    tok = demo.build_tokenizer(vocab_size=spec["vocab"])
    model_dir, data = folder / "model", folder / "data.jsonl"
    stamp = folder / "spec.json"
    want = {**spec, "saved": "bf16"}  # what the folder holds: a change regenerates it
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (model_dir / "config.json").is_file():
        return model_dir, data
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = Qwen2Config(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["kv_heads"], max_position_embeddings=32768, tie_word_embeddings=True,
                      use_sliding_window=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # saved in bf16, as the published Qwen checkpoints are: full fine-tuning loads it into fp32
        model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    alphabet = [c for c in demo.CHARS if c.isalnum()]
    with open(data, "w", encoding="utf-8") as fh:
        for _ in range(spec["P"]):
            prompt = "".join(rng.choice(alphabet) for _ in range(spec["prompt_len"]))
            n = len(tok(prompt)["input_ids"])
            if n != spec["prompt_len"]:
                raise RuntimeError(f"a {spec['prompt_len']}-character prompt encodes to {n} tokens")
            ref = "".join(rng.choice("0123456789") for _ in range(spec["completion_len"] - 1))  # + EOS
            fh.write(json.dumps({"prompt": prompt, "reference": ref}) + "\n")
    stamp.write_text(json.dumps(want))
    return model_dir, data


def train_argv(spec: dict, name: str, model_dir: Path, data: Path, run_dir: Path) -> list[str]:
    extra = [x.format(r=spec["lora_r"]) for x in CONFIGS[name][1]]
    return ["train", "--model", str(model_dir), "--data", str(data), "--steps", "1", "--prompts-per-step",
            str(spec["P"]), "--group-size", str(spec["G"]), "--max-new-tokens", str(spec["completion_len"]),
            "--output-dir", str(run_dir), "--overwrite", "--no-progress", "--no-plot", "--tensorboard", "false",
            "--device", "cpu", *extra]


# ------------------------------------------------------------------------------------------------ one point


def point(spec: dict, name: str, model_dir: Path, data: Path, run_dir: Path) -> dict:
    """In a fresh process: ``grao train --steps 1`` through ``grao.cli.main``, its phases measured."""
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.common import current_rss, peak_rss, reset_peak_rss
    from grao.cli import main
    from grao.trainer import trainer as trainer_module

    if "lora" in name:
        import peft  # noqa: F401 - imported before the baseline, as grao imports it for LoRA
    marks: list[dict] = []

    def mark(phase: str) -> None:
        marks.append({"phase": phase, "rss": current_rss(), "peak": peak_rss()})
        reset_peak_rss()

    cls = trainer_module.Trainer
    held: dict = {}

    def wrap(method: str):
        orig = getattr(cls, method)

        def run(self, *a, **kw):
            out = orig(self, *a, **kw)
            if method == "__init__":  # weights a load left mmapped are read now, so that they count here
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.sum()
            mark(method)
            if method == "__init__":
                params = list(self.model.parameters())
                held.update(params=sum(p.numel() for p in params),
                            param_bytes=sum(p.numel() * p.element_size() for p in params),
                            trainable=sum(p.numel() for p in params if p.requires_grad),
                            trainable_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
                            weight_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in params}))
            return out
        setattr(cls, method, run)

    for m in ("__init__", "sample", "compute_gradients", "apply_update", "save_checkpoint"):
        wrap(m)
    reset_peak_rss()
    mark("imports")
    t0 = time.perf_counter()
    rc = main(train_argv(spec, name, model_dir, data, run_dir))
    wall = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()][-1]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the full model's is 2 GB
    return {"name": name, "rc": rc, "wall_s": round(wall, 1), "marks": marks, **held,
            # the phases' peaks (VmHWM is reset between phases, and ru_maxrss with it)
            "process_peak_rss": max(x["peak"] for x in marks),
            "threads": torch.get_num_threads(),
            "metrics": {k: metrics.get(k) for k in ("step_seconds", "gen_seconds", "update_seconds", "loss",
                                                    "completion_len_mean", "train_rows", "grad_norm")}}


def breakdown(row: dict) -> dict:
    """Where the peak goes, from the phase marks (module docstring)."""
    m = {x["phase"]: x for x in row["marks"]}
    base, init = m["imports"]["rss"], m["__init__"]["rss"]
    grads_end, update_end = m["compute_gradients"]["rss"], m["apply_update"]["rss"]
    tb = row["trainable_bytes"]
    return {
        "interpreter_and_libraries": {"measured": base},
        "weights": {"measured": init - base, "computed": row["param_bytes"]},
        "sampling_peak_above_weights": {"measured": m["sample"]["peak"] - init},
        "gradients": {"measured": grads_end - m["sample"]["rss"], "computed": tb},
        "activations_peak": {"measured": m["compute_gradients"]["peak"] - grads_end},
        "optimizer_state": {"measured": update_end - grads_end, "computed": 2 * row["trainable"] * 4},
        "phase_peaks": {x["phase"]: x["peak"] for x in row["marks"][1:]},
        "peak_phase": max(row["marks"][1:], key=lambda x: x["peak"])["phase"],
        "peak": row["process_peak_rss"],
    }


# ------------------------------------------------------------------------------------------------ arithmetic

# Published configs (config.json of Qwen/Qwen2.5-1.5B and Qwen/Qwen3-8B).
GPU_MODELS = {
    "Qwen2.5-1.5B": {"layers": 28, "hidden": 1536, "intermediate": 8960, "heads": 12, "kv_heads": 2, "head_dim": 128,
                     "vocab": 151936, "tied": True, "positions": 32768},
    "Qwen3-8B": {"layers": 36, "hidden": 4096, "intermediate": 12288, "heads": 32, "kv_heads": 8, "head_dim": 128,
                 "vocab": 151936, "tied": False, "positions": 40960},
}


def model_numbers(c: dict, r: int = 16) -> dict:
    """Parameter counts: all, and LoRA r's on q, k, v, o, gate, up, down."""
    d, i, q, kv = c["hidden"], c["intermediate"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    layer = d * q + 2 * d * kv + q * d + 3 * d * i + 2 * d  # projections and the two norms
    emb = c["vocab"] * d * (1 if c["tied"] else 2)
    lora = c["layers"] * r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d))
    return {"params": c["layers"] * layer + emb + d, "lora": lora, "d": d, "i": i, "kv": kv}


# The activation formula below, applied to the measured CPU step (fp32, a 571-token pass: one packed group of
# 256 + 5 x 63 positions), gives 1.3 GiB where 2.1 GiB was measured (benchmarks/results/lora): the estimates
# multiply it by this factor (attention scores of the CPU's SDPA, fp32 norm and rotary temporaries, the loss).
ACTIVATION_FACTOR = 1.6


def layer_activation_bytes(c: dict, elem: int = 2) -> int:
    """Bytes kept for the backward per token per layer: norm inputs (fp32) 4d twice, their outputs, q/k/v, the
    attention output, the MLP's gate, up, silu(gate) and product, in ``elem``-byte activations."""
    n = model_numbers(c)
    d, i, kv = n["d"], n["i"], n["kv"]
    return 8 * d + elem * (2 * d + (d + 2 * kv) + d + 4 * i)


def gpu_estimate(name: str, *, method: str, prompt_len: int, G: int, completion_len: int = 512,
                 checkpointing: bool = False, r: int = 16, micro_tokens: int = 1024) -> dict:
    """Peak GPU memory of one grao train step in GiB (bf16 autocast; the defaults: prefix sharing, the fused loss,
    shared-prompt sampling with its 2048 MiB budget, --micro-batch-tokens 1024). Terms:

    * weights: LoRA: 2 B/param (bf16, frozen) + the adapters at 16 B/param (fp32 weight, gradient, AdamW's
      two moments); full: 16 B/param (fp32 master weight, fp32 gradient, two fp32 moments) + 2 B/param for
      autocast's bf16 copies of the weights, cached during the forward and backward;
    * activations kept for the backward, per token per layer (:func:`layer_activation_bytes`, bf16 with fp32
      norms) x :data:`ACTIVATION_FACTOR`; LoRA adds nothing noticeable (under autocast an adapter reads the
      input its base layer's backward keeps; its r-wide intermediates are small); gradient checkpointing keeps
      2d bytes per token per layer instead, plus one layer's full set and the prompt's keys and values;
    * update: a group's prompt is forwarded once and held until its last pass (Lp tokens of activations), plus
      one pass of ``micro_tokens`` tokens;
    * sampling (not at the same time as the update): max(2 GiB budget, one prompt's keys and values + G rows of
      completion_len keys/values and a [V] fp32 logits row each), keys/values 2 * layers * kv * 2 bytes per token;
    * 1.5 GiB for the CUDA context and the allocator's slack.
    """
    c = GPU_MODELS[name]
    n = model_numbers(c, r)
    d, kv, L = n["d"], n["kv"], c["layers"]
    static = 2 * n["params"] + 16 * n["lora"] if method == "lora" else 18 * n["params"]
    layer = layer_activation_bytes(c) * ACTIVATION_FACTOR
    kv_token = 2 * L * kv * 2
    if checkpointing:
        update = 2 * d * L * (prompt_len + micro_tokens) + layer * (prompt_len + micro_tokens) + kv_token * prompt_len
    else:
        update = layer * L * (prompt_len + micro_tokens)
    sampling = max(2 * GIB, kv_token * (prompt_len + G * completion_len) + G * 4 * c["vocab"] * 4)
    total = static + max(update, sampling) + 1.5 * GIB
    return {"static_gib": static / GIB, "update_gib": update / GIB, "sampling_gib": sampling / GIB,
            "total_gib": total / GIB, "params": n["params"], "lora_params": n["lora"]}


def cpu_check() -> float:
    """The activation formula (factor 1) for the CPU step measured here: fp32, one 571-token pass, in GiB."""
    c = {"layers": 24, "hidden": 896, "intermediate": 4864, "heads": 14, "kv_heads": 2, "head_dim": 64,
         "vocab": 151936, "tied": True}
    return layer_activation_bytes(c, elem=4) * 24 * (256 + 5 * 63) / GIB


def gpu_estimates() -> dict:
    return {n: {f"{m}{'_checkpointing' if ck else ''}": {lp: gpu_estimate(n, method=m, prompt_len=lp, G=8,
                                                                         checkpointing=ck)
                                                         for lp in (2048, 8192, 32768)}
                for m in ("full", "lora") for ck in (False, True)} for n in GPU_MODELS}


def gpu_table(budget_gib: float = 80.0) -> list[str]:
    lines = ["| model | method | checkpointing | weights + optimizer | update at Lp = 8192 | peak at 8192 | "
             "longest prompt Lp that fits 80 GB (G = 4 / 16) |", "|---|---|---|---:|---:|---:|---|"]
    for name, c in GPU_MODELS.items():
        for method in ("full", "lora"):
            for ckpt in (False, True):
                e = gpu_estimate(name, method=method, prompt_len=8192, G=8, checkpointing=ckpt)
                fits = []
                top = c["positions"] - 512  # the model's positions, less the completion
                for G in (4, 16):
                    best = 0
                    for lp in [x for x in (1024, 2048, 4096, 8192, 16384, 24576, 32768) if x < top] + [top]:
                        if gpu_estimate(name, method=method, prompt_len=lp, G=G,
                                        checkpointing=ckpt)["total_gib"] <= budget_gib:
                            best = lp
                    fits.append("none" if not best else f"{best} (all positions)" if best == top else str(best))
                lines.append(f"| {name} | {'LoRA r=16, bf16 weights' if method == 'lora' else 'full, fp32 masters'} "
                             f"| {'on' if ckpt else 'off'} | {e['static_gib']:.1f} GiB | {e['update_gib']:.1f} GiB | "
                             f"{e['total_gib']:.1f} GiB | {' / '.join(fits)} |")
    return lines


# ------------------------------------------------------------------------------------------------ report

PHASES = {"__init__": "load", "sample": "sampling", "compute_gradients": "forward/backward",
          "apply_update": "AdamW step", "save_checkpoint": "checkpoint"}


def table(rows: list[dict], spec: dict, env: dict) -> list[str]:
    full = next((r for r in rows if r["name"] == "full_fp32"), None)
    out = [f"# One grao train step: full fine-tuning vs LoRA ({env['date']})", "",
           f"Model: Qwen2-architecture built from a config, {spec['layers']} layers, hidden {spec['hidden']}, "
           f"intermediate {spec['intermediate']}, {spec['heads']} heads / {spec['kv_heads']} kv heads, vocabulary "
           f"{spec['vocab']}, tied head ({rows[0]['params'] / 1e6:.0f}M parameters, random weights). P = {spec['P']} "
           f"prompts of {spec['prompt_len']} tokens, G = {spec['G']}, {spec['completion_len']} new tokens, one step. "
           f"{env['cpu_model']}, {rows[0]['threads']} thread(s), torch {env['torch']}, transformers "
           f"{env['transformers']}, peft {env['peft']}. Peak RSS of the whole process; each configuration in a "
           f"process of its own; `MALLOC_MMAP_THRESHOLD_=1048576`.", "",
           "| configuration | trainable | peak RSS (in) | vs full | weights (meas. / comp.) | held after backward / gradients (comp.) "
           "| optimizer (meas. / comp.) | activations peak (meas.) | sampling peak (meas.) | step | sampling | update |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["breakdown"]
        mib = lambda x: f"{x / MIB:.0f}"  # noqa: E731
        vs = f"{b['peak'] / full['breakdown']['peak']:.2f}x" if full else "-"
        mt = r["metrics"]
        out.append(f"| {CONFIGS[r['name']][0].format(r=spec['lora_r'])} | {r['trainable'] / 1e6:.2f}M | "
                   f"{mib(b['peak'])} MiB ({PHASES[b['peak_phase']]}) | {vs} | {mib(b['weights']['measured'])} / {mib(b['weights']['computed'])} "
                   f"| {mib(b['gradients']['measured'])} / {mib(b['gradients']['computed'])} | "
                   f"{mib(b['optimizer_state']['measured'])} / {mib(b['optimizer_state']['computed'])} | "
                   f"{mib(b['activations_peak']['measured'])} | {mib(b['sampling_peak_above_weights']['measured'])} | "
                   f"{mt['step_seconds']:.1f} s | {mt['gen_seconds']:.1f} s | {mt['update_seconds']:.1f} s |")
    out += ["", "Weights, gradients and optimizer state: measured as the RSS each phase adds or leaves held, "
            "beside their computed size; 'held after backward' is the gradients plus what the allocator and "
            "libraries keep of the forward/backward (no tensor beyond parameters and gradients is alive). "
            "Activations: the forward/backward's peak above what it leaves held (measured). Sampling: its peak "
            "above the weights (measured). Step, sampling and update times: the trainer's step_seconds, "
            "gen_seconds, update_seconds.",
            "", f"Interpreter and libraries before the trainer: {rows[0]['breakdown']['interpreter_and_libraries']['measured'] / MIB:.0f} MiB "
            "(included in the peak). MiB throughout; 'comp.' = parameter counts x bytes.", "",
            "## Qwen2.5-1.5B and Qwen3-8B on an 80 GB GPU (arithmetic, not measured)", "",
            "Settings this package would use: bf16 autocast, prefix sharing, the fused loss, shared-prompt sampling "
            "(2048 MiB budget), `--micro-batch-tokens 1024`, 512-token completions; LoRA r = 16 on the 7 "
            "projections. Formulas (`gpu_estimate` in benchmarks/lora_memory.py): LoRA 2 B/param (frozen bf16) "
            "+ 16 B/param for the adapters (fp32 weight, gradient, two AdamW moments); full fine-tuning 16 B/param "
            "(fp32 masters) + 2 B/param (autocast's bf16 weight copies); activations (8 d + 2 (4 d + 2 kv + 4 i)) "
            "bytes per token per layer (bf16, fp32 norm inputs) x 1.6 (the formula gives "
            f"{cpu_check():.1f} GiB for the fp32 CPU step above, which measured "
            f"{next((r['breakdown']['activations_peak']['measured'] for r in rows if r['name'] == 'full_fp32'), 0) / GIB:.1f} GiB); "
            "a prompt's activations are held for all of its passes, plus one 1024-token pass; gradient "
            "checkpointing keeps 2 d bytes per token per layer, one layer's full set and the prompt's keys and "
            "values; sampling max(2 GiB, its keys/values and logits); 1.5 GiB for the CUDA context. G barely "
            "matters: the update's passes have a fixed token budget, and sampling stays within its budget. Not "
            "measured: no GPU was lent to this work.", "", *gpu_table()]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "lora_memory"), help="results folder")
    ap.add_argument("--quick", action="store_true", help="a tiny model: a smoke run of the code path")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each training process (default 1)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="only rewrite table.md from --out's results.json")
    args = ap.parse_args()
    if args.report:
        sys.path.insert(0, str(REPO))
        done = json.loads((Path(args.out) / "results.json").read_text(encoding="utf-8"))
        done["gpu_estimates"] = gpu_estimates()  # the arithmetic as the code now has it
        (Path(args.out) / "results.json").write_text(json.dumps(done, indent=1) + "\n", encoding="utf-8")
        text = "\n".join(table(done["rows"], done["spec"], done["environment"])) + "\n"
        (Path(args.out) / "table.md").write_text(text, encoding="utf-8")
        print(text)
        return 0
    spec = dict(QUICK if args.quick else FULL)
    inputs = REPO / "runs" / "bench" / ("lora_memory_inputs_quick" if args.quick else "lora_memory_inputs")
    out = Path(args.out)
    if args.point:
        name, run_dir = args.point.split("=", 1)
        print(json.dumps(point(spec, name, inputs / "model", inputs / "data.jsonl", Path(run_dir))))
        return 0
    sys.path.insert(0, str(REPO))
    env_child = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="1048576",
                     PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks."
                    f"lora_memory import prepare; from pathlib import Path; prepare({spec!r}, Path({str(inputs)!r}))"],
                   check=True, env=env_child)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.configs.split(","):
        run_dir = inputs / f"run_{name}"
        cmd = [sys.executable, str(Path(__file__).resolve())] + (["--quick"] if args.quick else []) + \
              ["--point", f"{name}={run_dir}"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env_child)
        (out / f"{name}.log").write_text(res.stdout + res.stderr, encoding="utf-8")
        if res.returncode != 0:
            print(f"{name}: FAILED (exit {res.returncode}); see {out / (name + '.log')}", flush=True)
            return 1
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["breakdown"] = breakdown(row)
        rows.append(row)
        print(f"{name}: peak RSS {row['breakdown']['peak'] / MIB:.0f} MiB, step {row['metrics']['step_seconds']:.1f} s "
              f"(process {time.perf_counter() - t0:.0f} s)", flush=True)
    import peft
    import transformers

    from benchmarks.common import environment
    env = {**environment("cpu"), "transformers": transformers.__version__, "peft": peft.__version__}
    full = next((r for r in rows if r["name"] == "full_fp32"), None)
    summary = {"spec": spec, "environment": env, "rows": rows,
               "gpu_estimates": gpu_estimates()}
    lora = next((r for r in rows if r["name"] == "lora_bf16"), None)
    if full and lora:
        ratio = lora["breakdown"]["peak"] / full["breakdown"]["peak"]
        summary["target"] = {"lora_bf16_over_full_fp32_peak": round(ratio, 3), "target": "<= 0.4", "met": ratio <= 0.4}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "table.md").write_text("\n".join(table(rows, spec, env)) + "\n", encoding="utf-8")
    print((out / "table.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
