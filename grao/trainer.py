"""A thin GRAO trainer for Hugging Face causal LMs (any ``AutoModelForCausalLM``).

One step (:meth:`Trainer.train_step`):

1. take P prompts with their reference answers y;
2. sample G completions per prompt with ``generate`` (``num_return_sequences=G``: each prompt is
   encoded once per group), temperature / top-p, ``max_new_tokens``;
3. score R(o_i, y) for the G samples and R(y, y) for the reference with the reward function(s);
4. build the GRAO batch of B = P * (G + 1) rows, the G samples of a prompt first and its reference
   last (GRAO_SPEC.md, "Tensor layout"), labels = the completion tokens (prompt and padding ignored);
5. run the backbone to its last hidden states and apply the loss to them and the lm_head weight,
   ``grao_kernels.fused_linear_grao_loss`` (never the full [B, T, V] logits) or, with
   ``loss_impl="eager"``, the eager ``grao.linear_grao_loss`` that materialises them;
6. AdamW step (weight decay 0.01 as in the paper), gradient clipping, LR schedule.

Micro-batching (``micro_batch_rows``) is exact because the advantages are constants computed once
per group from all G + 1 rewards (``grao.group_advantages``). Two schemes, picked automatically:

* micro-batches of whole groups (``micro_batch_rows`` a multiple of G + 1, or 0 = everything): the
  fused loss runs on each chunk of prompts and is scaled by (prompts in chunk / P), since the batch
  loss is the mean over prompts of independent per-prompt terms;
* micro-batches of rows (any other size; memory then does not grow with G): the loss is linear in
  the per-token log-probs with coefficients known before the forward pass (``grao.grao_row_grad``,
  the spec's dLoss/dlogp), so each chunk back-propagates the surrogate ``sum(coef * logp)`` on
  ``grao_kernels.linear_logprob`` outputs. Its value and gradient equal those of the full loss.

(Sampling itself still holds the G completions of a prompt and their KV cache at once; the update does not.)
The peak memory of one update vs G is measured by ``benchmarks/trainer_memory.py``.

Baselines use the same rollouts and log-prob machinery (``grao.baselines``): ``sft`` (mean NLL of the
reference), ``dpo`` (reference as chosen, the lowest-reward sample or a ``rejected`` column as
rejected, against a frozen copy of the initial model), ``grpo`` (TRL-style, no reference in the group).

Checkpoints are written with ``save_pretrained`` into a temporary directory that is renamed
atomically to ``checkpoints/step-XXXXXXXX``; the trainer state (optimizer, scheduler, RNG, data
position, step) is a ``torch.save`` of tensors and plain containers, loaded with
``weights_only=True`` (a state file holding any other pickled object is refused). ``resume=True``
continues from the newest complete checkpoint; an interrupted run leaves at most a ``.tmp-*``
directory, which is ignored and removed. Models and tokenizers are loaded with
``trust_remote_code=False`` unless the config says otherwise.

Faults (each counted in the step metrics):

* a reward function that raises or returns the wrong length / None / NaN: a :class:`RewardError`
  naming the function (``on_reward_error="raise"``, the default), or with ``"drop_group"`` the
  prompts whose rewards are invalid are left out of the step (``groups_dropped``); a step whose
  groups are all dropped makes no update (``skipped_all_dropped``);
* a non-finite loss or gradient: the optimizer and scheduler do not step, the gradients are
  discarded, weights and optimizer state stay as they were (``skipped_nonfinite``);
* ``max_consecutive_skips`` skipped steps in a row stop the run with an error.

Several processes (``torchrun`` or ``accelerate launch``, the commands are in the README): each rank samples
and scores its contiguous shard of the step's P prompts, with a sampling seed that depends on
(seed, step, prompt index) and not on the rank, so the rollouts equal those of one process with
``sample_seeding="prompt"``. Each rank's loss is scaled by (its prompts / all prompts) -- tokens
for SFT and DAPO-style GRPO -- and the gradients are summed over ranks with ``all_reduce`` once per
step (after all micro-batches), so the update equals the single-process update on the global batch.
This is data parallelism with a replicated model (the lm_head included), what DDP does; the trainer
does not wrap the model in ``DistributedDataParallel`` because its loss never calls the model's
forward (it runs the backbone and applies the fused loss to the lm_head weight).

``parallel="fsdp"`` (or ``accelerate launch`` with ``--use_fsdp --fsdp_version 2``) shards the model
with FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder layer (the model's
``_no_split_modules`` classes) is its own FSDP unit and the root (the causal LM: embeddings, final
norm and the lm_head, tied or not) is the last one, kept unsharded between its forward and backward.
Generation goes through the model's forward, which all-gathers each unit in turn. The loss path calls
:func:`_fsdp_hidden_and_head` registered with ``register_fsdp_forward_method``: it runs the backbone
and returns its last hidden states together with the *full* lm_head weight (the root's all-gathered
parameter, so the fused loss sees the whole [V, D] matrix and a tied embedding stays tied); its
gradient is reduce-scattered by FSDP like every other one. (Fused-loss integrations that meet an FSDP2
lm_head often gather the DTensor weight with ``full_tensor()``; with the default ``grad_placements``
(Replicate) its backward keeps only the rank's own shard of the rank's own gradient, with no sum over
ranks -- right for a frozen head, not for a trained one -- so the root's own all-gather is used here.)
The calls are kept in lock-step: rollouts run with every unit gathered once (no collective per token,
``synced_gpus=False``, ranks may make different numbers of ``generate`` calls), and a rank with fewer
micro-batches than another adds zero-loss passes. FSDP2 averages the reduce-scattered gradients over ranks, so under FSDP each rank's
loss scale (its share of the global normaliser) is multiplied by the world size: the update equals
the one-process update. Gradient norm and clipping run on the local shards (squared norms summed over
ranks). Checkpoints gather a full state dict to rank 0 (``get_model_state_dict(full_state_dict=True,
cpu_offload=True)``) and ``save_pretrained`` it, so they are ordinary HF checkpoints; resuming an FSDP
run is not supported (refused with an error). A DPO / KL reference model stays replicated. FSDP1 and
DeepSpeed / Megatron launches are refused with an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grao.baselines import dpo_loss, grpo_advantages, grpo_loss, sft_loss
from grao.data import PromptSampler, load_records, render_prompt
from grao.reference import (
    COMPONENTS,
    grao_objective,
    grao_row_grad,
    group_advantages,
    linear_grao_loss,
    linear_logits,
    sequence_logprob,
    token_logprobs,
)
from grao.rewards import (
    RewardError,
    call_reward,
    call_reward_lenient,
    resolve_reward,
    reward_name,
)

logger = logging.getLogger("grao")

METHODS = ("grao", "grpo", "sft", "dpo")
LOSS_IMPLS = ("auto", "fused", "eager")
SCHEDULES = ("constant", "linear", "cosine")
REWARD_ERROR_MODES = ("raise", "drop_group")
SAMPLE_SEEDINGS = ("auto", "batch", "prompt")
PARALLELS = ("ddp", "fsdp")
FAULT_ENV = "GRAO_FAULT_INJECT"  # test hook, see _fault_point
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.pt"


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
    micro_batch_rows: int = 0  # rows per forward/backward; 0 = the whole step at once
    max_consecutive_skips: int = 10  # stop when this many steps in a row made no update (non-finite / all dropped); 0: never
    gradient_checkpointing: bool = False
    bf16: str = "auto"  # auto (bf16 autocast on CUDA when supported) | true | false
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (when installed)
    disable_dropout: bool = True
    seed: int = 0
    device: str = "auto"
    parallel: str = "ddp"  # several processes: ddp (replicated model, gradient all-reduce) | fsdp (FSDP2 fully_shard); ACCELERATE_USE_FSDP with FSDP_VERSION=2 picks fsdp
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
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        if self.method == "grpo":
            need(self.group_size >= 2, "grpo needs group_size >= 2 (advantages are normalised over the G samples)")
        return self


# --------------------------------------------------------------------------------------------------------------
# loss back-ends


def _fused_module():
    try:
        import grao_kernels
        return grao_kernels if hasattr(grao_kernels, "fused_linear_grao_loss") else None
    except Exception:  # noqa: BLE001 - a half-built grao_kernels must not break the eager path
        return None


def resolve_loss_impl(loss_impl: str) -> str:
    """"fused" or "eager"; "auto" picks fused when ``grao_kernels`` imports."""
    if loss_impl == "eager":
        return "eager"
    mod = _fused_module()
    if mod is None:
        if loss_impl == "fused":
            raise ImportError("loss_impl='fused' needs grao_kernels (fused_linear_grao_loss, linear_logprob); "
                              "it did not import. Use loss_impl='eager' or 'auto'.")
        warnings.warn("grao_kernels is not importable: falling back to the eager loss (full logits)", stacklevel=2)
        return "eager"
    return "fused"


class LossBackend:
    """The two per-chunk primitives every method needs, fused (no [.., V] logits) or eager."""

    def __init__(self, impl: str):
        self.impl = impl
        if impl == "fused":
            mod = _fused_module()
            self._grao, self._logprob = mod.fused_linear_grao_loss, mod.linear_logprob
        else:
            self._grao, self._logprob = linear_grao_loss, None

    def grao(self, hidden, weight, labels, rewards, *, bias, temperature, beta, lam, eps, reference_in_stats):
        return self._grao(hidden, weight, labels, rewards, beta=beta, lam=lam, eps=eps, bias=bias,
                          temperature=temperature, reference_in_stats=reference_in_stats)

    def logprob(self, hidden, weight, labels, *, bias, temperature) -> torch.Tensor:
        """Per-token log-probs [B, T] (fp32), 0 at ignored positions."""
        if self._logprob is not None:
            return self._logprob(hidden, weight, labels, bias=bias, temperature=temperature)
        return token_logprobs(linear_logits(hidden, weight, bias, temperature), labels)


# --------------------------------------------------------------------------------------------------------------
# batches


@dataclass
class Rollout:
    """One step's samples. Lists are per prompt; token lists exclude padding."""

    records: list[dict]
    prompt_texts: list[str]
    prompt_ids: list[list[int]]  # [P]
    sample_ids: list[list[list[int]]]  # [P][G] generated tokens up to and including EOS
    sample_texts: list[list[str]]  # [P][G]
    reference_ids: list[list[int]]  # [P] reference tokens + EOS
    rewards: torch.Tensor  # [P, G+1] float32: R(o_i, y) then R(y, y); NaN rows for dropped groups
    gen_seconds: float = 0.0
    keep: list[bool] | None = None  # [P] False: the group's rewards were invalid (on_reward_error="drop_group")
    reward_errors: list[str] = dataclasses.field(default_factory=list)

    def kept(self) -> Rollout:
        """The rollout restricted to the groups with valid rewards."""
        if self.keep is None or all(self.keep):
            return self
        idx = [i for i, k in enumerate(self.keep) if k]
        pick = lambda xs: [xs[i] for i in idx]
        return Rollout(pick(self.records), pick(self.prompt_texts), pick(self.prompt_ids), pick(self.sample_ids),
                       pick(self.sample_texts), pick(self.reference_ids), self.rewards[idx], self.gen_seconds)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, ignore_index: int = -100
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [N, L], attention_mask [N, L], labels [N, L]) from (prompt, completion) rows.

    labels are already shifted: labels[:, t] is the token that the hidden state at t predicts when it is a
    completion token, else ignore_index; the last column is always ignore_index.
    """
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), ignore_index, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = list(p) + list(c)
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
        if c:
            labels[i, len(p) - 1:len(seq) - 1] = torch.tensor(c, dtype=torch.long)
    return ids, mask, labels


def chunk_ranges(total: int, size: int) -> list[tuple[int, int]]:
    size = total if size <= 0 else size
    return [(s, min(s + size, total)) for s in range(0, total, size)]


# --------------------------------------------------------------------------------------------------------------
# model helpers


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone returning last_hidden_state, lm_head Linear) of a causal LM."""
    head = model.get_output_embeddings()
    backbone = getattr(model, "base_model", None)
    if head is None or backbone is None or backbone is model or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__}: need a causal LM with a base model and a linear lm_head "
                        f"(get_output_embeddings)")
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        val = getattr(cfg, attr, None)
        if val not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(model).__name__} transforms its logits ({attr}={val}); the fused "
                                      f"hidden-state loss covers plain linear heads only")
    return backbone, head


def disable_dropout(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset; CPU: the process's max resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def make_schedule(optimizer, config: TrainConfig):
    warm, total = int(config.warmup_steps), int(config.steps)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_model_and_tokenizer(config: TrainConfig, source: str | None = None, device=None):
    """The policy and its tokenizer: the demo model, or ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = source or config.model
    if src == "demo":
        from grao import demo
        tok = demo.build_tokenizer()
        model = demo.build_model(tok, seed=config.seed, attn_implementation=config.attn_implementation)
    else:
        # trust_remote_code: a hub repository's own Python code runs only when the user asked for it
        remote = bool(config.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(config.tokenizer or src if source is None else src, trust_remote_code=remote)
        kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=remote, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {src} has no eos token: completions could not end")
    if device is not None:
        model.to(device)
    return model, tok


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed from their temp dir and holding the trainer state), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def recover_interrupted_saves(output_dir: str | os.PathLike) -> None:
    """Repair what a process killed inside :meth:`Trainer.save_checkpoint` can leave behind.

    A kill between the two renames of a re-save leaves the complete old checkpoint as
    ``.old-step-N-<pid>`` and no ``step-N``: it is renamed back. Half-written ``.tmp-*`` directories and
    ``.old-*`` ones that have a ``step-N`` again are removed.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return
    import re
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".old-"):
            m = re.fullmatch(rf"\.old-({CHECKPOINT_PREFIX}\d+)-\d+", entry.name)  # not the "-pruned" ones
            if m and not (root / m.group(1)).exists() and (entry / STATE_FILE).is_file():
                os.rename(entry, root / m.group(1))
                continue
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)


def _fault_point(name: str, step: int) -> None:
    """Test hook: with ``GRAO_FAULT_INJECT="<name>@<step>"`` the process announces it on stdout and
    sleeps, so that a test can SIGKILL it at exactly this point (e.g. inside a checkpoint write).
    Points: ``save_weights`` (weights written to the temp dir, trainer state not yet), ``save_state``
    (everything written, not yet renamed). Unset in normal runs: a dictionary lookup, nothing else."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{name}@{step}":
        print(f"{FAULT_ENV}: paused at {name} step {step} pid {os.getpid()}", flush=True)
        time.sleep(600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _plain(value):
    """Config values as YAML/JSON/weights_only-safe plain types (callables become their names)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return getattr(value, "__name__", type(value).__name__)


# --------------------------------------------------------------------------------------------------------------
# several processes


def _dist():
    """torch.distributed when a process group of several ranks is up, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def launch_parallel(parallel: str = "ddp") -> str:
    """The parallelism of a multi-process run: ``parallel`` ("ddp" | "fsdp"), or "fsdp" when
    ``accelerate launch`` was asked for FSDP version 2 (``ACCELERATE_USE_FSDP`` with ``FSDP_VERSION=2``).
    FSDP version 1, DeepSpeed and Megatron launches are refused with NotImplementedError."""
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM"):
        if _env_true(var):
            raise NotImplementedError(f"{var} is set: the grao trainer supports DDP-style data parallelism "
                                      f"(replicated model, gradient all-reduce) and FSDP2; DeepSpeed / Megatron "
                                      f"sharding is not supported. Launch with accelerate launch --multi_gpu, "
                                      f"--use_fsdp --fsdp_version 2, or torchrun.")
    if _env_true("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise NotImplementedError(f"ACCELERATE_USE_FSDP is set with FSDP_VERSION={version}: the grao trainer "
                                      f"supports FSDP2 (fully_shard) only; launch with --fsdp_version 2 (or "
                                      f"--parallel fsdp), or use plain data parallelism (--multi_gpu)")
        return "fsdp"
    return parallel


def init_distributed(want_cuda: bool) -> tuple[int, int, int]:
    """(rank, world_size, local_rank). With ``WORLD_SIZE > 1`` in the environment (set by ``torchrun`` and
    ``accelerate launch``) the default process group is created (NCCL for CUDA, else gloo) unless the
    caller already did it. FSDP1 / DeepSpeed / Megatron launches are refused (:func:`launch_parallel`)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() <= 1:
            return 0, 1, 0
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0
    launch_parallel()
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def shutdown_distributed(barrier: bool = True) -> None:
    """Destroy the default process group if one is up (end of ``grao train``)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of ``total`` items; sizes differ by at most one."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _all_reduce_grads(params: list[torch.nn.Parameter], bucket_bytes: int = 25 * 2 ** 20) -> None:
    """Sum .grad over ranks in flat buckets (DDP's gradient bucketing, without its forward hooks).

    A parameter without a gradient on some ranks gets zeros there; one without a gradient on every
    rank keeps ``grad = None`` (as in one process, so AdamW leaves it alone)."""
    dist = _dist()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has)
    used = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in used:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a HF model (its ``_no_split_modules`` classes, else ``base_model.layers``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        found = list(getattr(model.base_model, "layers", None) or [])
    if not found:
        raise TypeError(f"{type(model).__name__}: no decoder layers found to shard (neither _no_split_modules "
                        f"nor base_model.layers)")
    return found


def _fsdp_hidden_and_head(model, input_ids, attention_mask):
    """FSDP forward method of the root: (last hidden states [N, L, D], lm_head weight [V, D], bias [V] or
    None). Called through the root's FSDP hooks (``register_fsdp_forward_method``), so the weight returned is
    the root's all-gathered full parameter and its gradient is reduce-scattered with the others."""
    backbone, head = lm_parts(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden, head.weight, getattr(head, "bias", None)


def fsdp_shard(model, device: torch.device, world_size: int):
    """Shard ``model`` in place with FSDP2: every decoder layer, then the root (embeddings, norm, lm_head).

    The root is not resharded after its forward (it would be all-gathered again at once for the backward
    and for the loss that uses the lm_head weight after the forward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    lm_parts(model)  # a clear error before sharding for a model the loss path cannot use
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    import types
    model.grao_hidden_and_head = types.MethodType(_fsdp_hidden_and_head, model)
    register_fsdp_forward_method(model, "grao_hidden_and_head")
    return model


def _all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over ranks (float64); the values themselves in one process."""
    dist = _dist()
    if dist is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_gather(obj: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients); a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def prompt_seed(seed: int, step: int, index: int) -> int:
    """Sampling seed of the prompt at position ``index`` of step ``step``'s global batch (not of a rank)."""
    digest = hashlib.blake2b(f"grao:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """GRAO (and baseline) training of a causal LM; see the module docstring for the step.

    Args:
        config: a :class:`TrainConfig`.
        model, tokenizer: optional ready objects (otherwise built from ``config.model``).
        train_records, eval_records: optional record lists (otherwise from ``config.data`` or the demo task).
        reward: optional reward callable (otherwise ``resolve_reward(config.reward)``).
    """

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None, train_records=None, eval_records=None,
                 reward: Callable | None = None):
        self.config = config.validate()
        cfg = self.config
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                                   else cfg.device)
        self.rank, self.world_size, local_rank = init_distributed(self.device.type == "cuda")
        self.is_main = self.rank == 0
        if self.world_size > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local_rank)
            if cfg.sample_seeding == "batch":
                raise ValueError("sample_seeding='batch' draws every rank's samples from one global RNG stream; "
                                 "with several processes use 'prompt' (or 'auto')")
            if cfg.prompts_per_step < self.world_size:
                raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be >= the number of processes "
                                 f"({self.world_size}): each rank samples its share of the step's prompts")
        self.sample_seeding = (("prompt" if self.world_size > 1 else "batch") if cfg.sample_seeding == "auto"
                               else cfg.sample_seeding)
        # FSDP2 sharding with several processes (one process: nothing to shard, the plain path)
        self.fsdp = self.world_size > 1 and launch_parallel(cfg.parallel) == "fsdp"
        if self.fsdp and cfg.resume:
            raise NotImplementedError("resume=True is not supported with FSDP (parallel='fsdp'): the checkpoints "
                                      "hold full model weights (an ordinary HF checkpoint, usable as --model) but "
                                      "not the sharded optimizer state")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.output_dir = Path(cfg.output_dir)
        self.resume_from = None
        if cfg.resume:
            if self.is_main:
                recover_interrupted_saves(self.output_dir)
            ckpts = checkpoint_dirs(self.output_dir)
            found = str(ckpts[-1]) if ckpts else None
            chosen = _all_gather(found)[0]  # rank 0 decides
            self.resume_from = Path(chosen) if chosen else None
        if model is None:
            model, tok = load_model_and_tokenizer(cfg, source=str(self.resume_from) if self.resume_from else None)
            tokenizer = tokenizer or tok
        elif self.resume_from is not None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(self.resume_from, trust_remote_code=bool(cfg.trust_remote_code))
        if tokenizer is None:
            raise ValueError("a tokenizer is required when a model object is passed")
        self.model, self.tokenizer = model.to(self.device), tokenizer
        if self.world_size > 1:  # every rank starts from rank 0's weights, as DDP does
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                _dist().broadcast(t.data, 0)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if cfg.disable_dropout:
            disable_dropout(self.model)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        self.backbone, self.head = lm_parts(self.model)
        self.loss_impl = resolve_loss_impl(cfg.loss_impl)
        self.backend = LossBackend(self.loss_impl)
        self.autocast_dtype = None
        if self.device.type == "cuda" and (cfg.bf16 is True or str(cfg.bf16).lower() in ("true", "auto")):
            if str(cfg.bf16).lower() != "auto" or torch.cuda.is_bf16_supported():
                self.autocast_dtype = torch.bfloat16
        self.reward_fn = reward if reward is not None else resolve_reward(cfg.reward,
                                                                          trust_remote_code=bool(cfg.trust_remote_code))
        if train_records is None:
            train_records, eval_records = self._default_records(eval_records)
        self.train_records = load_records(train_records)
        self.eval_records = load_records(eval_records) if eval_records else None
        if cfg.method == "dpo" and cfg.dpo_rejected == "column" and "rejected" not in self.train_records[0]:
            raise ValueError("dpo_rejected='column' needs a 'rejected' column in the data")
        self.ref_model = None
        if cfg.method == "dpo" or (cfg.method == "grpo" and cfg.grpo_kl_beta > 0):
            self.ref_model = self._build_reference_model()  # replicated, also under FSDP
        self._arch_name = type(self.model).__name__
        if self.fsdp:
            fsdp_shard(self.model, self.device, self.world_size)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = make_schedule(self.optimizer, cfg)
        self.sampler = PromptSampler(len(self.train_records), seed=cfg.seed)
        self.step = 0
        self.counters = {"skipped_nonfinite": 0, "skipped_all_dropped": 0, "groups_dropped": 0}  # run totals
        self._consecutive_skips = 0
        self._loss_scale = 1.0  # this rank's share of the step's loss normaliser (1 in one process)
        self._fsdp_gathered = False  # inside _fsdp_full_params
        self._fsdp_passes = 0  # FSDP forward passes of this step's update (see _fsdp_pad_passes)
        self.history: list[dict] = []
        self._tb = None
        if self.resume_from is not None:
            self._load_state(self.resume_from)

    # ---------------------------------------------------------------------------------------------- setup
    def _default_records(self, eval_records):
        cfg = self.config
        if cfg.data is not None:
            return cfg.data, (eval_records or cfg.eval_data)
        if cfg.model != "demo":
            raise ValueError("data is required (a JSONL file with prompt and reference) unless model='demo'")
        from grao import demo
        train, ev = demo.make_task(cfg.task, num_train=cfg.task_train_size, num_eval=cfg.task_eval_size,
                                   min_len=cfg.task_min_len, max_len=cfg.task_max_len)
        return train, (eval_records or ev)

    def _build_reference_model(self):
        """A frozen copy of the *initial* policy (the base model, also after a resume)."""
        if self.resume_from is None:
            import copy
            ref = copy.deepcopy(self.model)
        else:
            ref, _ = load_model_and_tokenizer(self.config)
        ref.to(self.device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # ---------------------------------------------------------------------------------------------- rollout
    def _encode_prompts(self, texts: list[str], conversational: list[bool]) -> list[list[int]]:
        out = []
        for text, conv in zip(texts, conversational):
            ids = self.tokenizer(text, add_special_tokens=not conv, truncation=True,
                                 max_length=self.config.max_prompt_length)["input_ids"]
            if not ids:
                raise ValueError(f"prompt {text!r:.60} encodes to no tokens")
            out.append(ids)
        return out

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_samples: int, *, temperature: float | None = None,
                 model=None, seeds: list[int] | None = None) -> list[list[list[int]]]:
        """Sample ``num_samples`` completions per prompt -> [P][n] token lists, cut after the first EOS.

        Without ``seeds``: one batched ``generate`` call drawing from the global RNG. With ``seeds`` (one
        int per prompt): one call per prompt under ``torch.manual_seed(seed)`` in a forked RNG, so a
        prompt's samples depend on its seed only (not on the batch or the process it landed in).
        """
        if self.fsdp and (model is None or model is self.model) and not self._fsdp_gathered:
            with self._fsdp_full_params():  # no collective inside: ranks may make different numbers of calls
                return self.generate(prompt_ids, num_samples, temperature=temperature, model=model, seeds=seeds)
        if seeds is not None:
            devices = [self.device] if self.device.type == "cuda" else []
            out = []
            for ids, seed in zip(prompt_ids, seeds, strict=True):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    out += self.generate([ids], num_samples, temperature=temperature, model=model)
            return out
        cfg, tok = self.config, self.tokenizer
        model = model or self.model
        temperature = cfg.temperature if temperature is None else temperature
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding for decoder-only generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        was_training = model.training
        model.eval()
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, num_return_sequences=num_samples,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        if self.fsdp:  # parameters are gathered (_fsdp_full_params): no lock-step between ranks is needed
            kwargs["synced_gpus"] = False
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=cfg.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._autocast():
            out = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        model.train(was_training)
        new = out[:, width:].tolist()
        eos = tok.eos_token_id
        result: list[list[list[int]]] = []
        for i in range(len(prompt_ids)):
            group = []
            for row in new[i * num_samples:(i + 1) * num_samples]:
                cut = row.index(eos) + 1 if eos in row else len(row)
                group.append(row[:cut])  # rows that ended early are padded after their EOS
            result.append(group)
        return result

    @contextlib.contextmanager
    def _fsdp_full_params(self):
        """FSDP: all-gather every unit once and keep them unsharded (no resharding after forward) for the
        duration, e.g. a rollout, whose number of forward calls differs between ranks; reshard after."""
        from torch.distributed.fsdp import FSDPModule
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.unshard()
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
        self._fsdp_gathered = True
        try:
            yield
        finally:
            self._fsdp_gathered = False
            for m in units:
                m.set_reshard_after_forward(m is not self.model, recurse=False)  # the root stays gathered
                m.reshard()

    def _update_passes(self, ro: Rollout) -> int:
        """Forward/backward passes of the policy that :meth:`accumulate_gradients` makes on ``ro``."""
        cfg, P = self.config, len(ro.prompt_ids)
        if P == 0:
            return 0
        mb = cfg.micro_batch_rows
        if cfg.method == "grao":
            width = cfg.group_size + 1
            if mb <= 0 or mb % width == 0:
                return len(chunk_ranges(P, (mb // width) if mb > 0 else P))
            return len(chunk_ranges(P * width, mb))
        if cfg.method == "grpo":
            return len(chunk_ranges(P * cfg.group_size, mb))
        if cfg.method == "sft":
            return len(chunk_ranges(P, mb))
        return len(chunk_ranges(P, P if mb <= 0 else max(1, mb // 2)))

    def _fsdp_max_passes(self, ro: Rollout) -> int:
        """FSDP: the most passes any rank makes this step, agreed on before the first one (each pass
        all-gathers and reduce-scatters, so every rank must make the same number)."""
        import torch.distributed as dist
        n = torch.tensor([self._update_passes(ro)], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return int(n)

    def _fsdp_pad_passes(self, target: int) -> None:
        """FSDP: a rank with fewer micro-batches than ``target`` (or no kept prompt) adds passes of zero loss."""
        if self._fsdp_passes > target:
            raise RuntimeError(f"FSDP: {self._fsdp_passes} forward passes made, {target} planned")
        eos = self.tokenizer.eos_token_id
        for _ in range(target - self._fsdp_passes):
            hidden, weight, bias, _ = self.hidden_states([([eos], [eos])])
            zero = hidden.sum() * 0.0 + weight.sum() * 0.0 + (bias.sum() * 0.0 if bias is not None else 0.0)
            zero.backward()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def rollout(self, records: list[dict], *, first_index: int = 0) -> Rollout:
        """Sample and score G completions for each record. ``first_index``: position of ``records[0]`` in the
        step's global batch (a rank's shard offset), which with ``sample_seeding="prompt"`` picks the seeds."""
        cfg, tok = self.config, self.tokenizer
        conv = [not isinstance(r["prompt"], str) for r in records]
        texts = [render_prompt(r["prompt"], tok) for r in records]
        prompt_ids = self._encode_prompts(texts, conv)
        seeds = None
        if self.sample_seeding == "prompt":
            seeds = [prompt_seed(cfg.seed, self.step, first_index + j) for j in range(len(records))]
        t0 = time.perf_counter()
        samples = self.generate(prompt_ids, cfg.group_size, seeds=seeds)
        gen_seconds = time.perf_counter() - t0
        sample_texts = [[self.decode(s) for s in group] for group in samples]
        refs = [r["reference"] for r in records]
        ref_ids = [tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ref in refs]
        rewards, keep, errors = self._score_checked(records, texts, sample_texts)
        return Rollout(records, texts, prompt_ids, samples, sample_texts, ref_ids, rewards, gen_seconds,
                       keep=keep, reward_errors=errors)

    @staticmethod
    def _reward_inputs(records, prompt_texts, sample_texts) -> dict:
        prompts, completions, references = [], [], []
        columns: dict[str, list] = {k: [] for k in records[0] if k not in ("prompt", "reference")}
        for rec, text, group in zip(records, prompt_texts, sample_texts):
            for c in list(group) + [rec["reference"]]:
                prompts.append(text)
                completions.append(c)
                references.append(rec["reference"])
                for k in columns:
                    columns[k].append(rec.get(k))
        columns.pop("solution", None)
        return dict(prompts=prompts, completions=completions, references=references, **columns)

    def score(self, records: list[dict], prompt_texts: list[str], sample_texts: list[list[str]]) -> torch.Tensor:
        """rewards [P, G+1] float32: R(o_i, y) for each sample, then R(y, y), in one reward call.

        Raises :class:`grao.rewards.RewardError` naming the reward when it raises or returns a wrong
        length, None or a non-finite value."""
        G = len(sample_texts[0])
        values = call_reward(self.reward_fn, **self._reward_inputs(records, prompt_texts, sample_texts))
        return torch.tensor(values, dtype=torch.float32).view(len(records), G + 1)

    def _score_checked(self, records, prompt_texts, sample_texts) -> tuple[torch.Tensor, list[bool], list[str]]:
        """(rewards [P, G+1], keep [P], error messages) under ``on_reward_error``.

        "raise": :meth:`score`. "drop_group": one lenient call for the whole batch; if the call itself fails
        (raises, wrong length) each group is scored on its own to find the failing ones. A group with an
        invalid value (None / NaN / inf / not a number) or whose call failed gets NaN rewards and keep=False.
        """
        P, G = len(records), len(sample_texts[0])
        if self.config.on_reward_error == "raise":
            return self.score(records, prompt_texts, sample_texts), [True] * P, []
        errors: list[str] = []
        try:
            values = call_reward_lenient(self.reward_fn, **self._reward_inputs(records, prompt_texts, sample_texts))
            rewards = torch.tensor(values, dtype=torch.float32).view(P, G + 1)
        except RewardError as exc:
            errors.append(str(exc))
            rows = []
            for i in range(P):
                try:
                    rows.append(call_reward_lenient(self.reward_fn, **self._reward_inputs(
                        records[i:i + 1], prompt_texts[i:i + 1], sample_texts[i:i + 1])))
                except RewardError as exc_i:
                    errors.append(f"prompt {i}: {exc_i}")
                    rows.append([math.nan] * (G + 1))
            rewards = torch.tensor(rows, dtype=torch.float32)
        keep = torch.isfinite(rewards).all(-1)
        for i in (~keep).nonzero().flatten().tolist():
            if not any(e.startswith(f"prompt {i}:") for e in errors):
                errors.append(f"prompt {i}: reward {reward_name(self.reward_fn)!r} returned a None / non-finite / "
                              f"non-numeric value")
        rewards[~keep] = math.nan
        if errors:
            logger.warning("step %d: dropped %d of %d groups on reward errors: %s", self.step + 1,
                           int((~keep).sum()), P, "; ".join(errors[:3]))
        return rewards, keep.tolist(), errors

    # ---------------------------------------------------------------------------------------------- forward
    @contextlib.contextmanager
    def _autocast(self):
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                yield

    def hidden_states(self, rows: list[tuple[list[int], list[int]]], model=None):
        """(hidden [N, L, D], weight [V, D], bias or None, labels [N, L]) for (prompt, completion) rows."""
        model = model or self.model
        backbone, head = (self.backbone, self.head) if model is self.model else lm_parts(model)
        ids, mask, labels = pad_rows(rows, self.tokenizer.pad_token_id)
        ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
        with self._autocast():
            if self.fsdp and model is self.model:  # through the root's FSDP hooks: the full lm_head weight
                hidden, weight, bias = model.grao_hidden_and_head(ids, mask)
                self._fsdp_passes += 1
            else:
                hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                weight, bias = head.weight, getattr(head, "bias", None)
        if self.autocast_dtype is not None:
            hidden, weight = hidden.to(self.autocast_dtype), weight.to(self.autocast_dtype)
            bias = bias.to(self.autocast_dtype) if bias is not None else None
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return hidden, weight, bias, labels

    def token_logp(self, rows, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token log-probs [N, L] fp32, completion mask [N, L] bool) of rows."""
        hidden, weight, bias, labels = self.hidden_states(rows, model)
        logp = self.backend.logprob(hidden, weight, labels, bias=bias, temperature=self.config.loss_temperature)
        return logp, labels != -100

    # ---------------------------------------------------------------------------------------------- losses
    def grao_rows(self, ro: Rollout) -> list[tuple[list[int], list[int]]]:
        rows = []
        for p, group, ref in zip(ro.prompt_ids, ro.sample_ids, ro.reference_ids):
            rows += [(p, s) for s in group] + [(p, ref)]
        return rows

    def accumulate_gradients(self, ro: Rollout) -> dict[str, float]:
        """Forward/backward of one step's loss in micro-batches; gradients accumulate in .grad.

        Returns the logged statistics (the loss and, for GRAO, its three components).
        """
        method = self.config.method
        if method == "grao":
            return self._grao_backward(ro)
        if method == "grpo":
            return self._grpo_backward(ro)
        if method == "sft":
            return self._sft_backward(ro)
        return self._dpo_backward(ro)

    def _grao_backward(self, ro: Rollout) -> dict[str, float]:
        cfg = self.config
        P, width = ro.rewards.shape
        rows = self.grao_rows(ro)
        rewards = ro.rewards.to(self.device)
        adv = group_advantages(rewards, eps=cfg.eps, reference_in_stats=cfg.reference_in_stats)
        counts = torch.tensor([len(c) for _, c in rows], device=self.device)
        mb = cfg.micro_batch_rows
        by_groups = mb <= 0 or mb % width == 0
        seq_parts = []
        if by_groups:
            # whole prompts per chunk: the fused loss on each chunk, scaled by its share of prompts
            for start, stop in chunk_ranges(P, (mb // width) if mb > 0 else P):
                hidden, weight, bias, labels = self.hidden_states(rows[start * width:stop * width])
                loss, stats = self.backend.grao(hidden, weight, labels, rewards[start:stop], bias=bias,
                                                temperature=cfg.loss_temperature, beta=cfg.beta, lam=cfg.lam,
                                                eps=cfg.eps, reference_in_stats=cfg.reference_in_stats)
                (loss * ((stop - start) / P * self._loss_scale)).backward()
                seq_parts.append(stats["seq_logp"].detach().float())
        else:
            # rows per chunk: surrogate sum(coef * logp) with the spec's closed-form dLoss/dlogp
            coef = grao_row_grad(adv, counts, beta=cfg.beta, lam=cfg.lam).float()
            for start, stop in chunk_ranges(len(rows), mb):
                logp, mask = self.token_logp(rows[start:stop])
                ((coef[start:stop, None] * logp).sum() * self._loss_scale).backward()
                seq_parts.append(sequence_logprob(logp.detach(), mask))
        seq = torch.cat(seq_parts)
        loss, parts = grao_objective(seq, adv.to(seq.dtype), beta=cfg.beta, lam=cfg.lam)
        out = {"loss": float(loss)}
        total = sum(abs(float(v)) for v in parts.values()) or 1.0
        for k in COMPONENTS:
            out[f"loss_{k}"] = float(parts[k])
            out[f"share_{k}"] = abs(float(parts[k])) / total
        out["adv_reference_mean"] = float(adv[:, -1].mean())
        return out

    def _grpo_backward(self, ro: Rollout) -> dict[str, float]:
        cfg = self.config
        rows = [(p, s) for p, group in zip(ro.prompt_ids, ro.sample_ids) for s in group]
        adv = grpo_advantages(ro.rewards[:, :-1].to(self.device)).flatten()
        n_rows = len(rows)
        n_tokens = sum(len(c) for _, c in rows)
        total, stats_acc = 0.0, {}
        for start, stop in chunk_ranges(n_rows, cfg.micro_batch_rows):
            chunk = rows[start:stop]
            ref_logp = None
            if cfg.grpo_kl_beta > 0:
                with torch.no_grad():
                    ref_logp = self.token_logp(chunk, model=self.ref_model)[0]
            logp, mask = self.token_logp(chunk)
            loss, stats = grpo_loss(logp, mask, adv[start:stop], ref_token_logp=ref_logp, kl_beta=cfg.grpo_kl_beta,
                                    epsilon_low=cfg.grpo_epsilon, epsilon_high=cfg.grpo_epsilon,
                                    loss_type=cfg.grpo_loss_type, max_completion_length=cfg.max_new_tokens)
            share = (int(mask.sum()) / n_tokens) if cfg.grpo_loss_type == "dapo" else (stop - start) / n_rows
            (loss * (share * self._loss_scale)).backward()
            total += float(loss.detach()) * share
            for k, v in stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + float(v) * (stop - start) / n_rows
        return {"loss": total, **{f"grpo_{k}": v for k, v in stats_acc.items()}}

    def _sft_backward(self, ro: Rollout) -> dict[str, float]:
        rows = list(zip(ro.prompt_ids, ro.reference_ids))
        n_tokens = sum(len(c) for _, c in rows)
        total = 0.0
        for start, stop in chunk_ranges(len(rows), self.config.micro_batch_rows):
            logp, mask = self.token_logp(rows[start:stop])
            share = int(mask.sum()) / n_tokens
            loss = sft_loss(logp, mask) * share
            (loss * self._loss_scale).backward()
            total += float(loss.detach())
        return {"loss": total}

    def _dpo_backward(self, ro: Rollout) -> dict[str, float]:
        cfg = self.config
        rows = []
        for rec, p, group, ref, r in zip(ro.records, ro.prompt_ids, ro.sample_ids, ro.reference_ids, ro.rewards):
            if cfg.dpo_rejected == "column":
                rej = self.tokenizer(rec["rejected"], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            else:
                rej = group[int(torch.argmin(r[:-1]))]  # the worst sample (first among ties)
            rows += [(p, ref), (p, rej)]
        P = len(ro.prompt_ids)
        mb = cfg.micro_batch_rows
        pairs_per_chunk = P if mb <= 0 else max(1, mb // 2)
        total, acc = 0.0, {}
        for start, stop in chunk_ranges(P, pairs_per_chunk):
            chunk = rows[2 * start:2 * stop]
            with torch.no_grad():
                ref_logp, _ = self.token_logp(chunk, model=self.ref_model)
            logp, mask = self.token_logp(chunk)
            summed, ref_summed = (logp * mask).sum(-1), (ref_logp * mask).sum(-1)
            loss, stats = dpo_loss(summed[0::2], summed[1::2], ref_summed[0::2], ref_summed[1::2], beta=cfg.dpo_beta)
            share = (stop - start) / P
            (loss * (share * self._loss_scale)).backward()
            total += float(loss.detach()) * share
            for k, v in stats.items():
                acc[k] = acc.get(k, 0.0) + float(v) * share
        return {"loss": total, **{f"dpo_{k}": v for k, v in acc.items()}}

    # ---------------------------------------------------------------------------------------------- step
    def _normaliser(self, ro: Rollout) -> float:
        """What this rank's share of the batch loss is measured in: prompts (GRAO, DPO, GRPO: per-prompt
        means), or completion tokens (SFT and DAPO-style GRPO: per-token means)."""
        cfg = self.config
        if cfg.method == "sft":
            return float(sum(len(r) for r in ro.reference_ids))
        if cfg.method == "grpo" and cfg.grpo_loss_type == "dapo":
            return float(sum(len(s) for group in ro.sample_ids for s in group))
        return float(len(ro.prompt_ids))

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.fsdp:  # sharded (DTensor) gradients: squared norms of the local shards, summed over ranks
            sq = sum((float(_local(g).double().pow(2).sum()) for g in grads), 0.0)
            return torch.tensor(math.sqrt(_all_reduce_sum([sq], self.device)[0]), device=self.device)
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)

    def train_step(self) -> dict[str, Any]:
        """One rollout + update. With several processes every rank calls it; the returned metrics are global.

        A step with non-finite loss / gradient, or with every group dropped, makes no update: weights,
        optimizer and LR scheduler stay as they were (the step counter and the data position advance)."""
        cfg = self.config
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        records = [self.train_records[i] for i in self.sampler.next_indices(cfg.prompts_per_step)]
        lo, hi = shard_range(len(records), self.rank, self.world_size)
        ro = self.rollout(records[lo:hi], first_index=lo)
        kept = ro.kept()
        t1 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_kept, norm = _all_reduce_sum([len(kept.prompt_ids), self._normaliser(kept)], self.device)
        n_dropped = cfg.prompts_per_step - int(n_kept)
        stats: dict[str, float] = {}
        reason = None
        if n_kept == 0:
            reason = "skipped_all_dropped"
        else:
            # each rank's loss is scaled by its share of the global normaliser, so the sum of the ranks'
            # gradients is the gradient of the loss over the global batch
            self._loss_scale = self._normaliser(kept) / norm if self.world_size > 1 else 1.0
            try:
                if self.fsdp:  # FSDP2 reduce-scatters the gradients itself and averages them over the ranks
                    self._loss_scale *= self.world_size
                    self._fsdp_passes, target = 0, self._fsdp_max_passes(kept)
                local = self.accumulate_gradients(kept) if kept.prompt_ids else {}
                if self.fsdp:
                    self._fsdp_pad_passes(target)
                    self._loss_scale /= self.world_size  # the logged loss: this rank's share of the global one
                if self.world_size > 1:
                    stats = self._reduce_stats(local, len(kept.prompt_ids) / n_kept)
                    if not self.fsdp:
                        _all_reduce_grads([p for p in self.model.parameters() if p.requires_grad])
                else:
                    stats = local
            finally:
                self._loss_scale = 1.0
        grad_norm = None
        lr = self.scheduler.get_last_lr()[0]
        if reason is None:
            norm_t = self._grad_norm()
            grad_norm = float(norm_t)
            if not (math.isfinite(stats.get("loss", 0.0)) and math.isfinite(grad_norm)):
                reason = "skipped_nonfinite"
            else:
                if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                    params = [p for p in self.model.parameters() if p.grad is not None]
                    if self.fsdp:  # DTensor gradients: scale the local shards (torch's clip_coef formula)
                        coef = min(1.0, cfg.max_grad_norm / (grad_norm + 1e-6))
                        for p in params:
                            _local(p.grad).mul_(coef)
                    else:
                        torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, norm_t)
                self.optimizer.step()
                self.scheduler.step()
        if reason is not None:
            self.optimizer.zero_grad(set_to_none=True)  # discard the bad gradients; no optimizer / LR step
            self.counters[reason] += 1
            self._consecutive_skips += 1
            logger.warning("step %d skipped (%s): loss %s, grad norm %s; weights and optimizer state unchanged",
                           self.step + 1, reason, stats.get("loss"), grad_norm)
        else:
            self._consecutive_skips = 0
        self.counters["groups_dropped"] += n_dropped
        self.step += 1
        t2 = time.perf_counter()
        # global rollout statistics (every rank's shard; one process: its own)
        shards = _all_gather({"rewards": kept.rewards.tolist(), "lens": [len(s) for g in ro.sample_ids for s in g],
                              "gen_seconds": ro.gen_seconds, "errors": ro.reward_errors[:3]})
        rewards = torch.tensor([row for sh in shards for row in sh["rewards"]], dtype=torch.float32)
        lens = [n for sh in shards for n in sh["lens"]]
        gen_seconds = max(sh["gen_seconds"] for sh in shards)
        errors = [e for sh in shards for e in sh["errors"]]
        nan = math.nan
        samples = rewards[:, :-1] if rewards.numel() else None
        train_rows = {"grao": int(n_kept) * (cfg.group_size + 1), "grpo": int(n_kept) * cfg.group_size,
                      "sft": int(n_kept), "dpo": 2 * int(n_kept)}[cfg.method]
        metrics = {
            "step": self.step, "method": cfg.method,
            "reward_mean": float(samples.mean()) if samples is not None else nan,
            "reward_std": float(samples.std(unbiased=False)) if samples is not None else nan,
            "reward_reference": float(rewards[:, -1].mean()) if samples is not None else nan,
            "frac_groups_all_equal": (float((samples.amax(-1) == samples.amin(-1)).float().mean())
                                      if samples is not None else nan),
            **({"loss": nan} if not stats else stats),
            "grad_norm": grad_norm, "lr": lr,
            "skipped": reason is not None,
            "skipped_nonfinite": int(reason == "skipped_nonfinite"),
            "skipped_all_dropped": int(reason == "skipped_all_dropped"),
            "groups_dropped": n_dropped,
            **{f"total_{k}": v for k, v in self.counters.items()},
            "completion_len_mean": sum(lens) / max(1, len(lens)),
            "completion_len_max": max(lens),
            "gen_tokens_per_s": sum(lens) / max(gen_seconds, 1e-9),
            "train_rows": train_rows,
            "step_seconds": t2 - t0, "gen_seconds": gen_seconds, "update_seconds": t2 - t1,
            "peak_memory_mb": peak_memory_bytes(self.device) / 2 ** 20,
            "sample": f"{ro.prompt_texts[0]!s}{ro.sample_texts[0][0]}",
        }
        if self.world_size > 1:
            metrics["world_size"] = self.world_size
            metrics["parallel"] = "fsdp" if self.fsdp else "ddp"
        if errors:
            metrics["reward_errors"] = errors[:3]
        if cfg.max_consecutive_skips and self._consecutive_skips >= cfg.max_consecutive_skips:
            raise RuntimeError(f"{self._consecutive_skips} steps in a row made no update (last: {reason}; "
                               f"reward errors: {errors[:1]}); stopping (max_consecutive_skips="
                               f"{cfg.max_consecutive_skips})")
        return metrics

    def _reduce_stats(self, local: dict[str, float], weight: float) -> dict[str, float]:
        """Global step statistics from each rank's local means: the loss weighted by the rank's loss scale,
        the other statistics by its share of the kept prompts; GRAO's component shares recomputed."""
        keys = sorted(set().union(*_all_gather(sorted(local))))
        vals = [local.get(k, 0.0) * (self._loss_scale if k == "loss" or k.startswith("loss_") else weight)
                for k in keys]
        out = dict(zip(keys, _all_reduce_sum(vals, self.device)))
        parts = [f"loss_{k}" for k in COMPONENTS]
        if all(k in out for k in parts):
            total = sum(abs(out[k]) for k in parts) or 1.0
            for k in COMPONENTS:
                out[f"share_{k}"] = abs(out[f"loss_{k}"]) / total
        return out

    @torch.no_grad()
    def evaluate(self, records: list[dict] | None = None, *, model=None, limit: int | None = None,
                 temperature: float = 0.0) -> dict[str, Any]:
        """Greedy (by default) completion per prompt; returns {"reward_mean", "rewards", "completions"}."""
        records = records or self.eval_records or self.train_records
        records = records[:limit] if limit else records
        rewards, completions = [], []
        bs = self.config.eval_batch_size
        for start in range(0, len(records), bs):
            recs = records[start:start + bs]
            conv = [not isinstance(r["prompt"], str) for r in recs]
            texts = [render_prompt(r["prompt"], self.tokenizer) for r in recs]
            ids = self._encode_prompts(texts, conv)
            outs = self.generate(ids, 1, temperature=temperature, model=model)
            comp = [self.decode(g[0]) for g in outs]
            completions += comp
            cols = {k: [r.get(k) for r in recs] for k in recs[0] if k not in ("prompt", "reference", "solution")}
            rewards += call_reward(self.reward_fn, prompts=texts, completions=comp,
                                   references=[r["reference"] for r in recs], **cols)
        return {"reward_mean": sum(rewards) / len(rewards), "rewards": rewards, "completions": completions}

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # FSDP: the optimizer state is sharded (DTensors) and not saved; such a state is refused on resume
        optim = {} if self.fsdp else self.optimizer.state_dict()
        return {"step": self.step, "optimizer": optim, "parallel": "fsdp" if self.fsdp else "ddp",
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": rng, "config": _plain(dataclasses.asdict(self.config)),
                "counters": dict(self.counters), "format": 1}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-XXXXXXXX atomically (temp dir, fsync, rename); prune old ones.

        A process killed at any point leaves the previous checkpoints complete: the new one only appears
        under its final name once every file is written and fsynced; pruning renames a checkpoint away
        before deleting it. With several processes rank 0 writes and the others wait for it."""
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        full = None
        if self.fsdp:  # every rank takes part in gathering the full weights; rank 0 receives them on the CPU
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
            # a tied lm_head appears under both names in the state dict: keep the first, as save_pretrained does
            named = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
            full = {k: v for k, v in full.items() if k in named}
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-{final.name}-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            if full is None:
                self.model.save_pretrained(tmp)
            else:
                self.model.save_pretrained(tmp, state_dict=full)
                # fully_shard swaps the class for FSDP<Name>: keep the architecture an ordinary HF name
                cfg_path = tmp / "config.json"
                conf = json.loads(cfg_path.read_text(encoding="utf-8"))
                conf["architectures"] = [self._arch_name]
                cfg_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            self.tokenizer.save_pretrained(tmp)
            _fault_point("save_weights", self.step)
            torch.save(self.state_dict(), tmp / STATE_FILE)
            _fsync_tree(tmp)
            _fault_point("save_state", self.step)
            if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way first
                trash = root / f".old-{final.name}-{os.getpid()}"
                os.rename(final, trash)  # a kill right here is repaired by recover_interrupted_saves
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(root)
            if self.config.save_total_limit and self.config.save_total_limit > 0:
                for old in checkpoint_dirs(self.output_dir)[:-self.config.save_total_limit]:
                    trash = root / f".old-{old.name}-{os.getpid()}-pruned"
                    os.rename(old, trash)  # never leave a half-deleted directory under a checkpoint's name
                    shutil.rmtree(trash, ignore_errors=True)
        if self.world_size > 1:
            _dist().barrier()
        return final

    def _load_state(self, path: Path) -> None:
        """Restore optimizer, scheduler, sampler, RNG and step from ``path/trainer_state.pt``.

        Loaded with ``torch.load(weights_only=True)``: tensors and plain containers only. A file holding any
        other pickled object (which could run code when unpickled) is refused with a ValueError."""
        import pickle
        try:
            state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise ValueError(f"refusing to load {path / STATE_FILE}: it holds objects other than tensors and plain "
                             f"containers (loaded with torch.load(weights_only=True), which never runs pickled "
                             f"code). Details: {str(exc).splitlines()[0]}") from None
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError(f"{path / STATE_FILE} is not a grao trainer state (expected a dict with 'optimizer')")
        if state.get("parallel") == "fsdp":
            raise NotImplementedError(f"{path} was written by an FSDP run, which does not save the (sharded) "
                                      f"optimizer state: resuming it is not supported. Start a new run from its "
                                      f"weights instead (--model {path}).")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuple(state["rng"]["python"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        for k, v in (state.get("counters") or {}).items():
            self.counters[k] = int(v)
        if self.is_main:
            recover_interrupted_saves(path.parent.parent)  # leftovers of an interrupted save

    # ---------------------------------------------------------------------------------------------- loop
    def _metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _restore_history(self) -> None:
        """Keep the metrics of steps <= the resumed step (a killed run may have logged later steps or a torn line)."""
        path = self._metrics_path()
        kept = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 1 << 60) <= self.step:
                    kept.append(row)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
        self.history = kept

    def _log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        with open(self._metrics_path(), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
            fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None and k != "step":
                    self._tb.add_scalar(k, v, metrics["step"])

    def _open_tensorboard(self) -> None:
        mode = str(self.config.tensorboard).lower()
        if mode == "false":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        except Exception:
            if mode == "true":
                raise
            self._tb = None

    def train(self, *, callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Run until ``config.steps``; returns the metrics history (one dict per step)."""
        cfg = self.config
        main = self.is_main  # with several processes rank 0 logs, plots and writes checkpoints
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                self._restore_history()
            else:
                self._metrics_path().write_text("", encoding="utf-8")
            with open(self.output_dir / "config.json", "w", encoding="utf-8") as fh:
                json.dump(_plain(dataclasses.asdict(cfg)), fh, indent=1)
            self._open_tensorboard()
        bar = None
        if cfg.progress and main:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method}", dynamic_ncols=True,
                       file=sys.stderr)
        try:
            while self.step < cfg.steps:
                metrics = self.train_step()
                if (main or self.fsdp) and cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    metrics["eval_reward"] = self.evaluate(limit=cfg.eval_prompts)["reward_mean"]
                self.history.append(metrics)
                self._log(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4f}")
                if callback is not None:
                    callback(metrics)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.close()
        if cfg.plot and main:
            plot_history({cfg.method: [self.history]}, self.output_dir / "curves.png")
        return self.history


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------------------------
# plots and summaries


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average; missing values (None, NaN: skipped steps) are left out of the windows."""
    out, acc = [], []
    for v in values:
        acc.append(v if v is not None and math.isfinite(v) else None)
        if len(acc) > window:
            acc.pop(0)
        good = [a for a in acc if a is not None]
        out.append(sum(good) / len(good) if good else math.nan)
    return out


def plot_history(runs: dict[str, list[list[dict]]], path: str | os.PathLike, *, key: str = "reward_mean",
                 title: str | None = None, window: int = 5) -> Path | None:
    """PNG of ``key`` per step: one line per method (mean over its runs, band = min..max over runs).

    runs: {method: [history of run 1, ...]}. Returns the path, or None when matplotlib is missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, histories in runs.items():
        if not histories or not histories[0]:
            continue
        n = min(len(h) for h in histories)
        steps = [histories[0][i]["step"] for i in range(n)]
        curves = [smooth([h[i][key] for i in range(n)], window) for h in histories]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        line, = axes[0].plot(steps, mean, label=method)
        if len(curves) > 1:
            axes[0].fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                                 [max(c[i] for c in curves) for i in range(n)], color=line.get_color(), alpha=0.2)
        losses = [smooth([h[i]["loss"] for i in range(n)], window) for h in histories]
        axes[1].plot(steps, [sum(c[i] for c in losses) / len(losses) for i in range(n)], label=method)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"{key} (sampled, moving average {window})")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (each method its own objective)")
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ascii_curve(history: list[dict], key: str = "reward_mean", *, points: int = 12, window: int = 5) -> str:
    """A few rows "step | value | bar" of a smoothed curve for printing."""
    vals = smooth([h[key] for h in history], window)
    if not vals:
        return ""
    idx = sorted({round(i * (len(vals) - 1) / max(1, points - 1)) for i in range(points)})
    top = max([v for v in vals if math.isfinite(v)] + [1e-9])
    lines = [f"{'step':>6} | {key:>11} | "]
    for i in idx:
        bar = "#" * int(round(40 * max(vals[i], 0) / top)) if math.isfinite(vals[i]) else ""
        lines.append(f"{history[i]['step']:>6} | {vals[i]:>11.3f} | {bar}")
    return "\n".join(lines)
