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
