"""The built-in default: a tiny causal LM, a character tokenizer and a synthetic verifiable task.

Nothing is downloaded. The tokenizer is a character-level ``tokenizers`` WordLevel model built in
code and wrapped in ``PreTrainedTokenizerFast``; the model is a 2-layer ``LlamaForCausalLM`` built
from a config with a seeded random init; the task generates (prompt, reference) pairs whose answer
is checked exactly (e.g. ``"reverse 4831:"`` -> ``"1384"``). A randomly initialised model essentially
never emits the exact answer (about V^-(n+1) per sample), so at the start every group of samples
fails: GRPO's group-normalised advantages are all zero there, while GRAO still learns from the
reference answer inside the group (docs/spec.md, "Advantages").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz +-=:>,")
TASKS = ("reverse", "copy", "sort", "add", "copy_flawed", "needle")  # copy_flawed: grao/tasks_flawed.py; needle:
# grao/tasks_needle.py (long context)


def build_tokenizer(vocab_size: int | None = None):
    """Character-level PreTrainedTokenizerFast (pad 0, bos 1, eos 2, unk 3); decode joins characters.
    ``vocab_size``: pad the vocabulary with filler tokens ``<t{i}>`` to that many entries, so that every id a
    larger model samples decodes (encoding never produces a filler: one token per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIAL + CHARS
    names += [f"<t{i}>" for i in range(len(names), vocab_size or 0)]
    vocab = {tok: i for i, tok in enumerate(names)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    return tok


@dataclass
class DemoModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64


def model_size(task: str | None = None) -> DemoModelConfig:
    """The demo model's size for ``task``: the default, with positions enough for a long-context task's prompts."""
    if task == "needle":
        from grao import tasks_needle
        return DemoModelConfig(max_position_embeddings=tasks_needle.MAX_POSITIONS)
    return DemoModelConfig()


def build_model(tokenizer, seed: int = 0, size: DemoModelConfig | None = None, attn_implementation: str = "sdpa"):
    """A tiny LlamaForCausalLM with a seeded random init (the global RNG state is left untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = size or DemoModelConfig()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden_size,
                         intermediate_size=size.intermediate_size, num_hidden_layers=size.num_hidden_layers,
                         num_attention_heads=size.num_attention_heads, num_key_value_heads=size.num_attention_heads,
                         max_position_embeddings=size.max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def make_example(task: str, rng: random.Random, min_len: int, max_len: int) -> dict:
    if task == "copy_flawed":  # imperfect references on a documented subset (grao/tasks_flawed.py)
        from grao import tasks_flawed
        return tasks_flawed.make_example(rng, min_len, max_len)
    if task == "needle":  # the digits hidden in a long distractor context (grao/tasks_needle.py)
        from grao import tasks_needle
        return tasks_needle.make_example(rng, min_len, max_len)
    if task == "add":
        a, b = rng.randint(0, 10 ** max_len - 1), rng.randint(0, 10 ** max_len - 1)
        return {"prompt": f"{a}+{b}=", "reference": str(a + b)}
    n = rng.randint(min_len, max_len)
    if task == "sort":
        s = "".join(rng.choice("0123456789") for _ in range(n))
        return {"prompt": f"sort {s}:", "reference": "".join(sorted(s))}
    s = "".join(rng.choice("0123456789") for _ in range(n))
    if task == "reverse":
        return {"prompt": f"reverse {s}:", "reference": s[::-1]}
    if task == "copy":
        return {"prompt": f"copy {s}:", "reference": s}
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def make_task(task: str = "reverse", *, num_train: int = 2000, num_eval: int = 128, min_len: int = 3,
              max_len: int = 5, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, eval) records with no prompt shared between the two splits."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    tries = 0
    while len(out) < num_train + num_eval:
        ex = make_example(task, rng, min_len, max_len)
        tries += 1
        if ex["prompt"] in seen:
            if tries > 50 * (num_train + num_eval):
                raise ValueError(f"task {task!r} with lengths {min_len}..{max_len} has too few distinct prompts")
            continue
        seen.add(ex["prompt"])
        out.append(ex)
    return out[num_eval:], out[:num_eval]
