"""A long-context built-in task: find the one number hidden in a long distractor text.

Task ``needle``: the prompt is ``"find <context>:"`` where the context is random lower-case "words" (a-z,
1-6 letters, single spaces) with exactly one "word" of digits, the needle, hidden at a random word position;
the answer is the needle's digits (``--task-min-len`` .. ``--task-max-len`` of them; the demo uses 1).
Example (short context)::

    "find qzv mtkepa xo 4 lwbr hyu:"  ->  "4"

Context lengths (characters, one token each): half of the prompts draw one uniformly from SHORT_CHARS =
(3, 12) (the needle and a word or two), the other half log-uniformly from CONTEXT_CHARS = (16, 320). Of the
2000 demo training prompts 17 % have 128-320 context tokens and the longest prompt is 325 tokens with
``find `` and ``:`` (plus bos); the answer is 1 token plus eos. Why (results/needle/README.md):

* The distractors contain no digits, so the answer is carried by the only digit token(s) of the prompt, and
  one attention head can find them by their content at any distance (RoPE leaves low-frequency dimensions
  nearly position-free).
* At a random init that head attends uniformly, so the needle's share of its output, and of the gradient
  that would sharpen it, is about 1/length. With contexts of one fixed length of 256, uniform over 32..320
  or log-uniform over 8..320, the 2-layer demo model stayed at chance (reward 0.1) for 50-150 steps, with
  GRAO and with SFT alike; with a quarter of short contexts one seed learned and one did not. The short
  half gives a strong signal, the head forms on it and, matching by content, then serves the long prompts
  too (greedy reward 0.93-1.0 on unseen prompts of 262-327 tokens, seeds 0-2).

Prompts are long against the answer, the case prefix sharing is for: each prompt is forwarded once for its
G samples and its reference.

Reward (:func:`needle_reward`, spec ``grao.tasks_needle:needle_reward``): partial credit by position, the
number of places where completion and reference agree, divided by the longer of the two lengths (so extra
characters cost too); 1.0 exactly for the right answer (after whitespace normalisation), 0.0 for an
empty or unrelated one. A random digit guess scores about 0.1 per digit.
"""

from __future__ import annotations

import random
import re

TASK = "needle"
CONTEXT_CHARS = (16, 320)  # the context's length in characters: log-uniform over this range ...
SHORT_SHARE, SHORT_CHARS = 0.5, (3, 12)  # ... except for this share: uniform over this range
PREFIX, SUFFIX = "find ", ":"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_POSITIONS = 512  # max_position_embeddings of the demo model on this task (covers prompt + answer)
REWARD_SPEC = "grao.tasks_needle:needle_reward"
_DIGITS = re.compile(r"[0-9]+")


def make_context(rng: random.Random, needle: str, length: int | None = None) -> str:
    """``length`` characters (default: drawn log-uniformly from CONTEXT_CHARS) of random letter words (1-6
    letters, single spaces) with ``needle`` inserted as one word at a random word position; the only digits of
    the result are the needle's."""
    if not needle.isdigit():
        raise ValueError(f"the needle must be digits, got {needle!r}")
    if length is None:  # SHORT_SHARE of the contexts short (uniform in SHORT_CHARS), the rest log-uniform
        if rng.random() < SHORT_SHARE:
            length = rng.randint(*SHORT_CHARS)
        else:
            lo, hi = CONTEXT_CHARS
            length = min(hi, int(lo * (hi / lo) ** rng.random()))
        length = max(len(needle) + 2, length)
    if length < len(needle) + 2:
        raise ValueError(f"context length {length} is too short for needle {needle!r}")
    words: list[str] = []
    room = length - len(needle)  # characters left for letter words, each with the space before it
    while room >= 2:
        n = rng.randint(1, min(6, room - 1))
        words.append("".join(rng.choice(LETTERS) for _ in range(n)))
        room -= n + 1
    if room:  # one character short: lengthen a letter word (there is one, since length >= len(needle) + 2)
        words[-1] += rng.choice(LETTERS)
    words.insert(rng.randint(0, len(words)), needle)
    return " ".join(words)


def make_example(rng: random.Random, min_len: int, max_len: int, length: int | None = None) -> dict:
    """One record: a prompt of ``len(PREFIX) + length + len(SUFFIX)`` characters (length: CONTEXT_CHARS by
    default) and its needle as reference."""
    n = rng.randint(min_len, max_len)
    needle = "".join(rng.choice("0123456789") for _ in range(n))
    return {"prompt": f"{PREFIX}{make_context(rng, needle, length)}{SUFFIX}", "reference": needle}


def needle_of(prompt: str) -> str:
    """The answer of a ``needle`` prompt: its only run of digits."""
    found = _DIGITS.findall(str(prompt))
    if len(found) != 1:
        raise ValueError(f"a needle prompt holds exactly one run of digits, found {len(found)}")
    return found[0]


def _norm(text: str) -> str:
    return "".join(str(text).split())


def needle_score(completion: str, reference: str) -> float:
    """Positional partial credit in [0, 1] (module docstring); 1.0 only for the exact answer."""
    o, y = _norm(completion), _norm(reference)
    if not y:
        return float(not o)
    if not o:
        return 0.0
    right = sum(a == b for a, b in zip(o, y))
    return right / max(len(o), len(y))


def needle_reward(prompts=None, completions=(), references=(), **_) -> list[float]:
    """R(o, y) for the trainer: :func:`needle_score` per completion."""
    return [needle_score(c, r) for c, r in zip(completions, references, strict=True)]


needle_reward.__name__ = "needle_reward"

# `grao demo --task needle` uses these over the demo's defaults (grao.cli.commands.TASK_DEMO_DEFAULTS); chosen
# so that the held-out reward rises from chance within a few minutes on a 2-core CPU (results/needle/).
DEMO_DEFAULTS = dict(task=TASK, task_min_len=1, task_max_len=1, reward=REWARD_SPEC, max_new_tokens=4,
                     steps=150, prompts_per_step=16, group_size=4, lr=5e-3, eval_every=25, eval_prompts=128,
                     output_dir="runs/demo-needle", save_every=0)
