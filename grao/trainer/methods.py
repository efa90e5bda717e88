"""The training methods (GRAO, GRPO, SFT, DPO, PPO) as objects: everything the trainer asks of a method.

A :class:`Method` says which rows of a rollout it trains on (:meth:`Method.batch`: rows, rows per group, whether
a group may be split), runs its loss's forward/backward over the planner's micro-batches (:meth:`Method.update`,
the losses themselves are in ``grao.trainer.update``), what a rank's share of the loss is measured in
(:meth:`Method.loss_normaliser`), whether it needs the frozen reference model, how many samples a step trains
on, and what it asks of the config and the data. :data:`REGISTRY` maps ``TrainConfig.method`` to its object;
``config.METHODS`` (the choices of ``--method``) are its names. The trainer, the config and the CLI use the
object and never compare the method's name.

Adding a method is one more subclass and one :func:`register` call. What it needs beyond these hooks goes
into the base class with a default that keeps the other methods as they are. PPO added three:
:meth:`Method.make_modules` (trainable modules beside the policy, here its value head: the trainer puts their
parameters into the optimizer, the gradient clipping and the checkpoint), :meth:`Method.rollout_phases` (the
rollouts each optimizer step of a step trains on: PPO's epochs x minibatches, after computing its rollout's
constants once), and :attr:`Method.data_parallel`.
"""

from __future__ import annotations

import dataclasses

from typing import TYPE_CHECKING, Any

import torch

from grao.trainer import update
from grao.trainer.plan import Batch, Plan, plan_micro_batches

if TYPE_CHECKING:
    from grao.trainer.config import TrainConfig
    from grao.trainer.forward import PolicyForward
    from grao.trainer.rollout import Rollout


class Method:
    """One training method; subclasses set :attr:`name` and override the hooks that differ."""

    #: ``TrainConfig.method`` / ``--method`` value; also the progress bar's label and the metrics' "method".
    name: str = ""
    #: A split group forwards its prompt once for its ranges (``plan.PromptSharing``): the method's update
    #: passes the planner's shared prompt keys and values to its log-prob passes.
    shares_prompt_kv: bool = False
    #: The method trains under DDP / FSDP (several processes); False: the trainer refuses it there.
    data_parallel: bool = True

    # ------------------------------------------------------------------------------------------ the config
    def validate(self, cfg: TrainConfig) -> None:
        """What the method asks of the other fields (checked after each field's own check): ValueError(message),
        which ``TrainConfig.validate`` raises as a ConfigError."""

    def check_records(self, cfg: TrainConfig, records: list[dict]) -> None:
        """What the method asks of the training records (a column it reads): ValueError(message)."""

    def needs_reference_model(self, cfg: TrainConfig) -> bool:
        """Whether the trainer keeps a frozen copy of the initial policy for :meth:`update` (``ref_model``)."""
        return False

    # -------------------------------------------------------------------------------------- one step's rows
    def rows_per_group(self, cfg: TrainConfig) -> int:
        """Rows a prompt contributes to the step's batch."""
        raise NotImplementedError

    def batch(self, cfg: TrainConfig, ro: Rollout, tokenizer=None) -> Batch:
        """The rows the update forwards, with the planner's unit and whether a group may be split."""
        raise NotImplementedError

    def trained_samples(self, cfg: TrainConfig, prompts: int) -> int:
        """Rows (sequences) a step on ``prompts`` kept prompts trains on (the metric ``train_rows``)."""
        return prompts * self.rows_per_group(cfg)

    def loss_normaliser(self, cfg: TrainConfig, ro: Rollout) -> float:
        """What a rank's share of the batch loss is measured in: by default prompts (per-prompt means)."""
        return float(len(ro.prompt_ids))

    # ------------------------------------------------------------------------------------------- the update
    def make_modules(self, cfg: TrainConfig, model) -> dict[str, torch.nn.Module]:
        """Trainable modules beside the policy (name -> module, on the policy's device): the trainer optimises,
        clips, checkpoints and resumes their parameters and passes them to :meth:`update` as ``modules``."""
        return {}

    def rollout_phases(self, cfg: TrainConfig, forward: PolicyForward, ro: Rollout, *, ref_model=None,
                       modules: dict | None = None, step: int = 0) -> list[Rollout]:
        """The rollouts the step's optimizer steps train on, one each (by default one step on ``ro``)."""
        return [ro]

    def micro_batches(self, cfg: TrainConfig, ro: Rollout, tokenizer=None, *,
                      prompt_kv: bool = False) -> tuple[Batch, Plan]:
        """The step's batch and its micro-batch plan (``prompt_kv``: ``PolicyForward.can_share_prompt_kv``)."""
        b = self.batch(cfg, ro, tokenizer)
        return b, plan_micro_batches(cfg, b.rows, b.unit, splittable=b.splittable,
                                     prompt_kv=prompt_kv and self.shares_prompt_kv)

    def planned_passes(self, cfg: TrainConfig, ro: Rollout, tokenizer=None, *, prompt_kv: bool = False) -> int:
        """Forward/backward passes of the policy that :meth:`update` makes on ``ro`` (agreed between ranks
        before the update under data parallelism)."""
        if not ro.prompt_ids:
            return 0
        return len(self.micro_batches(cfg, ro, tokenizer, prompt_kv=prompt_kv)[1])

    def update(self, cfg: TrainConfig, forward: PolicyForward, ro: Rollout, *, grad_scale: float = 1.0,
               ref_model=None, tokenizer=None, modules=None) -> dict[str, float]:
        """Forward/backward of one step's loss on ``ro`` in micro-batches, scaled by ``grad_scale`` (gradients
        accumulate in ``.grad``); returns the logged statistics, ``loss`` first."""
        raise NotImplementedError


class GRAO(Method):
    """GRAO (docs/spec.md): per prompt its G samples and the reference answer, one group."""

    name = "grao"
    shares_prompt_kv = True

    def rows_per_group(self, cfg):
        return cfg.group_size + 1

    def batch(self, cfg, ro, tokenizer=None):
        return Batch(update.grao_rows(ro), self.rows_per_group(cfg), True)

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None, modules=None):
        b, plan = self.micro_batches(cfg, ro, tokenizer, prompt_kv=forward.can_share_prompt_kv)
        return update.grao_update(cfg, forward, ro, b.rows, plan, grad_scale)


class OnSamples(Method):
    """A method that trains on a prompt's G sampled completions only (GRPO, PPO): G rows a group, splittable."""

    def rows_per_group(self, cfg):
        return cfg.group_size

    def batch(self, cfg, ro, tokenizer=None):
        return Batch(update.grpo_rows(ro), self.rows_per_group(cfg), True)


class GRPO(OnSamples):
    """GRPO as TRL defines it: the G samples only, advantages normalised over them."""

    name = "grpo"
    shares_prompt_kv = True

    def validate(self, cfg):
        if cfg.group_size < 2:
            raise ValueError(f"group_size must be >= 2 with method grpo (its advantages are normalised over the "
                             f"G samples), got {cfg.group_size}")

    def needs_reference_model(self, cfg):
        return cfg.grpo_kl_beta > 0  # the KL term's initial policy


    def loss_normaliser(self, cfg, ro):
        if cfg.grpo_loss_type == "dapo":  # DAPO's token mean: completion tokens
            return float(sum(len(s) for group in ro.sample_ids for s in group))
        return super().loss_normaliser(cfg, ro)

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None, modules=None):
        b, plan = self.micro_batches(cfg, ro, tokenizer, prompt_kv=forward.can_share_prompt_kv)
        return update.grpo_update(cfg, forward, ro, b.rows, plan, grad_scale, ref_model)


class SFT(Method):
    """SFT: the mean NLL of the reference answers (one row per prompt)."""

    name = "sft"

    def rows_per_group(self, cfg):
        return 1

    def batch(self, cfg, ro, tokenizer=None):
        return Batch(update.sft_rows(ro), 1, True)

    def loss_normaliser(self, cfg, ro):
        return float(sum(len(r) for r in ro.reference_ids))  # a token mean: reference tokens

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None, modules=None):
        b, plan = self.micro_batches(cfg, ro, tokenizer)
        return update.sft_update(cfg, forward, ro, b.rows, plan, grad_scale)


class DPO(Method):
    """DPO: the reference answer as chosen, the group's worst sample (or a ``rejected`` column) as rejected,
    against a frozen copy of the initial policy; a pair is never split."""

    name = "dpo"

    def check_records(self, cfg, records):
        if cfg.dpo_rejected == "column" and "rejected" not in records[0]:
            raise ValueError("dpo_rejected='column' needs a 'rejected' column in the data")

    def needs_reference_model(self, cfg):
        return True

    def rows_per_group(self, cfg):
        return 2

    def batch(self, cfg, ro, tokenizer=None):
        return Batch(update.dpo_rows(cfg, ro, tokenizer), 2, False)

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None, modules=None):
        b, plan = self.micro_batches(cfg, ro, tokenizer)
        return update.dpo_update(cfg, forward, ro, b.rows, plan, grad_scale, ref_model)


class PPO(OnSamples):
    """PPO as RLHF practice runs it for LMs (docs/spec.md, PPO): the G samples scored at their last token, a
    per-token KL penalty against the initial policy in the rewards, a value head on the policy's final hidden
    states, GAE, ``ppo_epochs`` x ``ppo_minibatches`` optimizer steps per rollout. One process only."""

    name = "ppo"
    data_parallel = False  # the value head is not wrapped in DDP / FSDP

    def validate(self, cfg):
        if cfg.ppo_minibatches > cfg.prompts_per_step:
            raise ValueError(f"ppo_minibatches ({cfg.ppo_minibatches}) must be <= prompts_per_step "
                             f"({cfg.prompts_per_step}): a minibatch is a set of prompts")

    def needs_reference_model(self, cfg):
        return cfg.ppo_kl_coef > 0  # the KL penalty's initial policy


    def loss_normaliser(self, cfg, ro):
        return float(sum(len(s) for group in ro.sample_ids for s in group))  # a token mean

    def make_modules(self, cfg, model):
        # A value head on the shared backbone (TRL's older PPOTrainer; OpenRLHF trains a separate critic model):
        # one linear layer D -> 1 in fp32, zero-initialised (V = 0 before training); on one GPU a second model
        # and its optimizer state would double the memory this package exists to save.
        from grao.trainer.model import lm_parts
        head = lm_parts(model)[1]
        value_head = torch.nn.Linear(head.weight.shape[1], 1, device=head.weight.device, dtype=torch.float32)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
        return {"value_head": value_head}

    def rollout_phases(self, cfg, forward, ro, *, ref_model=None, modules=None, step=0):
        if not ro.prompt_ids:
            return [ro]
        b, plan = self.micro_batches(cfg, ro)
        extras = update.ppo_prepare(cfg, forward, ro, b.rows, plan, ref_model, modules["value_head"])
        G, P = cfg.group_size, len(ro.prompt_ids)
        gen = torch.Generator().manual_seed(hash((int(cfg.seed), int(step))) & 0x7FFFFFFF)  # resumable order
        phases = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(P, generator=gen).tolist()
            for idx in (order[i::cfg.ppo_minibatches] for i in range(cfg.ppo_minibatches)):
                idx = sorted(idx)
                pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
                rows_of = [p * G + g for p in idx for g in range(G)]
                ex = {k: [extras[k][r] for r in rows_of] for k in update.PPO_ROW_KEYS}
                ex["stats"] = extras["stats"]
                phases.append(dataclasses.replace(
                    ro, records=pick(ro.records), prompt_texts=pick(ro.prompt_texts), prompt_ids=pick(ro.prompt_ids),
                    sample_ids=pick(ro.sample_ids), sample_texts=pick(ro.sample_texts),
                    reference_ids=pick(ro.reference_ids), rewards=ro.rewards[idx], keep=None, extras=ex))
        return phases

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None, modules=None):
        b, plan = self.micro_batches(cfg, ro, tokenizer)
        if "old_logp" not in ro.extras:  # a rollout not from rollout_phases: its constants now (ratio 1)
            ro = dataclasses.replace(ro, extras=update.ppo_prepare(cfg, forward, ro, b.rows, plan, ref_model,
                                                                   modules["value_head"]))
        return update.ppo_update(cfg, forward, ro, b.rows, plan, grad_scale, modules["value_head"])


#: ``TrainConfig.method`` -> its object, in the order ``--method`` lists them.
REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` a value of ``TrainConfig.method`` (``--method``), under ``method.name``."""
    if not method.name or method.name in REGISTRY:
        raise ValueError(f"a method needs a name of its own, got {method.name!r}")
    REGISTRY[method.name] = method
    return method


for _m in (GRAO(), GRPO(), SFT(), DPO(), PPO()):
    register(_m)

#: The method names (``--method``'s choices).
METHODS: tuple[str, ...] = tuple(REGISTRY)


def get_method(name: Any) -> Method:
    """The object of method ``name``; ValueError listing the methods for another name."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {', '.join(REGISTRY)}, got {name!r}") from None


def accumulate_gradients(config: TrainConfig, forward: PolicyForward, ro: Rollout, *, grad_scale: float = 1.0,
                         ref_model=None, tokenizer=None, modules=None) -> dict[str, float]:
    """Forward/backward of one step's loss of ``config.method`` in micro-batches; returns the logged statistics
    (the loss and, for GRAO, its three components). ``ref_model``: the frozen model of DPO and GRPO's KL term;
    ``tokenizer``: DPO's ``rejected`` column."""
    return get_method(config.method).update(config, forward, ro, grad_scale=grad_scale, ref_model=ref_model,
                                            tokenizer=tokenizer, modules=modules)


def step_over_phases(phases: list[Rollout], compute, apply) -> tuple[dict, int, float | None, str | None]:
    """One optimizer step per phase (``Method.rollout_phases``): ``compute(phase)`` -> (stats, kept prompts),
    ``apply(loss, schedule=last)`` -> (grad norm, skip reason or None); the LR schedule advances once, at the last.
    -> (stats, kept prompts, grad norm, skip reason); over several phases the means of their stats and norms.
    A phase that skips ends the step there (the earlier phases' updates stay)."""
    history, norms = [], []
    stats, n_kept, grad_norm = {}, 0, None
    for i, phase in enumerate(phases):
        stats, n_kept = compute(phase)
        if n_kept == 0:
            return stats, 0, None, "skipped_all_dropped"
        grad_norm, bad = apply(stats.get("loss", 0.0), schedule=i == len(phases) - 1)
        if bad is not None:
            return stats, n_kept, grad_norm, bad
        history.append(stats)
        norms.append(grad_norm)
    if len(phases) > 1:
        stats = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
        grad_norm = sum(norms) / len(norms)
    return stats, n_kept, grad_norm, None
