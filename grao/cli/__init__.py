"""``grao`` command line: train, demo, eval, merge-lora, compare.

    grao demo                                    # built-in tiny LM + synthetic task, about half a minute on a CPU
    grao train --config run.yaml [--lr 1e-5 ...] # every TrainConfig field is also a flag
    grao eval --model runs/x/checkpoints/step-00000100 --base <base model> --data eval.jsonl
    grao compare --methods sft,dpo,ppo,grpo,grao --seeds 0,1,2 --output-dir results/compare
    grao merge-lora runs/x/checkpoints/step-00000100 runs/x/merged   # a LoRA checkpoint -> a plain model folder

A user error (a bad value, a missing file, an output folder holding another run, ...) ends the command with
one ``grao: error: ...`` line and exit status 2; ``--debug`` shows the Python traceback instead. Warnings
of grao print as ``grao: warning: ...``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import grao
import grao_kernels
from grao.cli.commands import (
    COMPARE_SETS,
    DEMO_DEFAULTS,
    DEMO_TIME,
    EVAL_FIELDS,
    MERGE_DTYPES,
    cmd_compare,
    cmd_demo,
    cmd_eval,
    cmd_merge_lora,
    cmd_train,
    ras_nag,
)
from grao.cli.options import (
    Parser,
    add_config_flags,
    build_config,
    comma_list,
    load_yaml,
    model_source,
    nonnegative_int,
    positive_int,
)
from grao.trainer.config import METHODS

__all__ = ["DEMO_DEFAULTS", "build_config", "build_parser", "load_yaml", "main", "ras_nag"]

# Fields each command shows and takes as flags (any field can still come from --config, except where noted).
COMPARE_FIELDS = ("task", "task_min_len", "task_max_len", "task_train_size", "task_eval_size", "reward", "steps",
                  "prompts_per_step", "group_size", "max_new_tokens", "temperature", "lr", "beta", "lam",
                  "loss_impl", "eval_every", "eval_prompts", "device", "progress", "tensorboard", "overwrite")
COMMANDS: dict[str, Parser] = {}  # name -> its parser, filled by build_parser
# Errors that are the user's to fix: one line, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, NotImplementedError, ImportError)


def _command(sub, name: str, help: str, description: str, config_help: str) -> Parser:
    p = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False, usage=f"grao {name} [options]")
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show the Python traceback instead of one line")
    COMMANDS[name] = p
    return p


def build_parser() -> Parser:
    parser = Parser(prog="grao", description="GRAO alignment training (arXiv 2508.07750). "
                    "'grao COMMAND --help' lists the options of a command.", allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", default=False,
                        help="on an error, show the Python traceback instead of one line")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=Parser)
    yaml_help = "YAML file of options, keys named as the flags with _ (group_size: 8); flags given here win"

    p = _command(sub, "train", "train a causal LM with GRAO or a baseline (SFT, DPO, GRPO)",
                 "Train a causal LM with GRAO (or SFT, DPO, GRPO on the same samples): per step, P prompts, G sampled\n"
                 "completions each, rewards against the reference answers, one update. Writes metrics.jsonl,\n"
                 "checkpoints/ and curves.png to --output-dir.", yaml_help)
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = _command(sub, "demo", f"GRAO on a built-in tiny model and synthetic task ({DEMO_TIME})",
                 f"Train the built-in tiny Llama (nothing downloaded) on a synthetic task a random model cannot\n"
                 f"solve, print the learning curve and the held-out reward before and after, save\n"
                 f"runs/demo/curves.png; {DEMO_TIME}. Every option of grao train applies.", yaml_help)
    p.add_argument("--threads", type=nonnegative_int, default=1, metavar="N",
                   help="torch CPU threads (0: torch's default; default: 1, since extra threads slow the tiny "
                        "model down on a busy machine)")
    add_config_flags(p, DEMO_DEFAULTS)
    p.set_defaults(func=cmd_demo)

    p = _command(sub, "eval", "RAS and NAG of a trained model against its base model",
                 "One greedy answer per prompt from the trained model and from its base, each judged against the\n"
                 "reference by --reward; prints the mean rewards, RAS (share of answers with reward > 0) and NAG\n"
                 "(share where the trained model beats the base) as JSON. For a checkpoint of a grao run, the task,\n"
                 "reward and lengths default to that run's (its config.json).",
                 "YAML file of options (e.g. the training run's: data, reward, max_new_tokens, ...)")
    p.add_argument("checkpoint", nargs="?", type=model_source, help="the trained model, as --model")
    p.add_argument("--model", metavar="PATH", type=model_source, help="the trained model: a checkpoint directory "
                   "(e.g. runs/x/checkpoints/step-00000100), a hub id, or 'demo'")
    p.add_argument("--base", required=True, metavar="PATH", type=model_source, help="the model before training: a directory, a hub "
                   "id, or 'demo'")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="evaluate the first N prompts only")
    add_config_flags(p, only=EVAL_FIELDS, helps={
        "data": "records to evaluate, in the format of grao train's --data (needed unless --base is demo; "
                "default: the synthetic --task's held-out prompts)"})
    p.set_defaults(func=cmd_eval)

    p = _command(sub, "merge-lora", "merge a LoRA checkpoint's adapter into its base model: a plain model folder",
                 "Load the base model a LoRA run trained on (the run's --model, read from the checkpoint's\n"
                 "trainer_state.pt; or --base), apply the checkpoint's adapter, merge it into the weights (in fp32) and\n"
                 "save a plain Hugging Face model folder with the tokenizer: loadable with\n"
                 "AutoModelForCausalLM.from_pretrained, usable as --model without peft.", argparse.SUPPRESS)
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=model_source,
                   help="a checkpoint of a LoRA run (e.g. runs/x/checkpoints/step-00000100)")
    p.add_argument("out", metavar="OUT", help="the folder to write the merged model to")
    p.add_argument("--base", metavar="PATH", type=model_source, default=None,
                   help="the base model, where the run's --model is no longer where it was (default: the run's)")
    p.add_argument("--dtype", choices=MERGE_DTYPES, default="auto",
                   help="dtype of the saved weights (default auto: the dtype the run held its weights in)")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it holds files")
    p.set_defaults(func=cmd_merge_lora)

    p = _command(sub, "compare", "SFT, DPO, GRPO and GRAO on the built-in task over several seeds",
                 "Train each method of --methods for each seed of --seeds on the demo task with the same budget,\n"
                 "then write a table (mean ± std over seeds), results.json and learning curves to --output-dir.\n"
                 "Any other option of grao train can be set with --config.",
                 "YAML file of any grao train options except " + ", ".join(COMPARE_SETS))
    p.add_argument("--methods", type=comma_list("choice", METHODS), default=["sft", "dpo", "ppo", "grpo", "grao"],
                   metavar="LIST", help=f"methods to train, comma-separated, from {', '.join(METHODS)} "
                   "(default: sft,dpo,ppo,grpo,grao)")
    p.add_argument("--seeds", type=comma_list("int"), default=[0, 1, 2], metavar="LIST",
                   help="seeds, comma-separated integers; each method trains once per seed (default: 0,1,2)")
    p.add_argument("--output-dir", dest="compare_dir", default="runs/compare", metavar="DIR",
                   help="where the table, results.json, curves.jsonl and curves.png go (default: runs/compare)")
    p.add_argument("--runs-dir", default="runs/compare-runs", metavar="DIR",
                   help="where each run's own folder (<method>-seed<seed>) goes (default: runs/compare-runs)")
    p.add_argument("--threads", type=nonnegative_int, default=1, metavar="N",
                   help="torch CPU threads (0: torch's default; default: 1, see grao demo --help)")
    p.add_argument("--ablation", action="store_true", help="also train GRAO's ablations on the same seeds: "
                   "exploration only (beta 0, lam 0), + imitation (lam 0), and reference_in_stats off "
                   "(grao/cli/compare_report.py); written to ablation.json and the table")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    add_config_flags(p, DEMO_DEFAULTS, only=COMPARE_FIELDS)
    p.set_defaults(func=cmd_compare)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """grao's own warnings as one ``grao: warning: ...`` line; other libraries' in Python's usual form."""
    where = Path(filename).resolve()
    if issubclass(category, UserWarning) and any(where.is_relative_to(root) for root in _PACKAGES):
        return f"grao: warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


_python_format = warnings.formatwarning
_PACKAGES = (Path(grao.__file__).resolve().parent, Path(grao_kernels.__file__).resolve().parent)


def _one_line(exc: BaseException) -> str:
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    return (lines[0] + (" ..." if len(lines) > 1 else "")) if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``grao`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            COMMANDS[args.cmd].unknown_arguments(extra)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    warnings.formatwarning = _format_warning
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("grao: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"grao: error: {_one_line(exc)}", file=sys.stderr)
        if not _is_grao_error(exc):
            print("grao: (from a library grao uses; --debug shows the traceback)", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = _python_format


def _is_grao_error(exc: BaseException) -> bool:
    """Raised by grao itself (its message says what to fix), not passed through from a library."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module == "grao" or module.startswith(("grao.", "grao_kernels"))


if __name__ == "__main__":
    sys.exit(main())
