"""A built-in task with systematically wrong references, and a pairwise judge that knows the truth.

Task ``copy_flawed``: the prompt is ``"copy <digits>:"`` and the correct answer is the digits unchanged,
as in ``copy``. The references are imperfect in one fixed, documented way (not random noise, which maximum
likelihood would average out):

* FLAWED SUBSET: every prompt whose digit string starts with ``7``, ``8`` or ``9`` (about 30 % of prompts);
* ERROR: the reference of such a prompt drops the last digit (``"copy 7341:"`` -> reference ``"734"``,
  truth ``"7341"``). Every other prompt has the correct reference.

So imitation (SFT, DPO's chosen answer, GRAO's imitation term) is pulled towards a consistent, learnable
mistake on 30 % of the prompts, and the references' own accuracy is about 0.7.

The judge (:data:`copy_flawed_judge`, reward spec ``grao.tasks_flawed:copy_flawed_judge``) has the paper's
form R(o, y) in {+1, 0, -1}: ``o`` is better than, tied with or worse than the reference ``y``. It plays the
role of the paper's LLM judge that can solve the problem: it reads the truth ``t`` off the prompt and
prefers the answer with the smaller Levenshtein distance to ``t`` (after whitespace normalisation):

    R(o, y) = sign(d(y, t) - d(o, t))

hence R(y, y) = 0, a correct ``o`` beats a wrong ``y`` (+1), a wrong ``o`` loses to a correct ``y`` (-1), and
two answers equally far from the truth tie (0). Held-out accuracy is exact match against the truth
(:func:`accuracy`), which no method sees during training.
"""

from __future__ import annotations

import random
import re

from grao.rewards import PairwiseJudgeReward

FLAWED_FIRST_DIGITS = "789"  # the documented flawed subset: the digit string starts with one of these
TASK = "copy_flawed"
_PROMPT = re.compile(r"copy ([0-9]+):\s*$")


def truth_of(prompt: str) -> str:
    """The correct answer of a ``copy_flawed`` prompt (its digits)."""
    m = _PROMPT.search(str(prompt))
    if m is None:
        raise ValueError(f"not a copy_flawed prompt: {prompt!r}")
    return m.group(1)


def is_flawed(prompt: str) -> bool:
    """Whether the prompt belongs to the documented flawed subset (its reference is wrong)."""
    return truth_of(prompt)[0] in FLAWED_FIRST_DIGITS


def flawed_reference(digits: str) -> str:
    """The systematic error: the last digit is dropped."""
    return digits[:-1]


def make_example(rng: random.Random, min_len: int, max_len: int) -> dict:
    """One record: ``prompt``, ``reference`` (wrong on the flawed subset) and ``truth`` (always right).
    Strings are at least 2 digits long, so a flawed reference is never empty."""
    n = rng.randint(max(2, min_len), max(2, max_len))
    s = "".join(rng.choice("0123456789") for _ in range(n))
    ref = flawed_reference(s) if s[0] in FLAWED_FIRST_DIGITS else s
    return {"prompt": f"copy {s}:", "reference": ref, "truth": s}


def _norm(text: str) -> str:
    return " ".join(str(text).strip().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class TruthJudge:
    """A pairwise judge in TRL's ``BasePairwiseJudge`` form: ``judge(prompts, pairs)`` returns, per pair
    ``[o, y]``, 0 when ``o`` is closer to the truth, 1 when ``y`` is, -1 when they are equally close (a tie)."""

    def judge(self, prompts, pairs, shuffle_order: bool = False) -> list[int]:
        out = []
        for prompt, (a, b) in zip(prompts, pairs, strict=True):
            t = truth_of(prompt)
            da, db = levenshtein(_norm(a), t), levenshtein(_norm(b), t)
            out.append(0 if da < db else 1 if db < da else -1)
        return out


# R(o, y) in {+1, 0, -1}; identical o and y are a tie without asking the judge (R(y, y) = 0).
copy_flawed_judge = PairwiseJudgeReward(TruthJudge())
copy_flawed_judge.__name__ = "copy_flawed_judge"
JUDGE_SPEC = "grao.tasks_flawed:copy_flawed_judge"


def accuracy(records: list[dict], completions: list[str]) -> float:
    """Exact match against each record's ``truth`` (its ``reference`` where it has none)."""
    hits = [_norm(c) == _norm(r.get("truth", r["reference"])) for r, c in zip(records, completions, strict=True)]
    return sum(hits) / len(hits)


def reference_accuracy(records: list[dict]) -> float:
    """Share of records whose reference equals the truth."""
    return accuracy(records, [r["reference"] for r in records])
