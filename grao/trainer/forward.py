"""The policy's forward for the losses: (prompt, completion) rows -> last hidden states, lm_head weight, labels.

:class:`PolicyForward` is the only place the update calls a model. With prefix sharing (the default of
``grao train``) it packs the rows, each prompt once followed by its completions (``grao.packing``), and
returns padding-free hidden states of the completion tokens with ``cu_seqlens``; otherwise it pads the
rows. It runs the backbone under the step's autocast, and goes through the data-parallel wrapper when there is
one (DDP: ``no_sync`` on every pass of an update but the rank's last; FSDP2: the root's registered
forward method). Ranks must agree on the collectives, so an update declares its passes up front
(:meth:`PolicyForward.update`) and a rank with fewer passes than planned adds zero-loss ones.

:class:`LossBackend` is the choice between the fused ops of ``grao_kernels`` (never [tokens x vocab]
logits) and the eager reference that materialises them.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from grao.packed_attention import PromptKV, enable_prefix_sharing, packed_forward_kwargs
from grao.packing import PackedRows, pack_rows, unpack_token_values
from grao.reference import linear_grao_loss, linear_logits, linear_logprob_dot, token_logprobs
from grao.trainer.model import lm_parts, maybe_autocast

IGNORE_INDEX = -100


def _fused_module():
    try:
        import grao_kernels
        return grao_kernels if hasattr(grao_kernels, "fused_linear_grao_loss") else None
    except Exception:  # noqa: BLE001 - a half-built grao_kernels must not break the eager path
        return None


def resolve_loss_impl(loss_impl: str) -> str:
    """"fused" or "eager"; "auto" picks fused when ``grao_kernels`` imports."""
    if loss_impl == "eager":
        return "eager"
    mod = _fused_module()
    if mod is None:
        if loss_impl == "fused":
            raise ImportError("loss_impl='fused' needs grao_kernels (fused_linear_grao_loss, linear_logprob); "
                              "it did not import. Use loss_impl='eager' or 'auto'.")
        warnings.warn("grao_kernels is not importable: falling back to the eager loss (full logits)", stacklevel=2)
        return "eager"
    return "fused"


class LossBackend:
    """The per-chunk primitives every method needs, fused (no [.., V] logits) or eager."""

    def __init__(self, impl: str):
        self.impl = impl
        if impl == "fused":
            mod = _fused_module()
            self._grao, self._logprob = mod.fused_linear_grao_loss, mod.linear_logprob
            self._dot = mod.fused_linear_logprob_dot
        else:
            self._grao, self._logprob, self._dot = linear_grao_loss, None, linear_logprob_dot

    def grao(self, hidden, weight, labels, rewards, *, bias, temperature, beta, lam, eps, reference_in_stats,
             cu_seqlens=None):
        """The GRAO loss on padded ([B, T]) or, with ``cu_seqlens``, token-packed ([N]) labels."""
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        return self._grao(hidden, weight, labels, rewards, beta=beta, lam=lam, eps=eps, bias=bias,
                          temperature=temperature, reference_in_stats=reference_in_stats, **packed)

    def logprob_dot(self, hidden, weight, labels, coef, *, bias, temperature) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum(coef * logp), logp detached) for per-token coefficients known before the forward; fused, the
        input gradients come from the same pass (6·N·D·V, where log-probs then a backward cost 8·N·D·V)."""
        return self._dot(hidden, weight, labels, coef, bias=bias, temperature=temperature)

    def logprob(self, hidden, weight, labels, *, bias, temperature) -> torch.Tensor:
        """Per-token log-probs shaped like labels ([B, T] or token-packed [N]; fp32), 0 at ignored positions."""
        if self._logprob is not None:
            return self._logprob(hidden, weight, labels, bias=bias, temperature=temperature)
        return token_logprobs(linear_logits(hidden, weight, bias, temperature), labels)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, ignore_index: int = IGNORE_INDEX
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [N, L], attention_mask [N, L], labels [N, L]) from (prompt, completion) rows.

    labels are already shifted: labels[:, t] is the token that the hidden state at t predicts when it is a
    completion token, else ignore_index; the last column is always ignore_index.
    """
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), ignore_index, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = list(p) + list(c)
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
        if c:
            labels[i, len(p) - 1:len(seq) - 1] = torch.tensor(c, dtype=torch.long)
    return ids, mask, labels


class PolicyForward:
    """Hidden states and per-token log-probs of (prompt, completion) rows for the policy (through its
    DDP / FSDP wrapper when there is one) or for another model (a frozen DPO / KL reference).

    Args:
        model: the causal LM (FSDP2-sharded in place when ``fsdp``).
        pad_id: the tokenizer's pad token id. device: where the rows go.
        autocast_dtype: bf16 autocast of the forward, or None.
        backend: the loss primitives (:class:`LossBackend`). loss_temperature: logits / this.
        ddp: the ``DistributedDataParallel(HiddenAndHead(model))`` wrapper, or None.
        fsdp: the model is FSDP2-sharded (``grao.trainer.distributed.fsdp_shard``).
        prefix_sharing: forward each prompt once for all its rows (``grao.packing``); the model (and any
            other model given to the methods) is switched to the packed attention, which refuses
            unsupported architectures (``grao.packed_attention``).
    """

    def __init__(self, model, *, pad_id: int, device: torch.device, autocast_dtype, backend: LossBackend,
                 loss_temperature: float = 1.0, ddp=None, fsdp: bool = False, prefix_sharing: bool = False):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.prefix_sharing = bool(prefix_sharing)
        if self.prefix_sharing:
            enable_prefix_sharing(model)
        self.autocast_dtype, self.backend, self.loss_temperature = autocast_dtype, backend, loss_temperature
        self.ddp, self.fsdp = ddp, fsdp
        self.backbone, self.head = lm_parts(model)
        self.passes = 0  # policy passes with gradient made in the current update
        self.planned: int | None = None  # passes the current update makes (None: outside an update)

    @contextlib.contextmanager
    def update(self, planned: int):
        """The policy passes of one update, agreed on before the first: DDP reduces the gradients in the
        backward of pass ``planned`` (the earlier ones run under ``no_sync``); under FSDP every rank makes
        ``planned`` passes, each with its collectives. Missing passes are made with zero loss at the end."""
        self.passes, self.planned = 0, int(planned)
        try:
            yield
            while self.passes < self.planned:  # a rank with fewer micro-batches, or none kept
                hidden, weight, bias, _ = self.hidden_states([([self.pad_id], [self.pad_id])])
                zero = hidden.sum() * 0.0 + weight.sum() * 0.0 + (bias.sum() * 0.0 if bias is not None else 0.0)
                zero.backward()
        finally:
            self.planned = None

    def _count_pass(self) -> bool:
        """Count one policy pass with gradient; True when it is the update's last (DDP reduces in its backward)."""
        if self.planned is not None and self.passes >= self.planned:
            raise RuntimeError(f"data parallel update: pass {self.passes + 1} made, {self.planned} planned")
        self.passes += 1
        return self.planned is None or self.passes == self.planned

    def hidden_states(self, rows: list[tuple[list[int], list[int]]], model=None):
        """(hidden [N, L, D], weight [V, D], bias or None, labels [N, L]) for (prompt, completion) rows, padded."""
        ids, mask, labels = (t.to(self.device) for t in pad_rows(rows, self.pad_id))
        hidden, weight, bias = self._run(model or self.model, ids, mask)
        return hidden, weight, bias, labels

    @property
    def can_share_prompt_kv(self) -> bool:
        """Whether a group split into passes can forward its prompt once (:meth:`prompt_kv`): prefix sharing
        on, and not FSDP (its hooks gather parameters around each root forward and backward)."""
        return self.prefix_sharing and not self.fsdp

    def prompt_kv(self, prompt: list[int], passes: int) -> PromptKV:
        """Forward the policy on ``prompt`` without its last token, with gradient, keeping every layer's keys
        and values for the ``passes`` passes over its completions that follow (``prompt_kv=`` of
        :meth:`logprob_dot`; each one's backward through ``PromptKV.backward``). Not a counted pass: its
        backward is the last completion pass's."""
        kv = PromptKV(len(prompt) - 1, passes)
        packed = pack_rows([(list(prompt[:-1]), [])]).to(self.device)
        packed.segments.prompt_kv = kv
        kwargs = packed_forward_kwargs(packed.segments, self.device)
        with maybe_autocast(self.device, self.autocast_dtype):
            self.backbone(input_ids=packed.input_ids, attention_mask=kwargs.pop("attention_mask"), use_cache=False,
                          position_ids=packed.position_ids, **kwargs)
        return kv

    def packed_hidden_states(self, rows: list[tuple[list[int], list[int]]], model=None, prompt_kv=None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, PackedRows]:
        """(hidden [M, D], weight [V, D], bias or None, labels [M], packed) for the M completion tokens of
        ``rows``, padding-free: consecutive rows with the same prompt forward it once; hidden[m] is the state
        that predicts labels[m]; ``packed.cu_seqlens`` [R + 1] delimits the rows. With ``prompt_kv`` (rows of
        one prompt, :meth:`prompt_kv`) only the prompt's last token is forwarded again."""
        model = model or self.model
        enable_prefix_sharing(model)  # idempotent: a no-op for the policy, set up in __init__
        packed = pack_rows(rows, cached=prompt_kv.length if prompt_kv is not None else 0).to(self.device)
        if prompt_kv is not None:
            prompt_kv.start_pass()
            packed.segments.prompt_kv = prompt_kv
        kwargs = packed_forward_kwargs(packed.segments, self.device)
        hidden, weight, bias = self._run(model, packed.input_ids, kwargs.pop("attention_mask"),
                                         position_ids=packed.position_ids, **kwargs)
        return hidden[0].index_select(0, packed.source), weight, bias, packed.labels, packed

    def _run(self, model, ids, mask, **kwargs):
        """(last hidden states, lm_head weight, bias) of one backbone forward, through DDP / FSDP for the policy."""
        policy = model is self.model
        with maybe_autocast(self.device, self.autocast_dtype):
            if policy and self.fsdp:  # through the root's FSDP hooks: the full lm_head weight
                hidden, weight, bias = model.grao_hidden_and_head(ids, mask, **kwargs)
                self._count_pass()
            elif policy and self.ddp is not None and torch.is_grad_enabled():
                last = self._count_pass()  # DDP arms its reduction in the forward: no_sync on all but the last
                with contextlib.nullcontext() if last else self.ddp.no_sync():
                    hidden, weight, bias = self.ddp(ids, mask, **kwargs)
            else:
                backbone, head = (self.backbone, self.head) if policy else lm_parts(model)
                hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state
                weight, bias = head.weight, getattr(head, "bias", None)
        if self.autocast_dtype is not None:
            hidden, weight = hidden.to(self.autocast_dtype), weight.to(self.autocast_dtype)
            bias = bias.to(self.autocast_dtype) if bias is not None else None
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return hidden, weight, bias

    def grao_loss(self, rows, rewards, *, beta, lam, eps, reference_in_stats):
        """The GRAO loss and its stats on whole groups ``rows`` (per prompt its G samples, then its reference)."""
        kw = {"temperature": self.loss_temperature, "beta": beta, "lam": lam, "eps": eps,
              "reference_in_stats": reference_in_stats}
        if self.prefix_sharing:
            hidden, weight, bias, labels, packed = self.packed_hidden_states(rows)
            return self.backend.grao(hidden, weight, labels, rewards, bias=bias, cu_seqlens=packed.cu_seqlens, **kw)
        hidden, weight, bias, labels = self.hidden_states(rows)
        return self.backend.grao(hidden, weight, labels, rewards, bias=bias, **kw)

    def logprob_dot(self, rows, row_coef: torch.Tensor, model=None, prompt_kv=None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(value, per-token log-probs [N, L] detached, completion mask [N, L]) of rows, where ``value`` =
        sum over each row's completion tokens of ``row_coef[row] * logp``: a loss linear in the log-probs
        with coefficients known before the forward (GRAO on part of a group, SFT), back-propagated from the
        gradients of the same pass (``LossBackend.logprob_dot``). ``prompt_kv``: see :meth:`prompt_kv`."""
        kw = {"temperature": self.loss_temperature}
        if self.prefix_sharing:
            hidden, weight, bias, labels, packed = self.packed_hidden_states(rows, model, prompt_kv)
            coef = row_coef.to(self.device).index_select(0, packed.row_index)
            value, logp = self.backend.logprob_dot(hidden, weight, labels, coef, bias=bias, **kw)
            return (value, *unpack_token_values(logp, packed))
        hidden, weight, bias, labels = self.hidden_states(rows, model)
        coef = row_coef.to(self.device)[:, None].expand(labels.shape)
        value, logp = self.backend.logprob_dot(hidden, weight, labels, coef, bias=bias, **kw)
        return value, logp, labels != IGNORE_INDEX

    def token_logp(self, rows, model=None, prompt_kv=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token log-probs [N, L] fp32, completion mask [N, L] bool) of rows; only the masked entries
        mean anything (with prefix sharing L is the longest completion, without it the longest row).
        ``prompt_kv``: see :meth:`prompt_kv`."""
        if self.prefix_sharing:
            hidden, weight, bias, labels, packed = self.packed_hidden_states(rows, model, prompt_kv)
            logp = self.backend.logprob(hidden, weight, labels, bias=bias, temperature=self.loss_temperature)
            return unpack_token_values(logp, packed)
        hidden, weight, bias, labels = self.hidden_states(rows, model)
        logp = self.backend.logprob(hidden, weight, labels, bias=bias, temperature=self.loss_temperature)
        return logp, labels != IGNORE_INDEX

    def token_logp_values(self, rows, value_head, model=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token log-probs [N, L] fp32, values [N, L] fp32, completion mask [N, L]) of rows: the log-probs
        as :meth:`token_logp` (fused: ``linear_logprob``, no [tokens x vocab] logits), the values from
        ``value_head`` (PPO's linear layer, fp32) on the same pass's final hidden states: values[t] is the
        value of the state that samples completion token t."""
        if self.prefix_sharing:
            hidden, weight, bias, labels, packed = self.packed_hidden_states(rows, model)
            logp = self.backend.logprob(hidden, weight, labels, bias=bias, temperature=self.loss_temperature)
            values = value_head(hidden.float()).squeeze(-1)
            logp, mask = unpack_token_values(logp, packed)
            return logp, unpack_token_values(values, packed)[0], mask
        hidden, weight, bias, labels = self.hidden_states(rows, model)
        logp = self.backend.logprob(hidden, weight, labels, bias=bias, temperature=self.loss_temperature)
        return logp, value_head(hidden.float()).squeeze(-1), labels != IGNORE_INDEX
