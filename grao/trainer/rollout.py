"""Rollouts: sample G completions per prompt (one copy of each prompt, by default) and score them.

:class:`RolloutEngine` owns the sampling side of a step: encoding prompts, sampling (by default
:func:`grao.sampling.sample_shared`: each prompt prefilled once and its G samples decoded against that one
copy of its keys and values; ``shared_sampling=False`` or a model it does not serve: transformers
``generate(num_return_sequences=G)``; temperature / top-p; ``max_new_tokens``), the reward
call R(o_i, y) for the G samples and R(y, y) for the reference, and the reward-fault policy
(``on_reward_error``), plus greedy evaluation. Its product is a :class:`Rollout`.

With several processes each rank rolls out its own shard of the step's prompts. With
``sample_seeding="prompt"`` a prompt's samples are drawn under a seed of (seed, step, prompt index in
the global batch) (:func:`prompt_seed`), so they equal those of a one-process run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grao.data import DataError, render_prompt
from grao.rewards import RewardError, call_reward, call_reward_lenient, reward_name
from grao.sampling import sample_shared
from grao.sampling import supported as supported_for_sharing
from grao.trainer.config import TrainConfig
from grao.trainer.model import maybe_autocast

logger = logging.getLogger("grao")


@dataclass
class Rollout:
    """One step's samples. Lists are per prompt; token lists exclude padding."""

    records: list[dict]
    prompt_texts: list[str]
    prompt_ids: list[list[int]]  # [P]
    sample_ids: list[list[list[int]]]  # [P][G] generated tokens up to and including EOS
    sample_texts: list[list[str]]  # [P][G]
    reference_ids: list[list[int]]  # [P] reference tokens + EOS
    rewards: torch.Tensor  # [P, G+1] float32: R(o_i, y) then R(y, y); NaN rows for dropped groups
    gen_seconds: float = 0.0
    keep: list[bool] | None = None  # [P] False: the group's rewards were invalid (on_reward_error="drop_group")
    reward_errors: list[str] = dataclasses.field(default_factory=list)
    prompts_truncated: int = 0  # prompts of this rollout cut to max_prompt_length (all of them, also in kept())
    extras: dict = dataclasses.field(default_factory=dict)  # a method's per-rollout constants (PPO: old log-probs)

    def kept(self) -> Rollout:
        """The rollout restricted to the groups with valid rewards."""
        if self.keep is None or all(self.keep):
            return self
        idx = [i for i, k in enumerate(self.keep) if k]
        pick = lambda xs: [xs[i] for i in idx]
        return Rollout(pick(self.records), pick(self.prompt_texts), pick(self.prompt_ids), pick(self.sample_ids),
                       pick(self.sample_texts), pick(self.reference_ids), self.rewards[idx], self.gen_seconds,
                       prompts_truncated=self.prompts_truncated)


def prompt_seed(seed: int, step: int, index: int) -> int:
    """Sampling seed of the prompt at position ``index`` of step ``step``'s global batch (not of a rank)."""
    digest = hashlib.blake2b(f"grao:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PromptLengthError(DataError):
    """A prompt that, with ``max_new_tokens`` generated after it, needs more positions than the model has."""


def model_positions(model) -> int | None:
    """The model's ``config.max_position_embeddings``, or None when its config has no such positive int."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


class RolloutEngine:
    """Sampling and scoring for one policy.

    Args:
        model: the policy (``generate`` runs on it, never on a data-parallel wrapper).
        tokenizer, config, reward_fn, device: as in the trainer.
        autocast_dtype: bf16 autocast of ``generate``, or None.
        seeding: "batch" (one ``generate`` call, global RNG) or "prompt" (:func:`prompt_seed` per prompt).
        gather_params: FSDP: a context manager factory that keeps every unit gathered during a rollout.
    """

    def __init__(self, model, tokenizer, config: TrainConfig, reward_fn: Callable, device: torch.device, *,
                 autocast_dtype=None, seeding: str = "batch", gather_params: Callable | None = None):
        self.model, self.tokenizer, self.config, self.reward_fn = model, tokenizer, config, reward_fn
        self.device, self.autocast_dtype, self.seeding = device, autocast_dtype, seeding
        self.gather_params = gather_params
        self._gathered = False
        self._fallback_noted = False
        self._cut_warned = False  # the one warning about prompts cut to max_prompt_length was given

    def encode_prompts(self, texts: list[str], conversational: list[bool], *, indices: list[int] | None = None,
                       model=None, name: str = "data") -> list[list[int]]:
        """Token ids of rendered prompts, checked and cut as :meth:`encode_checked` does."""
        return self.encode_checked(texts, conversational, indices=indices, model=model, name=name)[0]

    def encode_checked(self, texts: list[str], conversational: list[bool], *, indices: list[int] | None = None,
                       model=None, name: str = "data") -> tuple[list[list[int]], int]:
        """(token ids [P], how many were cut) of rendered prompts. ``max_prompt_length`` 0 never cuts; N > 0
        keeps a longer prompt's last N tokens (warning once per engine). A prompt that with ``max_new_tokens``
        exceeds the positions of ``model`` (default the policy) raises :class:`PromptLengthError` naming
        ``indices[j]`` (the record's index in ``name``; without ``indices``, its position in ``texts``)."""
        limit, positions = self.config.max_prompt_length, model_positions(model or self.model)
        out, cut = [], 0
        for j, (text, conv) in enumerate(zip(texts, conversational, strict=True)):
            ids = self.tokenizer(text, add_special_tokens=not conv)["input_ids"]
            if not ids:
                raise ValueError(f"prompt {text!r:.60} encodes to no tokens")
            where = f"record {indices[j]} of {name}" if indices is not None else f"prompt {j} of the batch"
            self._check_fits(where, len(ids), positions)
            if limit and len(ids) > limit:
                if not self._cut_warned:
                    self._cut_warned = True
                    warnings.warn(f"max_prompt_length={limit}: the prompt of {where} has {len(ids)} tokens: cut "
                                  f"from the left, its first {len(ids) - limit} tokens dropped and its last {limit} "
                                  f"kept; in training each step's count of cut prompts is logged as prompts_truncated, without "
                                  f"a further warning", UserWarning, stacklevel=3)
                ids = ids[-limit:]
                cut += 1
            out.append(ids)
        return out, cut

    def _check_fits(self, where: str, n_tokens: int, positions: int | None) -> None:
        """Raise :class:`PromptLengthError` when ``n_tokens`` prompt tokens (after the max_prompt_length cut)
        plus ``max_new_tokens`` exceed ``positions`` (None: no check)."""
        limit, new = self.config.max_prompt_length, self.config.max_new_tokens
        kept = min(n_tokens, limit) if limit else n_tokens
        if positions is None or kept + new <= positions:
            return
        room = positions - new
        fix = (f"set --max-prompt-length N (at most {room}) to keep each prompt's last N tokens, or use a model "
               f"with more positions" if room >= 1 else
               f"set --max-new-tokens below {positions} to leave room for a prompt, or use a model with more positions")
        size = (f"its prompt is {n_tokens} tokens" if kept == n_tokens else
                f"its prompt of {n_tokens} tokens is cut to --max-prompt-length {limit}")
        raise PromptLengthError(f"{where}: {size}, and with --max-new-tokens {new} it needs {kept + new} positions, "
                                f"more than the model's {positions} (config.max_position_embeddings); {fix}")

    def check_records(self, records: list[dict], *, name: str = "data", model=None, warn: bool = True) -> int:
        """Before training: tokenise every record's prompt once and raise :class:`PromptLengthError` for the first
        that does not fit ``model`` (default the policy); returns how many ``max_prompt_length`` will cut (with
        one warning when ``warn``). Nothing to check (no cut, no known positions): returns 0 untokenised."""
        limit, positions = self.config.max_prompt_length, model_positions(model or self.model)
        if not limit and positions is None:
            return 0
        long, first = 0, None
        for start in range(0, len(records), 256):  # batched tokenizer calls; string and message prompts apart
            lengths: dict[int, int] = {}
            for conv in (False, True):
                picked = [i for i in range(start, min(start + 256, len(records)))
                          if (not isinstance(records[i]["prompt"], str)) == conv]
                if picked:
                    texts = [render_prompt(records[i]["prompt"], self.tokenizer) for i in picked]
                    encoded = self.tokenizer(texts, add_special_tokens=not conv)["input_ids"]
                    lengths.update(zip(picked, map(len, encoded)))
            for i in sorted(lengths):  # the first over-long record of the data is the one refused
                self._check_fits(f"record {i} of {name}", lengths[i], positions)
                if limit and lengths[i] > limit:
                    long += 1
                    first = first or (i, lengths[i])
        if long:
            self._cut_warned = True
            if warn:
                i, n = first
                warnings.warn(f"max_prompt_length={limit}: {long} of the {len(records)} prompts of {name} are longer "
                              f"and will be cut from the left (e.g. record {i}: its first {n - limit} of {n} tokens "
                              f"dropped, its last {limit} kept); in training each step's count is logged as "
                              f"prompts_truncated",
                              UserWarning, stacklevel=2)
        return long

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @contextlib.contextmanager
    def _policy_gathered(self, model):
        """FSDP: every unit of the policy gathered once for the duration (no collective per token, so ranks
        may make different numbers of ``generate`` calls)."""
        if self.gather_params is None or self._gathered or model not in (None, self.model):
            yield
            return
        self._gathered = True
        try:
            with self.gather_params():
                yield
        finally:
            self._gathered = False

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_samples: int, *, temperature: float | None = None,
                 model=None, seeds: list[int] | None = None) -> list[list[list[int]]]:
        """Sample ``num_samples`` completions per prompt -> [P][n] token lists, cut after the first EOS.

        Without ``seeds``: one batched ``generate`` call drawing from the global RNG. With ``seeds`` (one
        int per prompt): one call per prompt under ``torch.manual_seed(seed)`` in a forked RNG, so a
        prompt's samples depend on its seed only (not on the batch or the process it landed in).
        """
        with self._policy_gathered(model):
            if seeds is None:
                return self._generate(prompt_ids, num_samples, temperature, model or self.model)
            devices = [self.device] if self.device.type == "cuda" else []
            out = []
            for ids, seed in zip(prompt_ids, seeds, strict=True):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    out += self._generate([ids], num_samples, temperature, model or self.model)
            return out

    def _shared_engine(self, model, prompt_ids) -> bool:
        """Whether this call samples with :func:`grao.sampling.sample_shared` (else ``generate``, with one
        notice per engine when shared sampling was asked for but the model is not served)."""
        if not self.config.shared_sampling:
            return False
        why = supported_for_sharing(model, max(len(p) for p in prompt_ids) + self.config.max_new_tokens)
        if why is not None and not self._fallback_noted:
            self._fallback_noted = True
            logger.warning("shared-prompt sampling does not serve this model (%s): sampling with transformers "
                           "generate, which copies each prompt's keys and values G times", why)
        return why is None

    def _generate(self, prompt_ids, num_samples, temperature, model) -> list[list[list[int]]]:
        cfg, tok = self.config, self.tokenizer
        temperature = cfg.temperature if temperature is None else temperature
        if self._shared_engine(model, prompt_ids):
            with maybe_autocast(self.device, self.autocast_dtype):
                return sample_shared(model, prompt_ids, num_samples, max_new_tokens=cfg.max_new_tokens,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                     temperature=temperature, top_p=cfg.top_p, device=self.device,
                                     budget_bytes=cfg.sample_memory_mib * 2**20 or None,
                                     strict_budget=cfg.sample_memory_mib > 0, dtype=self.autocast_dtype)
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding for decoder-only generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        was_training = model.training
        model.eval()
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, num_return_sequences=num_samples,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        if self.gather_params is not None:  # parameters are gathered: no lock-step between ranks is needed
            kwargs["synced_gpus"] = False
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=cfg.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with maybe_autocast(self.device, self.autocast_dtype):
            out = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        model.train(was_training)
        new = out[:, width:].tolist()
        eos = tok.eos_token_id
        result: list[list[list[int]]] = []
        for i in range(len(prompt_ids)):
            group = []
            for row in new[i * num_samples:(i + 1) * num_samples]:
                cut = row.index(eos) + 1 if eos in row else len(row)
                group.append(row[:cut])  # rows that ended early are padded after their EOS
            result.append(group)
        return result

    def rollout(self, records: list[dict], *, step: int = 0, first_index: int = 0,
                record_indices: list[int] | None = None) -> Rollout:
        """Sample and score G completions for each record at step ``step`` (0-based: the steps done so far).
        ``first_index``: position of ``records[0]`` in the step's global batch (a rank's shard offset), which
        with ``seeding="prompt"`` picks the seeds. ``record_indices``: each record's index in the data, named
        by the error for a prompt too long for the model (:meth:`encode_checked`)."""
        cfg, tok = self.config, self.tokenizer
        conv = [not isinstance(r["prompt"], str) for r in records]
        texts = [render_prompt(r["prompt"], tok) for r in records]
        prompt_ids, truncated = self.encode_checked(texts, conv, indices=record_indices)
        seeds = None
        if self.seeding == "prompt":
            seeds = [prompt_seed(cfg.seed, step, first_index + j) for j in range(len(records))]
        t0 = time.perf_counter()
        samples = self.generate(prompt_ids, cfg.group_size, seeds=seeds)
        gen_seconds = time.perf_counter() - t0
        sample_texts = [[self.decode(s) for s in group] for group in samples]
        refs = [r["reference"] for r in records]
        ref_ids = [tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ref in refs]
        rewards, keep, errors = self.score_checked(records, texts, sample_texts, step=step)
        return Rollout(records, texts, prompt_ids, samples, sample_texts, ref_ids, rewards, gen_seconds,
                       keep=keep, reward_errors=errors, prompts_truncated=truncated)

    @staticmethod
    def _reward_inputs(records, prompt_texts, sample_texts) -> dict:
        prompts, completions, references = [], [], []
        columns: dict[str, list] = {k: [] for k in records[0] if k not in ("prompt", "reference")}
        for rec, text, group in zip(records, prompt_texts, sample_texts):
            for c in list(group) + [rec["reference"]]:
                prompts.append(text)
                completions.append(c)
                references.append(rec["reference"])
                for k in columns:
                    columns[k].append(rec.get(k))
        columns.pop("solution", None)
        return dict(prompts=prompts, completions=completions, references=references, **columns)

    def score(self, records: list[dict], prompt_texts: list[str], sample_texts: list[list[str]]) -> torch.Tensor:
        """rewards [P, G+1] float32: R(o_i, y) for each sample, then R(y, y), in one reward call.

        Raises :class:`grao.rewards.RewardError` naming the reward when it raises or returns a wrong
        length, None or a non-finite value."""
        G = len(sample_texts[0])
        values = call_reward(self.reward_fn, **self._reward_inputs(records, prompt_texts, sample_texts))
        return torch.tensor(values, dtype=torch.float32).view(len(records), G + 1)

    def score_checked(self, records, prompt_texts, sample_texts, *, step: int = 0
                      ) -> tuple[torch.Tensor, list[bool], list[str]]:
        """(rewards [P, G+1], keep [P], error messages) under ``on_reward_error``.

        "raise": :meth:`score`. "drop_group": one lenient call for the whole batch; if the call itself fails
        (raises, wrong length) each group is scored on its own to find the failing ones. A group with an
        invalid value (None / NaN / inf / not a number) or whose call failed gets NaN rewards and keep=False.
        """
        P, G = len(records), len(sample_texts[0])
        if self.config.on_reward_error == "raise":
            return self.score(records, prompt_texts, sample_texts), [True] * P, []
        errors: list[str] = []
        try:
            values = call_reward_lenient(self.reward_fn, **self._reward_inputs(records, prompt_texts, sample_texts))
            rewards = torch.tensor(values, dtype=torch.float32).view(P, G + 1)
        except RewardError as exc:
            errors.append(str(exc))
            rows = []
            for i in range(P):
                try:
                    rows.append(call_reward_lenient(self.reward_fn, **self._reward_inputs(
                        records[i:i + 1], prompt_texts[i:i + 1], sample_texts[i:i + 1])))
                except RewardError as exc_i:
                    errors.append(f"prompt {i}: {exc_i}")
                    rows.append([math.nan] * (G + 1))
            rewards = torch.tensor(rows, dtype=torch.float32)
        keep = torch.isfinite(rewards).all(-1)
        for i in (~keep).nonzero().flatten().tolist():
            if not any(e.startswith(f"prompt {i}:") for e in errors):
                errors.append(f"prompt {i}: reward {reward_name(self.reward_fn)!r} returned a None / non-finite / "
                              f"non-numeric value")
        rewards[~keep] = math.nan
        if errors:
            logger.warning("step %d: dropped %d of %d groups on reward errors: %s", step + 1,
                           int((~keep).sum()), P, "; ".join(errors[:3]))
        return rewards, keep.tolist(), errors

    @torch.no_grad()
    def evaluate(self, records: list[dict], *, model=None, temperature: float = 0.0) -> dict[str, Any]:
        """One completion per prompt (greedy by default); {"reward_mean", "rewards", "completions"}. Prompts are
        checked against ``model``'s positions and cut as in training (:meth:`encode_checked`)."""
        rewards, completions = [], []
        bs = self.config.eval_batch_size
        for start in range(0, len(records), bs):
            recs = records[start:start + bs]
            conv = [not isinstance(r["prompt"], str) for r in recs]
            texts = [render_prompt(r["prompt"], self.tokenizer) for r in recs]
            ids = self.encode_prompts(texts, conv, indices=list(range(start, start + len(recs))), model=model,
                                      name="the evaluated records")
            outs = self.generate(ids, 1, temperature=temperature, model=model)
            comp = [self.decode(g[0]) for g in outs]
            completions += comp
            cols = {k: [r.get(k) for r in recs] for k in recs[0] if k not in ("prompt", "reference", "solution")}
            rewards += call_reward(self.reward_fn, prompts=texts, completions=comp,
                                   references=[r["reference"] for r in recs], **cols)
        return {"reward_mean": sum(rewards) / len(rewards), "rewards": rewards, "completions": completions}
