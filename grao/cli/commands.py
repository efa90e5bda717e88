"""What each ``grao`` subcommand does: train, demo, eval (RAS and NAG), compare.

``eval`` reports the paper's metrics with one greedy answer per prompt, each judged against the
reference by the reward: RAS = fraction of prompts with R(o_after, y) > 0, NAG = fraction with
R(o_after, y) > R(o_before, y) (docs/spec.md, "Evaluation metrics").
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

from grao import tasks_needle
from grao.cli.options import build_config, load_yaml
from grao.trainer.config import ConfigError, check_field

# The built-in default (`grao demo` and `grao compare`): tuned to show a rising reward within a few
# minutes on a 2-core CPU. Every value can be overridden with the same flags as `grao train`.
DEMO_DEFAULTS = dict(model="demo", task="copy", task_min_len=3, task_max_len=4, reward="exact_match",
                     steps=200, prompts_per_step=8, group_size=8, max_new_tokens=8, temperature=0.7,
                     lr=2e-3, lr_schedule="constant", warmup_steps=10, max_grad_norm=1.0, eval_every=50,
                     eval_prompts=128, output_dir="runs/demo", save_every=100)
# How long `grao demo` takes with the defaults above (README and `grao demo --help` quote this).
DEMO_TIME = "about half a minute on a 2-core CPU"
# A task's own demo settings over DEMO_DEFAULTS (when --task or the YAML names it; flags still win): the
# long-context needle task (grao/tasks_needle.py) needs its reward, lengths and a longer budget.
TASK_DEMO_DEFAULTS = {tasks_needle.TASK: tasks_needle.DEMO_DEFAULTS}
# Fields `grao compare` sets per run itself.
COMPARE_SETS = {"method": "grao compare trains each of --methods", "seed": "grao compare trains each of --seeds",
                "output_dir": "grao compare writes each run under --runs-dir"}


def quiet_progress(progress: bool) -> None:
    """With ``progress`` off, also silence the progress bars of transformers and huggingface_hub."""
    if progress:
        return
    import transformers
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def ras_nag(evaluator, base_model, records, limit: int | None = None, keep_completions: bool = False) -> dict:
    """Greedy answers of the trained policy and of ``base_model`` on ``records`` (the first ``limit``), judged by
    the reward of ``evaluator`` (a Trainer or a RolloutEngine: anything with ``evaluate(records, model=...)``).

    Returns {"reward_after", "reward_before", "ras", "nag", "prompts", "examples"} (and "completions", the
    trained policy's answers, with ``keep_completions``).
    """
    records = records[:limit] if limit else records
    after = evaluator.evaluate(records)
    before = evaluator.evaluate(records, model=base_model)
    ra, rb = after["rewards"], before["rewards"]
    n = len(ra)
    return {"reward_after": sum(ra) / n, "reward_before": sum(rb) / n,
            "ras": sum(a > 0 for a in ra) / n, "nag": sum(a > b for a, b in zip(ra, rb)) / n, "prompts": n,
            "examples": [{"completion_after": a, "completion_before": b}
                         for a, b in zip(after["completions"][:3], before["completions"][:3])],
            **({"completions": after["completions"]} if keep_completions else {})}


def _environment() -> dict:
    import torch
    import transformers
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _eval_lines(history: list[dict]) -> list[str]:
    evals = [(h["step"], h["eval_reward"]) for h in history if "eval_reward" in h]
    if not evals:
        return []
    return ["greedy reward on held-out prompts: " + ", ".join(f"step {s}: {v:.3f}" for s, v in evals)]


# ----------------------------------------------------------------------------------------------------- train / demo


def demo_defaults(args) -> dict:
    """DEMO_DEFAULTS, updated with TASK_DEMO_DEFAULTS of the task that --task (or else the YAML --config) names."""
    task = getattr(args, "task", None) or load_yaml(getattr(args, "config", None)).get("task")
    return {**DEMO_DEFAULTS, **TASK_DEMO_DEFAULTS.get(task, {})}


def resume_line(trainer) -> str:
    """What a resumed run continues with: its saved settings, and the changes RESUME_SAFE allowed."""
    changes = trainer.resume_changes
    return (f"resume: continuing {trainer.output_dir} from step {trainer.step} with its saved settings"
            + (f", changed: {', '.join(changes)}" if changes else ""))


def cmd_train(args) -> int:
    """Train; also the entry point of each process under ``torchrun`` / ``accelerate launch`` (rank 0 prints)."""
    from grao.trainer import Trainer, ascii_curve, shutdown_distributed
    cfg = build_config(args)
    quiet_progress(cfg.progress)
    try:
        trainer = Trainer(cfg)
        if trainer.is_main and trainer.resume_from is not None:
            print(resume_line(trainer), flush=True)
        history = trainer.train()
    except BaseException:
        shutdown_distributed(barrier=False)  # the other ranks may be stuck in a collective: no barrier
        raise
    shutdown_distributed()
    if trainer.is_main:
        print(ascii_curve(history))
        print("\n".join(_eval_lines(history)) or "held-out evaluation: off (see --eval-every)")
        print(f"metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}; checkpoints: {Path(cfg.output_dir) / 'checkpoints'}")
    return 0


def cmd_demo(args) -> int:
    """Train the built-in tiny model on the synthetic task, print the curve, save a plot."""
    import torch

    from grao.trainer import Trainer, ascii_curve, load_model_and_tokenizer, plot_history
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args, demo_defaults(args))
    quiet_progress(cfg.progress)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    print(f"grao demo: method={cfg.method} task={cfg.task} ({cfg.task_min_len}-{cfg.task_max_len} digits), "
          f"model={sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M params, loss={trainer.loss_impl}, "
          f"P={cfg.prompts_per_step} G={cfg.group_size}, {cfg.steps} steps, reward={cfg.reward}")
    if trainer.resume_from is not None:
        print(resume_line(trainer))
    ex = trainer.train_records[0]
    print(f"example: prompt {ex['prompt']!r} -> reference {ex['reference']!r}", flush=True)
    history = trainer.train()
    train_seconds = time.perf_counter() - t0
    base, _ = load_model_and_tokenizer(cfg, name="base")
    base.to(trainer.device)
    result = ras_nag(trainer, base, trainer.eval_records, limit=cfg.eval_prompts)
    print("\nsampled reward during training (moving average of 5 steps):")
    print(ascii_curve(history))
    for line in _eval_lines(history):
        print(line)
    print(f"held-out ({result['prompts']} prompts, greedy): reward before {result['reward_before']:.3f} -> "
          f"after {result['reward_after']:.3f}; RAS {result['ras']:.3f}, NAG {result['nag']:.3f}")
    for e in result["examples"]:
        print(f"  before {e['completion_before']!r:>14} | after {e['completion_after']!r}")
    plot = Path(cfg.output_dir) / "curves.png"
    plot_history({cfg.method: [history]}, plot, title=f"grao demo: {cfg.method} on '{cfg.task}'")
    summary = {"config": dataclasses.asdict(cfg), "seconds": train_seconds, "eval": result, "environment": _environment()}
    with open(Path(cfg.output_dir) / "summary.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1, default=str)
    print(f"time {train_seconds:.0f} s; plot {plot}; metrics {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


# ----------------------------------------------------------------------------------------------------- eval

# What `grao eval` takes from flags, YAML, or the checkpoint's run (the other options do not affect it).
EVAL_FIELDS = ("data", "tokenizer", "task", "task_min_len", "task_max_len", "task_eval_size", "reward",
               "trust_remote_code", "max_new_tokens", "max_prompt_length", "eval_batch_size", "seed", "device",
               "bf16", "attn_implementation")


def run_values(checkpoint: str) -> dict:
    """The EVAL_FIELDS of the run a checkpoint belongs to (``<run>/config.json`` beside ``<run>/checkpoints``),
    so that ``grao eval`` judges it on that run's task with its reward and lengths; {} for other models."""
    path = Path(checkpoint).parent.parent / "config.json"
    if Path(checkpoint).parent.name != "checkpoints" or not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(run, dict):
        return {}
    out = {}
    for key in EVAL_FIELDS:
        if key in run and key not in ("device", "data", "tokenizer"):
            try:  # e.g. a reward given as a Python callable is saved by name only: leave it to --reward
                out[key] = check_field(key, run[key])
            except ConfigError:
                pass
    return out


def cmd_eval(args) -> int:
    """RAS and NAG of a trained model against its base, on --data (or the demo task's held-out prompts)."""
    import torch

    from grao.data import load_records
    from grao.rewards import resolve_reward
    from grao.trainer import RolloutEngine, load_model_and_tokenizer
    from grao.trainer.model import autocast_dtype
    if args.model and args.checkpoint and args.model != args.checkpoint:
        raise ConfigError(f"two models given: --model {args.model} and {args.checkpoint}; give one")
    source = args.model or args.checkpoint
    if not source:
        raise ConfigError("--model is required: the trained model (e.g. runs/x/checkpoints/step-00000100)")
    cfg = build_config(args, {**run_values(source), "progress": False})
    quiet_progress(False)
    data = args.data or cfg.eval_data or cfg.data  # --data given here wins over a YAML's eval_data
    if data is None and "demo" not in (args.base, source):
        raise ConfigError("data is required (a JSONL file of prompt/reference records) unless --base is 'demo'")
    if data is not None:
        records = load_records(data)
    else:
        from grao import demo
        _, records = demo.make_task(cfg.task, num_train=0, num_eval=cfg.task_eval_size, min_len=cfg.task_min_len,
                                    max_len=cfg.task_max_len)
        records = load_records(records)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    policy, tok = load_model_and_tokenizer(cfg, source=source, device=device, name="model")
    base, _ = load_model_and_tokenizer(cfg, source=args.base, device=device, name="base")
    engine = RolloutEngine(policy, tok, cfg, resolve_reward(cfg.reward, trust_remote_code=cfg.trust_remote_code),
                           device, autocast_dtype=autocast_dtype(cfg, device))
    checked = records[:args.limit] if args.limit else records  # too long for either model: refused up front
    engine.check_records(checked, name="data")
    engine.check_records(checked, name="data (with the --base model)", model=base, warn=False)
    result = ras_nag(engine, base, records, limit=args.limit)
    result["data"] = data or f"task {cfg.task} ({cfg.task_min_len}-{cfg.task_max_len} digits), held-out prompts"
    print(json.dumps(result, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------- merge-lora

MERGE_DTYPES = ("auto", "bf16", "fp32")


def cmd_merge_lora(args) -> int:
    """Merge the LoRA adapter of a checkpoint into its base model and save a plain model folder."""
    import torch

    from grao.trainer import lora
    from grao.trainer.config import TrainConfig
    from grao.trainer.model import load_adapter_base
    ckpt, out = Path(args.checkpoint), Path(args.out)
    if not lora.is_adapter_dir(ckpt):
        raise ConfigError(f"checkpoint {ckpt} is not a LoRA checkpoint (no {lora.ADAPTER_CONFIG} in it); a "
                          f"checkpoint of a full fine-tuning run is already a plain model folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ConfigError(f"out {out} already exists and is not empty; use --overwrite to replace its files, or "
                          f"another folder")
    base_values = {"model": args.base} if args.base else {}
    cfg = TrainConfig(**base_values)
    # the base as the run held it (e.g. bf16: the adapter was trained on those rounded weights), merged in fp32
    # (the adapters are fp32 master weights), then saved in --dtype
    quiet_progress(False)
    base, tok, run = load_adapter_base(cfg, ckpt, name="checkpoint")
    if args.base:
        run["model"] = args.base
    model = lora.load_lora(base.float(), ckpt, trainable=False).merge_and_unload()
    want = args.dtype if args.dtype != "auto" else str(run.get("weight_dtype") or "fp32")
    model = model.to(lora.DTYPES.get(want, torch.float32))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"merged the LoRA adapter of {ckpt} into its base model ({run.get('model')}): {out} "
          f"({want}; load it with AutoModelForCausalLM.from_pretrained, or as --model)")
    return 0


# ----------------------------------------------------------------------------------------------------- compare


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))


def cmd_compare(args) -> int:
    """SFT, DPO, PPO, GRPO and GRAO on the same task, budget and seeds; a table and learning curves."""
    import torch

    from grao.cli.compare_report import ABLATIONS, results_json, table_lines, truth_metrics
    from grao.trainer import Trainer, load_model_and_tokenizer, plot_history
    from grao.trainer.checkpoint import OutputDirError, run_summary
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, seeds = args.methods, args.seeds
    base_values = dict(DEMO_DEFAULTS)
    base_values.update({"save_every": 0, "progress": False, "plot": False})
    cfg = build_config(args, base_values, exclude=COMPARE_SETS, saved_run=False)  # its runs are its own
    quiet_progress(cfg.progress)
    # arms: the methods, then (--ablation) the GRAO variants of compare_report.ABLATIONS not already among them
    arms = list(methods) + ([a for a in ABLATIONS if a not in methods] if getattr(args, "ablation", False) else [])
    spec = {a: ABLATIONS[a][1:] if a in ABLATIONS else (a, {}) for a in arms}
    run_dirs = {(m, s): Path(args.runs_dir) / f"{m}-seed{s}" for s in seeds for m in arms}
    held = [f"{d.name}: {run_summary(d)}" for d in run_dirs.values() if run_summary(d)]
    if held and not cfg.overwrite:
        raise OutputDirError(f"--runs-dir {args.runs_dir} already holds {len(held)} of these runs ({held[0]}"
                             f"{', ...' if len(held) > 1 else ''}); use --overwrite to replace them, or another "
                             f"--runs-dir")
    out = Path(args.compare_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[list[dict]]] = {m: [] for m in arms}
    results: dict[str, list[dict]] = {m: [] for m in arms}
    t_all = time.perf_counter()
    for seed in seeds:
        for arm in arms:
            method, overrides = spec[arm]
            run_cfg = dataclasses.replace(cfg, method=method, seed=seed, output_dir=str(run_dirs[arm, seed]),
                                          **overrides)
            t0 = time.perf_counter()
            trainer = Trainer(run_cfg)
            history = trainer.train()
            base, _ = load_model_and_tokenizer(run_cfg, name="base")
            base.to(trainer.device)
            res = ras_nag(trainer, base, trainer.eval_records, limit=run_cfg.eval_prompts, keep_completions=True)
            held_out = trainer.eval_records[:run_cfg.eval_prompts]
            res.update(truth_metrics(held_out, res.pop("completions")))
            res.update({"seed": seed, "seconds": time.perf_counter() - t0,
                        "final_train_reward": sum(h["reward_mean"] for h in history[-10:]) / min(10, len(history))})
            results[arm].append(res)
            runs[arm].append(history)
            print(f"{arm:>5} seed {seed}: held-out reward {res['reward_before']:.3f} -> {res['reward_after']:.3f}, "
                  f"accuracy vs truth {res['accuracy']:.3f}, RAS {res['ras']:.3f}, NAG {res['nag']:.3f} "
                  f"({res['seconds']:.0f} s)", flush=True)
    keys = ("reward_after", "ras", "nag", "final_train_reward")
    lines = ["| method | held-out reward (greedy) | RAS | NAG | sampled reward, last 10 steps |",
             "|---|---|---|---|---|"]
    for m in arms:
        cells = {k: _mean_std([r[k] for r in results[m]]) for k in keys}
        lines.append(f"| {m.upper()} | " + " | ".join(f"{cells[k][0]:.3f} ± {cells[k][1]:.3f}" for k in keys) + " |")
    command = "grao " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    env = _environment()
    header = [f"# grao compare: {', '.join(x.upper() for x in methods)} on the built-in task",
              "",
              f"Command: `{command}`",
              "",
              f"Date {env['date']}; torch {env['torch']}, transformers {env['transformers']}, python {env['python']}, "
              f"{env['device']} ({env['cpu_threads']} threads), {env['platform']}. Total {time.perf_counter() - t_all:.0f} s.",
              "",
              f"Task `{cfg.task}` ({cfg.task_min_len}-{cfg.task_max_len} digits), reward `{cfg.reward}`, "
              f"{cfg.steps} steps x {cfg.prompts_per_step} prompts x G = {cfg.group_size} samples "
              f"(temperature {cfg.temperature}), lr {cfg.lr}, seeds {seeds}; each method trains from the same "
              f"random init per seed and samples the same number of completions per step. Mean ± sample std "
              f"over seeds. Held-out: {cfg.eval_prompts} unseen prompts, one greedy answer each; "
              f"RAS = share with R(o, y) > 0; NAG = share where the trained model's answer scores higher than "
              f"the base model's (docs/spec.md).",
              ""]
    ref_acc = results[arms[0]][0]["reference_accuracy"]
    truth = [f"Held-out accuracy against the truth (exact match, greedy); the references' own accuracy on these "
             f"prompts is {ref_acc:.3f} ({results[arms[0]][0]['flawed_prompts']} of them have a wrong reference).",
             "", *table_lines(results, methods), ""]
    if len(arms) > len(methods):
        truth += ["Ablation of GRAO (same task, seeds and budget):", "",
                  *table_lines(results, [a for a in ABLATIONS if a in arms], {a: v[0] for a, v in ABLATIONS.items()}),
                  ""]
    (out / "table.md").write_text("\n".join(header + truth + ["Rewards:", ""] + lines) + "\n", encoding="utf-8")
    with open(out / "results.json", "w", encoding="utf-8") as fh:
        json.dump(results_json(cfg.task, ref_acc, results, methods), fh, indent=1)
    if len(arms) > len(methods):
        with open(out / "ablation.json", "w", encoding="utf-8") as fh:
            json.dump(results_json(cfg.task, ref_acc, results, [a for a in ABLATIONS if a in arms]), fh, indent=1)
    with open(out / "runs.json", "w", encoding="utf-8") as fh:
        json.dump({"command": command, "environment": env, "config": dataclasses.asdict(cfg), "seeds": seeds,
                   "ablations": {a: ABLATIONS[a] for a in arms if a in ABLATIONS}, "results": results}, fh,
                  indent=1, default=str)
    with open(out / "curves.jsonl", "w", encoding="utf-8") as fh:
        for m in arms:
            for seed, h in zip(seeds, runs[m]):
                fh.writelines(json.dumps({"method": m, "seed": seed, "step": row["step"],
                                         "reward_mean": row["reward_mean"], "loss": row["loss"],
                                         **({"eval_reward": row["eval_reward"]} if "eval_reward" in row else {})})
                             + "\n" for row in h)
    plot_history(runs, out / "curves.png", title=f"sampled reward on '{cfg.task}' (mean, band = min..max over seeds)")
    print("\n".join(lines))
    print("\n".join(truth))
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'runs.json'}, {out / 'curves.jsonl'}, "
          f"{out / 'curves.png'}")
    return 0
