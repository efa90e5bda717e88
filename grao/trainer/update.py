"""The per-method losses of one step (GRAO, GRPO, SFT, DPO, PPO), forward and backward over micro-batches.

Each ``*_update`` runs the passes of one step's loss on a rollout, in the ranges of the planner
(``grao.trainer.plan``); the gradients accumulate in ``.grad`` and the optimizer step is the trainer's. The
method objects of ``grao.trainer.methods`` call them. Every pass goes through
:class:`grao.trainer.forward.PolicyForward`; each loss is scaled by ``grad_scale`` (this rank's share of the
step's normaliser, times the world size that DDP / FSDP average over).

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

from typing import TYPE_CHECKING

import torch

from grao.baselines import dpo_loss, gae_advantages, grpo_advantages, grpo_loss, masked_whiten, ppo_loss, ppo_rewards
from grao.reference import (
    COMPONENTS,
    GRAOInputError,
    grao_objective,
    grao_row_grad,
    group_advantages,
    sequence_logprob,
)
from grao.trainer.plan import Plan, PromptSharing, Rows

if TYPE_CHECKING:
    from grao.trainer.config import TrainConfig
    from grao.trainer.forward import PolicyForward
    from grao.trainer.rollout import Rollout


# ------------------------------------------------------------------------------------------ rows per method


def grao_rows(ro: Rollout) -> Rows:
    """The GRAO batch: per prompt its G samples, then its reference answer (docs/spec.md, tensor layout)."""
    rows = []
    for p, group, ref in zip(ro.prompt_ids, ro.sample_ids, ro.reference_ids):
        rows += [(p, s) for s in group] + [(p, ref)]
    return rows


def grpo_rows(ro: Rollout) -> Rows:
    """The GRPO batch: per prompt its G samples (the reference answer is not a member)."""
    return [(p, s) for p, group in zip(ro.prompt_ids, ro.sample_ids) for s in group]


def sft_rows(ro: Rollout) -> Rows:
    """The SFT batch: per prompt its reference answer."""
    return list(zip(ro.prompt_ids, ro.reference_ids))


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


# -------------------------------------------------------------------------------------- losses per method


def grao_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, rows: Rows, plan: Plan,
                grad_scale: float) -> dict[str, float]:
    """GRAO (docs/spec.md): whole groups through the fused loss, parts of a group through its linear surrogate."""
    P, width = ro.rewards.shape
    rewards = ro.rewards.to(forward.device)
    adv = group_advantages(rewards, eps=cfg.eps, reference_in_stats=cfg.reference_in_stats)
    counts = torch.tensor([len(c) for _, c in rows], device=forward.device)
    coef = None
    seq_parts = []
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


def grpo_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, rows: Rows, plan: Plan,
                grad_scale: float, ref_model) -> dict[str, float]:
    """GRPO as TRL defines it: clipped ratio, optional KL against ``ref_model``, its token averaging."""
    unit = cfg.group_size
    adv = grpo_advantages(ro.rewards[:, :-1].to(forward.device)).flatten()
    n_rows = len(rows)
    n_tokens = sum(len(c) for _, c in rows)
    total, stats_acc = 0.0, {}
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


def sft_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, rows: Rows, plan: Plan,
               grad_scale: float) -> dict[str, float]:
    """SFT: the mean NLL of the reference answers' tokens."""
    n_tokens = sum(len(c) for _, c in rows)
    if n_tokens == 0:
        raise GRAOInputError("sft: the step's reference answers have no token; the SFT loss is undefined")
    total = 0.0
    for start, stop in plan:
        # the batch's sft_loss, -sum(logp) / n_tokens, is linear in the log-probs: coefficient -1 / n_tokens
        coef = torch.full((stop - start,), -1.0 / n_tokens, device=forward.device)
        value, _, _ = forward.logprob_dot(rows[start:stop], coef)
        (value * grad_scale).backward()
        total += float(value.detach())
    return {"loss": total}


def dpo_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, rows: Rows, plan: Plan,
               grad_scale: float, ref_model) -> dict[str, float]:
    """DPO on (chosen, rejected) row pairs against the frozen ``ref_model``; a plan never splits a pair."""
    P = len(ro.prompt_ids)
    total, acc = 0.0, {}
    for row_start, row_stop in plan:
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


# ----------------------------------------------------------------------------------------------------- PPO
#: The per-row constants of a PPO rollout (``Rollout.extras``), each a list of 1-D tensors, one per row
#: (per prompt its G samples), as long as the row's completion.
PPO_ROW_KEYS = ("old_logp", "old_values", "advantages", "returns")


def _scatter_rows(per_row: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-row 1-D tensors -> [N, L] laid out as ``mask`` (each row's masked entries in order), 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.masked_scatter(mask, torch.cat(per_row).to(mask.device, torch.float32))


def ppo_prepare(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, rows: Rows, plan: Plan, ref_model,
                value_head) -> dict:
    """The rollout's PPO constants, once, under no_grad (docs/spec.md, PPO): the policy's log-probs and values,
    the per-token rewards (KL penalty against ``ref_model`` plus R(o, y) at the last token), GAE advantages
    (whitened over the rollout's tokens) and returns. -> ``{key: [per-row tensors]}`` for ``PPO_ROW_KEYS``
    and ``"stats"`` (logged)."""
    logps, values, refs = [], [], []
    with torch.no_grad():
        for start, stop in plan:
            chunk = rows[start:stop]
            logp, value, mask = forward.token_logp_values(chunk, value_head)
            counts = mask.sum(-1).tolist()
            logps += list(logp[mask].float().split(counts))
            values += list(value[mask].float().split(counts))
            if cfg.ppo_kl_coef > 0:
                ref, ref_mask = forward.token_logp(chunk, model=ref_model)
                refs += list(ref[ref_mask].float().split(ref_mask.sum(-1).tolist()))
    refs = refs or [x.clone() for x in logps]
    lengths = [len(x) for x in logps]
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    logp, value, ref = pad(logps), pad(values), pad(refs)
    mask = torch.arange(logp.shape[1], device=logp.device)[None, :] < torch.tensor(lengths, device=logp.device)[:, None]
    scores = ro.rewards[:, :-1].reshape(-1).to(logp.device, torch.float32)  # R(o_i, y) per sample row
    rewards, kl = ppo_rewards(scores, logp, ref, mask, kl_coef=cfg.ppo_kl_coef)
    adv, returns = gae_advantages(rewards, value, mask, gamma=cfg.ppo_gamma, lam=cfg.ppo_gae_lambda)
    white = masked_whiten(adv, mask)
    split = lambda x: list(x[mask].split(lengths))  # noqa: E731
    n = mask.sum().clamp(min=1)
    stats = {"kl": float(kl.sum() / n), "value_mean": float((value * mask).sum() / n),
             "return_mean": float((returns * mask).sum() / n), "score_mean": float(scores.mean())}
    return {"old_logp": logps, "old_values": values, "advantages": split(white), "returns": split(returns),
            "stats": stats}


def ppo_update(cfg: TrainConfig, forward: PolicyForward, ro: Rollout, rows: Rows, plan: Plan, grad_scale: float,
               value_head) -> dict[str, float]:
    """One PPO minibatch (``ro``, its constants in ``ro.extras``): the clipped surrogate and the clipped value
    loss, a token mean over the minibatch. The surrogate's dLoss/dlogp depends on the ratio, known only after
    the forward, so each chunk takes the log-probs (``linear_logprob``: no [tokens x vocab] logits) and
    back-propagates them."""
    ex = ro.extras
    n_tokens = sum(len(x) for x in ex["old_logp"])
    total, acc = 0.0, {}
    for start, stop in plan:
        logp, values, mask = forward.token_logp_values(rows[start:stop], value_head)
        const = {k: _scatter_rows(ex[k][start:stop], mask) for k in PPO_ROW_KEYS}
        loss, stats = ppo_loss(logp, values, mask, old_token_logp=const["old_logp"], old_values=const["old_values"],
                               advantages=const["advantages"], returns=const["returns"], clip=cfg.ppo_clip,
                               value_clip=cfg.ppo_value_clip, value_coef=cfg.ppo_value_coef, num_tokens=n_tokens)
        (loss * grad_scale).backward()
        total += float(loss.detach())
        share = int(mask.sum()) / max(1, n_tokens)
        for k, v in stats.items():  # policy / value loss are already sums / n_tokens; the rest chunk means
            acc[k] = acc.get(k, 0.0) + float(v) * (1.0 if k.endswith("_loss") else share)
    out = {"loss": total, **{f"ppo_{k}": v for k, v in acc.items()}}
    out.update({f"ppo_{k}": v for k, v in ex.get("stats", {}).items()})
    return out
