"""Trainer: wires the pieces of ``grao.trainer`` together; :meth:`Trainer.train_step` is one step end to end.

One step, one method per phase:

1. :meth:`Trainer.sample` takes P prompts with their references, samples G completions per prompt and
   scores them (``rollout.RolloutEngine``); with several processes each rank takes its shard;
2. :meth:`Trainer.compute_gradients` runs the method's loss over the kept groups in micro-batches
   (``Trainer.method``, a ``methods.Method``) through the policy's forward (``forward.PolicyForward``:
   backbone to hidden states, the lm_head weight, the fused loss; DDP / FSDP2 with several processes);
3. :meth:`Trainer.apply_update` clips the gradient norm and steps AdamW and the LR schedule, or skips the
   update when the loss or gradient is not finite (weights and optimizer state unchanged);
4. :meth:`Trainer.step_metrics` assembles the step's metrics (``metrics``).

:meth:`Trainer.train` loops over steps, evaluates, logs and checkpoints (``checkpoint``).

Faults (each counted in the step metrics): a reward function that raises or returns the wrong length /
None / NaN gives a RewardError (``on_reward_error="raise"``) or leaves its prompt out of the step
(``"drop_group"``; a step whose groups are all dropped makes no update); a non-finite loss or gradient
skips the update; ``max_consecutive_skips`` skipped steps in a row stop the run with an error.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grao.data import PromptSampler, load_records, warn_about_records
from grao.rewards import resolve_reward
from grao.trainer import checkpoint as ckpt
from grao.trainer import distributed as dist
from grao.trainer import lora
from grao.trainer.config import ConfigError, TrainConfig, check_resume
from grao.trainer.forward import LossBackend, PolicyForward, resolve_loss_impl
from grao.trainer.methods import Method, get_method, step_over_phases
from grao.trainer.metrics import (
    MetricsLog,
    peak_memory_bytes,
    plot_history,
    reduce_step_stats,
    rollout_stats,
)
from grao.trainer.model import (
    autocast_dtype,
    lm_parts,
    load_model_and_tokenizer,
    prepare_policy,
)
from grao.trainer.rollout import Rollout, RolloutEngine

logger = logging.getLogger("grao")


def make_schedule(optimizer, config: TrainConfig):
    """LambdaLR: linear warmup over ``warmup_steps``, then constant, linear or cosine decay to ``steps``."""
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
        self.config = cfg = config.validate()
        self.method: Method = get_method(cfg.method)  # what the step trains with (methods.py)
        self._init_processes()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.output_dir = Path(cfg.output_dir)
        self.resume_from = self._claim_output_dir()
        self._init_model(model, tokenizer)
        self.loss_impl = resolve_loss_impl(cfg.loss_impl)
        self.autocast_dtype = autocast_dtype(cfg, self.device, self.weight_dtype)
        if self.autocast_dtype is not None and lora.lora_enabled(cfg):
            lora.adapters_follow_autocast(self.model)
        self.reward_fn = reward if reward is not None else resolve_reward(
            cfg.reward, trust_remote_code=bool(cfg.trust_remote_code))
        if train_records is None:
            train_records, eval_records = self._default_records(eval_records)
        self.train_records = load_records(train_records)
        self.eval_records = load_records(eval_records) if eval_records else None
        if self.is_main:  # data that would train silently badly: say so once
            warn_about_records(self.train_records, self.tokenizer, name="data", prompts_per_step=cfg.prompts_per_step)
            if self.eval_records:
                warn_about_records(self.eval_records, self.tokenizer, name="eval_data")
            if cfg.eval_data and not cfg.eval_every:
                warnings.warn("eval_data is set but eval_every is 0: it is never evaluated during training",
                              UserWarning, stacklevel=2)
        self.method.check_records(cfg, self.train_records)
        self.ref_model = None
        if self.method.needs_reference_model(cfg):
            self.ref_model = self._build_reference_model()  # replicated, also under FSDP
        self._arch_name = type(self.model).__name__
        if self.fsdp:
            dist.fsdp_shard(self.model, self.device, self.world_size)
        self.forward = PolicyForward(self.model, pad_id=self.tokenizer.pad_token_id, device=self.device,
                                     autocast_dtype=self.autocast_dtype, backend=LossBackend(self.loss_impl),
                                     loss_temperature=cfg.loss_temperature, ddp=self.ddp, fsdp=self.fsdp,
                                     prefix_sharing=cfg.prefix_sharing)
        self.rollouts = RolloutEngine(self.model, self.tokenizer, cfg, self.reward_fn, self.device,
                                      autocast_dtype=self.autocast_dtype, seeding=self.sample_seeding,
                                      gather_params=(lambda: dist.fsdp_full_params(self.model)) if self.fsdp else None)
        # every prompt tokenised once: one too long for the model is refused now, not at the step that draws it
        self.rollouts.check_records(self.train_records, name="data", warn=self.is_main)
        if self.eval_records:
            self.rollouts.check_records(self.eval_records, name="eval_data", warn=self.is_main)
        # trainable modules beside the policy (PPO's value head): optimised, clipped and checkpointed with it
        self.modules: dict[str, torch.nn.Module] = self.method.make_modules(cfg, self.model)
        self.extra_params = [p for m in self.modules.values() for p in m.parameters()]
        params = [p for p in self.model.parameters() if p.requires_grad] + self.extra_params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = make_schedule(self.optimizer, cfg)
        self.sampler = PromptSampler(len(self.train_records), seed=cfg.seed)
        self.step = 0
        self.counters = {"skipped_nonfinite": 0, "skipped_all_dropped": 0, "groups_dropped": 0}  # run totals
        self._consecutive_skips = 0
        self.history: list[dict] = []
        self.log = MetricsLog(self.output_dir, cfg.tensorboard)
        if self.resume_from is not None:
            self._load_state(self.resume_from)

    # ---------------------------------------------------------------------------------------------- setup
    def _init_processes(self) -> None:
        """Device, rank and world size; the sampling seeding and whether the model is FSDP-sharded."""
        cfg = self.config
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                                   else cfg.device)
        self.rank, self.world_size, local_rank = dist.init_distributed(self.device.type == "cuda")
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
        self.fsdp = self.world_size > 1 and dist.launch_parallel(cfg.parallel) == "fsdp"
        if self.world_size > 1 and not self.method.data_parallel:
            raise NotImplementedError(f"method {cfg.method} trains in one process only (its value head is not "
                                      f"data-parallel); run it without torchrun")
        if self.fsdp and lora.lora_enabled(cfg):
            raise NotImplementedError("LoRA (lora_r > 0) is not supported with FSDP (parallel='fsdp'): FSDP2 "
                                      "all-gathers each unit's parameters in one dtype, and the adapters (fp32) sit "
                                      "beside frozen bf16 weights; LoRA trains with DDP (parallel='ddp')")
        if self.fsdp and cfg.resume:
            raise NotImplementedError("resume=True is not supported with FSDP (parallel='fsdp'): the checkpoints "
                                      "hold full model weights (an ordinary HF checkpoint, usable as --model) but "
                                      "not the sharded optimizer state")

    def _claim_output_dir(self) -> Path | None:
        """The checkpoint to resume from, or None; a folder holding another run is refused unless resume or
        overwrite (``checkpoint.claim_output_dir``), and a resume that would change a setting of the saved run
        outside ``config.RESUME_SAFE`` is refused, listing them (:meth:`_check_resume`). Rank 0 decides, every
        rank gets its answer or error."""
        outcome = None
        self.resume_changes: list[str] = []  # the safe changes a resume made ("steps: 200 -> 400", ...)
        if self.is_main:
            try:
                found = ckpt.claim_output_dir(self.output_dir, resume=self.config.resume,
                                              overwrite=self.config.overwrite)
                changes = self._check_resume(found) if found is not None else []
                outcome = ("ok", str(found) if found else None, changes)
            except (ValueError, NotImplementedError) as exc:  # OutputDirError, ConfigError, a refused state
                outcome = ("error", type(exc).__name__, str(exc))
        kind, value, extra = dist.all_gather(outcome)[0]
        if kind == "error":
            errors = {e.__name__: e for e in (ckpt.OutputDirError, ConfigError, NotImplementedError)}
            raise errors.get(value, ValueError)(extra)
        self.resume_changes = list(extra)
        return Path(value) if value else None

    def _check_resume(self, found: Path) -> list[str]:
        """Resuming from checkpoint ``found``: refuse a config that changes a setting of the saved run outside
        ``config.RESUME_SAFE`` (ConfigError listing each ``name: saved -> given``); warn when the new steps
        re-time a decaying LR schedule or leave nothing to train. Returns the safe changes."""
        cfg = self.config
        saved = ckpt.saved_run_config(self.output_dir)
        if saved is None:  # a checkpoint written without a config (not by Trainer): nothing to compare with
            return []
        values, where = saved
        changes = check_resume(values, cfg, where=where)
        at = int(found.name[len(ckpt.CHECKPOINT_PREFIX):])
        before = values.get("steps", cfg.steps)
        if before != cfg.steps and cfg.lr_schedule != "constant":
            warnings.warn(f"resume: steps {before} -> {cfg.steps} re-times the {cfg.lr_schedule} learning-rate "
                          f"decay: it now ends at step {cfg.steps}, so the rate after step {at} follows the new "
                          f"curve", UserWarning, stacklevel=3)
        if at >= cfg.steps:
            warnings.warn(f"resume: {self.output_dir} is at step {at} and steps is {cfg.steps}: nothing to train "
                          f"(raise steps to continue the run)", UserWarning, stacklevel=3)
        return changes

    def _init_model(self, model, tokenizer) -> None:
        """The policy on its device (from a checkpoint when resuming), with the run's model options."""
        self.model, self.tokenizer, self.weight_dtype = prepare_policy(self.config, self.device, model, tokenizer,
                                                                       self.resume_from)
        self.backbone, self.head = lm_parts(self.model)
        # Several processes: every rank starts from rank 0's weights. DDP copies them when it wraps the
        # model (the policy's loss forwards then go through self.ddp); FSDP2 shards the model later,
        # after the reference model is copied, from the weights broadcast here.
        self.ddp = None
        if self.fsdp:
            dist.broadcast_from_rank0(self.model)
        elif self.world_size > 1:
            self.ddp = dist.wrap_ddp(self.model, self.device)

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
            ref = copy.deepcopy(self.model)  # after DDP's broadcast (wrap_ddp): rank 0's initial weights
        else:
            ref, _ = load_model_and_tokenizer(self.config, dtype=self.weight_dtype)
        ref.to(self.device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    @property
    def backend(self) -> LossBackend:
        """The loss primitives in use (fused ``grao_kernels`` ops or the eager reference)."""
        return self.forward.backend

    # ---------------------------------------------------------------------------------------------- phases
    def rollout(self, records: list[dict], *, first_index: int = 0, record_indices: list[int] | None = None) -> Rollout:
        """Sample and score G completions per record at the current step (see ``RolloutEngine.rollout``)."""
        return self.rollouts.rollout(records, step=self.step, first_index=first_index, record_indices=record_indices)

    def sample(self) -> Rollout:
        """Phase 1: this rank's shard of the step's P prompts, sampled and scored."""
        indices = self.sampler.next_indices(self.config.prompts_per_step)
        records = [self.train_records[i] for i in indices]
        lo, hi = dist.shard_range(len(records), self.rank, self.world_size)
        return self.rollout(records[lo:hi], first_index=lo, record_indices=indices[lo:hi])

    def accumulate_gradients(self, ro: Rollout, grad_scale: float = 1.0) -> dict[str, float]:
        """Forward/backward of the method's loss on ``ro`` in micro-batches (gradients accumulate in .grad)."""
        return self.method.update(self.config, self.forward, ro, grad_scale=grad_scale, ref_model=self.ref_model,
                                  tokenizer=self.tokenizer, modules=self.modules)

    def compute_gradients(self, kept: Rollout) -> tuple[dict[str, float], int]:
        """Phase 2: gradients of the step's loss over every rank's kept groups -> (global stats, kept prompts).

        Each rank's loss is scaled by its share of the global normaliser (prompts, or tokens for SFT and
        DAPO-style GRPO), times the world size that DDP / FSDP2 average the gradients over: the update
        equals the one-process update on the global batch."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        local_norm = self.method.loss_normaliser(self.config, kept)
        n_kept, norm = dist.all_reduce_sum([len(kept.prompt_ids), local_norm], self.device)
        if n_kept == 0:
            return {}, 0
        if self.world_size == 1:
            return self.accumulate_gradients(kept), int(n_kept)
        share = local_norm / norm
        planned = self.method.planned_passes(self.config, kept, self.tokenizer,
                                             prompt_kv=self.forward.can_share_prompt_kv)
        planned = dist.all_reduce_max(planned, self.device) if self.fsdp else max(1, planned)
        with self.forward.update(planned):
            local = self.accumulate_gradients(kept, share * self.world_size) if kept.prompt_ids else {}
        return reduce_step_stats(local, share, len(kept.prompt_ids) / n_kept, self.device), int(n_kept)

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in [*self.model.parameters(), *self.extra_params] if p.grad is not None]
        if self.fsdp:  # sharded (DTensor) gradients: squared norms of the local shards, summed over ranks
            sq = sum((float(dist.local_tensor(g).double().pow(2).sum()) for g in grads), 0.0)
            return torch.tensor(math.sqrt(dist.all_reduce_sum([sq], self.device)[0]), device=self.device)
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)

    def apply_update(self, loss: float, schedule: bool = True) -> tuple[float, str | None]:
        """Phase 3: clip and step (optimizer and, with ``schedule``, the LR schedule) -> (grad norm, None), or
        make no update and discard the gradients when the loss or the gradient norm is not finite -> (norm,
        "skipped_nonfinite")."""
        cfg = self.config
        norm_t = self._grad_norm()
        grad_norm = float(norm_t)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return grad_norm, "skipped_nonfinite"
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            params = [p for p in [*self.model.parameters(), *self.extra_params] if p.grad is not None]
            if self.fsdp:  # DTensor gradients: scale the local shards (torch's clip_coef formula)
                coef = min(1.0, cfg.max_grad_norm / (grad_norm + 1e-6))
                for p in params:
                    dist.local_tensor(p.grad).mul_(coef)
            else:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, norm_t)
        self.optimizer.step()
        if schedule:
            self.scheduler.step()
        return grad_norm, None

    def train_step(self) -> dict[str, Any]:
        """One rollout + update. With several processes every rank calls it; the returned metrics are global.

        A step with non-finite loss / gradient, or with every group dropped, makes no update: weights,
        optimizer and LR scheduler stay as they were (the step counter and the data position advance)."""
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        ro = self.sample()
        kept = ro.kept()
        t1 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        self.model.train()
        # one optimizer step per phase (PPO: epochs x minibatches over the rollout; the others: one); the LR
        # schedule advances once per step
        phases = self.method.rollout_phases(self.config, self.forward, kept, ref_model=self.ref_model,
                                            modules=self.modules, step=self.step)
        stats, n_kept, grad_norm, reason = step_over_phases(phases, self.compute_gradients, self.apply_update)
        n_kept = len(kept.prompt_ids) if n_kept and len(phases) > 1 else n_kept  # PPO: all its minibatches
        if reason is not None:
            self.optimizer.zero_grad(set_to_none=True)  # discard the bad gradients; no optimizer / LR step
            self.counters[reason] += 1
            self._consecutive_skips += 1
            logger.warning("step %d skipped (%s): loss %s, grad norm %s; weights and optimizer state unchanged",
                           self.step + 1, reason, stats.get("loss"), grad_norm)
        else:
            self._consecutive_skips = 0
        n_dropped = self.config.prompts_per_step - n_kept
        self.counters["groups_dropped"] += n_dropped
        self.step += 1
        metrics = self.step_metrics(ro, kept, stats, n_kept=n_kept, n_dropped=n_dropped, grad_norm=grad_norm, lr=lr,
                                    reason=reason, seconds=(time.perf_counter() - t0, time.perf_counter() - t1))
        cfg = self.config
        if cfg.max_consecutive_skips and self._consecutive_skips >= cfg.max_consecutive_skips:
            raise RuntimeError(f"{self._consecutive_skips} steps in a row made no update (last: {reason}; "
                               f"reward errors: {metrics.get('reward_errors', [])[:1]}); stopping "
                               f"(max_consecutive_skips={cfg.max_consecutive_skips})")
        return metrics

    def step_metrics(self, ro: Rollout, kept: Rollout, stats: dict, *, n_kept: int, n_dropped: int, grad_norm,
                     lr: float, reason: str | None, seconds: tuple[float, float]) -> dict[str, Any]:
        """Phase 4: the step's metrics, over every rank's rollout shard."""
        cfg = self.config
        shards = dist.all_gather({"rewards": kept.rewards.tolist(), "lens": [len(s) for g in ro.sample_ids for s in g],
                                  "gen_seconds": ro.gen_seconds, "errors": ro.reward_errors[:3],
                                  "truncated": ro.prompts_truncated})
        gen_seconds = max(sh["gen_seconds"] for sh in shards)
        errors = [e for sh in shards for e in sh["errors"]]
        sampled = rollout_stats([row for sh in shards for row in sh["rewards"]],
                                [n for sh in shards for n in sh["lens"]], gen_seconds)
        metrics = {
            "step": self.step, "method": cfg.method,
            **{k: sampled[k] for k in ("reward_mean", "reward_std", "reward_reference", "frac_groups_all_equal")},
            **({"loss": math.nan} if not stats else stats),
            "grad_norm": grad_norm, "lr": lr,
            "skipped": reason is not None,
            "skipped_nonfinite": int(reason == "skipped_nonfinite"),
            "skipped_all_dropped": int(reason == "skipped_all_dropped"),
            "groups_dropped": n_dropped,
            "prompts_truncated": sum(sh["truncated"] for sh in shards),  # cut to max_prompt_length, all ranks
            **{f"total_{k}": v for k, v in self.counters.items()},
            **{k: sampled[k] for k in ("completion_len_mean", "completion_len_max", "gen_tokens_per_s")},
            "train_rows": self.method.trained_samples(cfg, n_kept),
            "step_seconds": seconds[0], "gen_seconds": gen_seconds, "update_seconds": seconds[1],
            "peak_memory_mb": peak_memory_bytes(self.device) / 2 ** 20,
            "sample": f"{ro.prompt_texts[0]!s}{ro.sample_texts[0][0]}",
        }
        if self.world_size > 1:
            metrics["world_size"] = self.world_size
            metrics["parallel"] = "fsdp" if self.fsdp else "ddp"
        if errors:
            metrics["reward_errors"] = errors[:3]
        return metrics

    @torch.no_grad()
    def evaluate(self, records: list[dict] | None = None, *, model=None, limit: int | None = None,
                 temperature: float = 0.0) -> dict[str, Any]:
        """Greedy (by default) completion per prompt; returns {"reward_mean", "rewards", "completions"}."""
        records = records or self.eval_records or self.train_records
        return self.rollouts.evaluate(records[:limit] if limit else records, model=model, temperature=temperature)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # FSDP: the optimizer state is sharded (DTensors) and not saved; such a state is refused on resume
        optim = {} if self.fsdp else self.optimizer.state_dict()
        return {"step": self.step, "optimizer": optim, "parallel": "fsdp" if self.fsdp else "ddp",
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(), "rng": rng,
                "config": ckpt.plain(dataclasses.asdict(self.config)), "counters": dict(self.counters), "format": 1,
                "modules": {k: dict(m.state_dict()) for k, m in self.modules.items()},
                "weight_dtype": lora.DTYPE_NAMES.get(self.weight_dtype, str(self.weight_dtype))}

    def save_checkpoint(self) -> Path:
        """checkpoints/step-XXXXXXXX, written atomically by rank 0 (``checkpoint.write_checkpoint``); under
        FSDP every rank first takes part in gathering the full weights. The other ranks wait for rank 0."""
        full = dist.fsdp_full_state_dict(self.model) if self.fsdp else None
        final = self.output_dir / "checkpoints" / f"{ckpt.CHECKPOINT_PREFIX}{self.step:08d}"
        if self.is_main:
            final = ckpt.write_checkpoint(self.output_dir, self.step, model=self.model, tokenizer=self.tokenizer,
                                          state=self.state_dict(), full_state_dict=full,
                                          architecture=self._arch_name if self.fsdp else None,
                                          keep_last=self.config.save_total_limit)
        dist.barrier()
        return final

    def _load_state(self, path: Path) -> None:
        """Restore optimizer, scheduler, sampler, RNG and step from ``path/trainer_state.pt``."""
        state = ckpt.read_trainer_state(path)
        for k, m in self.modules.items():  # PPO's value head
            m.load_state_dict(state["modules"][k])  # KeyError: a state not written by this method
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(ckpt.as_tuple(state["rng"]["python"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        for k, v in (state.get("counters") or {}).items():
            self.counters[k] = int(v)
        if self.is_main:
            ckpt.recover_interrupted_saves(path.parent.parent)  # leftovers of an interrupted save

    # ---------------------------------------------------------------------------------------------- loop
    def train(self, *, callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Run until ``config.steps``; returns the metrics history (one dict per step)."""
        cfg = self.config
        main = self.is_main  # with several processes rank 0 logs, plots and writes checkpoints
        if main:
            self.history = self.log.start(resumed_step=self.step if self.resume_from is not None else None)
            with open(self.output_dir / "config.json", "w", encoding="utf-8") as fh:
                json.dump(ckpt.plain(dataclasses.asdict(cfg)), fh, indent=1)
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
                if main:
                    self.log.append(metrics)
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
            self.log.close()
        if cfg.plot and main:
            plot_history({cfg.method: [self.history]}, self.output_dir / "curves.png")
        return self.history
