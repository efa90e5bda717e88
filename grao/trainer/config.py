"""TrainConfig: every option of a training run, its defaults and its validation.

``grao train`` exposes each field as ``--flag`` and reads them from YAML (``grao.cli``); nothing
else in the trainer defines an option.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from grao.baselines import GRPO_LOSS_TYPES
from grao.demo import TASKS
from grao.rewards import check_reward_spec
from grao_kernels.checks import warn_unusual_weights

METHODS = ("grao", "grpo", "sft", "dpo")
LOSS_IMPLS = ("auto", "fused", "eager")
SCHEDULES = ("constant", "linear", "cosine")
REWARD_ERROR_MODES = ("raise", "drop_group")
SAMPLE_SEEDINGS = ("auto", "batch", "prompt")
PARALLELS = ("ddp", "fsdp")
DPO_REJECTED = ("sample", "column")
AUTO_BOOL = ("auto", "true", "false")


@dataclass
class TrainConfig:
    """Every option of a run; ``grao train`` exposes each field as ``--flag`` and reads them from YAML."""

    # model and data
    model: str = "demo"  # a path / hub id for AutoModelForCausalLM, or "demo" for the built-in tiny LM
    tokenizer: str | None = None  # defaults to `model`
    data: str | None = None  # JSONL/JSON file with prompt + reference (aliases solution/chosen, HH format); None with model=demo: the synthetic task
    eval_data: str | None = None
    task: str = "reverse"  # synthetic task of the demo model: reverse, copy, sort, add, copy_flawed, needle
    task_min_len: int = 3
    task_max_len: int = 5
    task_train_size: int = 2000
    task_eval_size: int = 128
    reward: Any = "exact_match"  # built-in name, "module:function", "reward_model:<path>", or a weighted list
    on_reward_error: str = "raise"  # raise (RewardError naming the reward) | drop_group (leave the prompt out, count it)
    trust_remote_code: bool = False  # run a model repository's own code (from_pretrained); only when asked
    method: str = "grao"  # grao | grpo | sft | dpo
    # sampling
    group_size: int = 8  # G
    prompts_per_step: int = 8  # P
    max_new_tokens: int = 16
    temperature: float = 0.7  # paper: 0.7
    top_p: float = 1.0
    sample_seeding: str = "auto"  # batch (one generate call, global RNG) | prompt (one call per prompt seeded by (seed, step, prompt index): the same samples for any number of processes; slower) | auto (batch in one process, prompt in several)
    max_prompt_length: int = 0  # 0: never cut a prompt; N: keep each prompt's last N tokens (warns once, counts prompts_truncated per step)
    shared_sampling: bool = True  # prefill each prompt once and decode its G samples against that one copy (grao.sampling); off: transformers generate
    sample_memory_mib: int = 0  # memory one sampling batch may hold beyond the weights (prompt caches, rows, transients); 0: auto (2048, raised to fit one prompt)
    # losses
    beta: float = 0.5  # GRAO imitation weight (paper 0.5)
    lam: float = 0.6  # GRAO alignment weight (paper 0.6)
    eps: float = 1e-6
    reference_in_stats: bool = True
    loss_impl: str = "auto"  # fused (grao_kernels) | eager (full logits) | auto (fused when importable)
    loss_temperature: float = 1.0  # logits / this in the training loss
    dpo_beta: float = 0.1
    dpo_rejected: str = "sample"  # sample (lowest-reward sample of the group) | column (a `rejected` column)
    grpo_epsilon: float = 0.2
    grpo_kl_beta: float = 0.0
    grpo_loss_type: str = "grpo"
    # optimisation
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.01  # paper: 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0  # 0 disables clipping
    lr_schedule: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    micro_batch_rows: int = 0  # rows per forward/backward (overrides micro_batch_tokens); 0 = sized by micro_batch_tokens
    micro_batch_tokens: int = 1024  # token positions per forward/backward (whole groups when they fit); 0 = the whole step at once
    prefix_sharing: bool = True  # forward each prompt once for its G samples and reference (grao.packing); off: padded rows
    max_consecutive_skips: int = 10  # stop when this many steps in a row made no update (non-finite / all dropped); 0: never
    gradient_checkpointing: bool = False
    bf16: str = "auto"  # auto (bf16 autocast on CUDA when supported) | true | false
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (when installed)
    disable_dropout: bool = True
    seed: int = 0
    device: str = "auto"
    parallel: str = "ddp"  # several processes: ddp (torch DistributedDataParallel, replicated model) | fsdp (FSDP2 fully_shard); ACCELERATE_USE_FSDP with FSDP_VERSION=2 picks fsdp
    # output
    output_dir: str = "runs/grao"
    save_every: int = 0  # 0: only at the end
    save_total_limit: int = 2
    eval_every: int = 0  # greedy reward on eval data every N steps (0: off)
    eval_prompts: int = 64
    eval_batch_size: int = 64
    resume: bool = False
    overwrite: bool = False  # replace a run already in output_dir (else it is refused unless resume)
    progress: bool = True
    plot: bool = True
    tensorboard: str = "auto"  # auto (when installed) | true | false

    def validate(self) -> TrainConfig:
        """Check (and normalise, e.g. ``bf16=True`` -> ``"true"``, ``lr="1e-4"`` -> ``1e-4``) every field against
        :data:`OPTIONS`; raises :class:`ConfigError` naming the field and what it accepts. The CLI and the YAML
        loader check each value they read with the same :func:`check_field`, so the messages are the same."""
        for f in fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
        if self.method == "grpo" and self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 with method grpo (its advantages are normalised over the "
                              f"G samples), got {self.group_size}")
        if self.task_max_len < self.task_min_len:
            raise ConfigError(f"task_max_len must be >= task_min_len ({self.task_min_len}), got {self.task_max_len}")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                              "overwrite replaces it")
        warn_unusual_weights(self.beta, self.lam)
        return self


# What a resumed run (``resume=True`` with a checkpoint in output_dir) may set differently from the run it
# continues: each entry changes where the run stops, how it is evaluated, checkpointed or shown, or how a step
# is computed (memory, speed, machine), never what it trains (model, data, task, method, loss, sampling
# distribution, optimiser, schedule, seed). Any other setting that differs from the saved run's is refused,
# listed (``Trainer``); with ``grao train --resume`` a setting not given is the saved run's (grao.cli).
RESUME_SAFE: dict[str, str] = {
    "steps": "where the run stops (a linear or cosine decay is re-timed to the new end: a warning says so)",
    "eval_every": "evaluation only reads the policy (greedy, no update)",
    "eval_prompts": "evaluation only reads the policy",
    "eval_batch_size": "evaluation only reads the policy",
    "eval_data": "held-out records: evaluation only reads the policy, training never sees them",
    "save_every": "checkpoint cadence",
    "save_total_limit": "how many checkpoints are kept",
    "progress": "display only",
    "plot": "display only",
    "tensorboard": "logging only",
    "output_dir": "the folder is the run: a moved folder or another spelling of its path still names it",
    "resume": "the switch itself",
    "overwrite": "excluded by resume anyway (validate refuses both)",
    "device": "where a step runs: the same update up to rounding, so a checkpoint may move between machines",
    "micro_batch_rows": "memory per forward/backward pass; the update is exact either way",
    "micro_batch_tokens": "memory per forward/backward pass; the update is exact either way",
    "sample_memory_mib": "memory of a sampling batch; the samples' distribution is the same",
    "shared_sampling": "how the G samples are decoded (one prompt copy or generate); same distribution",
    "prefix_sharing": "how a group is forwarded (packed or padded rows); the same loss and gradient",
    "loss_impl": "fused or eager computation of the same loss (memory and speed)",
    "gradient_checkpointing": "recomputes activations: memory for time, the same gradients",
    "attn_implementation": "the attention kernel: the same attention, computed another way",
    "parallel": "how several processes share the model; the same update (resuming under FSDP is refused anyway)",
    "max_consecutive_skips": "when to stop a run that makes no updates; no update changes",
    "on_reward_error": "what a failing reward does (stop, or drop that prompt): recovers a run a reward stopped",
    "trust_remote_code": "a permission to run the model repository's code, not a setting of the training",
}


def _comparable(name: str, value: Any) -> Any:
    """A field's value as two runs' configs are compared: through the field's check where that is pure
    (numbers, booleans, choices: 1e-4 == "0.0001", bf16 True == "true"), lists for tuples, callables by name."""
    opt = OPTIONS.get(name)
    if opt is not None and opt.kind in ("int", "float", "bool", "choice", "auto_bool"):
        try:
            return opt.parse(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):
        return [_comparable("", v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, dict)):
        return value
    return getattr(value, "__name__", type(value).__name__)


def _same_setting(name: str, saved: Any, given: Any) -> bool:
    a, b = _comparable(name, saved), _comparable(name, given)
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
        try:  # a file or model directory named by two spellings of its path
            return os.path.samefile(a, b)
        except OSError:
            return False
    return False


def _shown_setting(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def resume_changes(saved: dict, config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(field, saved value, value of ``config``) for each setting of ``config`` that differs from ``saved`` (the
    TrainConfig values of the run being resumed, as its config.json holds them). A field the saved run did not
    have (added since) counts as its default there; keys it has that TrainConfig no longer has are ignored."""
    out = []
    for f in fields(config):
        before = saved.get(f.name, f.default)
        now = getattr(config, f.name)
        if not _same_setting(f.name, before, now):
            out.append((f.name, before, now))
    return out


def check_resume(saved: dict, config: TrainConfig, *, where: str) -> list[str]:
    """Refuse resuming the run whose settings are ``saved`` (read from ``where``) with a ``config`` that changes
    one outside :data:`RESUME_SAFE`: a ConfigError listing every such change as ``name: saved -> given``.
    Returns the safe changes in that form (the trainer says what it continues with)."""
    changes = resume_changes(saved, config)
    unsafe = [f"{n}: {_shown_setting(a)} -> {_shown_setting(b)}" for n, a, b in changes if n not in RESUME_SAFE]
    if unsafe:
        raise ConfigError(f"resume: {config.output_dir} holds a run with other settings ({where}): "
                          f"{', '.join(unsafe)}. A resume may change only the options listed under --resume in "
                          f"grao train --help (config.RESUME_SAFE); leave these out to keep the saved values, or "
                          f"start a new run (another output_dir, or overwrite)")
    return [f"{n}: {_shown_setting(a)} -> {_shown_setting(b)}" for n, a, b in changes
            if n not in ("resume", "overwrite", "output_dir")]


def resume_safe_flags() -> list[str]:
    """The command-line flags of :data:`RESUME_SAFE` (``--steps``, ...), but for resume and overwrite themselves."""
    return ["--" + n.replace("_", "-") for n in RESUME_SAFE if n not in ("resume", "overwrite", "output_dir")]


# ------------------------------------------------------------------------------------ what each field accepts


class ConfigError(ValueError):
    """A TrainConfig value its field does not accept. The message starts with the field's name and says what
    was expected and what was given (``group_size must be an integer >= 1, got 0``)."""


@dataclass(frozen=True)
class Option:
    """One field: a one-line description and the values it accepts.

    kind: ``int`` / ``float`` (with bounds ``low``/``high``, ``open_*``: bound excluded), ``bool``, ``choice``
    (one of ``choices``), ``auto_bool`` (auto | true | false; a bool is accepted), ``text`` (non-empty string),
    ``optional`` (None or non-empty string), ``file`` (None or an existing file), ``reward``, ``device``."""

    help: str
    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple = ()

    def allowed(self) -> str:
        """The accepted values in words ("an integer >= 1", "one of grao, grpo, sft, dpo", ...)."""
        if self.kind in ("choice", "auto_bool"):
            return "one of " + ", ".join(self.choices or AUTO_BOOL)
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                return (f"{noun} in {'(' if self.open_low else '['}{self.low:g}, "
                        f"{self.high:g}{')' if self.open_high else ']'}")
            if self.low is not None:
                return f"{noun} {'>' if self.open_low else '>='} {self.low:g}"
            return noun if self.kind == "int" else "a finite number"
        return {"bool": "true or false", "text": "a non-empty string", "model": "a model directory, hub id or 'demo'", "optional": "a non-empty string",
                "file": "an existing file", "device": "auto, cpu, cuda or cuda:N",
                "reward": "a reward name, 'module:function', 'reward_model:<path>' or a list of them"}[self.kind]

    def parse(self, value: Any) -> Any:
        """``value`` (typed, or text from a flag or YAML) as the field's type; ValueError(problem) if refused."""
        kind, problem = self.kind, f"must be {self.allowed()}, got {shown(value)}"
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(problem)
            try:
                v = int(value) if kind == "int" and not isinstance(value, float) else float(value)
            except ValueError:
                raise ValueError(problem) from None
            if (kind == "int" and isinstance(value, float)) or not math.isfinite(v):
                raise ValueError(problem)
            lo_bad = self.low is not None and (v <= self.low if self.open_low else v < self.low)
            hi_bad = self.high is not None and (v >= self.high if self.open_high else v > self.high)
            if lo_bad or hi_bad:
                raise ValueError(problem)
            return v
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(problem)
            return value
        if kind in ("choice", "auto_bool"):
            choices = self.choices or AUTO_BOOL
            text = str(value).lower() if kind == "auto_bool" and isinstance(value, (bool, str)) else value
            if text not in choices:
                close = difflib.get_close_matches(str(value), choices, n=1)
                raise ValueError(problem + (f" (did you mean {close[0]!r}?)" if close else ""))
            return text
        if kind == "reward":
            check_reward_spec(value)
            return value
        if value is None and kind in ("optional", "file"):
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(problem)
        if kind == "file" and not os.path.isfile(value):
            raise ValueError(f"must be {self.allowed()}, got {value!r}, which "
                             + ("is a directory" if os.path.isdir(value) else "does not exist"))
        if kind == "device":
            return check_device(value)
        if kind == "model":
            check_model_source(value)
        return value


def check_model_source(src: str) -> None:
    """ValueError(problem) for a model that is neither 'demo', an existing directory, nor shaped like a Hugging
    Face hub id ('name' or 'org/name'), before transformers is asked (which would fail with a hub error)."""
    if src == "demo" or os.path.isdir(src):
        return
    expected = "a local model directory, a Hugging Face hub id or 'demo'"
    if os.path.exists(src):
        raise ValueError(f"must be {expected}, got {src!r}, which is a file")
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(src)
    except HFValidationError:
        raise ValueError(f"must be {expected}, got {src!r}: no such directory") from None


def shown(value: Any) -> str:
    """A value as messages show it: numbers bare, also when they came as text (``--group-size 0`` and YAML
    ``group_size: 0`` both read "got 0"), other strings quoted."""
    if isinstance(value, str):
        try:
            float(value)
            return value.strip()
        except ValueError:
            return repr(value)
    return repr(value)


def check_device(value: str) -> str:
    """"auto", or a torch device that this machine has; ValueError(problem) otherwise."""
    import torch
    if value == "auto":
        return value
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise ValueError(f"must be a device this machine has, got {value!r}: {why} "
                             f"(torch {torch.__version__}); use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"must be a device this machine has, got {value!r}: "
                             f"{torch.cuda.device_count()} CUDA device(s) visible")
    return value


def _int(help, low=None):
    return Option(help, "int", low=low)


def _num(help, low=None, high=None, open_low=False, open_high=False):
    return Option(help, "float", low=low, high=high, open_low=open_low, open_high=open_high)


def _choice(help, choices):
    return Option(help, "choice", choices=tuple(choices))


# Section -> field -> Option; ``grao train --help`` shows them in this order, with these descriptions.
SECTIONS: dict[str, dict[str, Option]] = {
    "model and data": {
        "model": Option("the policy: a local model directory, a Hugging Face hub id, or 'demo' (a built-in tiny "
                        "Llama, nothing downloaded)", "model"),
        "tokenizer": Option("tokenizer directory or hub id, when not the model's", "optional"),
        "data": Option("training records: a JSONL file (or a .json list) with 'prompt' and 'reference' (or "
                       "'solution', 'chosen', 'answer'; HH-RLHF chosen/rejected dialogues); with --model demo "
                       "the default is the synthetic --task", "file"),
        "eval_data": Option("held-out records (same format) evaluated every --eval-every steps", "file"),
        "task": _choice("synthetic task of the demo data: the answer reverses, copies, sorts or adds digits "
                        "(copy_flawed: copy with wrong references on a fixed subset, grao/tasks_flawed.py; "
                        "needle: the digits hidden in a long letter context, grao/tasks_needle.py)",
                        TASKS),
        "task_min_len": _int("shortest digit string of the synthetic task", 1),
        "task_max_len": _int("longest digit string of the synthetic task (>= --task-min-len)", 1),
        "task_train_size": _int("training prompts generated for the synthetic task", 1),
        "task_eval_size": _int("held-out prompts generated for the synthetic task", 1),
        "reward": Option("R(o, y): exact_match, token_f1, char_f1, reward_model:<path>, module:function, or "
                         "several as 'a*0.5,b*0.5'", "reward"),
        "on_reward_error": _choice("when the reward raises or returns None/NaN: raise (stop, naming it) or "
                                   "drop_group (leave that prompt out of the step, counted)", REWARD_ERROR_MODES),
        "trust_remote_code": Option("run a model repository's own Python code (off unless given)", "bool"),
        "method": _choice("what to train with: GRAO, or a baseline on the same samples", METHODS),
    },
    "sampling": {
        "group_size": _int("G: completions sampled per prompt (grpo: >= 2)", 1),
        "prompts_per_step": _int("P: prompts per step, over all processes", 1),
        "max_new_tokens": _int("longest sampled completion, in tokens", 1),
        "temperature": _num("sampling temperature (paper 0.7); greedy (0) would make the G samples identical", 0,
                            open_low=True),
        "top_p": _num("nucleus sampling: the smallest token set with this probability mass (1: off)", 0, 1,
                      open_low=True),
        "sample_seeding": _choice("batch: one generate call on the global RNG; prompt: one call per prompt seeded "
                                  "by (seed, step, prompt), the same samples on any number of processes; auto: "
                                  "batch in one process, prompt in several", SAMPLE_SEEDINGS),
        "max_prompt_length": _int("0 (default): never cut; N: keep each prompt's last N tokens, with a warning "
                                  "and a per-step count (prompts_truncated); the cut is from the left, a leading "
                                  "BOS token goes with the rest", 0),
        "shared_sampling": Option("prefill each prompt once and decode its G samples against that one copy of its "
                                  "keys and values (Llama, Mistral, Qwen2/3 families; others use transformers "
                                  "generate); --no-shared-sampling: generate for every model", "bool"),
        "sample_memory_mib": _int("MiB one sampling batch may hold beyond the weights: prompts' keys and values, "
                                  "decode rows, prefill chunks (0: auto, 2048 and at least one prompt)", 0),
    },
    "loss": {
        "beta": _num("GRAO imitation weight (paper 0.5; values outside [0, 1] warn)"),
        "lam": _num("GRAO alignment weight (paper 0.6; values outside [0, 1] warn)"),
        "eps": _num("added to the group's reward standard deviation in the advantages", 0, open_low=True),
        "reference_in_stats": Option("count the reference's reward in the group mean and std (spec default)",
                                     "bool"),
        "loss_impl": _choice("fused: grao_kernels, no [tokens x vocab] logits; eager: full logits; auto: fused "
                             "when it imports", LOSS_IMPLS),
        "loss_temperature": _num("logits are divided by this in the training loss", 0, open_low=True),
        "dpo_beta": _num("DPO's beta", 0, open_low=True),
        "dpo_rejected": _choice("DPO's rejected answer: the group's lowest-reward sample, or a 'rejected' column",
                                DPO_REJECTED),
        "grpo_epsilon": _num("GRPO's clipping range of the probability ratio", 0),
        "grpo_kl_beta": _num("GRPO's KL weight against the initial policy (0: no reference model)", 0),
        "grpo_loss_type": _choice("GRPO's token averaging, as TRL defines it", GRPO_LOSS_TYPES),
    },
    "optimisation": {
        "steps": _int("optimizer steps of the run", 1),
        "lr": _num("AdamW learning rate", 0, open_low=True),
        "weight_decay": _num("AdamW weight decay (paper 0.01)", 0),
        "adam_beta1": _num("AdamW beta1", 0, 1, open_high=True),
        "adam_beta2": _num("AdamW beta2", 0, 1, open_high=True),
        "max_grad_norm": _num("clip the gradient norm to this (0: no clipping)", 0),
        "lr_schedule": _choice("learning rate after the warmup: constant, or linear / cosine decay to 0",
                               SCHEDULES),
        "warmup_steps": _int("steps of linear warmup", 0),
        "micro_batch_rows": _int("rows per forward/backward pass, overriding --micro-batch-tokens (0: sized by "
                                 "--micro-batch-tokens; exact either way)", 0),
        "micro_batch_tokens": _int("token positions per forward/backward pass: whole groups while they fit, a "
                                   "larger group split into row ranges that share one forward of its prompt "
                                   "(0: the whole step at once; exact either way)", 0),
        "prefix_sharing": Option("forward each prompt once for its G samples and reference answer, packed and "
                                 "padding-free (Llama, Mistral, Qwen2/3 families); --no-prefix-sharing pads "
                                 "every row", "bool"),
        "max_consecutive_skips": _int("stop after this many steps in a row without an update (0: never)", 0),
        "gradient_checkpointing": Option("recompute activations in the backward: less memory, slower", "bool"),
        "bf16": Option("bf16 autocast on CUDA: auto (when the GPU supports it), true or false", "auto_bool"),
        "attn_implementation": Option("attention kernel for transformers: sdpa, eager, flash_attention_2 "
                                      "(needs flash-attn), ...", "text"),
        "disable_dropout": Option("set every dropout probability to 0", "bool"),
        "seed": _int("seed of the model init (demo), the data order and the sampling", 0),
        "device": Option("auto: CUDA when available, else the CPU", "device"),
        "parallel": _choice("with several processes: ddp (replicated model) or fsdp (FSDP2 sharding)", PARALLELS),
    },
    "output": {
        "output_dir": Option("folder of the run (metrics.jsonl, checkpoints/, curves.png); one that holds "
                             "another run is refused unless --resume or --overwrite", "text"),
        "save_every": _int("write a checkpoint every N steps (0: only at the end)", 0),
        "save_total_limit": _int("keep the N newest checkpoints (0: all)", 0),
        "eval_every": _int("greedy reward on the held-out records every N steps (0: never)", 0),
        "eval_prompts": _int("held-out prompts per evaluation", 1),
        "eval_batch_size": _int("prompts per generate call when evaluating", 1),
        "resume": Option("continue the run in --output-dir from its newest complete checkpoint, with that run's "
                         "settings (its config.json) for every option not given; given ones may change only "
                         + ", ".join(resume_safe_flags()) + " (how the run is computed, evaluated, saved or "
                         "shown, not what it trains); any other change is refused, listed", "bool"),
        "overwrite": Option("replace the run in --output-dir (metrics, checkpoints, plots) by a new one", "bool"),
        "progress": Option("progress bars (grao's and transformers')", "bool"),
        "plot": Option("write curves.png at the end", "bool"),
        "tensorboard": Option("TensorBoard logs in --output-dir/tensorboard: auto (when installed), true or false",
                              "auto_bool"),
    },
}
OPTIONS: dict[str, Option] = {name: opt for section in SECTIONS.values() for name, opt in section.items()}


def check_field(name: str, value: Any) -> Any:
    """``value`` checked (and, from text, converted) for field ``name``; ConfigError naming it otherwise.

    A field without an entry in :data:`OPTIONS` is checked by its annotation (int, float, bool, str)."""
    option = OPTIONS.get(name)
    if option is None:
        kind = {"int": "int", "float": "float", "bool": "bool"}.get(
            str(TrainConfig.__dataclass_fields__[name].type), "any")
        if kind == "any":
            return value
        option = Option("", kind)
    try:
        return option.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{name} {exc}") from None


def suggest_field(name: str) -> str:
    """" (did you mean 'x'?)" for the field nearest to an unknown ``name``, or ""."""
    close = difflib.get_close_matches(name, [f.name for f in fields(TrainConfig)], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
