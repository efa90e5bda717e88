"""One step's loss and gradients per method (GRAO, GRPO, SFT, DPO), in micro-batches.

:func:`accumulate_gradients` runs the forward/backward passes of one step on a rollout; the gradients
accumulate in ``.grad`` and the optimizer step is the trainer's. Every pass goes through
:class:`grao.trainer.forward.PolicyForward`; each loss is scaled by ``grad_scale`` (this rank's share
of the step's normaliser, times the world size that DDP / FSDP average over).

GRAO micro-batching is exact because the advantages are constants computed once per group from all
G + 1 rewards (``grao.group_advantages``). Two schemes, picked by ``micro_batch_rows``:

* whole groups (a multiple of G + 1, or 0 = everything): the GRAO loss on each chunk of prompts,
  scaled by (prompts in chunk / P), since the batch loss is the mean over prompts of per-prompt terms;
* rows (any other size; memory then does not grow with G): the loss is linear in the per-token
  log-probs with coefficients known before the forward (``grao.grao_row_grad``, the spec's
  dLoss/dlogp), so each chunk back-propagates ``sum(coef * logp)`` on ``linear_logprob`` outputs,
  whose value and gradient equal those of the full loss.

Baselines use the same rollouts and log-prob machinery (``grao.baselines``): ``sft`` (mean NLL of the
reference), ``dpo`` (reference as chosen, the lowest-reward sample or a ``rejected`` column as rejected,
against a frozen copy of the initial model), ``grpo`` (TRL-style, no reference in the group).
"""

from __future__ import annotations

import torch

from grao.baselines import dpo_loss, grpo_advantages, grpo_loss, sft_loss
from grao.reference import (
    COMPONENTS,
    grao_objective,
    grao_row_grad,
    group_advantages,
    sequence_logprob,
)
from grao.trainer.config import TrainConfig
from grao.trainer.forward import PolicyForward
from grao.trainer.rollout import Rollout

Rows = list[tuple[list[int], list[int]]]


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


def planned_passes(config: TrainConfig, ro: Rollout) -> int:
    """Forward/backward passes of the policy that :func:`accumulate_gradients` makes on ``ro``."""
    P, mb = len(ro.prompt_ids), config.micro_batch_rows
    if P == 0:
        return 0
    if config.method == "grao":
        width = config.group_size + 1
        if mb <= 0 or mb % width == 0:
            return len(chunk_ranges(P, (mb // width) if mb > 0 else P))
        return len(chunk_ranges(P * width, mb))
    if config.method == "grpo":
        return len(chunk_ranges(P * config.group_size, mb))
    if config.method == "sft":
        return len(chunk_ranges(P, mb))
    return len(chunk_ranges(P, P if mb <= 0 else max(1, mb // 2)))


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
    mb = cfg.micro_batch_rows
    seq_parts = []
    if mb <= 0 or mb % width == 0:
        # whole prompts per chunk: the GRAO loss on each chunk, scaled by its share of prompts
        for start, stop in chunk_ranges(P, (mb // width) if mb > 0 else P):
            hidden, weight, bias, labels = forward.hidden_states(rows[start * width:stop * width])
            loss, stats = forward.backend.grao(hidden, weight, labels, rewards[start:stop], bias=bias,
                                               temperature=cfg.loss_temperature, beta=cfg.beta, lam=cfg.lam,
                                               eps=cfg.eps, reference_in_stats=cfg.reference_in_stats)
            (loss * ((stop - start) / P * grad_scale)).backward()
            seq_parts.append(stats["seq_logp"].detach().float())
    else:
        # rows per chunk: surrogate sum(coef * logp) with the spec's closed-form dLoss/dlogp
        coef = grao_row_grad(adv, counts, beta=cfg.beta, lam=cfg.lam).float()
        for start, stop in chunk_ranges(len(rows), mb):
            logp, mask = forward.token_logp(rows[start:stop])
            ((coef[start:stop, None] * logp).sum() * grad_scale).backward()
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


def grpo_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, grad_scale: float,
                ref_model) -> dict[str, float]:
    rows = [(p, s) for p, group in zip(ro.prompt_ids, ro.sample_ids) for s in group]
    adv = grpo_advantages(ro.rewards[:, :-1].to(forward.device)).flatten()
    n_rows = len(rows)
    n_tokens = sum(len(c) for _, c in rows)
    total, stats_acc = 0.0, {}
    for start, stop in chunk_ranges(n_rows, cfg.micro_batch_rows):
        chunk = rows[start:stop]
        ref_logp = None
        if cfg.grpo_kl_beta > 0:
            with torch.no_grad():
                ref_logp = forward.token_logp(chunk, model=ref_model)[0]
        logp, mask = forward.token_logp(chunk)
        loss, stats = grpo_loss(logp, mask, adv[start:stop], ref_token_logp=ref_logp, kl_beta=cfg.grpo_kl_beta,
                                epsilon_low=cfg.grpo_epsilon, epsilon_high=cfg.grpo_epsilon,
                                loss_type=cfg.grpo_loss_type, max_completion_length=cfg.max_new_tokens)
        share = (int(mask.sum()) / n_tokens) if cfg.grpo_loss_type == "dapo" else (stop - start) / n_rows
        (loss * (share * grad_scale)).backward()
        total += float(loss.detach()) * share
        for k, v in stats.items():
            stats_acc[k] = stats_acc.get(k, 0.0) + float(v) * (stop - start) / n_rows
    return {"loss": total, **{f"grpo_{k}": v for k, v in stats_acc.items()}}


def sft_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, grad_scale: float) -> dict[str, float]:
    rows = list(zip(ro.prompt_ids, ro.reference_ids))
    n_tokens = sum(len(c) for _, c in rows)
    total = 0.0
    for start, stop in chunk_ranges(len(rows), cfg.micro_batch_rows):
        logp, mask = forward.token_logp(rows[start:stop])
        share = int(mask.sum()) / n_tokens
        loss = sft_loss(logp, mask) * share
        (loss * grad_scale).backward()
        total += float(loss.detach())
    return {"loss": total}


def dpo_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, grad_scale: float, ref_model,
               tokenizer) -> dict[str, float]:
    rows = []
    for rec, p, group, ref, r in zip(ro.records, ro.prompt_ids, ro.sample_ids, ro.reference_ids, ro.rewards):
        if cfg.dpo_rejected == "column":
            rej = tokenizer(rec["rejected"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:
            rej = group[int(torch.argmin(r[:-1]))]  # the worst sample (first among ties)
        rows += [(p, ref), (p, rej)]
    P = len(ro.prompt_ids)
    mb = cfg.micro_batch_rows
    total, acc = 0.0, {}
    for start, stop in chunk_ranges(P, P if mb <= 0 else max(1, mb // 2)):
        chunk = rows[2 * start:2 * stop]
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
