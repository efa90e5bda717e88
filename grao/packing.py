"""The shared-prompt packed layout: one token row per group, ``[prompt, o_1, ..., o_G, y]``, no padding.

Today's padded layout forwards every (prompt, completion) row on its own, so a prompt of ``Lp`` tokens
with ``G + 1`` completions of ``Lc`` tokens costs ``(G + 1) (Lp + Lc)`` token positions. Packed, the
prompt is forwarded once: ``Lp + (G + 1) (Lc - 1)`` positions (a completion's last token predicts
nothing and no other token sees it, so it is not an input). Every completion sees the prompt and its
own earlier tokens only (``grao.packed_attention``), and its position ids continue from the prompt
length, so each completion token's hidden state is the one the unshared row would give it.

The idea is Prefix Grouper's (arXiv 2506.05433) and Unsloth's shared-prefix GRPO path (each completion
attends to the whole prompt and causally to itself); this layout adds GRAO's reference answer as one
more completion of the same prompt and feeds the loss padding-free (``grao_kernels``' ``cu_seqlens``).

:func:`pack_rows` turns (prompt, completion) rows into a :class:`PackedRows`: the packed ``input_ids`` and
``position_ids`` ``[1, N]``, the attention structure (:class:`PackedSegments`, handed to the attention
function), and, for the loss, ``source`` ``[M]`` (the packed position whose hidden state predicts each
completion token), ``labels`` ``[M]`` and ``cu_seqlens`` ``[R + 1]`` (row r's tokens are
``labels[cu_seqlens[r]:cu_seqlens[r + 1]]``). Consecutive rows with the same prompt share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Rows = list[tuple[list[int], list[int]]]


@dataclass
class Segment:
    """One packed group: its prompt at packed positions [start, prompt_stop), then the completion inputs
    up to ``stop``; ``inputs[k]`` is how many input tokens completion k has (its length - 1, 0 if empty)."""

    start: int
    prompt_stop: int
    stop: int
    inputs: tuple[int, ...]
    cached: int = 0  # prompt positions before ``start`` whose keys/values come from a PromptKV, not this row

    @property
    def prompt_len(self) -> int:
        """Prompt positions every completion attends to: the cached ones and those in this row."""
        return self.cached + self.prompt_stop - self.start


@dataclass
class PackedSegments:
    """What the packed attention function needs about the layout (``grao_packing=`` keyword of the forward).

    ``max_position`` is the largest position id (a sliding window wider than it changes nothing).
    Masks are built once per (segment, dtype, device) and reused by every layer (and by a gradient
    checkpointing recompute)."""

    segments: list[Segment]
    length: int
    max_position: int
    prompt_kv: object = None  # grao.packed_attention.PromptKV: records a prompt forward's keys, or serves them
    _masks: dict = field(default_factory=dict, repr=False)

    def prompt_mask(self, index: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Additive mask [m, cached + m] of segment ``index``'s m in-row prompt queries over [cached prompt
        keys; in-row prompt keys] (causal, aligned to the end); None when nothing is cached (plain causal)."""
        seg = self.segments[index]
        if seg.cached == 0:
            return None
        key = ("prompt", index, dtype, device)
        if key not in self._masks:
            m = seg.prompt_stop - seg.start
            cols = torch.arange(seg.cached + m, device=device)
            visible = cols[None, :] <= seg.cached + torch.arange(m, device=device)[:, None]
            self._masks[key] = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible,
                                                                                                 float("-inf"))
        return self._masks[key]

    def completion_blocks(self, index: int, dtype: torch.dtype, device: torch.device
                          ) -> list[tuple[int, torch.Tensor]]:
        """The completion queries of segment ``index`` cut into blocks of whole completions, as
        ``(tokens, mask)`` pairs in order: ``mask`` is the additive mask [tokens, Lp + tokens] of the block's
        queries over ``[prompt keys; the block's own keys]``: 0 where the key is a prompt token or an earlier
        (or the same) token of the query's own completion, -inf elsewhere.

        A block holds completions while it stays within ``max(Lp, BLOCK_TOKENS)`` tokens (one completion at
        least), so attention costs ``Nc * Lp + Nc * block`` per group rather than ``Nc * (Lp + Nc)``, and
        the keys of the prompt are copied once per block, at most about once per completion token."""
        key = (index, dtype, device)
        blocks = self._masks.get(key)
        if blocks is None:
            seg = self.segments[index]
            limit = max(seg.prompt_len, BLOCK_TOKENS)
            sizes: list[list[int]] = []
            for n in (n for n in seg.inputs if n > 0):
                if sizes and sum(sizes[-1]) + n <= limit:
                    sizes[-1].append(n)
                else:
                    sizes.append([n])
            blocks = [(sum(lens), _block_mask(lens, seg.prompt_len, dtype, device)) for lens in sizes]
            self._masks[key] = blocks
        return blocks


BLOCK_TOKENS = 512  # smallest completion block of the packed attention (PackedSegments.completion_blocks)


def _block_mask(lens: list[int], prompt_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [n, prompt_len + n] for completions of ``lens`` tokens packed after one prompt."""
    comp = torch.repeat_interleave(torch.arange(len(lens), device=device),
                                   torch.tensor(lens, dtype=torch.long, device=device))
    pos = torch.arange(comp.numel(), device=device)
    own = (comp[:, None] == comp[None, :]) & (pos[None, :] <= pos[:, None])
    visible = torch.cat([own.new_ones(comp.numel(), prompt_len), own], dim=1)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


@dataclass
class PackedRows:
    """Packed (prompt, completion) rows; see the module docstring."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    segments: PackedSegments
    source: torch.Tensor  # [M] packed position predicting each completion token
    labels: torch.Tensor  # [M] the completion tokens, row after row
    cu_seqlens: torch.Tensor  # [R + 1]
    num_rows: int

    def to(self, device) -> PackedRows:
        return PackedRows(self.input_ids.to(device), self.position_ids.to(device), self.segments,
                          self.source.to(device), self.labels.to(device), self.cu_seqlens.to(device), self.num_rows)

    @property
    def row_index(self) -> torch.Tensor:
        """[M]: the row of each completion token."""
        counts = self.cu_seqlens.diff()
        return torch.repeat_interleave(torch.arange(self.num_rows, device=counts.device), counts,
                                       output_size=self.labels.numel())


def pack_rows(rows: Rows, *, share_prompts: bool = True, cached: int = 0) -> PackedRows:
    """Pack (prompt, completion) rows; consecutive rows with equal prompts share one copy of it
    (``share_prompts=False``: every row keeps its own prompt, still padding-free).

    Every prompt needs at least one token (its last token's hidden state predicts the first completion
    token); completions may be empty (no token, no label). ``cached``: the first ``cached`` tokens of the
    prompt (one prompt for all rows) were forwarded earlier and their keys and values are served by a
    ``PromptKV`` (``grao.packed_attention``); only the rest of it is in the packed row, at its positions."""
    ids: list[int] = []
    pos: list[int] = []
    source: list[int] = []
    labels: list[int] = []
    cu = [0]
    segments: list[Segment] = []
    max_pos = 0
    i = 0
    while i < len(rows):
        prompt = list(rows[i][0])
        if not prompt:
            raise ValueError(f"rows[{i}]: the prompt is empty; a packed row needs at least one prompt token "
                             f"(its hidden state predicts the first completion token)")
        j = i + 1
        if share_prompts:
            while j < len(rows) and list(rows[j][0]) == prompt:
                j += 1
        if cached and (i > 0 or j < len(rows) or cached >= len(prompt)):
            raise ValueError(f"cached={cached}: every row must share one prompt longer than the cached part "
                             f"(rows[{i}] has a {len(prompt)}-token prompt, rows {i}..{j - 1} share it)")
        start = len(ids)
        ids += prompt[cached:]
        pos += range(cached, len(prompt))
        last = len(ids) - 1
        inputs = []
        for r in range(i, j):
            completion = list(rows[r][1])
            fed = completion[:-1]
            first = len(ids)
            ids += fed
            pos += range(len(prompt), len(prompt) + len(fed))
            if completion:
                source += [last, *range(first, first + len(fed))]
                labels += completion
            cu.append(len(labels))
            inputs.append(len(fed))
        max_pos = max(max_pos, len(prompt) - 1 + max(inputs))
        segments.append(Segment(start, start + len(prompt) - cached, len(ids), tuple(inputs), cached))
        i = j
    long = torch.long
    return PackedRows(
        input_ids=torch.tensor([ids], dtype=long), position_ids=torch.tensor([pos], dtype=long),
        segments=PackedSegments(segments, len(ids), max_pos), source=torch.tensor(source, dtype=long),
        labels=torch.tensor(labels, dtype=long), cu_seqlens=torch.tensor(cu, dtype=long), num_rows=len(rows))


def forwarded_tokens(rows: Rows, *, share_prompts: bool = True) -> int:
    """Token positions :func:`pack_rows` forwards for ``rows`` (the prompt once per run of equal prompts)."""
    total, prev = 0, None
    for prompt, completion in rows:
        if not (share_prompts and prev is not None and list(prompt) == prev):
            total += len(prompt)
            prev = list(prompt)
        total += max(len(completion) - 1, 0)
    return total


def unpack_token_values(values: torch.Tensor, packed: PackedRows, fill: float = 0.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values [M] (row after row) -> (padded [R, T] with ``fill`` after each row's end, mask [R, T]),
    T the longest completion; differentiable in ``values``."""
    counts = packed.cu_seqlens.diff()
    width = int(counts.max()) if counts.numel() else 0
    cols = torch.arange(width, device=values.device)
    mask = cols[None, :] < counts[:, None]
    out = values.new_full((packed.num_rows, width), fill)
    return out.masked_scatter(mask, values), mask
