"""The training methods (GRAO, GRPO, SFT, DPO) as objects: everything the trainer asks of a method.

A :class:`Method` says which rows of a rollout it trains on (:meth:`Method.batch`: rows, rows per group, whether
a group may be split), runs its loss's forward/backward over the planner's micro-batches (:meth:`Method.update`,
the losses themselves are in ``grao.trainer.update``), what a rank's share of the loss is measured in
(:meth:`Method.loss_normaliser`), whether it needs the frozen reference model, how many samples a step trains
on, and what it asks of the config and the data. :data:`REGISTRY` maps ``TrainConfig.method`` to its object;
``config.METHODS`` (the choices of ``--method``) are its names. The trainer, the config and the CLI use the
object and never compare the method's name.

Adding a method is one more subclass and one :func:`register` call. What it needs beyond these hooks goes
into the base class with a default that keeps the four methods as they are: PPO (issue 25) would add a value
head's parameters to the optimizer and checkpoint, its own advantages (GAE) inside its ``update``, and several
optimizer steps per rollout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
               ref_model=None, tokenizer=None) -> dict[str, float]:
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

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None):
        b, plan = self.micro_batches(cfg, ro, tokenizer, prompt_kv=forward.can_share_prompt_kv)
        return update.grao_update(cfg, forward, ro, b.rows, plan, grad_scale)


class GRPO(Method):
    """GRPO as TRL defines it: the G samples only, advantages normalised over them."""

    name = "grpo"
    shares_prompt_kv = True

    def validate(self, cfg):
        if cfg.group_size < 2:
            raise ValueError(f"group_size must be >= 2 with method grpo (its advantages are normalised over the "
                             f"G samples), got {cfg.group_size}")

    def needs_reference_model(self, cfg):
        return cfg.grpo_kl_beta > 0  # the KL term's initial policy

    def rows_per_group(self, cfg):
        return cfg.group_size

    def batch(self, cfg, ro, tokenizer=None):
        return Batch(update.grpo_rows(ro), self.rows_per_group(cfg), True)

    def loss_normaliser(self, cfg, ro):
        if cfg.grpo_loss_type == "dapo":  # DAPO's token mean: completion tokens
            return float(sum(len(s) for group in ro.sample_ids for s in group))
        return super().loss_normaliser(cfg, ro)

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None):
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

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None):
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

    def update(self, cfg, forward, ro, *, grad_scale=1.0, ref_model=None, tokenizer=None):
        b, plan = self.micro_batches(cfg, ro, tokenizer)
        return update.dpo_update(cfg, forward, ro, b.rows, plan, grad_scale, ref_model)


#: ``TrainConfig.method`` -> its object, in the order ``--method`` lists them.
REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` a value of ``TrainConfig.method`` (``--method``), under ``method.name``."""
    if not method.name or method.name in REGISTRY:
        raise ValueError(f"a method needs a name of its own, got {method.name!r}")
    REGISTRY[method.name] = method
    return method


for _m in (GRAO(), GRPO(), SFT(), DPO()):
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
                         ref_model=None, tokenizer=None) -> dict[str, float]:
    """Forward/backward of one step's loss of ``config.method`` in micro-batches; returns the logged statistics
    (the loss and, for GRAO, its three components). ``ref_model``: the frozen model of DPO and GRPO's KL term;
    ``tokenizer``: DPO's ``rejected`` column."""
    return get_method(config.method).update(config, forward, ro, grad_scale=grad_scale, ref_model=ref_model,
                                            tokenizer=tokenizer)
