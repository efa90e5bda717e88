"""Attention for the shared-prompt packed layout, plugged into Hugging Face models through the registry.

:func:`enable_prefix_sharing` switches a causal LM to ``grao_packed_<base>`` (e.g. ``grao_packed_sdpa``),
an attention function registered with ``transformers.AttentionInterface.register`` (and a mask function
with ``AttentionMaskInterface.register``): no per-model copy of modeling code. Without the
``grao_packing`` keyword a forward is exactly the base implementation (sampling, evaluation and the
unshared layout are unchanged). With ``grao_packing=PackedSegments`` (``grao.packing``) and
``attention_mask=None``, the mask is not built by transformers (see :func:`packed_forward_kwargs`)
and each packed group is served by two ``torch.nn.functional.scaled_dot_product_attention`` calls:

* its prompt queries, causal over the prompt keys (``is_causal=True``, no mask);
* its completion queries, in blocks of whole completions of about ``max(Lp, 512)`` tokens, each over
  ``[prompt keys; the block's keys]`` with an additive mask ``[Nb, Lp + Nb]``: every prompt key, plus
  earlier keys of the query's own completion (``PackedSegments.completion_blocks``).

Each query set attends to exactly the keys it would see in its own unshared row, so outputs match that
row's. Choice, measured here: FlexAttention (the block-mask route of Unsloth's shared-prefix GRPO) has no
backward on CPU in torch 2.13, and a two-part attention merged by log-sum-exp needs the log-sum-exp that
the public SDPA does not return; the split above is exact with the public SDPA on CPU and CUDA. Blocking
the completions keeps the work linear in the group's completion tokens: ``Nc * Lp + Nc * Nb`` scores
and masks of ``Nb x (Lp + Nb)``, where one mask over all completions would cost ``Nc x (Lp + Nc)``
(mostly masked-out work, quadratic in G); the prompt's keys are copied once per block, and a block is
at least as long as the prompt, so the copies add at most one key per completion token.

Supported: decoder-only models whose layers are all full attention and whose attention modules call
the interface with query/key/value after RoPE (Llama, Mistral, Qwen2, Qwen3 families; tested on tiny
configs of each). Refused with an error: other model types, recurrent / linear-attention / sliding-window
layer types (a sliding window is allowed when it is wider than every packed position), logit soft-capping
and attention sinks.

A group split into several micro-batches forwards its prompt once: :class:`PromptKV` keeps the prompt's
keys and values for the passes over its completions (each pass's row then starts with the prompt's last
token, its other prompt positions served from the cache).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

PREFIX = "grao_packed_"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
KWARG = "grao_packing"
SHARED_KWARG = "grao_shared_prompt"  # a grao.sampling.SharedPromptCache: shared-prompt sampling's attention


def _base_attention(name: str, module):
    """The base implementation's attention function (a model's own ``eager_attention_forward`` for eager)."""
    from transformers import AttentionInterface
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return AttentionInterface._global_mapping[name]


def _refuse_unsupported(module, packing, kwargs) -> None:
    window = kwargs.get("sliding_window")
    if window is not None and packing.max_position >= int(window):
        raise NotImplementedError(
            f"prefix sharing: {type(module).__name__} uses a sliding window of {window} tokens, and this packed "
            f"batch has positions up to {packing.max_position}; the packed layout serves full attention only. "
            f"Use prefix_sharing=False (--no-prefix-sharing) for this model or shorter sequences")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"prefix sharing: {type(module).__name__} passes {name}= to its attention "
                                      f"(soft-capping / attention sinks), which the packed attention does not "
                                      f"implement; use prefix_sharing=False (--no-prefix-sharing)")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(f"prefix sharing: {type(module).__name__} is not causal attention")


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over a packed batch ([1, H, N, d] queries; see the module docstring) -> ([1, N, H, d], None)."""
    shared = kwargs.get(SHARED_KWARG)
    if shared is not None:  # a decode / prefill step of shared-prompt sampling (grao.sampling)
        return shared.attention(module, query, key, value, scaling, **kwargs), None
    packing = kwargs.get(KWARG)
    base = module.config._attn_implementation.removeprefix(PREFIX)
    if packing is None:
        return _base_attention(base, module)(module, query, key, value, attention_mask, scaling=scaling,
                                             dropout=dropout, **kwargs)
    _refuse_unsupported(module, packing, kwargs)
    if query.shape[0] != 1 or query.shape[2] != packing.length:
        raise ValueError(f"prefix sharing: the packed forward expects one row of {packing.length} tokens, got "
                         f"queries of shape {list(query.shape)}")
    kv = packing.prompt_kv
    layer = getattr(module, "layer_idx", None)
    if kv is not None:
        if layer is None:
            raise NotImplementedError(f"prefix sharing: {type(module).__name__} has no layer_idx; a prompt "
                                      f"forwarded once for several passes needs one per attention layer")
        if kv.recording:
            kv.record(layer, key, value)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: query head h reads key/value head h // groups
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # split (not slices): the backward of a split is one concatenation, where each slice's backward would
    # zero-fill a full-length gradient and add it (measured: ~1/4 of a tiny model's packed backward on CPU)
    sizes = [seg.stop - seg.start for seg in packing.segments]
    pieces = []
    for index, (seg, q, k, v) in enumerate(zip(packing.segments, *(t.split(sizes, dim=2) for t in (query, key, value)))):
        m, nc = seg.prompt_stop - seg.start, seg.stop - seg.prompt_stop
        if nc == 0 and not seg.cached:
            pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling))
            continue
        q_prompt, q_completions = q.split([m, nc], dim=2)
        k_prompt, k_completions = k.split([m, nc], dim=2)
        v_prompt, v_completions = v.split([m, nc], dim=2)
        if seg.cached:  # the prompt's first positions come from an earlier forward (PromptKV)
            k_cached, v_cached = kv.get(layer)
            if groups > 1:
                k_cached, v_cached = k_cached.repeat_interleave(groups, dim=1), v_cached.repeat_interleave(groups, dim=1)
            k_prompt, v_prompt = torch.cat([k_cached, k_prompt], dim=2), torch.cat([v_cached, v_prompt], dim=2)
            pieces.append(F.scaled_dot_product_attention(q_prompt, k_prompt, v_prompt, dropout_p=dropout, scale=scaling,
                                                         attn_mask=packing.prompt_mask(index, query.dtype, query.device)))
        else:
            pieces.append(F.scaled_dot_product_attention(q_prompt, k_prompt, v_prompt, dropout_p=dropout,
                                                         is_causal=True, scale=scaling))
        blocks = packing.completion_blocks(index, query.dtype, query.device)
        block_sizes = [n for n, _ in blocks]
        for (_, mask), qb, kb, vb in zip(blocks, *(t.split(block_sizes, dim=2)
                                                    for t in (q_completions, k_completions, v_completions))):
            if len(blocks) > 1 or seg.cached:
                kb, vb = torch.cat([k_prompt, kb], dim=2), torch.cat([v_prompt, vb], dim=2)
            else:  # one block: the segment's keys as they are, no copy
                kb, vb = k, v
            pieces.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout,
                                                         scale=scaling))
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous(), None


class PromptKV:
    """A prompt's keys and values, per attention layer, from one forward, served to several passes over its
    completions (a group split into micro-batches forwards its prompt once, not once per pass).

    Protocol (``grao.trainer.forward.PolicyForward.prompt_kv``): a forward of the prompt's first ``length``
    tokens with ``PackedSegments.prompt_kv`` set records each layer's keys and values (after RoPE, before
    grouped-query repetition) while :attr:`recording`; then each of the ``passes`` completion passes calls
    :meth:`start_pass` and packs its rows with ``cached=length``. Passes before the last read detached copies
    that collect the gradients w.r.t. the prompt's keys and values; the last pass reads the recorded tensors
    themselves, and :meth:`backward` of its loss also sends the collected gradients into the prompt's forward,
    so one backward finishes the prompt (under DDP that backward is the one that reduces). The same idea as
    cascade / shared-prefix attention for inference, applied to training; the code is our own."""

    def __init__(self, length: int, passes: int):
        self.length, self.passes = int(length), int(passes)
        self.recording, self.served = True, 0
        self._recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self._recorded[layer] = (key, value)

    def start_pass(self) -> None:
        if not self._recorded:
            raise RuntimeError("PromptKV: no keys were recorded (the prompt forward did not run the packed attention)")
        if self.served >= self.passes:
            raise RuntimeError(f"PromptKV: pass {self.served + 1} started, {self.passes} planned")
        self.recording = False
        self.served += 1

    @property
    def last(self) -> bool:
        return self.served == self.passes

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last:
            return self._recorded[layer]
        if layer not in self._copies:
            self._copies[layer] = tuple(t.detach().requires_grad_(t.requires_grad) for t in self._recorded[layer])
        return self._copies[layer]

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate a pass's loss; the last pass's also carries the earlier passes' gradients w.r.t.
        the prompt's keys and values into the prompt forward, then lets go of it."""
        if not self.last:
            loss.backward()
            return
        outputs, grads = [loss], [None]
        for layer, copies in self._copies.items():
            for recorded, copy in zip(self._recorded[layer], copies):
                if copy.grad is not None:
                    outputs.append(recorded)
                    grads.append(copy.grad)
        torch.autograd.backward(outputs, grads)  # a checkpointed layer's recompute still reads the keys here
        self._recorded, self._copies = {}, {}


def check_supported(model) -> None:
    """Raise NotImplementedError naming what is unsupported when ``model`` cannot use the packed layout."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"prefix sharing supports the model types {SUPPORTED_MODEL_TYPES} (decoder-only, "
                                  f"full attention, RoPE from position ids); {type(model).__name__} is "
                                  f"model_type={kind!r}. Use prefix_sharing=False (--no-prefix-sharing)")
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if layer_types - {"full_attention"}:
        raise NotImplementedError(f"prefix sharing serves full-attention layers only; {type(model).__name__} has "
                                  f"layer types {sorted(layer_types)}. Use prefix_sharing=False (--no-prefix-sharing)")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("prefix sharing: attention logit soft-capping is not supported; "
                                  "use prefix_sharing=False (--no-prefix-sharing)")


def enable_prefix_sharing(model):
    """Switch ``model`` (a supported causal LM) to the packed attention wrapping its current implementation;
    idempotent. Forwards without the ``grao_packing`` keyword are unchanged. Returns the model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    check_supported(model)
    current = model.config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return model
    if current != "eager" and current not in AttentionInterface._global_mapping:
        raise NotImplementedError(f"prefix sharing wraps a registered attention implementation; the model uses "
                                  f"{current!r}")
    name = PREFIX + current
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, packed_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    return model


def prefix_sharing_enabled(model) -> bool:
    return str(model.config._attn_implementation or "").startswith(PREFIX)


def packed_forward_kwargs(packing, device) -> dict:
    """Keyword arguments for a backbone forward over a packed row: the packing structure for the attention
    function, and a 4-D placeholder ``attention_mask`` so that transformers does not build an [N, N] mask
    (a 4-D mask is taken as already prepared; the packed attention never reads it)."""
    return {KWARG: packing, "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)}
