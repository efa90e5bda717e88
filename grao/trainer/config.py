"""TrainConfig: every option of a training run, its default, its description and its validation.

Each field is declared once, with its help text and the values it accepts in its metadata
(``field(default=..., metadata={"help": ..., "option": Option(...)})``, as Hugging Face's TrainingArguments
do); ``grao train`` generates one ``--flag`` per field from them and reads the same names from YAML
(``grao.cli.options``); nothing else in the trainer defines an option. What a method adds to the checks
is the method's (``grao.trainer.methods``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from grao.baselines import GRPO_LOSS_TYPES
from grao.demo import TASKS
from grao.trainer.methods import METHODS, get_method
from grao.trainer.lora import DEFAULT_TARGET_MODULES
from grao.rewards import check_reward_spec
from grao_kernels.checks import warn_unusual_weights

LOSS_IMPLS = ("auto", "fused", "eager")
SCHEDULES = ("constant", "linear", "cosine")
REWARD_ERROR_MODES = ("raise", "drop_group")
SAMPLE_SEEDINGS = ("auto", "batch", "prompt")
PARALLELS = ("ddp", "fsdp")
DPO_REJECTED = ("sample", "column")
AUTO_BOOL = ("auto", "true", "false")
MODEL_DTYPES = ("auto", "bf16", "fp32")
LORA_FIELDS = ("lora_alpha", "lora_dropout", "lora_target_modules")


# ------------------------------------------------------------------------------------ what a field accepts


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


# --------------------------------------------------------------------------------------------- resuming

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


def resume_safe_flags() -> list[str]:
    """The command-line flags of :data:`RESUME_SAFE` (``--steps``, ...), but for resume and overwrite themselves."""
    return ["--" + n.replace("_", "-") for n in RESUME_SAFE if n not in ("resume", "overwrite", "output_dir")]


# ------------------------------------------------------------------------------------------------ the fields


def _field(default: Any, help: str, kind: str, **accepts) -> Any:
    """A TrainConfig field: its default, its one-line help and what it accepts (an :class:`Option`)."""
    return field(default=default, metadata={"help": help, "option": Option(help, kind, **accepts)})


def _int(default: int, help: str, low: float | None = None) -> Any:
    return _field(default, help, "int", low=low)


def _num(default: float, help: str, low=None, high=None, open_low=False, open_high=False) -> Any:
    return _field(default, help, "float", low=low, high=high, open_low=open_low, open_high=open_high)


def _choice(default: str, help: str, choices) -> Any:
    return _field(default, help, "choice", choices=tuple(choices))


def _bool(default: bool, help: str) -> Any:
    return _field(default, help, "bool")


@dataclass
class TrainConfig:
    """Every option of a run; ``grao train`` exposes each field as ``--flag`` and reads them from YAML.

    A field's ``metadata["help"]`` is its description (the flag's help), ``metadata["option"]`` what it accepts;
    the fields are grouped in ``grao train --help`` by :data:`SECTION_STARTS`."""

    # model and data
    model: str = _field("demo", "the policy: a local model directory, a Hugging Face hub id, or 'demo' (a built-in "
                        "tiny Llama, nothing downloaded)", "model")
    tokenizer: str | None = _field(None, "tokenizer directory or hub id, when not the model's", "optional")
    data: str | None = _field(None, "training records: a JSONL file (or a .json list) with 'prompt' and 'reference' "
                              "(or 'solution', 'chosen', 'answer'; HH-RLHF chosen/rejected dialogues); with --model "
                              "demo the default is the synthetic --task", "file")
    eval_data: str | None = _field(None, "held-out records (same format) evaluated every --eval-every steps", "file")
    task: str = _choice("reverse", "synthetic task of the demo data: the answer reverses, copies, sorts or adds digits "
                        "(copy_flawed: copy with wrong references on a fixed subset, grao/tasks_flawed.py; needle: "
                        "the digits hidden in a long letter context, grao/tasks_needle.py)", TASKS)
    task_min_len: int = _int(3, "shortest digit string of the synthetic task", 1)
    task_max_len: int = _int(5, "longest digit string of the synthetic task (>= --task-min-len)", 1)
    task_train_size: int = _int(2000, "training prompts generated for the synthetic task", 1)
    task_eval_size: int = _int(128, "held-out prompts generated for the synthetic task", 1)
    reward: Any = _field("exact_match", "R(o, y): exact_match, token_f1, char_f1, reward_model:<path>, "  # noqa: RUF009
                         "module:function, or several as 'a*0.5,b*0.5'", "reward")
    on_reward_error: str = _choice("raise", "when the reward raises or returns None/NaN: raise (stop, naming it) or "
                                   "drop_group (leave that prompt out of the step, counted)", REWARD_ERROR_MODES)
    trust_remote_code: bool = _bool(False, "run a model repository's own Python code (off unless given)")
    method: str = _choice("grao", "what to train with: GRAO, or a baseline on the same samples", METHODS)
    # weights and adapters
    model_dtype: str = _choice("auto", "dtype of the weights as loaded: fp32, bf16 (LoRA only: the frozen weights "
                               "in bf16, the adapters fp32 master weights), or auto: fp32 for full fine-tuning, bf16 "
                               "for LoRA on a GPU with bf16, else fp32", MODEL_DTYPES)
    lora_r: int = _int(0, "LoRA rank (peft): 0 trains every weight; N > 0 freezes them all, the lm_head included, and "
                       "trains rank-N adapters on --lora-target-modules", 0)
    lora_alpha: float = _num(0.0, "LoRA alpha (adapter scale alpha / r); 0: 2 x --lora-r", 0)
    lora_dropout: float = _num(0.0, "dropout on the adapters' input (0: none, as on-policy RL wants the sampled and "
                               "the trained policy equal)", 0, 1, open_high=True)
    lora_target_modules: str = _field(DEFAULT_TARGET_MODULES, "comma-separated names of the linear layers that get "
                                      "adapters, or all-linear; the default names every attention and MLP "
                                      "projection of Llama, Qwen2/3 and Mistral", "text")
    # sampling
    group_size: int = _int(8, "G: completions sampled per prompt (grpo: >= 2)", 1)
    prompts_per_step: int = _int(8, "P: prompts per step, over all processes", 1)
    max_new_tokens: int = _int(16, "longest sampled completion, in tokens", 1)
    temperature: float = _num(0.7, "sampling temperature (paper 0.7); greedy (0) would make the G samples identical",
                              0, open_low=True)
    top_p: float = _num(1.0, "nucleus sampling: the smallest token set with this probability mass (1: off)", 0, 1,
                        open_low=True)
    sample_seeding: str = _choice("auto", "batch: one generate call on the global RNG; prompt: one call per prompt "
                                  "seeded by (seed, step, prompt), the same samples on any number of processes; auto: "
                                  "batch in one process, prompt in several", SAMPLE_SEEDINGS)
    max_prompt_length: int = _int(0, "0 (default): never cut; N: keep each prompt's last N tokens, with a warning and "
                                  "a per-step count (prompts_truncated); the cut is from the left, a leading BOS token "
                                  "goes with the rest", 0)
    shared_sampling: bool = _bool(True, "prefill each prompt once and decode its G samples against that one copy of "
                                  "its keys and values (Llama, Mistral, Qwen2/3 families; others use transformers "
                                  "generate); --no-shared-sampling: generate for every model")
    sample_memory_mib: int = _int(0, "MiB one sampling batch may hold beyond the weights: prompts' keys and values, "
                                  "decode rows, prefill chunks (0: auto, 2048 and at least one prompt)", 0)
    # loss
    beta: float = _num(0.5, "GRAO imitation weight (paper 0.5; values outside [0, 1] warn)")
    lam: float = _num(0.6, "GRAO alignment weight (paper 0.6; values outside [0, 1] warn)")
    eps: float = _num(1e-6, "added to the group's reward standard deviation in the advantages", 0, open_low=True)
    reference_in_stats: bool = _bool(True, "count the reference's reward in the group mean and std (spec default)")
    loss_impl: str = _choice("auto", "fused: grao_kernels, no [tokens x vocab] logits; eager: full logits; auto: "
                             "fused when it imports", LOSS_IMPLS)
    loss_temperature: float = _num(1.0, "logits are divided by this in the training loss", 0, open_low=True)
    dpo_beta: float = _num(0.1, "DPO's beta", 0, open_low=True)
    dpo_rejected: str = _choice("sample", "DPO's rejected answer: the group's lowest-reward sample, or a 'rejected' "
                                "column", DPO_REJECTED)
    grpo_epsilon: float = _num(0.2, "GRPO's clipping range of the probability ratio", 0)
    grpo_kl_beta: float = _num(0.0, "GRPO's KL weight against the initial policy (0: no reference model)", 0)
    grpo_loss_type: str = _choice("grpo", "GRPO's token averaging, as TRL defines it", GRPO_LOSS_TYPES)
    ppo_kl_coef: float = _num(0.05, "PPO's per-token KL penalty against the initial policy, in the rewards", 0)
    ppo_gamma: float = _num(1.0, "PPO's discount over the completion's tokens (GAE)", 0, 1)
    ppo_gae_lambda: float = _num(0.95, "PPO's GAE lambda", 0, 1)
    ppo_clip: float = _num(0.2, "PPO's clipping range of the probability ratio", 0)
    ppo_value_clip: float = _num(0.2, "PPO's clipping range of the value head's change from the rollout's values", 0)
    ppo_value_coef: float = _num(0.1, "PPO's weight of the value loss", 0)
    ppo_epochs: int = _int(2, "PPO's passes over each rollout (old log-probs and values fixed at the rollout)", 1)
    ppo_minibatches: int = _int(1, "PPO's minibatches (of prompts) per epoch: one optimizer step each", 1)
    # optimisation
    steps: int = _int(100, "optimizer steps of the run", 1)
    lr: float = _num(1e-4, "AdamW learning rate", 0, open_low=True)
    weight_decay: float = _num(0.01, "AdamW weight decay (paper 0.01)", 0)
    adam_beta1: float = _num(0.9, "AdamW beta1", 0, 1, open_high=True)
    adam_beta2: float = _num(0.999, "AdamW beta2", 0, 1, open_high=True)
    max_grad_norm: float = _num(1.0, "clip the gradient norm to this (0: no clipping)", 0)
    lr_schedule: str = _choice("constant", "learning rate after the warmup: constant, or linear / cosine decay to 0",
                               SCHEDULES)
    warmup_steps: int = _int(0, "steps of linear warmup", 0)
    micro_batch_rows: int = _int(0, "rows per forward/backward pass, overriding --micro-batch-tokens (0: sized by "
                                 "--micro-batch-tokens; exact either way)", 0)
    micro_batch_tokens: int = _int(1024, "token positions per forward/backward pass: whole groups while they fit, a "
                                   "larger group split into row ranges that share one forward of its prompt (0: the "
                                   "whole step at once; exact either way)", 0)
    prefix_sharing: bool = _bool(True, "forward each prompt once for its G samples and reference answer, packed and "
                                 "padding-free (Llama, Mistral, Qwen2/3 families); --no-prefix-sharing pads every row")
    max_consecutive_skips: int = _int(10, "stop after this many steps in a row without an update (0: never)", 0)
    gradient_checkpointing: bool = _bool(False, "recompute activations in the backward: less memory, slower")
    bf16: str = _field("auto", "bf16 autocast on CUDA: auto (when the GPU supports it), true or false; bf16 weights "
                       "(LoRA, --model-dtype bf16) compute under it on the CPU too, unless false", "auto_bool")
    attn_implementation: str = _field("sdpa", "attention kernel for transformers: sdpa, eager, flash_attention_2 "
                                      "(needs flash-attn), ...", "text")
    disable_dropout: bool = _bool(True, "set every dropout probability to 0")
    seed: int = _int(0, "seed of the model init (demo), the data order and the sampling", 0)
    device: str = _field("auto", "auto: CUDA when available, else the CPU", "device")
    parallel: str = _choice("ddp", "with several processes: ddp (replicated model) or fsdp (FSDP2 sharding)",
                            PARALLELS)
    # output
    output_dir: str = _field("runs/grao", "folder of the run (metrics.jsonl, checkpoints/, curves.png); one that "
                             "holds another run is refused unless --resume or --overwrite", "text")
    save_every: int = _int(0, "write a checkpoint every N steps (0: only at the end)", 0)
    save_total_limit: int = _int(2, "keep the N newest checkpoints (0: all)", 0)
    eval_every: int = _int(0, "greedy reward on the held-out records every N steps (0: never)", 0)
    eval_prompts: int = _int(64, "held-out prompts per evaluation", 1)
    eval_batch_size: int = _int(64, "prompts per generate call when evaluating", 1)
    resume: bool = _bool(False, "continue the run in --output-dir from its newest complete checkpoint, with that "
                         "run's settings (its config.json) for every option not given; given ones may change only "
                         + ", ".join(resume_safe_flags()) + " (how the run is computed, evaluated, saved or shown, "
                         "not what it trains); any other change is refused, listed")
    overwrite: bool = _bool(False, "replace the run in --output-dir (metrics, checkpoints, plots) by a new one")
    progress: bool = _bool(True, "progress bars (grao's and transformers')")
    plot: bool = _bool(True, "write curves.png at the end")
    tensorboard: str = _field("auto", "TensorBoard logs in --output-dir/tensorboard: auto (when installed), true or "
                              "false", "auto_bool")

    def validate(self) -> TrainConfig:
        """Check (and normalise, e.g. ``bf16=True`` -> ``"true"``, ``lr="1e-4"`` -> ``1e-4``) every field against
        its :class:`Option`, then what the method asks of the others (``Method.validate``: GRPO's group size);
        raises :class:`ConfigError` naming the field and what it accepts. The CLI and the YAML loader check each
        value they read with the same :func:`check_field`, so the messages are the same."""
        for f in fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
        try:
            get_method(self.method).validate(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.task_max_len < self.task_min_len:
            raise ConfigError(f"task_max_len must be >= task_min_len ({self.task_min_len}), got {self.task_max_len}")
        self._check_lora()
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                              "overwrite replaces it")
        warn_unusual_weights(self.beta, self.lam)
        return self


    def _check_lora(self) -> None:
        """LoRA options only with LoRA on; target module names; bf16 weights only for LoRA (see grao.trainer.lora)."""
        if not self.lora_r:
            given = [n for n in LORA_FIELDS if getattr(self, n) != TrainConfig.__dataclass_fields__[n].default]
            if given:
                flags = ", ".join("--" + n.replace("_", "-") for n in given)
                raise ConfigError(f"lora_r is 0 (LoRA off), but {flags} {'is' if len(given) == 1 else 'are'} given: "
                                  f"add --lora-r N (e.g. 16) to train LoRA adapters, or leave {flags} out")
            if self.model_dtype == "bf16":
                raise ConfigError("model_dtype bf16 is for LoRA (--lora-r N): full fine-tuning keeps fp32 master "
                                  "weights (bf16 weights would lose AdamW updates below bf16's resolution); use "
                                  "--model-dtype fp32 or auto, which trains with bf16 autocast on a GPU with bf16, "
                                  "or add --lora-r N")
        names = [x.strip() for x in self.lora_target_modules.split(",")]
        bad = [x for x in names if not re.fullmatch(r"[A-Za-z0-9_.\-]+", x)]
        if bad or ("all-linear" in names and len(names) > 1):
            raise ConfigError(f"lora_target_modules must be comma-separated module names (q_proj,v_proj) or "
                              f"all-linear, got {self.lora_target_modules!r}")


#: The first field of each group of ``grao train --help`` and the group's title; a group runs to the next.
SECTION_STARTS = {"model": "model and data", "model_dtype": "weights and LoRA adapters", "group_size": "sampling",
                  "beta": "loss", "steps": "optimisation", "output_dir": "output"}


def _sections() -> dict[str, dict[str, Option]]:
    out: dict[str, dict[str, Option]] = {}
    title = None
    for f in fields(TrainConfig):
        title = SECTION_STARTS.get(f.name, title)
        out.setdefault(title, {})[f.name] = f.metadata["option"]
    return out


#: Section -> field -> Option, in the fields' order; ``grao train --help`` shows them so (derived from the fields).
SECTIONS: dict[str, dict[str, Option]] = _sections()
OPTIONS: dict[str, Option] = {name: opt for section in SECTIONS.values() for name, opt in section.items()}


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


def check_field(name: str, value: Any) -> Any:
    """``value`` checked (and, from text, converted) for field ``name``; ConfigError naming it otherwise.

    Every field has its Option (the test of the help texts says so)."""
    option = OPTIONS[name]
    try:
        return option.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{name} {exc}") from None


def suggest_field(name: str) -> str:
    """" (did you mean 'x'?)" for the field nearest to an unknown ``name``, or ""."""
    close = difflib.get_close_matches(name, [f.name for f in fields(TrainConfig)], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
