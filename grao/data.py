"""Prompt / reference data for the GRAO trainer.

A record is a dict with a ``prompt`` and a ``reference`` (the ground-truth or human-preferred
answer y of the spec); every other column is kept and handed to the reward functions as a
keyword (as TRL does with dataset columns). Accepted inputs:

* JSONL files (one JSON object per line), a list of dicts, or a Hugging Face ``datasets``
  dataset (duck-typed: anything iterable of dicts; ``datasets`` is not a dependency);
* the reference under ``reference`` or one of its aliases ``solution`` / ``chosen`` / ``answer``;
* conversational prompts: a list of ``{"role", "content"}`` messages, rendered with the
  tokenizer's chat template (``add_generation_prompt=True``); a conversational reference
  (a list of messages) contributes the content of its last assistant message;
* the Anthropic HH-RLHF format the paper used: ``chosen`` / ``rejected`` hold whole dialogues
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``; the prompt is everything up to and including the
  last ``"\\n\\nAssistant:"`` and the reference is the text after it (the ``rejected`` dialogue's
  last answer becomes the ``rejected`` column, usable by DPO).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch

REFERENCE_ALIASES = ("reference", "solution", "chosen", "answer")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


class DataError(ValueError):
    """Raised for records that lack a prompt or a reference, or files that cannot be parsed."""


def split_hh(dialogue: str) -> tuple[str, str]:
    """Split an HH-RLHF dialogue into (prompt ending with "\\n\\nAssistant:", final answer stripped)."""
    if not isinstance(dialogue, str):
        raise DataError(f"an HH dialogue must be a string, got {type(dialogue).__name__}")
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"HH dialogue has no {HH_ASSISTANT!r} turn: {dialogue[:80]!r}")
    prompt = dialogue[:cut + len(HH_ASSISTANT)]
    return prompt, dialogue[cut + len(HH_ASSISTANT):].strip()


def _is_hh(text: Any) -> bool:
    return isinstance(text, str) and HH_ASSISTANT in text and HH_HUMAN.strip() in text


def _message_text(value: Any, what: str) -> Any:
    """A reference given as messages -> the content of its last assistant (or last) message."""
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and "content" in m for m in value):
            raise DataError(f"{what} as a list must hold {{'role', 'content'}} messages, got {value!r:.120}")
        assistant = [m for m in value if m.get("role") == "assistant"]
        return (assistant or value)[-1]["content"]
    return value


def normalize_record(record: dict, index: int = 0) -> dict:
    """Return a copy of ``record`` with ``prompt`` and ``reference`` set (aliases and HH resolved)."""
    if not isinstance(record, dict):
        raise DataError(f"record {index} must be a dict, got {type(record).__name__}")
    out = dict(record)
    if "prompt" not in out and "chosen" in out and _is_hh(out["chosen"]):
        out["prompt"], out["reference"] = split_hh(out["chosen"])
        if isinstance(out.get("rejected"), str) and HH_ASSISTANT in out["rejected"]:
            out["rejected"] = split_hh(out["rejected"])[1]
        return out
    if "prompt" not in out:
        raise DataError(f"record {index} has no 'prompt' column (columns: {sorted(out)}); expected 'prompt' and "
                        f"'reference' (or one of {REFERENCE_ALIASES[1:]}), or HH-RLHF 'chosen'/'rejected' dialogues")
    ref_key = next((k for k in REFERENCE_ALIASES if k in out), None)
    if ref_key is None:
        raise DataError(f"record {index} has no reference column: expected one of {REFERENCE_ALIASES}, "
                        f"got columns {sorted(out)}")
    reference = _message_text(out[ref_key], f"record {index} '{ref_key}'")
    if isinstance(out["prompt"], str) and isinstance(reference, str) and ref_key == "chosen" \
            and reference.startswith(out["prompt"]):
        reference = reference[len(out["prompt"]):]  # TRL "standard preference" rows may repeat the prompt
    if not isinstance(reference, str) or not reference.strip():
        raise DataError(f"record {index}: the reference ('{ref_key}') must be a non-empty string, got {reference!r:.80}")
    if "rejected" in out:
        out["rejected"] = _message_text(out["rejected"], f"record {index} 'rejected'")
    out["reference"] = reference
    if not isinstance(out["prompt"], (str, list)):
        raise DataError(f"record {index}: 'prompt' must be a string or a list of chat messages, "
                        f"got {type(out['prompt']).__name__}")
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (blank lines skipped); errors name the file and line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def load_records(source: Any) -> list[dict]:
    """Load and normalise records from a JSONL/JSON path, a list of dicts or a ``datasets`` dataset.
    Errors about a file's content name the file (and the line or record)."""
    where = ""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        where = f"{path}: "
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found" if not os.path.exists(path) else f"{path}: not a file")
        if path.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as fh:
                    rows = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of records, got {type(rows).__name__}")
        else:
            rows = read_jsonl(path)
    elif isinstance(source, Iterable):
        rows = list(source)
    else:
        raise DataError(f"data must be a path, a list of dicts or a datasets.Dataset, got {type(source).__name__}")
    if not rows:
        raise DataError(f"{where}holds no records" if where else "the data set is empty")
    try:
        return [normalize_record(r, i) for i, r in enumerate(rows)]
    except DataError as exc:
        raise DataError(f"{where}{exc}") from None


def warn_about_records(records: list[dict], tokenizer, *, name: str, prompts_per_step: int | None = None) -> None:
    """UserWarnings for data that trains silently badly: fewer records than a step's prompts (prompts then repeat
    within a step), and references the tokenizer cannot represent (they become its unknown token, so an
    exact-match reward can never be earned on them)."""
    import warnings
    if prompts_per_step is not None and prompts_per_step > len(records):
        warnings.warn(f"prompts_per_step ({prompts_per_step}) is more than the {len(records)} records of {name}: "
                      f"prompts repeat within a step", UserWarning, stacklevel=2)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    refs = [r["reference"] for r in records]
    bad = [i for i, ids in enumerate(tokenizer(refs, add_special_tokens=False)["input_ids"]) if unk in ids]
    if bad:
        warnings.warn(f"{len(bad)} of the {len(refs)} references of {name} hold text the tokenizer cannot represent "
                      f"(it becomes {tokenizer.unk_token}), e.g. record {bad[0]}: {refs[bad[0]]!r:.60}; the policy "
                      f"can never write those answers exactly", UserWarning, stacklevel=2)


def render_prompt(prompt: Any, tokenizer=None) -> str:
    """Prompt text for generation: strings as they are, message lists through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise DataError("a conversational prompt (list of messages) needs a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


class PromptSampler:
    """Seeded epoch-wise shuffling over records; its state (epoch, position) is checkpointable.

    The permutation of epoch e is drawn from ``torch.Generator().manual_seed(seed + e)``, so
    resuming needs only (epoch, position), never a generator state.
    """

    def __init__(self, num_records: int, seed: int = 0, shuffle: bool = True):
        if num_records <= 0:
            raise DataError("PromptSampler needs at least one record")
        self.num_records, self.seed, self.shuffle = num_records, int(seed), shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_records))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_records, generator=g).tolist()

    def next_indices(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position >= self.num_records:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._make_order()
