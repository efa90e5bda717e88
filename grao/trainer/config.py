"""TrainConfig: every option of a training run, its defaults and its validation.

``grao train`` exposes each field as ``--flag`` and reads them from YAML (``grao.cli``); nothing
else in the trainer defines an option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("grao", "grpo", "sft", "dpo")
LOSS_IMPLS = ("auto", "fused", "eager")
SCHEDULES = ("constant", "linear", "cosine")
REWARD_ERROR_MODES = ("raise", "drop_group")
SAMPLE_SEEDINGS = ("auto", "batch", "prompt")
PARALLELS = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Every option of a run; ``grao train`` exposes each field as ``--flag`` and reads them from YAML."""

    # model and data
    model: str = "demo"  # a path / hub id for AutoModelForCausalLM, or "demo" for the built-in tiny LM
    tokenizer: str | None = None  # defaults to `model`
    data: str | None = None  # JSONL/JSON file with prompt + reference (aliases solution/chosen, HH format); None with model=demo: the synthetic task
    eval_data: str | None = None
    task: str = "reverse"  # synthetic task of the demo model: reverse, copy, sort, add
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
    max_prompt_length: int = 512
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
    micro_batch_tokens: int = 4096  # token positions per forward/backward (whole groups when they fit); 0 = the whole step at once
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
    progress: bool = True
    plot: bool = True
    tensorboard: str = "auto"  # auto (when installed) | true | false

    def validate(self) -> TrainConfig:
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.loss_impl in LOSS_IMPLS, f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        need(self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        need(self.dpo_rejected in ("sample", "column"), f"dpo_rejected must be sample|column, got {self.dpo_rejected!r}")
        need(self.on_reward_error in REWARD_ERROR_MODES,
             f"on_reward_error must be one of {REWARD_ERROR_MODES}, got {self.on_reward_error!r}")
        need(self.sample_seeding in SAMPLE_SEEDINGS,
             f"sample_seeding must be one of {SAMPLE_SEEDINGS}, got {self.sample_seeding!r}")
        need(self.parallel in PARALLELS, f"parallel must be one of {PARALLELS}, got {self.parallel!r}")
        need(self.max_consecutive_skips >= 0, f"max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}")
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "steps"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.micro_batch_rows >= 0, f"micro_batch_rows must be >= 0, got {self.micro_batch_rows}")
        need(self.micro_batch_tokens >= 0, f"micro_batch_tokens must be >= 0, got {self.micro_batch_tokens}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        if self.method == "grpo":
            need(self.group_size >= 2, "grpo needs group_size >= 2 (advantages are normalised over the G samples)")
        return self
