"""Shared-prompt sampling: each prompt prefilled once, its G samples decoded against that one copy.

``transformers.generate(num_return_sequences=G)`` expands every prompt G times before the prefill: G
prefills and G copies of its keys and values. :func:`sample_shared` instead

* prefills each prompt once, in position chunks of a token budget (prompts of one batch right-padded
  together: with causal attention a valid position never sees a padded one);
* keeps one copy of each prompt's keys and values (:class:`SharedPromptCache`, a transformers ``Cache``),
  and a small buffer per sample for the tokens it generates;
* decodes the samples with an attention (served through the transformers attention registry, by the
  ``grao_packed_<base>`` wrapper of :mod:`grao.packed_attention`) that scores each query against the
  shared prompt keys and against its own keys, with one exact softmax over both (the two parts merged by
  their common maximum and summed normalisers). The G samples' queries of one prompt meet its keys in one
  matmul, ``[Hkv, G * groups, d] x [Hkv, d, Lp]``: the Hydragen / cascade-attention decomposition (Juravsky
  et al. 2024; FlashInfer), written here with plain torch ops. Nothing is copied or broadcast G-fold.

Prompts and samples are grouped into batches whose estimated memory (prompt caches, per-row buffers and
scores, logits, a prefill chunk's activations) fits ``budget_bytes`` (:func:`plan_batches`). A prompt whose
G samples do not fit at once is prefilled once and decoded in several row ranges.

Sampling semantics are transformers' own: logits in float32 (float64 models: float64),
``TemperatureLogitsWarper`` then ``TopPLogitsWarper``, ``torch.multinomial``; greedy is ``argmax``; a row
stops after its first EOS and is padded after it (finished rows keep being computed until every row of the batch is done, as in
``generate``). Other generation-config processors (repetition penalty, top-k) are not applied.

Served: the model types of the packed layout (Llama, Mistral, Qwen2, Qwen3) with full attention
(:func:`supported`); the trainer falls back to ``generate`` for others.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grao.packed_attention import SHARED_KWARG, check_supported, enable_prefix_sharing

DEFAULT_BUDGET_MIB = 2048
MIN_CHUNK, MAX_CHUNK = 16, 8192  # prompt positions per prefill forward


class SamplingBudgetError(ValueError):
    """A sampling batch cannot fit the memory budget (``sample_memory_mib``)."""


def _unwrapped(model):
    """A PEFT model's base model (its adapters live inside that model's modules), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def supported(model, max_length: int) -> str | None:
    """None when :func:`sample_shared` serves ``model`` for sequences up to ``max_length`` tokens, else why not."""
    from grao.trainer.model import lm_parts

    model = _unwrapped(model)
    try:
        check_supported(model)
        lm_parts(model)
    except (NotImplementedError, TypeError) as exc:
        return str(exc).split(". Use")[0]
    window = getattr(model.config, "sliding_window", None)
    if window is not None and getattr(model.config, "use_sliding_window", True) and max_length > int(window):
        return f"{type(model).__name__} has a sliding window of {window} tokens, shorter than {max_length}"
    return None


# ------------------------------------------------------------------------------------------- the cache


class SharedPromptCache:
    """Keys and values of one sampling batch: ``n`` prompts (one copy each, right-padded to the longest) and
    ``n * g`` sample rows (prompt ``i`` owns rows ``i*g .. i*g+g-1``), per attention layer.

    Filled in two phases. ``prefill``: :meth:`update` writes a chunk of prompt positions ``[start, start+c)``.
    ``decode``: :meth:`update` writes each row's newest token at position :attr:`step` of its own buffer. The
    attention reads what it needs from here (:meth:`attention`); the model's ``update`` call returns the
    given keys unchanged."""

    def __init__(self, lengths: list[int], *, max_new_tokens: int):
        self.lengths = list(lengths)
        self.n, self.width, self.max_new_tokens = len(lengths), max(lengths), int(max_new_tokens)
        self.prompt_k: dict[int, torch.Tensor] = {}
        self.prompt_v: dict[int, torch.Tensor] = {}
        self.own_k: dict[int, torch.Tensor] = {}
        self.own_v: dict[int, torch.Tensor] = {}
        self.mode, self.start, self.step, self.g = "prefill", 0, 0, 0
        self._key_mask: torch.Tensor | None = None

    # -- the transformers Cache protocol (duck-typed: the models call update() and nothing else when the
    #    position ids and a prepared 4-D mask are given)
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.mode == "prefill":
            if layer_idx not in self.prompt_k:
                shape = (self.n, key.shape[1], self.width, key.shape[3])
                self.prompt_k[layer_idx] = key.new_empty(shape)
                self.prompt_v[layer_idx] = value.new_empty(shape)
            stop = self.start + key.shape[2]
            self.prompt_k[layer_idx][:, :, self.start:stop] = key
            self.prompt_v[layer_idx][:, :, self.start:stop] = value
        else:
            if layer_idx not in self.own_k:
                shape = (key.shape[0], key.shape[1], self.max_new_tokens, key.shape[3])
                self.own_k[layer_idx] = key.new_empty(shape)
                self.own_v[layer_idx] = value.new_empty(shape)
            self.own_k[layer_idx][:, :, self.step:self.step + 1] = key
            self.own_v[layer_idx][:, :, self.step:self.step + 1] = value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width + self.step if self.mode == "decode" else self.start

    def start_decode(self, rows_per_prompt: int) -> None:
        """Switch to decoding ``rows_per_prompt`` samples per prompt (fresh per-row buffers; the prompts'
        keys and values stay, so one prefill can serve several row ranges)."""
        self.mode, self.step, self.g = "decode", 0, int(rows_per_prompt)
        self.own_k, self.own_v = {}, {}

    def key_mask(self, device) -> torch.Tensor:
        """[n, 1, 1, width] bool: True at each prompt's real (not padded) positions."""
        if self._key_mask is None:
            lengths = torch.tensor(self.lengths, device=device)
            self._key_mask = (torch.arange(self.width, device=device) < lengths[:, None]).view(self.n, 1, 1, -1)
        return self._key_mask

    # -- the attention, called by the registered wrapper with the module's query / key / value
    def attention(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                  **kwargs) -> torch.Tensor:
        """Attention output [B, q_len, H, d] for this batch's phase (see the module docstring)."""
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise NotImplementedError(f"shared-prompt sampling: {type(module).__name__} uses soft-capping or "
                                      f"attention sinks, which it does not implement")
        layer = module.layer_idx
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.mode == "prefill":
            return self._prefill_attention(layer, query, scale)
        return self._decode_attention(layer, query, scale)

    def _prefill_attention(self, layer, query, scale):
        c = query.shape[2]
        stop = self.start + c
        k, v = self.prompt_k[layer][:, :, :stop], self.prompt_v[layer][:, :, :stop]
        gqa = query.shape[1] != k.shape[1]
        if self.start == 0:
            out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:  # chunk queries see every earlier prompt position and the chunk causally
            pos = torch.arange(stop, device=query.device)
            mask = pos[None, :] <= pos[self.start:, None]
            out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)

    def _decode_attention(self, layer, query, scale):
        n, g = self.n, self.g
        B, H, _, d = query.shape
        kp, vp = self.prompt_k[layer], self.prompt_v[layer]
        hkv = kp.shape[1]
        grp = H // hkv
        t = self.step + 1
        ko, vo = self.own_k[layer][:, :, :t], self.own_v[layer][:, :, :t]
        low = query.dtype in (torch.float16, torch.bfloat16)
        # the prompt part: prompt i's g*grp queries per kv head against its keys, in one matmul per prompt
        qp = query.view(n, g, hkv, grp, d).transpose(1, 2).reshape(n, hkv, g * grp, d)
        sp = torch.matmul(qp, kp.transpose(-1, -2))  # [n, hkv, g*grp, width]
        sp = (sp.float() if low else sp).mul_(scale).masked_fill_(~self.key_mask(query.device), -math.inf)
        # the sample's own part: each row's queries against its own keys
        qo = query.view(B, hkv, grp, d)
        so = torch.matmul(qo, ko.transpose(-1, -2))  # [B, hkv, grp, t]
        so = (so.float() if low else so).mul_(scale)
        # one softmax over both parts: a common maximum, exponentials, the summed normaliser
        sp5 = sp.view(n, hkv, g, grp, -1)
        so5 = so.view(n, g, hkv, grp, t).transpose(1, 2)  # [n, hkv, g, grp, t] (a view)
        top = torch.maximum(sp5.amax(-1), so5.amax(-1)).unsqueeze(-1)
        sp5.sub_(top).exp_()
        eo = (so5 - top).exp()
        denom = sp5.sum(-1) + eo.sum(-1)  # [n, hkv, g, grp]
        out_p = torch.matmul(sp.to(vp.dtype), vp)  # [n, hkv, g*grp, d]
        out_o = torch.matmul(eo.transpose(1, 2).reshape(B, hkv, grp, t).to(vo.dtype), vo)  # [B, hkv, grp, d]
        out_p = out_p.view(n, hkv, g, grp, d).transpose(1, 2).reshape(B, hkv, grp, d)
        if low:  # sum and normalise in float32, as the softmax was
            out_p, out_o = out_p.float(), out_o.float()
        out = (out_p + out_o) / denom.transpose(1, 2).reshape(B, hkv, grp, 1)
        return out.to(query.dtype).reshape(B, 1, H, d)


# ------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know of a model."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    elem: int  # bytes per activation / key element

    @staticmethod
    def of(model, dtype: torch.dtype) -> ModelShape:
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return ModelShape(c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", None) or heads, head_dim,
                          c.hidden_size, getattr(c, "intermediate_size", 4 * c.hidden_size), c.vocab_size,
                          torch.empty((), dtype=dtype).element_size())

    def kv_bytes(self, tokens: int) -> int:
        """Keys and values of ``tokens`` positions, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.elem * tokens

    def row_bytes(self, width: int, max_new_tokens: int) -> int:
        """One decode row: its own keys and values, its attention scores over the prompt (fp32, about three
        live copies), its logits and probabilities (fp32), and a layer's activations."""
        return (self.kv_bytes(max_new_tokens) + 3 * 4 * self.heads * (width + max_new_tokens) + 4 * 4 * self.vocab
                + 4 * self.elem * (3 * self.hidden + 2 * self.intermediate))

    def chunk_token_bytes(self, width: int) -> int:
        """One prefill position: a layer's activations, and its row of the attention mask and scores."""
        return 6 * self.elem * (self.hidden + self.intermediate) + width * (1 + 4 * self.heads)


@dataclass(frozen=True)
class Batch:
    """Prompts sampled together: their indices, and the range of sample numbers decoded in each pass."""

    prompts: tuple[int, ...]
    row_ranges: tuple[tuple[int, int], ...]  # (first, stop) sample numbers, one range per decode pass
    chunk_tokens: int  # prompt positions per prefill forward, over the batch's prompts


def plan_batches(lengths: list[int], num_samples: int, max_new_tokens: int, shape: ModelShape,
                 budget_bytes: int, *, strict: bool) -> list[Batch]:
    """Group prompts (longest first) into batches that fit ``budget_bytes``; a prompt whose samples do not all
    fit is decoded in several row ranges. ``strict``: raise :class:`SamplingBudgetError` when one prompt with
    one row does not fit (else such a prompt is sampled alone, one row per pass, over the budget)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, i = [], 0
    while i < len(order):
        width = lengths[order[i]]
        row, kv = shape.row_bytes(width, max_new_tokens), shape.kv_bytes(width)
        reserve = MIN_CHUNK * shape.chunk_token_bytes(width)  # the smallest prefill chunk
        per_prompt = kv + num_samples * row
        n = 1
        while i + n < len(order) and (n + 1) * per_prompt + reserve <= budget_bytes:
            n += 1
        rows = num_samples
        if n == 1 and per_prompt + reserve > budget_bytes:  # one prompt, its samples in row ranges
            rows = (budget_bytes - kv - reserve) // row
            if rows < 1:
                if strict:
                    need = kv + row + reserve
                    raise SamplingBudgetError(
                        f"sampling a {width}-token prompt needs about {math.ceil(need / 2**20)} MiB (its keys and "
                        f"values and one sample), more than sample_memory_mib={budget_bytes // 2**20}: raise "
                        f"--sample-memory-mib, or shorten prompts with --max-prompt-length")
                rows = 1
            rows = min(rows, num_samples)
        ranges = tuple((s, min(s + rows, num_samples)) for s in range(0, num_samples, rows))
        spare = budget_bytes - n * (kv + rows * row)
        chunk = int(min(MAX_CHUNK, max(MIN_CHUNK, spare // shape.chunk_token_bytes(width))))
        # within a batch the prompts keep their order: one batch then draws the samples generate would
        batches.append(Batch(tuple(sorted(order[i:i + n])), ranges, chunk))
        i += n
    return batches


# ------------------------------------------------------------------------------------------- the loop


def _cache_keyword(backbone) -> str:
    """The backbone's name for its cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def sample_shared(model, prompt_ids: list[list[int]], num_samples: int, *, max_new_tokens: int, eos_token_id: int,
                  pad_token_id: int, temperature: float, top_p: float = 1.0, budget_bytes: int | None = None,
                  strict_budget: bool = False, device=None, dtype: torch.dtype | None = None,
                  on_logits: Callable[[Batch, tuple[int, int], int, torch.Tensor], None] | None = None
                  ) -> list[list[list[int]]]:
    """``num_samples`` completions per prompt -> [P][n] token lists, each cut after its first EOS.

    ``temperature`` 0 is greedy. ``budget_bytes``: the memory a batch may hold beyond the weights (default
    :data:`DEFAULT_BUDGET_MIB`); ``strict_budget``: refuse a prompt that cannot fit it. ``dtype``: the
    activations' dtype (an autocast dtype) for the estimate. ``on_logits(batch, rows, step, logits)``: called
    with each decode step's float32 next-token logits (tests compare them with an unshared forward)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    from grao.trainer.model import lm_parts

    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample_shared: every prompt needs at least one token")
    model = _unwrapped(model)
    backbone, head = lm_parts(model)
    enable_prefix_sharing(model)  # the registered wrapper serves SHARED_KWARG; idempotent
    device = device or next(model.parameters()).device
    shape = ModelShape.of(model, dtype or next(model.parameters()).dtype)
    budget = budget_bytes if budget_bytes is not None else DEFAULT_BUDGET_MIB * 2**20
    lengths = [len(p) for p in prompt_ids]
    plan = plan_batches(lengths, num_samples, max_new_tokens, shape, budget, strict=strict_budget)
    cache_kw = _cache_keyword(backbone)
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # a prepared 4-D mask: none is built
    warpers = []
    if temperature > 0:
        warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))

    run = getattr(model, "grao_backbone_forward", None) or backbone  # FSDP: through the root's hooks

    def forward(cache, ids, positions):
        out = run(input_ids=ids, position_ids=positions, attention_mask=placeholder, use_cache=True,
                       **{cache_kw: cache, SHARED_KWARG: cache})
        return out.last_hidden_state

    def pick(logits, ids):
        if temperature <= 0:
            return logits.argmax(-1)
        for w in warpers:
            logits = w(ids, logits)
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(1)

    was_training = model.training
    model.eval()
    result: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in prompt_ids]
    try:
        for batch in plan:
            prompts = [prompt_ids[i] for i in batch.prompts]
            cache = SharedPromptCache([len(p) for p in prompts], max_new_tokens=max_new_tokens)
            last = _prefill(forward, head, cache, prompts, batch.chunk_tokens, pad_token_id, device)  # [n, V]
            for first, stop in batch.row_ranges:
                g = stop - first
                cache.start_decode(g)
                tokens = _decode(forward, head, cache, last, g, pick, max_new_tokens, eos_token_id, pad_token_id,
                                 device, None if on_logits is None else
                                 (lambda step, lg, b=batch, rows=(first, stop): on_logits(b, rows, step, lg)))
                for j, prompt in enumerate(batch.prompts):
                    for r in range(g):
                        result[prompt][first + r] = tokens[j * g + r]
            del cache
    finally:
        model.train(was_training)
    return result


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits for sampling: float32, as ``generate`` takes them (float64 stays float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _prefill(forward, head, cache: SharedPromptCache, prompts, chunk_tokens: int, pad_id: int, device):
    """Forward the batch's prompts (right-padded) in position chunks; -> float32 logits [n, V] at each prompt's
    last position."""
    n, width = cache.n, cache.width
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    ids = ids.to(device)
    lengths = torch.tensor(cache.lengths, device=device)
    step = max(1, chunk_tokens // n)
    last = None
    for start in range(0, width, step):
        stop = min(start + step, width)
        cache.start = start
        positions = torch.arange(start, stop, device=device).expand(n, -1)
        hidden = forward(cache, ids[:, start:stop], positions)
        ends = lengths - 1
        inside = (ends >= start) & (ends < stop)
        if inside.any():
            rows = inside.nonzero().flatten()
            h = hidden[rows, ends[rows] - start]
            logits = _wide(head(h))
            if last is None:
                last = logits.new_empty(n, logits.shape[-1])
            last[rows] = logits
    cache.start = width
    return last


def _decode(forward, head, cache: SharedPromptCache, last, g: int, pick, max_new_tokens: int, eos: int, pad: int,
            device, on_logits) -> list[list[int]]:
    """Decode ``g`` rows per prompt from the prompts' last logits; -> one token list per row (cut after EOS)."""
    n = cache.n
    B = n * g
    positions = torch.tensor(cache.lengths, device=device).repeat_interleave(g).view(B, 1)
    logits = last.repeat_interleave(g, dim=0)  # [B, V]: g rows per prompt (a few KB per row, not the prompt)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        if on_logits is not None:
            on_logits(step, logits)
        token = pick(logits, out[:, :step])
        token = torch.where(done, torch.full_like(token, pad), token)
        out[:, step] = token
        done |= token == eos
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        cache.step = step
        hidden = forward(cache, token.view(B, 1), positions + step)
        logits = _wide(head(hidden[:, -1]))
    rows = out.tolist()
    return [row[:row.index(eos) + 1] if eos in row else row[:max_new_tokens] for row in rows]
