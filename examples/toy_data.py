"""A tiny causal LM and scored toy prompt groups for the examples (nothing is downloaded).

In real use the groups come from sampling G completions per prompt with the policy and scoring
each against the reference answer with a reward (e.g. ``grao.judges.ChatCompletionsJudge``); here
the tokens are random and the rewards are random judge verdicts in {-1, 0, +1}.
"""

from __future__ import annotations

import torch


def tiny_model(vocab_size: int = 96, hidden_size: int = 32, seed: int = 0):
    """A 2-layer LlamaForCausalLM from a config, seeded random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def toy_groups(num_prompts: int = 8, group: int = 4, vocab_size: int = 96, seed: int = 0) -> list[dict]:
    """One dict per prompt: its G sampled completions then its reference answer, tokenised and scored.

    input_ids, attention_mask, labels: [G+1, T] int64, labels = input_ids with -100 on the prompt and
    on right padding (the Hugging Face convention: the model shifts them); rewards: [G+1] float32,
    R(o_1, y) .. R(o_G, y) then R(y, y) = 0.
    """
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(num_prompts):
        prompt = torch.randint(1, vocab_size, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen)
        answers = [torch.randint(1, vocab_size, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen)
                   for _ in range(group + 1)]
        width = len(prompt) + max(len(a) for a in answers)
        ids = torch.zeros(group + 1, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, answer in enumerate(answers):
            seq = torch.cat([prompt, answer])
            ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
            labels[row, len(prompt):len(seq)] = answer
        rewards = torch.cat([torch.randint(-1, 2, (group,), generator=gen).float(), torch.zeros(1)])
        items.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "rewards": rewards})
    return items


def collate_groups(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack prompt groups: input_ids / attention_mask / labels [P*(G+1), T] (right-padded to the
    longest), rewards [P, G+1]. Rows of a prompt stay contiguous, its reference answer last."""
    width = max(item["input_ids"].shape[1] for item in items)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {"input_ids": torch.cat([pad(item["input_ids"], pad_id) for item in items]),
            "attention_mask": torch.cat([pad(item["attention_mask"], 0) for item in items]),
            "labels": torch.cat([pad(item["labels"], -100) for item in items]),
            "rewards": torch.stack([item["rewards"] for item in items]).float()}
