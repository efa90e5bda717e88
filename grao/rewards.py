"""Reward functions R(o, y): a completion o scored against the reference answer y.

A reward is any callable ``fn(prompts, completions, references, **columns) -> list[float]``
with one float per completion. It is called with keyword arguments only, in the style of
TRL reward functions (trl/trainer/grpo_trainer.py passes ``prompts``, ``completions`` and the
dataset columns as keywords): ``references`` also arrives as ``solution``, and every other
dataset column arrives under its own name. So a TRL reward function
``def f(completions, solution, **kwargs)`` works unchanged.

The trainer calls a reward once per step on P * (G + 1) completions: the G samples of each
prompt, then the reference itself (to get R(y, y), spec "Data per prompt").

Built in: :func:`exact_match`, :func:`token_f1` / :func:`char_f1`, :class:`RewardModelReward`
(a sequence-classification reward model: ``score(o) - score(y)`` or its sign) and
:class:`PairwiseJudgeReward` (+1 / 0 / -1 against the reference, as the paper's judge).
:class:`WeightedReward` combines several with weights.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFn = Callable[..., list]


class RewardError(ValueError):
    """A reward function returned the wrong number of values or a non-finite value."""


def _norm(text: str) -> str:
    return " ".join(str(text).strip().split())


def exact_match(prompts=None, completions=(), references=(), **_) -> list[float]:
    """1.0 where the completion equals the reference after whitespace normalisation, else 0.0."""
    return [float(_norm(c) == _norm(r)) for c, r in zip(completions, references, strict=True)]


def _f1(pred: Sequence[str], gold: Sequence[str]) -> float:
    if not pred and not gold:
        return 1.0
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


_WORD = re.compile(r"\w+|[^\w\s]")


def token_f1(prompts=None, completions=(), references=(), **_) -> list[float]:
    """Bag-of-tokens F1 (SQuAD style) between completion and reference; tokens are lower-cased words
    and punctuation marks. In [0, 1]; 1 for identical token multisets."""
    return [_f1(_WORD.findall(str(c).lower()), _WORD.findall(str(r).lower()))
            for c, r in zip(completions, references, strict=True)]


def char_f1(prompts=None, completions=(), references=(), **_) -> list[float]:
    """Bag-of-characters F1 (whitespace ignored): a dense partial-credit reward for short answers."""
    return [_f1([ch for ch in str(c) if not ch.isspace()], [ch for ch in str(r) if not ch.isspace()])
            for c, r in zip(completions, references, strict=True)]


class RewardModelReward:
    """Wrap a Hugging Face sequence-classification reward model as R(o, y).

    R(o, y) = score(prompt + o) - score(prompt + y) (``mode="diff"``) or its sign in {-1, 0, +1}
    (``mode="sign"``, the paper's judgment form); either way R(y, y) = 0. ``score`` is the logit of
    ``label_index`` (the single output of a ``num_labels=1`` reward head by default).

    Args:
        model: an ``AutoModelForSequenceClassification`` (or a path / hub id to load one).
        tokenizer: its tokenizer (loaded from ``model`` when it is a path and this is None).
        mode: "diff" or "sign". batch_size: texts scored per forward. max_length: truncation.
        trust_remote_code: passed to ``from_pretrained`` when ``model`` is a path (default False: a
            repository's custom modelling code is never run unless asked for).
    """

    def __init__(self, model, tokenizer=None, *, mode: str = "diff", batch_size: int = 16, max_length: int = 1024,
                 label_index: int = 0, device=None, trust_remote_code: bool = False):
        if mode not in ("diff", "sign"):
            raise RewardError(f"mode must be 'diff' or 'sign', got {mode!r}")
        if isinstance(model, str):
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            # remote code (a repository's own modelling .py files) runs only when the user asks for it
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            raise RewardError("RewardModelReward needs the reward model's tokenizer")
        self.model, self.tokenizer, self.mode = model.eval(), tokenizer, mode
        self.batch_size, self.max_length, self.label_index = int(batch_size), int(max_length), int(label_index)
        self.device = device if device is not None else next(model.parameters()).device
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.__name__ = "reward_model"

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        """Reward-model score of each full text (prompt + answer)."""
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            logits = self.model(**enc).logits.float()
            out.extend(logits[:, self.label_index].tolist())
        return out

    def __call__(self, prompts=None, completions=(), references=(), **_) -> list[float]:
        prompts = [""] * len(completions) if prompts is None else [p if isinstance(p, str) else str(p) for p in prompts]
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        refs = [p + r for p, r in zip(prompts, references, strict=True)]
        # score each distinct text once (the reference of a group repeats G + 1 times)
        unique = list(dict.fromkeys(texts + refs))
        scores = dict(zip(unique, self.score(unique)))
        diff = [scores[t] - scores[r] for t, r in zip(texts, refs)]
        if self.mode == "sign":
            return [float((d > 0) - (d < 0)) for d in diff]
        return diff


class PairwiseJudgeReward:
    """A pairwise judge as R(o, y) in {+1, 0, -1}: o better than / tied with / worse than y (the paper's form).

    ``judge`` is either a callable ``judge(prompts, pairs) -> list[int]`` or an object with such a
    ``.judge`` method (TRL's ``BasePairwiseJudge`` interface: ``pairs[i] = [o, y]`` and the answer is
    the index of the preferred completion, 0 -> +1, 1 -> -1, anything else such as TRL's -1 for a
    failed judgment -> 0). Identical o and y are a tie without asking the judge, so R(y, y) = 0.
    With ``symmetric=True`` each pair is judged in both orders and the two verdicts are averaged,
    which cancels a judge's position bias.
    """

    def __init__(self, judge, *, symmetric: bool = False):
        self.judge = judge.judge if hasattr(judge, "judge") else judge
        if not callable(self.judge):
            raise RewardError("judge must be callable or have a .judge(prompts, pairs) method")
        self.symmetric = symmetric
        self.__name__ = "pairwise_judge"

    def _ask(self, prompts, pairs) -> list[float]:
        verdicts = list(self.judge(prompts, pairs))
        if len(verdicts) != len(pairs):
            raise RewardError(f"the judge returned {len(verdicts)} verdicts for {len(pairs)} pairs")
        return [1.0 if v == 0 else -1.0 if v == 1 else 0.0 for v in verdicts]

    def __call__(self, prompts=None, completions=(), references=(), **_) -> list[float]:
        prompts = [""] * len(completions) if prompts is None else list(prompts)
        out = [0.0] * len(completions)
        todo = [i for i, (c, r) in enumerate(zip(completions, references, strict=True)) if c != r]
        if todo:
            ps = [prompts[i] for i in todo]
            forward = self._ask(ps, [[completions[i], references[i]] for i in todo])
            if self.symmetric:
                backward = self._ask(ps, [[references[i], completions[i]] for i in todo])
                forward = [(f - b) / 2 for f, b in zip(forward, backward)]
            for i, v in zip(todo, forward):
                out[i] = v
        return out


class WeightedReward:
    """sum_k w_k * R_k(o, y) over several reward functions (each called with the same keywords)."""

    def __init__(self, rewards: Sequence[tuple[RewardFn, float]]):
        if not rewards:
            raise RewardError("WeightedReward needs at least one (reward, weight) pair")
        self.rewards = [(fn, float(w)) for fn, w in rewards]
        self.__name__ = "+".join(f"{w:g}*{reward_name(fn)}" for fn, w in self.rewards)

    def __call__(self, **kwargs) -> list[float]:
        kwargs.pop("solution", None)
        total = None
        for fn, w in self.rewards:
            vals = call_reward(fn, **kwargs)
            total = [w * v for v in vals] if total is None else [t + w * v for t, v in zip(total, vals)]
        return total


def reward_name(fn) -> str:
    """A name for error messages: ``__name__`` (functions, built-in wrappers), else the class name."""
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    func = getattr(fn, "func", None)  # functools.partial
    if func is not None:
        return f"partial({reward_name(func)})"
    return type(fn).__name__


def _invoke(fn: RewardFn, n: int, kwargs: dict) -> list:
    """Call ``fn``; any exception, a non-sequence or a wrong length becomes a RewardError naming ``fn``."""
    name = reward_name(fn)
    try:
        values = fn(**kwargs)
    except Exception as exc:
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
    if values is None or isinstance(values, (str, bytes, dict)):
        raise RewardError(f"reward {name!r} returned {type(values).__name__} instead of a list of "
                          f"{n} floats (one per completion)")
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {name!r} returned {type(values).__name__} instead of a list of "
                          f"{n} floats (one per completion)") from None
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
    return values


def _as_float(v: Any) -> float | None:
    """float(v) for numbers (bool, int, float, numpy / 0-d torch scalars), None for anything else."""
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _reward_kwargs(prompts, completions, references, columns: dict) -> dict:
    columns.pop("solution", None)  # always the references (a WeightedReward passes its keywords on)
    return dict(prompts=prompts, completions=completions, references=references, solution=references, **columns)


def call_reward(fn: RewardFn, *, prompts: list, completions: list[str], references: list[str],
                **columns: Any) -> list[float]:
    """Call a reward with TRL-compatible keywords and check it returns len(completions) finite floats.

    Raises :class:`RewardError` naming the reward (its ``__name__`` or class) when it raises, returns
    something that is not a sequence, the wrong number of values, or a None / non-numeric / NaN / inf value.
    """
    kwargs = _reward_kwargs(prompts, completions, references, columns)
    values = _invoke(fn, len(completions), kwargs)
    out = []
    for i, v in enumerate(values):
        f = _as_float(v)
        if f is None:
            raise RewardError(f"reward {reward_name(fn)!r} returned {v!r:.40} (not a number) for completion {i}")
        if not math.isfinite(f):
            raise RewardError(f"reward {reward_name(fn)!r} returned a non-finite value {f} for completion {i}")
        out.append(f)
    return out


def call_reward_lenient(fn: RewardFn, *, prompts: list, completions: list[str], references: list[str],
                        **columns: Any) -> list[float]:
    """As :func:`call_reward`, but a None / non-numeric / NaN / inf value becomes NaN instead of an error
    (the trainer then drops the groups that hold one, ``on_reward_error="drop_group"``).

    An exception, a non-sequence or a wrong length still raise :class:`RewardError` (the call as a whole failed).
    """
    kwargs = _reward_kwargs(prompts, completions, references, columns)
    values = _invoke(fn, len(completions), kwargs)
    out = []
    for v in values:
        f = _as_float(v)
        out.append(f if f is not None and math.isfinite(f) else math.nan)
    return out


BUILTIN = {"exact_match": exact_match, "token_f1": token_f1, "char_f1": char_f1}
REWARD_FORMS = ("one of exact_match, token_f1, char_f1, 'reward_model:<path>', 'module:function', or a "
                "comma-separated list of them with optional '*weight'")


def _check_weight(weight: Any, item: Any) -> None:
    try:
        ok = math.isfinite(float(weight))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise RewardError(f"must give each listed reward a finite weight, got {weight!r} in {item!r}")


def check_reward_spec(spec: Any) -> None:
    """Check the form of a reward spec (see :func:`resolve_reward`) without building it: nothing is loaded or
    imported. Raises RewardError(problem), the problem phrased "must be ..., got ..." (suggesting the nearest
    built-in name for a typo)."""
    if callable(spec):
        return
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise RewardError(f"must be {REWARD_FORMS}, got an empty list")
        for item in spec:
            if isinstance(item, dict):
                if "name" not in item:
                    raise RewardError(f"must give a 'name' (and an optional 'weight') in each listed mapping, "
                                      f"got {item!r}")
                _check_weight(item.get("weight", 1.0), item)
                check_reward_spec(item["name"])
            elif isinstance(item, str) and "*" in item:
                name, weight = item.rsplit("*", 1)
                _check_weight(weight, item)
                check_reward_spec(name.strip())
            else:
                check_reward_spec(item)
        return
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"must be {REWARD_FORMS}, got {spec!r}")
    if "," in spec or "*" in spec:
        check_reward_spec([s.strip() for s in spec.split(",") if s.strip()])
        return
    if spec in BUILTIN:
        return
    for prefix in ("reward_model_sign:", "reward_model:"):
        if spec.startswith(prefix):
            if not spec[len(prefix):].strip():
                raise RewardError(f"must name the reward model after {prefix!r}, got {spec!r}")
            return
    if ":" in spec:
        module, attr = spec.split(":", 1)
        if module.strip() and attr.strip():
            return
    close = difflib.get_close_matches(spec, list(BUILTIN), n=1)
    raise RewardError(f"must be {REWARD_FORMS}, got {spec!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def resolve_reward(spec: Any, *, trust_remote_code: bool = False) -> RewardFn:
    """A reward from a spec: a callable; a built-in name (exact_match, token_f1, char_f1);
    ``reward_model:<path or hub id>`` (optionally ``reward_model_sign:...``); ``module:function``;
    or a list of ``{"name": spec, "weight": w}`` / ``"spec*w"`` items combined with weights.
    ``trust_remote_code`` is passed to the reward model's ``from_pretrained`` (default False)."""
    sub = {"trust_remote_code": trust_remote_code}
    if callable(spec):
        return spec
    try:
        check_reward_spec(spec)
    except RewardError as exc:
        raise RewardError(f"reward {exc}") from None
    if isinstance(spec, (list, tuple)):
        items = []
        for item in spec:
            if isinstance(item, dict):
                items.append((resolve_reward(item["name"], **sub), float(item.get("weight", 1.0))))
            elif isinstance(item, str) and "*" in item:
                name, w = item.rsplit("*", 1)
                items.append((resolve_reward(name.strip(), **sub), float(w)))
            else:
                items.append((resolve_reward(item, **sub), 1.0))
        return items[0][0] if len(items) == 1 and items[0][1] == 1.0 else WeightedReward(items)
    if "," in spec or "*" in spec:
        return resolve_reward([s.strip() for s in spec.split(",") if s.strip()], **sub)
    if spec in BUILTIN:
        return BUILTIN[spec]
    for prefix, mode in (("reward_model_sign:", "sign"), ("reward_model:", "diff")):
        if spec.startswith(prefix):
            return RewardModelReward(spec[len(prefix):], mode=mode, trust_remote_code=trust_remote_code)
    module, attr = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise RewardError(f"reward {spec!r}: cannot import module {module!r} ({exc})") from exc
    except AttributeError:
        raise RewardError(f"reward {spec!r}: module {module!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {module}.{attr} is not callable")
    return fn
