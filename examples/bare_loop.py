"""GRAO, GRPO and SFT in a bare PyTorch loop on the fused ops (no [tokens x vocab] logits).

* GRAO: ``fused_linear_grao_loss`` on the model's last hidden states and the lm_head weight.
* GRPO / SFT (and DPO the same way): per-token log-probs from ``linear_logprob``, then the
  losses in ``grao.baselines`` (``grpo_loss``, ``sft_loss``, ``dpo_loss``).

Batches come from ``toy_data.collate_groups``: rows [P*(G+1), T] (each prompt's G samples, then its
reference answer) with Hugging Face-style labels, and rewards [P, G+1].

The hidden states come from the model's own forward (``model(..., output_hidden_states=True,
logits_to_keep=1)``), so the same functions work on a model wrapped in DistributedDataParallel:
examples/ddp_bare_loop.py.

    python examples/bare_loop.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import grao
from grao_kernels import fused_linear_grao_loss, linear_logprob


def hidden_and_labels(model, batch, rows=None):
    """Final hidden states [N, T, D] and labels [N, T] shifted to match them.

    Through ``model(...)`` itself, which under DDP is the wrapper: DDP synchronises the gradients of a pass
    only if that pass went through its forward (never call ``model.module.model(...)``). logits_to_keep=1
    limits the model's own lm_head to one position; hidden_states[-1] is the final (normed) hidden state.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if rows is not None:
        ids, mask, labels = ids[rows], mask[rows], labels[rows]
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1], F.pad(labels[:, 1:], (0, 1), value=-100)  # hidden state t predicts token t+1


def head_weight(model):
    """The lm_head weight, of the model inside a DDP wrapper when there is one (tied or not)."""
    return getattr(model, "module", model).get_output_embeddings().weight


def grao_loss(model, batch, beta=0.5, lam=0.6):
    hidden, labels = hidden_and_labels(model, batch)
    loss, stats = fused_linear_grao_loss(hidden, head_weight(model), labels, batch["rewards"], beta=beta, lam=lam)
    return loss


def grpo_loss(model, batch):
    prompts, width = batch["rewards"].shape
    samples = torch.arange(prompts * width) % width != width - 1  # GRPO sees the G samples, not the reference
    hidden, labels = hidden_and_labels(model, batch, samples)
    logp = linear_logprob(hidden, head_weight(model), labels)  # [N, T] fp32, 0 at ignored tokens
    advantages = grao.grpo_advantages(batch["rewards"][:, :-1]).flatten()  # [P*G]
    loss, stats = grao.grpo_loss(logp, labels != -100, advantages)
    return loss


def sft_loss(model, batch):
    prompts, width = batch["rewards"].shape
    references = torch.arange(prompts * width) % width == width - 1  # SFT imitates the reference answers
    hidden, labels = hidden_and_labels(model, batch, references)
    logp = linear_logprob(hidden, head_weight(model), labels)
    return grao.sft_loss(logp, labels != -100)


LOSSES = {"grao": grao_loss, "grpo": grpo_loss, "sft": sft_loss}


def train(method: str = "grao", steps: int = 5, prompts_per_step: int = 2, lr: float = 1e-3, seed: int = 0):
    """Train a tiny model for ``steps`` optimizer steps; returns (model, per-step losses)."""
    from toy_data import collate_groups, tiny_model, toy_groups

    model = tiny_model(seed=seed)
    data = toy_groups(num_prompts=steps * prompts_per_step, vocab_size=model.config.vocab_size, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        batch = collate_groups(data[step * prompts_per_step:(step + 1) * prompts_per_step])
        loss = LOSSES[method](model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


if __name__ == "__main__":
    for name in LOSSES:
        _, history = train(name)
        print(name, [round(v, 4) for v in history])
