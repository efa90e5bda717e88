"""``grao`` command line: train, demo, eval, compare.

    grao demo                                   # built-in tiny LM + synthetic task, minutes on a CPU
    grao train --config run.yaml [--lr 1e-5 ...] # every TrainConfig field is also a flag
    grao eval --model runs/x/checkpoints/step-00000100 --base <base model> --data eval.jsonl
    grao compare --methods sft,dpo,grpo,grao --seeds 0,1,2 --output-dir results/compare

``eval`` reports the paper's metrics with one greedy answer per prompt, each judged against the
reference by the reward: RAS = fraction of prompts with R(o_after, y) > 0, NAG = fraction with
R(o_after, y) > R(o_before, y) (docs/spec.md, "Evaluation metrics").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
import typing
from pathlib import Path

from grao.trainer import METHODS, TrainConfig

# The built-in default (`grao demo` and `grao compare`): tuned to show a rising reward within a few
# minutes on a 2-core CPU. Every value can be overridden with the same flags as `grao train`.
DEMO_DEFAULTS = dict(model="demo", task="copy", task_min_len=3, task_max_len=4, reward="exact_match",
                     steps=200, prompts_per_step=8, group_size=8, max_new_tokens=8, temperature=0.7,
                     lr=2e-3, lr_schedule="constant", warmup_steps=10, max_grad_norm=1.0, eval_every=50,
                     eval_prompts=128, output_dir="runs/demo", save_every=100)


# ----------------------------------------------------------------------------------------------------- config


def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    if tp is bool:
        return bool
    for cand in (int, float):
        if tp is cand:
            return cand
    return str


def add_config_flags(parser: argparse.ArgumentParser, defaults: dict | None = None, exclude: tuple = ()) -> None:
    """One flag per TrainConfig field (``--group-size`` for group_size); default None = not given."""
    group = parser.add_argument_group("training options (TrainConfig; YAML keys use the field names)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        tp = _field_type(f)
        default = (defaults or {}).get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default {default})")
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None, help=f"(default {default})")


def load_yaml(path: str | None) -> dict:
    """TrainConfig values from a YAML file, parsed with ``yaml.safe_load``: plain scalars, lists and mappings
    only, so a tag such as ``!!python/object/apply:os.system`` is refused (SystemExit naming the file)
    instead of running code."""
    if not path:
        return {}
    import yaml
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.constructor.ConstructorError as exc:
        raise SystemExit(f"{path}: refused: the config may hold only plain YAML values (strings, numbers, "
                         f"booleans, lists, mappings), it is parsed with yaml.safe_load and never builds Python "
                         f"objects; {exc.problem} {exc.problem_mark or ''}".rstrip()) from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read the config: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: the config must be a mapping of TrainConfig fields")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SystemExit(f"{path}: unknown option(s) {unknown}; valid: {sorted(names)}")
    return data


def build_config(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """TrainConfig from: dataclass defaults < ``base`` < YAML ``--config`` < explicit flags."""
    values = dict(base or {})
    values.update(load_yaml(getattr(args, "config", None)))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig(**values).validate()


# ----------------------------------------------------------------------------------------------------- eval


def ras_nag(trainer, base_model, records, limit: int | None = None) -> dict:
    """Greedy answers of the trained policy and of ``base_model`` on ``records``, judged by the trainer's reward.

    Returns {"reward_after", "reward_before", "ras", "nag", "prompts"}.
    """
    after = trainer.evaluate(records, limit=limit)
    before = trainer.evaluate(records, model=base_model, limit=limit)
    ra, rb = after["rewards"], before["rewards"]
    n = len(ra)
    return {"reward_after": sum(ra) / n, "reward_before": sum(rb) / n,
            "ras": sum(a > 0 for a in ra) / n, "nag": sum(a > b for a, b in zip(ra, rb)) / n, "prompts": n,
            "examples": [{"completion_after": a, "completion_before": b}
                         for a, b in zip(after["completions"][:3], before["completions"][:3])]}


def cmd_eval(args) -> int:
    from grao.trainer import Trainer, load_model_and_tokenizer
    cfg = build_config(args, {"steps": 1, "progress": False, "plot": False, "tensorboard": "false"})
    if not args.base:
        raise SystemExit("--base is required: the model before training (a path, a hub id, or 'demo')")
    policy, tok = load_model_and_tokenizer(cfg, source=args.checkpoint)
    trainer = Trainer(cfg, model=policy, tokenizer=tok)
    base, _ = load_model_and_tokenizer(cfg, source=args.base)
    base.to(trainer.device)
    records = trainer.eval_records or trainer.train_records
    result = ras_nag(trainer, base, records, limit=args.limit)
    print(json.dumps(result, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------- train / demo


def _environment() -> dict:
    import torch
    import transformers
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def cmd_train(args) -> int:
    """Train; also the entry point of each process under ``torchrun`` / ``accelerate launch`` (rank 0 prints)."""
    from grao.trainer import Trainer, ascii_curve, shutdown_distributed
    cfg = build_config(args)
    try:
        trainer = Trainer(cfg)
        history = trainer.train()
    except BaseException:
        shutdown_distributed(barrier=False)  # the other ranks may be stuck in a collective: no barrier
        raise
    shutdown_distributed()
    if trainer.is_main:
        print(ascii_curve(history))
        print(f"metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}; checkpoints: {Path(cfg.output_dir) / 'checkpoints'}")
    return 0


def cmd_demo(args) -> int:
    """Train the built-in tiny model on the synthetic task, print the curve, save a plot."""
    import torch

    from grao.trainer import Trainer, ascii_curve, load_model_and_tokenizer, plot_history
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args, DEMO_DEFAULTS)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    print(f"grao demo: method={cfg.method} task={cfg.task} ({cfg.task_min_len}-{cfg.task_max_len} digits), "
          f"model={sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M params, loss={trainer.loss_impl}, "
          f"P={cfg.prompts_per_step} G={cfg.group_size}, {cfg.steps} steps, reward={cfg.reward}")
    ex = trainer.train_records[0]
    print(f"example: prompt {ex['prompt']!r} -> reference {ex['reference']!r}")
    history = trainer.train()
    train_seconds = time.perf_counter() - t0
    base, _ = load_model_and_tokenizer(cfg)
    base.to(trainer.device)
    result = ras_nag(trainer, base, trainer.eval_records, limit=cfg.eval_prompts)
    print("\nsampled reward during training (moving average of 5 steps):")
    print(ascii_curve(history))
    evals = [(h["step"], h["eval_reward"]) for h in history if "eval_reward" in h]
    if evals:
        print("greedy reward on held-out prompts: " + ", ".join(f"step {s}: {v:.3f}" for s, v in evals))
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


# ----------------------------------------------------------------------------------------------------- compare


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))


def cmd_compare(args) -> int:
    """SFT, DPO, GRPO and GRAO on the same task, budget and seeds; a table and learning curves."""
    import torch

    from grao.trainer import Trainer, load_model_and_tokenizer, plot_history
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {METHODS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.compare_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_values = dict(DEMO_DEFAULTS)
    base_values.update({"save_every": 0, "progress": False, "plot": False})
    runs: dict[str, list[list[dict]]] = {m: [] for m in methods}
    results: dict[str, list[dict]] = {m: [] for m in methods}
    t_all = time.perf_counter()
    for seed in seeds:
        for method in methods:
            overrides = {"method": method, "seed": seed, "output_dir": str(Path(args.runs_dir) / f"{method}-seed{seed}")}
            cfg = dataclasses.replace(build_config(args, base_values), **overrides)
            t0 = time.perf_counter()
            trainer = Trainer(cfg)
            history = trainer.train()
            base, _ = load_model_and_tokenizer(cfg)
            base.to(trainer.device)
            res = ras_nag(trainer, base, trainer.eval_records, limit=cfg.eval_prompts)
            res.update({"seed": seed, "seconds": time.perf_counter() - t0,
                        "final_train_reward": sum(h["reward_mean"] for h in history[-10:]) / min(10, len(history))})
            results[method].append(res)
            runs[method].append(history)
            print(f"{method:>5} seed {seed}: held-out reward {res['reward_before']:.3f} -> {res['reward_after']:.3f}, "
                  f"RAS {res['ras']:.3f}, NAG {res['nag']:.3f} ({res['seconds']:.0f} s)", flush=True)
    cfg = build_config(args, base_values)
    rows = []
    for m in methods:
        rs = results[m]
        cells = {k: _mean_std([r[k] for r in rs]) for k in ("reward_after", "ras", "nag", "final_train_reward")}
        rows.append((m, cells))
    lines = ["| method | held-out reward (greedy) | RAS | NAG | sampled reward, last 10 steps |",
             "|---|---|---|---|---|"]
    for m, c in rows:
        lines.append(f"| {m.upper()} | " + " | ".join(f"{c[k][0]:.3f} ± {c[k][1]:.3f}"
                                                     for k in ("reward_after", "ras", "nag", "final_train_reward")) + " |")
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
    (out / "table.md").write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    with open(out / "results.json", "w", encoding="utf-8") as fh:
        json.dump({"command": command, "environment": env, "config": dataclasses.asdict(cfg), "seeds": seeds,
                   "results": results}, fh, indent=1, default=str)
    with open(out / "curves.jsonl", "w", encoding="utf-8") as fh:
        for m in methods:
            for seed, h in zip(seeds, runs[m]):
                fh.writelines(json.dumps({"method": m, "seed": seed, "step": row["step"],
                                         "reward_mean": row["reward_mean"], "loss": row["loss"],
                                         **({"eval_reward": row["eval_reward"]} if "eval_reward" in row else {})})
                             + "\n" for row in h)
    plot_history(runs, out / "curves.png", title=f"sampled reward on '{cfg.task}' (mean, band = min..max over seeds)")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'curves.jsonl'}, {out / 'curves.png'}")
    return 0


# ----------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grao", description="GRAO alignment training (arXiv 2508.07750)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train a causal LM with GRAO or a baseline")
    p.add_argument("--config", help="YAML file of TrainConfig fields")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="the built-in tiny model on a synthetic task (no download, minutes on a CPU)")
    p.add_argument("--config", help="YAML overrides")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model gains little from more, and on a shared "
                        "machine extra OpenMP threads make it up to 10x slower; 0 = torch's default)")
    add_config_flags(p, DEMO_DEFAULTS)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="RAS and NAG of a checkpoint against its base model")
    p.add_argument("checkpoint", help="trained model directory (e.g. runs/x/checkpoints/step-00000100)")
    p.add_argument("--base", required=True, help="the model before training: a path, a hub id, or 'demo'")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts")
    p.add_argument("--config", help="YAML file (data, reward, max_new_tokens, ...)")
    add_config_flags(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("compare", help="SFT, DPO, GRPO, GRAO on the built-in task over several seeds")
    p.add_argument("--methods", default="sft,dpo,grpo,grao")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--output-dir", dest="compare_dir", default="runs/compare")
    p.add_argument("--runs-dir", default="runs/compare-runs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see grao demo --help)")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML overrides of the demo defaults")
    add_config_flags(p, DEMO_DEFAULTS, exclude=("output_dir", "method", "seed"))
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
