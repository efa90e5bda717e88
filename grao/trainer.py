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
``weights_only=True``. ``resume=True`` continues from the newest complete checkpoint; an
interrupted run leaves at most a ``.tmp-*`` directory, which is ignored and removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
from grao.rewards import call_reward, resolve_reward

METHODS = ("grao", "grpo", "sft", "dpo")
LOSS_IMPLS = ("auto", "fused", "eager")
SCHEDULES = ("constant", "linear", "cosine")
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
    method: str = "grao"  # grao | grpo | sft | dpo
    # sampling
    group_size: int = 8  # G
    prompts_per_step: int = 8  # P
    max_new_tokens: int = 16
    temperature: float = 0.7  # paper: 0.7
    top_p: float = 1.0
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
    gradient_checkpointing: bool = False
    bf16: str = "auto"  # auto (bf16 autocast on CUDA when supported) | true | false
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (when installed)
    disable_dropout: bool = True
    seed: int = 0
    device: str = "auto"
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
    rewards: torch.Tensor  # [P, G+1] float32: R(o_i, y) then R(y, y)
    gen_seconds: float = 0.0


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
        tok = AutoTokenizer.from_pretrained(config.tokenizer or src if source is None else src)
        kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
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
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.output_dir = Path(cfg.output_dir)
        self.resume_from = None
        if cfg.resume:
            ckpts = checkpoint_dirs(self.output_dir)
            self.resume_from = ckpts[-1] if ckpts else None
        if model is None:
            model, tok = load_model_and_tokenizer(cfg, source=str(self.resume_from) if self.resume_from else None)
            tokenizer = tokenizer or tok
        elif self.resume_from is not None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(self.resume_from)
        if tokenizer is None:
            raise ValueError("a tokenizer is required when a model object is passed")
        self.model, self.tokenizer = model.to(self.device), tokenizer
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
        self.reward_fn = reward if reward is not None else resolve_reward(cfg.reward)
        if train_records is None:
            train_records, eval_records = self._default_records(eval_records)
        self.train_records = load_records(train_records)
        self.eval_records = load_records(eval_records) if eval_records else None
        if cfg.method == "dpo" and cfg.dpo_rejected == "column" and "rejected" not in self.train_records[0]:
            raise ValueError("dpo_rejected='column' needs a 'rejected' column in the data")
        self.ref_model = None
        if cfg.method == "dpo" or (cfg.method == "grpo" and cfg.grpo_kl_beta > 0):
            self.ref_model = self._build_reference_model()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = make_schedule(self.optimizer, cfg)
        self.sampler = PromptSampler(len(self.train_records), seed=cfg.seed)
        self.step = 0
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
                 model=None) -> list[list[list[int]]]:
        """Sample ``num_samples`` completions per prompt -> [P][n] token lists, cut after the first EOS."""
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

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def rollout(self, records: list[dict]) -> Rollout:
        cfg, tok = self.config, self.tokenizer
        conv = [not isinstance(r["prompt"], str) for r in records]
        texts = [render_prompt(r["prompt"], tok) for r in records]
        prompt_ids = self._encode_prompts(texts, conv)
        t0 = time.perf_counter()
        samples = self.generate(prompt_ids, cfg.group_size)
        gen_seconds = time.perf_counter() - t0
        sample_texts = [[self.decode(s) for s in group] for group in samples]
        refs = [r["reference"] for r in records]
        ref_ids = [tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ref in refs]
        rewards = self.score(records, texts, sample_texts)
        return Rollout(records, texts, prompt_ids, samples, sample_texts, ref_ids, rewards, gen_seconds)

    def score(self, records: list[dict], prompt_texts: list[str], sample_texts: list[list[str]]) -> torch.Tensor:
        """rewards [P, G+1]: R(o_i, y) for each sample, then R(y, y), in one reward call."""
        G = len(sample_texts[0])
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
        values = call_reward(self.reward_fn, prompts=prompts, completions=completions, references=references,
                             **columns)
        return torch.tensor(values, dtype=torch.float32).view(len(records), G + 1)

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
                (loss * ((stop - start) / P)).backward()
                seq_parts.append(stats["seq_logp"].detach().float())
        else:
            # rows per chunk: surrogate sum(coef * logp) with the spec's closed-form dLoss/dlogp
            coef = grao_row_grad(adv, counts, beta=cfg.beta, lam=cfg.lam).float()
            for start, stop in chunk_ranges(len(rows), mb):
                logp, mask = self.token_logp(rows[start:stop])
                (coef[start:stop, None] * logp).sum().backward()
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
            (loss * share).backward()
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
            loss.backward()
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
            (loss * share).backward()
            total += float(loss.detach()) * share
            for k, v in stats.items():
                acc[k] = acc.get(k, 0.0) + float(v) * share
        return {"loss": total, **{f"dpo_{k}": v for k, v in acc.items()}}

    # ---------------------------------------------------------------------------------------------- step
    def train_step(self) -> dict[str, Any]:
        cfg = self.config
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        records = [self.train_records[i] for i in self.sampler.next_indices(cfg.prompts_per_step)]
        ro = self.rollout(records)
        t1 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.accumulate_gradients(ro)
        grad_norm = None
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        t2 = time.perf_counter()
        samples = ro.rewards[:, :-1]
        gen_tokens = sum(len(s) for group in ro.sample_ids for s in group)
        train_rows = {"grao": len(ro.prompt_ids) * (cfg.group_size + 1), "grpo": len(ro.prompt_ids) * cfg.group_size,
                      "sft": len(ro.prompt_ids), "dpo": 2 * len(ro.prompt_ids)}[cfg.method]
        metrics = {
            "step": self.step, "method": cfg.method,
            "reward_mean": float(samples.mean()), "reward_std": float(samples.std(unbiased=False)),
            "reward_reference": float(ro.rewards[:, -1].mean()),
            "frac_groups_all_equal": float((samples.amax(-1) == samples.amin(-1)).float().mean()),
            **stats,
            "grad_norm": grad_norm, "lr": lr,
            "completion_len_mean": gen_tokens / max(1, samples.numel()),
            "completion_len_max": max(len(s) for group in ro.sample_ids for s in group),
            "gen_tokens_per_s": gen_tokens / max(ro.gen_seconds, 1e-9),
            "train_rows": train_rows,
            "step_seconds": t2 - t0, "gen_seconds": ro.gen_seconds, "update_seconds": t2 - t1,
            "peak_memory_mb": peak_memory_bytes(self.device) / 2 ** 20,
            "sample": f"{ro.prompt_texts[0]!s}{ro.sample_texts[0][0]}",
        }
        return metrics

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
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": rng, "config": _plain(dataclasses.asdict(self.config)),
                "format": 1}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-XXXXXXXX atomically (temp dir, fsync, rename); prune old ones."""
        root = self.output_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        torch.save(self.state_dict(), tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way first
            trash = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        if self.config.save_total_limit and self.config.save_total_limit > 0:
            for old in checkpoint_dirs(self.output_dir)[:-self.config.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_state(self, path: Path) -> None:
        state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuple(state["rng"]["python"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        root = path.parent
        for stale in root.iterdir():  # leftovers of an interrupted save
            if stale.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(stale, ignore_errors=True)

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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self._restore_history()
        else:
            self._metrics_path().write_text("", encoding="utf-8")
        with open(self.output_dir / "config.json", "w", encoding="utf-8") as fh:
            json.dump(_plain(dataclasses.asdict(cfg)), fh, indent=1)
        self._open_tensorboard()
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method}", dynamic_ncols=True,
                       file=sys.stderr)
        try:
            while self.step < cfg.steps:
                metrics = self.train_step()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
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
        if cfg.plot:
            plot_history({cfg.method: [self.history]}, self.output_dir / "curves.png")
        return self.history


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------------------------
# plots and summaries


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
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
    top = max(max(vals), 1e-9)
    lines = [f"{'step':>6} | {key:>11} | "]
    for i in idx:
        bar = "#" * int(round(40 * max(vals[i], 0) / top))
        lines.append(f"{history[i]['step']:>6} | {vals[i]:>11.3f} | {bar}")
    return "\n".join(lines)
