"""Baselines the paper compares GRAO against, on the same per-token log-probs.

Each takes per-token log-probs [B, T] (from :func:`grao.token_logprobs` on full logits, or from
:func:`grao_kernels.linear_logprob` without them) plus a completion mask, so any path that
produces log-probs can train any method.

GRPO follows TRL's GRPOTrainer (trl/trainer/grpo_trainer.py, ``_compute_loss``): advantages
are normalised over the G samples of a prompt, the per-token loss is the PPO-clipped
ratio term plus an optional k3 KL, and ``loss_type`` picks how tokens are averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grao_kernels.checks import GRAOInputError, _checking_values, check_scalar, check_tensor


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    check_tensor(name_a, a)
    check_tensor(name_b, b)
    if tuple(a.shape) != tuple(b.shape):
        raise GRAOInputError(f"{name_b} must have the shape of {name_a} {list(a.shape)}, got {list(b.shape)}")


def sft_loss(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood over the masked tokens. token_logp [B, T], mask [B, T] bool."""
    _check_pair("token_logp", token_logp, "mask", mask)
    count = mask.sum()
    if int(count) == 0:
        raise GRAOInputError("mask selects no token: the SFT loss of an empty batch is undefined")
    return -(token_logp * mask).sum() / count


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, *, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss. All inputs [B]: summed completion log-probs under the policy and a frozen reference.

    loss = mean(-log sigmoid(beta * ((c - c_ref) - (r - r_ref)))). Returns (loss, {"chosen_reward",
    "rejected_reward", "accuracy"}) with rewards beta * (logp - ref_logp), detached.
    """
    for name, t in (("rejected_logp", rejected_logp), ("ref_chosen_logp", ref_chosen_logp),
                    ("ref_rejected_logp", ref_rejected_logp)):
        _check_pair("chosen_logp", chosen_logp, name, t)
    if chosen_logp.dim() != 1:
        raise GRAOInputError(f"chosen_logp must be [B] (summed log-probs per sequence), got {list(chosen_logp.shape)}")
    beta = check_scalar("beta", beta, positive=True)
    chosen_reward = beta * (chosen_logp - ref_chosen_logp.detach())
    rejected_reward = beta * (rejected_logp - ref_rejected_logp.detach())
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    stats = {"chosen_reward": chosen_reward.detach().mean(), "rejected_reward": rejected_reward.detach().mean(),
             "accuracy": (chosen_reward > rejected_reward).float().mean()}
    return loss, stats


GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def grpo_advantages(rewards: torch.Tensor, *, scale_rewards: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """TRL's GRPO advantages. rewards [P, G] -> [P, G]: r - mean, divided by (std + eps) if scale_rewards.

    std is the sample standard deviation (Bessel-corrected), as torch.std and TRL use.
    """
    check_tensor("rewards", rewards, floating=True)
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise GRAOInputError(f"rewards must be [P, G] for GRPO, got {list(rewards.shape)}")
    eps = check_scalar("eps", eps, positive=True)
    if _checking_values() and not bool(torch.isfinite(rewards).all()):
        raise GRAOInputError("rewards must be finite; found NaN or inf")  # the message of group_advantages
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale_rewards:
        return centred
    std = rewards.std(-1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred)
    return centred / (std + eps)


def grpo_loss(token_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, *,
              old_token_logp: torch.Tensor | None = None, ref_token_logp: torch.Tensor | None = None,
              kl_beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              loss_type: str = "grpo", max_completion_length: int | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss as in TRL. token_logp, mask, old/ref log-probs [B, T]; advantages [B] (one per sequence).

    ratio = exp(logp - old_logp) (old = detached current when None: the on-policy case);
    per-token loss = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
    + kl_beta * (exp(ref - logp) - (ref - logp) - 1). Reduction by ``loss_type``:
    ``grpo`` mean over each sequence's tokens then over sequences; ``dr_grpo`` sum over all tokens
    divided by B * max_completion_length (default T); ``dapo`` sum over all tokens / token count.
    """
    _check_pair("token_logp", token_logp, "mask", mask)
    if token_logp.dim() != 2:
        raise GRAOInputError(f"token_logp must be [B, T], got {list(token_logp.shape)}")
    if advantages.dim() != 1 or advantages.shape[0] != token_logp.shape[0]:
        raise GRAOInputError(f"advantages must be [B] = [{token_logp.shape[0]}], got {list(advantages.shape)}")
    if loss_type not in GRPO_LOSS_TYPES:
        raise GRAOInputError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    kl_beta = check_scalar("kl_beta", kl_beta, nonnegative=True)
    epsilon_low = check_scalar("epsilon_low", epsilon_low, nonnegative=True)
    epsilon_high = check_scalar("epsilon_high", epsilon_high, nonnegative=True)
    if kl_beta > 0 and ref_token_logp is None:
        raise GRAOInputError("ref_token_logp [B, T] is required when kl_beta > 0")
    old = token_logp.detach() if old_token_logp is None else old_token_logp
    _check_pair("token_logp", token_logp, "old_token_logp", old)
    m = mask.to(token_logp.dtype)
    adv = advantages.detach().to(token_logp.dtype).unsqueeze(-1)
    ratio = torch.exp(token_logp - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    if kl_beta > 0:
        _check_pair("token_logp", token_logp, "ref_token_logp", ref_token_logp)
        delta = ref_token_logp.detach() - token_logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_beta * kl
        stats["kl"] = ((kl * m).sum() / m.sum().clamp(min=1)).detach()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        length = token_logp.shape[1] if max_completion_length is None else int(max_completion_length)
        loss = (per_token * m).sum() / (token_logp.shape[0] * length)
    else:
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    stats["clip_ratio"] = ((is_clipped.to(m.dtype) * m).sum() / m.sum().clamp(min=1)).detach()
    return loss, stats


# ------------------------------------------------------------------------------------------------------ PPO
# PPO as RLHF practice runs it for language models (docs/spec.md, "PPO"): the ideas of TRL's PPO trainer
# (per-token KL penalty against the initial policy folded into the rewards, the score at the last token,
# GAE, whitened advantages, clipped surrogate and clipped value loss averaged over tokens) and OpenRLHF's
# (the same per-token reward shaping); written here from the equations, not from their code.


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row the column of its last masked token ([B] long); a row without one gives -1."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, cols, torch.full_like(cols, -1)).max(-1).values


def ppo_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *,
                kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards [B, T]: r_t = -kl_coef * (logp_t - ref_logp_t), plus the sequence's score
    (R(o, y), [B]) at its last completion token; 0 outside ``mask``. Returns (rewards, per-token kl), both
    detached: logp is the rollout's (old) policy, ref_logp the frozen initial policy's."""
    _check_pair("logp", logp, "mask", mask)
    _check_pair("logp", logp, "ref_logp", ref_logp)
    kl_coef = check_scalar("kl_coef", kl_coef, nonnegative=True)
    if scores.dim() != 1 or scores.shape[0] != logp.shape[0]:
        raise GRAOInputError(f"scores must be [B] = [{logp.shape[0]}], got {list(scores.shape)}")
    m = mask.to(logp.dtype)
    kl = ((logp - ref_logp) * m).detach()
    rewards = -kl_coef * kl
    last = _last_token_index(mask)
    rows = torch.nonzero(last >= 0).flatten()
    rewards[rows, last[rows]] += scores.detach().to(rewards.dtype)[rows]
    return rewards, kl


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens (masked, contiguous).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0), A_t = delta_t + gamma * lam *
    A_{t+1}; returns (advantages, returns = A + V), both [B, T], 0 outside ``mask``, not whitened."""
    _check_pair("rewards", rewards, "mask", mask)
    _check_pair("rewards", rewards, "values", values)
    gamma = check_scalar("gamma", gamma, nonnegative=True)
    lam = check_scalar("lam", lam, nonnegative=True)
    m = mask.to(rewards.dtype)
    r, v = rewards.detach() * m, values.detach() * m
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        # a masked position (padding after the end, or before a padded row's start) passes nothing on
        next_adv = adv[:, t]
        next_value = v[:, t]
    return adv, (adv + v) * m


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (var Bessel-corrected); 0 outside ``mask``."""
    _check_pair("x", x, "mask", mask)
    m = mask.to(x.dtype)
    n = m.sum()
    if int(n) == 0:
        return torch.zeros_like(x)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def ppo_loss(token_logp: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, old_token_logp: torch.Tensor,
             old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, clip: float = 0.2,
             value_clip: float = 0.2, value_coef: float = 0.1, num_tokens: float | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO loss on [B, T] per-token tensors (the old ones and the advantages / returns are constants).

    ratio = exp(logp - old_logp); policy term max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip));
    value term 0.5 * max((V - R)^2, (old_V + clip(V - old_V, -value_clip, value_clip) - R)^2);
    loss = sum over masked tokens of (policy + value_coef * value) / ``num_tokens`` (default: the masked
    count; a micro-batch passes its minibatch's count so the chunks add up to the minibatch's token mean).
    """
    _check_pair("token_logp", token_logp, "mask", mask)
    for name, t in (("values", values), ("old_token_logp", old_token_logp), ("old_values", old_values),
                    ("advantages", advantages), ("returns", returns)):
        _check_pair("token_logp", token_logp, name, t)
    clip = check_scalar("clip", clip, nonnegative=True)
    value_clip = check_scalar("value_clip", value_clip, nonnegative=True)
    value_coef = check_scalar("value_coef", value_coef, nonnegative=True)
    m = mask.to(token_logp.dtype)
    n = m.sum().clamp(min=1) if num_tokens is None else float(num_tokens)
    adv, ret = advantages.detach(), returns.detach()
    old_logp, old_v = old_token_logp.detach(), old_values.detach()
    log_ratio = (token_logp - old_logp) * m
    ratio = torch.exp(log_ratio)
    pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    v_clipped = old_v + torch.clamp(values - old_v, -value_clip, value_clip)
    vf = 0.5 * torch.max((values - ret) ** 2, (v_clipped - ret) ** 2)
    pg_sum, vf_sum = (pg * m).sum(), (vf * m).sum()
    loss = (pg_sum + value_coef * vf_sum) / n
    with torch.no_grad():
        count = m.sum().clamp(min=1)
        stats = {"policy_loss": pg_sum / n, "value_loss": vf_sum / n,
                 "clipfrac": (((ratio - 1).abs() > clip).to(m.dtype) * m).sum() / count,
                 "approx_kl": ((0.5 * log_ratio ** 2) * m).sum() / count,
                 "value_clipfrac": (((values - old_v).abs() > value_clip).to(m.dtype) * m).sum() / count}
    return loss, stats
