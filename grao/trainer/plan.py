"""The micro-batch planner: which contiguous row ranges of a step go through one forward/backward pass.

A step's rows (the method's, ``grao.trainer.methods``) are cut into passes (:func:`plan_micro_batches`):
``micro_batch_rows`` rows when it is set, else whole groups packed while the tokens one pass forwards fit
``micro_batch_tokens`` (a group whose completions alone are over the budget is split into row ranges of up to
the budget's completion tokens), else the whole step. So memory stays flat as G and lengths grow without the
user sizing anything; whether a method's loss stays exact when a group is cut is the method's to say.

A split group forwards its prompt once for all its ranges (:class:`PromptSharing`, for methods whose
``shares_prompt_kv`` is set, with prefix sharing): the prompt's keys and values are kept and served to each
range's pass, whose backward sends their gradients back (``grao.packed_attention.PromptKV``). Where that is
not available (FSDP, or prefix sharing off) every range forwards the prompt again; packed, a range may then
hold as many completion tokens as the prompt has, so a long prompt costs one forward per prompt-length of
completions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from grao.packing import forwarded_tokens

if TYPE_CHECKING:
    from grao.trainer.config import TrainConfig
    from grao.trainer.forward import PolicyForward

Rows = list[tuple[list[int], list[int]]]
#: Contiguous [start, stop) row ranges, one forward/backward pass each.
Plan = list[tuple[int, int]]


class Batch(NamedTuple):
    """The rows a method trains on in one step and how the planner may cut them."""

    rows: Rows  #: (prompt ids, completion ids) per row, a group's rows contiguous
    unit: int  #: rows per group: kept in one pass while they fit
    splittable: bool  #: whether the loss stays exact when a group is cut (not a DPO pair)


def chunk_ranges(total: int, size: int) -> Plan:
    """[start, stop) spans of ``size`` items covering ``total`` (one span for size <= 0)."""
    size = total if size <= 0 else size
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def pass_tokens(rows: Rows, shared: bool) -> int:
    """Token positions one forward of ``rows`` costs: packed (each prompt once), or padded to the longest row."""
    if shared:
        return forwarded_tokens(rows)
    return len(rows) * max((len(p) + len(c) for p, c in rows), default=0)


def plan_micro_batches(config: TrainConfig, rows: Rows, unit: int, *, splittable: bool,
                       prompt_kv: bool = False) -> Plan:
    """Contiguous [start, stop) row ranges, one forward/backward pass each (see the module docstring).

    ``unit``: rows per group (kept together when they fit); ``splittable``: the loss stays exact when a
    group is cut (GRAO, GRPO, SFT rows; not a DPO pair); ``prompt_kv``: a split group forwards its prompt
    once (:func:`prompt_kv_passes`), so its ranges are held to the budget whatever the prompt's length.
    Under a token budget the passes are balanced: the plan is the greedy one under the smallest budget that
    needs no more passes than ``micro_batch_tokens`` does (no small leftover pass; the largest pass, which
    sets the peak memory, is as small as it can be)."""
    n, mb, budget = len(rows), int(config.micro_batch_rows), int(config.micro_batch_tokens)
    if n == 0:
        return []
    if mb > 0:
        return chunk_ranges(n, mb if splittable else max(1, mb // unit) * unit)
    if budget <= 0:
        return [(0, n)]
    shared = bool(config.prefix_sharing)
    cached = shared and prompt_kv

    def greedy(limit: int) -> Plan:
        return _greedy_plan(rows, unit, splittable, limit, shared, cached)

    plan = greedy(budget)
    lo, hi = 1, budget
    while lo < hi:
        mid = (lo + hi) // 2
        if len(greedy(mid)) <= len(plan):
            hi = mid
        else:
            lo = mid + 1
    balanced = greedy(lo)
    return balanced if len(balanced) == len(plan) else plan


class PromptSharing:
    """Per row range of a plan, the ``PromptKV`` its pass reads (None: the pass forwards its own prompts).

    Ranges inside a group that :func:`prompt_kv_passes` shares get one prompt forward per group, made
    when the group's first such range comes; :meth:`backward` back-propagates a pass's loss through it."""

    def __init__(self, forward: PolicyForward, plan: Plan, rows: Rows, unit: int):
        self.forward, self.rows, self.unit = forward, rows, unit
        self.passes = prompt_kv_passes(plan, rows, unit) if forward.can_share_prompt_kv else {}
        self.group, self.kv = None, None

    def for_range(self, start: int, stop: int):
        group = start // self.unit
        if group not in self.passes or (stop - 1) // self.unit != group:
            return None
        if self.group != group:
            self.group, self.kv = group, self.forward.prompt_kv(self.rows[start][0], self.passes[group])
        return self.kv

    @staticmethod
    def backward(kv, loss: torch.Tensor) -> None:
        if kv is not None:
            kv.backward(loss)
        else:
            loss.backward()


def prompt_kv_passes(plan: Plan, rows: Rows, unit: int) -> dict[int, int]:
    """{group: passes} for the groups whose rows ``plan`` splits into two or more ranges lying inside the
    group (a token-budget plan always does): such a group forwards its prompt once and serves its keys and
    values to those passes (``PolicyForward.prompt_kv``). Prompts of one token have nothing to share."""
    inside: dict[int, int] = {}
    for start, stop in plan:
        group = start // unit
        if (stop - 1) // unit == group:  # a whole group is one range: counted once, never shared
            inside[group] = inside.get(group, 0) + 1
    return {g: k for g, k in inside.items() if k > 1 and len(rows[g * unit][0]) > 1}


def _split_tokens(rows: Rows, shared: bool) -> int:
    """What a range of one group's rows is held to when the group is split: packed, its completion tokens
    only (its prompt is forwarded once for all ranges, or, without PromptSharing, again by every range:
    either way splitting cannot shrink that part); padded, the whole pass."""
    return pass_tokens(rows, shared) - (len(rows[0][0]) if shared and rows else 0)


def _greedy_plan(rows: Rows, unit: int, splittable: bool, budget: int, shared: bool,
                 cached: bool = False) -> Plan:
    """Whole groups while the pass fits ``budget`` tokens; a group whose completions alone are over it is
    split into row ranges (see :func:`_split_tokens`) of up to ``budget`` completion tokens when its prompt
    is forwarded once for them (``cached``), else of up to ``max(budget, prompt length)`` when packed:
    then every range forwards the prompt again, so ranges shorter than the prompt would multiply its
    forwards without lowering the peak much (measured at a 4096-token prompt, G = 8, 128-token completions,
    budget 1024: two passes instead of one, 63% slower, the same peak)."""
    n = len(rows)
    out, start = [], 0
    for u0 in range(0, n, unit):
        u1 = min(u0 + unit, n)
        if start < u0 and pass_tokens(rows[start:u1], shared) > budget:
            out.append((start, u0))
            start = u0
        limit = max(budget, len(rows[u0][0])) if shared and not cached else budget
        if splittable and _split_tokens(rows[u0:u1], shared) > limit:  # the group alone is over: split it
            if start < u0:
                out.append((start, u0))
            a = u0
            for r in range(u0 + 1, u1):
                if _split_tokens(rows[a:r + 1], shared) > limit:
                    out.append((a, r))
                    a = r
            out.append((a, u1))
            start = u1
    if start < n:
        out.append((start, n))
    return out
