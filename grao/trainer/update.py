"""One step's loss and gradients per method (GRAO, GRPO, SFT, DPO), in micro-batches.

:func:`accumulate_gradients` runs the forward/backward passes of one step on a rollout; the gradients
accumulate in ``.grad`` and the optimizer step is the trainer's. Every pass goes through
:class:`grao.trainer.forward.PolicyForward`; each loss is scaled by ``grad_scale`` (this rank's share
of the step's normaliser, times the world size that DDP / FSDP average over).

Micro-batches (:func:`plan_micro_batches`) are contiguous row ranges: ``micro_batch_rows`` rows when it is
set, else whole groups packed while the tokens one pass forwards fit ``micro_batch_tokens`` (a group whose
completions alone are over the budget is split into row ranges of up to the budget's completion tokens),
else the whole step. So memory stays flat as G and lengths grow without the user sizing anything.

A split group forwards its prompt once for all its ranges (:class:`PromptSharing`, GRAO and GRPO with
prefix sharing): the prompt's keys and values are kept and served to each range's pass, whose backward
sends their gradients back (``grao.packed_attention.PromptKV``). Where that is not available (FSDP, or
prefix sharing off) every range forwards the prompt again; packed, a range may then hold as many
completion tokens as the prompt has, so a long prompt costs one forward per prompt-length of completions.

GRAO micro-batching is exact because the advantages are constants computed once per group from all
G + 1 rewards (``grao.group_advantages``). Two schemes, per range:

* whole groups: the GRAO loss on the chunk of prompts, scaled by (prompts in chunk / P), since the
  batch loss is the mean over prompts of per-prompt terms;
* part of a group (or rows across groups): the loss is linear in the per-token log-probs with
  coefficients known before the forward (``grao.grao_row_grad``, the spec's dLoss/dlogp), so each chunk
  back-propagates ``sum(coef * logp)`` (``grao_kernels.fused_linear_logprob_dot``: the input gradients
  come out of the log-prob pass, no recompute of the logits), whose value and gradient equal those of
  the full loss. SFT's token mean is linear in the log-probs too (coefficient ``-1 / tokens``).

With ``prefix_sharing`` every pass forwards each prompt once for all its rows in the range
(``grao.packing``); the arithmetic above is unchanged.

Baselines use the same rollouts and log-prob machinery (``grao.baselines``): ``sft`` (mean NLL of the
reference), ``dpo`` (reference as chosen, the lowest-reward sample or a ``rejected`` column as rejected,
against a frozen copy of the initial model), ``grpo`` (TRL-style, no reference in the group).
"""

from __future__ import annotations

import torch

from grao.baselines import dpo_loss, grpo_advantages, grpo_loss
from grao.packing import forwarded_tokens
from grao.reference import (
    COMPONENTS,
    GRAOInputError,
    grao_objective,
    grao_row_grad,
    group_advantages,
    sequence_logprob,
)
from grao.trainer.config import TrainConfig
from grao.trainer.forward import PolicyForward
from grao.trainer.rollout import Rollout

Rows = list[tuple[list[int], list[int]]]
#: Methods whose split groups forward their prompt once (PromptSharing); SFT has one row per prompt and a DPO
#: pair is never split.
PROMPT_KV_METHODS = ("grao", "grpo")


def chunk_ranges(total: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) spans of ``size`` items covering ``total`` (one span for size <= 0)."""
    size = total if size <= 0 else size
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def grao_rows(ro: Rollout) -> Rows:
    """The GRAO batch: per prompt its G samples, then its reference answer (docs/spec.md, tensor layout)."""
    rows = []
    for p, group, ref in zip(ro.prompt_ids, ro.sample_ids, ro.reference_ids):
        rows += [(p, s) for s in group] + [(p, ref)]
    return rows


def pass_tokens(rows: Rows, shared: bool) -> int:
    """Token positions one forward of ``rows`` costs: packed (each prompt once), or padded to the longest row."""
    if shared:
        return forwarded_tokens(rows)
    return len(rows) * max((len(p) + len(c) for p, c in rows), default=0)


def plan_micro_batches(config: TrainConfig, rows: Rows, unit: int, *, splittable: bool,
                       prompt_kv: bool = False) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, one forward/backward pass each (see the module docstring).

    ``unit``: rows per group (kept together when they fit); ``splittable``: the loss stays exact when a
    group is cut (GRAO, GRPO, SFT rows; not a DPO pair); ``prompt_kv``: a split group forwards its prompt
    once (:func:`prompt_kv_passes`), so its ranges are held to the budget whatever the prompt's length.
    Under a token budget the passes are balanced: the plan is the greedy one under the smallest budget that
    needs no more passes than ``micro_batch_tokens`` does (no small leftover pass; the largest pass, which
    sets the peak memory, is as small as it can be)."""
    n, mb, budget = len(rows), int(config.micro_batch_rows), int(config.micro_batch_tokens)
    if n == 0:
        return []
    if mb > 0:
        return chunk_ranges(n, mb if splittable else max(1, mb // unit) * unit)
    if budget <= 0:
        return [(0, n)]
    shared = bool(config.prefix_sharing)
    cached = shared and prompt_kv

    def greedy(limit: int) -> list[tuple[int, int]]:
        return _greedy_plan(rows, unit, splittable, limit, shared, cached)

    plan = greedy(budget)
    lo, hi = 1, budget
    while lo < hi:
        mid = (lo + hi) // 2
        if len(greedy(mid)) <= len(plan):
            hi = mid
        else:
            lo = mid + 1
    balanced = greedy(lo)
    return balanced if len(balanced) == len(plan) else plan


class PromptSharing:
    """Per row range of a plan, the ``PromptKV`` its pass reads (None: the pass forwards its own prompts).

    Ranges inside a group that :func:`prompt_kv_passes` shares get one prompt forward per group, made
    when the group's first such range comes; :meth:`backward` back-propagates a pass's loss through it."""

    def __init__(self, forward: PolicyForward, plan: list[tuple[int, int]], rows: Rows, unit: int):
        self.forward, self.rows, self.unit = forward, rows, unit
        self.passes = prompt_kv_passes(plan, rows, unit) if forward.can_share_prompt_kv else {}
        self.group, self.kv = None, None

    def for_range(self, start: int, stop: int):
        group = start // self.unit
        if group not in self.passes or (stop - 1) // self.unit != group:
            return None
        if self.group != group:
            self.group, self.kv = group, self.forward.prompt_kv(self.rows[start][0], self.passes[group])
        return self.kv

    @staticmethod
    def backward(kv, loss: torch.Tensor) -> None:
        if kv is not None:
            kv.backward(loss)
        else:
            loss.backward()


def prompt_kv_passes(plan: list[tuple[int, int]], rows: Rows, unit: int) -> dict[int, int]:
    """{group: passes} for the groups whose rows ``plan`` splits into two or more ranges lying inside the
    group (a token-budget plan always does): such a group forwards its prompt once and serves its keys and
    values to those passes (``PolicyForward.prompt_kv``). Prompts of one token have nothing to share."""
    inside: dict[int, int] = {}
    for start, stop in plan:
        group = start // unit
        if (stop - 1) // unit == group:  # a whole group is one range: counted once, never shared
            inside[group] = inside.get(group, 0) + 1
    return {g: k for g, k in inside.items() if k > 1 and len(rows[g * unit][0]) > 1}


def _split_tokens(rows: Rows, shared: bool) -> int:
    """What a range of one group's rows is held to when the group is split: packed, its completion tokens
    only (its prompt is forwarded once for all ranges, or, without PromptSharing, again by every range:
    either way splitting cannot shrink that part); padded, the whole pass."""
    return pass_tokens(rows, shared) - (len(rows[0][0]) if shared and rows else 0)


def _greedy_plan(rows: Rows, unit: int, splittable: bool, budget: int, shared: bool,
                 cached: bool = False) -> list[tuple[int, int]]:
    """Whole groups while the pass fits ``budget`` tokens; a group whose completions alone are over it is
    split into row ranges (see :func:`_split_tokens`) of up to ``budget`` completion tokens when its prompt
    is forwarded once for them (``cached``), else of up to ``max(budget, prompt length)`` when packed:
    then every range forwards the prompt again, so ranges shorter than the prompt would multiply its
    forwards without lowering the peak much (measured at a 4096-token prompt, G = 8, 128-token completions,
    budget 1024: two passes instead of one, 63% slower, the same peak)."""
    n = len(rows)
    out, start = [], 0
    for u0 in range(0, n, unit):
        u1 = min(u0 + unit, n)
        if start < u0 and pass_tokens(rows[start:u1], shared) > budget:
            out.append((start, u0))
            start = u0
        limit = max(budget, len(rows[u0][0])) if shared and not cached else budget
        if splittable and _split_tokens(rows[u0:u1], shared) > limit:  # the group alone is over: split it
            if start < u0:
                out.append((start, u0))
            a = u0
            for r in range(u0 + 1, u1):
                if _split_tokens(rows[a:r + 1], shared) > limit:
                    out.append((a, r))
                    a = r
            out.append((a, u1))
            start = u1
    if start < n:
        out.append((start, n))
    return out


def method_rows(config: TrainConfig, ro: Rollout, tokenizer=None) -> tuple[Rows, int, bool]:
    """(rows, rows per group, whether a group may be split) that the method's update forwards."""
    if config.method == "grao":
        return grao_rows(ro), config.group_size + 1, True
    if config.method == "grpo":
        return [(p, s) for p, group in zip(ro.prompt_ids, ro.sample_ids) for s in group], config.group_size, True
    if config.method == "sft":
        return list(zip(ro.prompt_ids, ro.reference_ids)), 1, True
    return dpo_rows(config, ro, tokenizer), 2, False


def planned_passes(config: TrainConfig, ro: Rollout, tokenizer=None, *, prompt_kv: bool = False) -> int:
    """Forward/backward passes of the policy that :func:`accumulate_gradients` makes on ``ro``
    (``prompt_kv``: ``PolicyForward.can_share_prompt_kv``, which the updates of PROMPT_KV_METHODS use)."""
    if not ro.prompt_ids:
        return 0
    rows, unit, splittable = method_rows(config, ro, tokenizer)
    return len(plan_micro_batches(config, rows, unit, splittable=splittable,
                                  prompt_kv=prompt_kv and config.method in PROMPT_KV_METHODS))


def loss_normaliser(config: TrainConfig, ro: Rollout) -> float:
    """What a rank's share of the batch loss is measured in: prompts (GRAO, DPO, GRPO: per-prompt means),
    or completion tokens (SFT and DAPO-style GRPO: per-token means)."""
    if config.method == "sft":
        return float(sum(len(r) for r in ro.reference_ids))
    if config.method == "grpo" and config.grpo_loss_type == "dapo":
        return float(sum(len(s) for group in ro.sample_ids for s in group))
    return float(len(ro.prompt_ids))


def accumulate_gradients(config: TrainConfig, forward: PolicyForward, ro: Rollout, *, grad_scale: float = 1.0,
                         ref_model=None, tokenizer=None) -> dict[str, float]:
    """Forward/backward of one step's loss in micro-batches; returns the logged statistics (the loss and,
    for GRAO, its three components). ``ref_model``: the frozen model of DPO and GRPO's KL term;
    ``tokenizer``: DPO's ``rejected`` column."""
    if config.method == "grao":
        return grao_update(config, forward, ro, grad_scale)
    if config.method == "grpo":
        return grpo_update(config, forward, ro, grad_scale, ref_model)
    if config.method == "sft":
        return sft_update(config, forward, ro, grad_scale)
    return dpo_update(config, forward, ro, grad_scale, ref_model, tokenizer)


def grao_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, grad_scale: float) -> dict[str, float]:
    P, width = ro.rewards.shape
    rows = grao_rows(ro)
    rewards = ro.rewards.to(forward.device)
    adv = group_advantages(rewards, eps=cfg.eps, reference_in_stats=cfg.reference_in_stats)
    counts = torch.tensor([len(c) for _, c in rows], device=forward.device)
    coef = None
    seq_parts = []
    plan = plan_micro_batches(cfg, rows, width, splittable=True, prompt_kv=forward.can_share_prompt_kv)
    sharing = PromptSharing(forward, plan, rows, width)
    for start, stop in plan:
        if start % width == 0 and stop % width == 0:
            # whole prompts: the GRAO loss on the chunk, scaled by its share of prompts
            g0, g1 = start // width, stop // width
            loss, stats = forward.grao_loss(rows[start:stop], rewards[g0:g1], beta=cfg.beta, lam=cfg.lam,
                                            eps=cfg.eps, reference_in_stats=cfg.reference_in_stats)
            (loss * ((g1 - g0) / P * grad_scale)).backward()
            seq_parts.append(stats["seq_logp"].detach())  # fp32 (fp64 for a float64 model): no rounding here
        else:
            # part of a group: surrogate sum(coef * logp) with the spec's closed-form dLoss/dlogp, whose
            # input gradients come out of the log-prob pass itself (no recompute of the logits)
            if coef is None:
                coef = grao_row_grad(adv, counts, beta=cfg.beta, lam=cfg.lam).flatten()
            kv = sharing.for_range(start, stop)
            value, logp, mask = forward.logprob_dot(rows[start:stop], coef[start:stop], prompt_kv=kv)
            sharing.backward(kv, value * grad_scale)
            seq_parts.append(sequence_logprob(logp, mask))
    seq = torch.cat(seq_parts)
    loss, parts = grao_objective(seq, adv.to(seq.dtype), beta=cfg.beta, lam=cfg.lam)
    out = {"loss": float(loss)}
    total = sum(abs(float(v)) for v in parts.values()) or 1.0
    for k in COMPONENTS:
        out[f"loss_{k}"] = float(parts[k])
        out[f"share_{k}"] = abs(float(parts[k])) / total
    out["adv_reference_mean"] = float(adv[:, -1].mean())
    return out


def grpo_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, grad_scale: float,
                ref_model) -> dict[str, float]:
    rows, unit, _ = method_rows(cfg, ro)
    adv = grpo_advantages(ro.rewards[:, :-1].to(forward.device)).flatten()
    n_rows = len(rows)
    n_tokens = sum(len(c) for _, c in rows)
    total, stats_acc = 0.0, {}
    plan = plan_micro_batches(cfg, rows, unit, splittable=True, prompt_kv=forward.can_share_prompt_kv)
    sharing = PromptSharing(forward, plan, rows, unit)
    for start, stop in plan:
        chunk = rows[start:stop]
        ref_logp = None
        if cfg.grpo_kl_beta > 0:
            with torch.no_grad():
                ref_logp = forward.token_logp(chunk, model=ref_model)[0]
        kv = sharing.for_range(start, stop)
        logp, mask = forward.token_logp(chunk, prompt_kv=kv)
        loss, stats = grpo_loss(logp, mask, adv[start:stop], ref_token_logp=ref_logp, kl_beta=cfg.grpo_kl_beta,
                                epsilon_low=cfg.grpo_epsilon, epsilon_high=cfg.grpo_epsilon,
                                loss_type=cfg.grpo_loss_type, max_completion_length=cfg.max_new_tokens)
        share = (int(mask.sum()) / n_tokens) if cfg.grpo_loss_type == "dapo" else (stop - start) / n_rows
        sharing.backward(kv, loss * (share * grad_scale))
        total += float(loss.detach()) * share
        for k, v in stats.items():
            stats_acc[k] = stats_acc.get(k, 0.0) + float(v) * (stop - start) / n_rows
    return {"loss": total, **{f"grpo_{k}": v for k, v in stats_acc.items()}}


def sft_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, grad_scale: float) -> dict[str, float]:
    rows = list(zip(ro.prompt_ids, ro.reference_ids))
    n_tokens = sum(len(c) for _, c in rows)
    if n_tokens == 0:
        raise GRAOInputError("sft: the step's reference answers have no token; the SFT loss is undefined")
    total = 0.0
    for start, stop in plan_micro_batches(cfg, rows, 1, splittable=True):
        # the batch's sft_loss, -sum(logp) / n_tokens, is linear in the log-probs: coefficient -1 / n_tokens
        coef = torch.full((stop - start,), -1.0 / n_tokens, device=forward.device)
        value, _, _ = forward.logprob_dot(rows[start:stop], coef)
        (value * grad_scale).backward()
        total += float(value.detach())
    return {"loss": total}


def dpo_rows(cfg: TrainConfig, ro: Rollout, tokenizer) -> Rows:
    """Per prompt (prompt, reference) as chosen, then (prompt, rejected): the group's worst sample or the
    ``rejected`` column."""
    rows = []
    for rec, p, group, ref, r in zip(ro.records, ro.prompt_ids, ro.sample_ids, ro.reference_ids, ro.rewards):
        if cfg.dpo_rejected == "column":
            rej = tokenizer(rec["rejected"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:
            rej = group[int(torch.argmin(r[:-1]))]  # the worst sample (first among ties)
        rows += [(p, ref), (p, rej)]
    return rows


def dpo_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, grad_scale: float, ref_model,
               tokenizer) -> dict[str, float]:
    rows = dpo_rows(cfg, ro, tokenizer)
    P = len(ro.prompt_ids)
    total, acc = 0.0, {}
    for row_start, row_stop in plan_micro_batches(cfg, rows, 2, splittable=False):
        start, stop = row_start // 2, row_stop // 2
        chunk = rows[row_start:row_stop]
        with torch.no_grad():
            ref_logp, _ = forward.token_logp(chunk, model=ref_model)
        logp, mask = forward.token_logp(chunk)
        summed, ref_summed = (logp * mask).sum(-1), (ref_logp * mask).sum(-1)
        loss, stats = dpo_loss(summed[0::2], summed[1::2], ref_summed[0::2], ref_summed[1::2], beta=cfg.dpo_beta)
        share = (stop - start) / P
        (loss * (share * grad_scale)).backward()
        total += float(loss.detach()) * share
        for k, v in stats.items():
            acc[k] = acc.get(k, 0.0) + float(v) * share
    return {"loss": total, **{f"dpo_{k}": v for k, v in acc.items()}}
