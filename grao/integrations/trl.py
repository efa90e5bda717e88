"""GRAO inside TRL's ``GRPOTrainer`` machinery: ``GRAOConfig`` and ``GRAOTrainer``.

TRL (https://github.com/huggingface/trl) keeps doing what it does: the dataloader and its
``RepeatSampler`` (each prompt G times), generation (``transformers`` or vLLM), the reward
functions (plain callables, async callables, reward models) with their weights, the
``GRPOConfig`` options, logging and checkpointing. This module changes three things:

1. ``_generate_and_score_completions``: after TRL has sampled and scored the G completions of
   each prompt, the prompt's reference answer y (the dataset column ``reference``, or its
   aliases ``solution`` / ``chosen``) joins the group as row G+1; its reward R(y, y) comes from
   the same reward functions, called with the reference as the completion. The advantages are
   GRAO's (docs/spec.md eq. 4, ``grao_kernels.group_advantages``: the reference is inside the
   group statistics), not TRL's. Tensors are returned group-major, ``[P, G+1, ...]``, so that
   TRL's ``shuffle_sequence_dict`` / ``split_tensor_dict`` (in ``GRPOTrainer._prepare_inputs``)
   shuffle and split whole groups: GRAO's loss couples the samples of a prompt with its reference.
2. ``compute_loss`` / ``_compute_loss``: the GRAO loss (spec eq. 3) by
   ``grao_kernels.fused_linear_grao_loss`` on the backbone's last hidden states and the lm_head
   weight, so no ``[tokens, vocab]`` logits are built. Like TRL's own fused paths (the Liger GRPO
   loss of TRL 0.x and ``DistillationTrainer.compute_loss`` of TRL 1.x) the backbone and the loss
   run inside the wrapped model's forward through TRL's ``_ForwardRedirection``, so DDP's
   ``prepare_for_backward`` fires and FSDP / DeepSpeed materialise the parameters; a sharded
   lm_head is gathered as TRL gathers it for its fused head (``trl.trainer.utils.add_fused_lm_head``):
   an FSDP2 ``DTensor`` with ``full_tensor()``, a DeepSpeed ZeRO-3 partition with
   ``GatheredParameters`` (TRL's ``maybe_gather_lm_head_ctx``). With FSDP1 the lm_head is expected
   in the root FSDP unit (the default auto-wrap policies wrap decoder layers only), whose
   parameters are unsharded during the root's forward.
3. Metrics: ``grao/exploration``, ``grao/imitation``, ``grao/alignment`` (the three loss
   components, summing to the loss), ``grao/reward_reference`` (mean R(y, y)),
   ``grao/advantage_reference`` (mean A_y) and ``grao/frac_groups_constant`` (groups whose G+1
   rewards are all equal: no learning signal), next to TRL's own ``reward``, ``rewards/<func>/mean``
   and the rest. The completions table logs GRAO's sample advantages.

Layout per micro-batch (what ``fused_linear_grao_loss`` expects): ``p`` whole prompts, ``p*(G+1)``
rows, each prompt's G samples then its reference. ``per_device_train_batch_size`` counts sampled
completions, as in TRL, and must be a multiple of ``num_generations``; each micro-batch then runs
``p*(G+1)`` rows through the model. The loss is divided by the gradient-accumulation steps, as
TRL's GRPO loss is (``GRPOTrainer.loss_is_scaled_for_ga``).

Not supported (a clear error at construction or on the first batch): TRL's KL term (``beta``),
``num_iterations > 1``, ``multi_objective_aggregation="normalize_then_sum"``, entropy bonus /
entropy masking, tools and environments, multimodal inputs. GRAO has no importance ratio, so
TRL's ``loss_type``, ``epsilon``, ``scale_rewards`` and vLLM importance-sampling correction do
not enter the loss. With ``prefix_sharing`` (default) each group is packed as ``[prompt, o_1..o_G, y]``
(``grao.packing``): the prompt is forwarded once, padding-free, each completion attending to the prompt
and to itself, positions counted from the prompt's first real token as during generation; the model
must be of a family the packed attention serves (Llama, Mistral, Qwen2/3; others are refused at
construction). With ``prefix_sharing=False`` the backbone sees TRL's token layout (left-padded prompts,
no ``position_ids``), so the log-probs are the ones TRL's own GRPO loss uses. Tested on CPU in one process with TRL
1.0.0 - 1.16.0 (tests/test_trl.py, ``TESTED_TRL_VERSIONS``); vLLM, DDP, FSDP, ZeRO-3 and PEFT follow
TRL's mechanisms but are untested here.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import is_conversational
    from trl.models.utils import _ForwardRedirection
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("grao.integrations.trl needs TRL: pip install 'grao-kernels[trl]' "
                      "(tested with trl 1.0.0 - 1.16.0)") from exc

from grao.packed_attention import enable_prefix_sharing, packed_forward_kwargs
from grao.packing import pack_rows
from grao.trainer import lm_parts
from grao_kernels import COMPONENTS, fused_linear_grao_loss, group_advantages

try:  # FSDP2 shards parameters as DTensors (torch >= 2.4: torch.distributed.tensor)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

__all__ = ["GRAOConfig", "GRAOTrainer", "REFERENCE_ALIASES", "TESTED_TRL_VERSIONS"]

# tests/test_trl.py passed with these (torch 2.13 CPU; transformers 5.24, and 5.17 for 1.0.0 / 1.16.0)
TESTED_TRL_VERSIONS = ("1.0.0", "1.10.0", "1.14.2", "1.16.0")
REFERENCE_ALIASES = ("solution", "chosen")
# batch keys of GRPOTrainer._generate_and_score_completions this adapter does not handle
_UNSUPPORTED_KEYS = ("tool_mask", "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                     "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images")


@dataclass
class GRAOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus GRAO's hyper-parameters (docs/spec.md; paper defaults).

    Every ``GRPOConfig`` option keeps its meaning for sampling, rewards, optimisation and logging.
    ``beta`` stays TRL's KL coefficient and must be 0 (GRAO has no KL term); GRAO's imitation
    weight is ``beta_imitation``.
    """

    beta_imitation: float = field(default=0.5, metadata={"help": "GRAO imitation weight beta (paper: 0.5)."})
    lam: float = field(default=0.6, metadata={"help": "GRAO alignment-regulariser weight lambda (paper: 0.6)."})
    advantage_eps: float = field(default=1e-6, metadata={"help": "eps in A = (R - mu) / (sigma + eps)."})
    reference_in_stats: bool = field(
        default=True, metadata={"help": "Advantage statistics over the G+1 group (spec default) or the G samples."})
    reference_column: str = field(
        default="reference",
        metadata={"help": "Dataset column holding the reference answer y; 'solution' and 'chosen' are aliases."})
    loss_temperature: float | None = field(
        default=None, metadata={"help": "Logits are divided by it in the loss; None: TRL's sampling `temperature`."})
    max_reference_length: int | None = field(
        default=None, metadata={"help": "Reference tokens kept (EOS included); None: `max_completion_length`."})
    prefix_sharing: bool = field(
        default=True, metadata={"help": "Forward each prompt once for its G samples and reference, packed and "
                                        "padding-free (grao.packing); False: TRL's left-padded rows."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("beta_imitation", "lam"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"GRAOConfig.{name} must be a finite number, got {value!r}")
        if not (isinstance(self.advantage_eps, (int, float)) and self.advantage_eps > 0):
            raise ValueError(f"GRAOConfig.advantage_eps must be > 0, got {self.advantage_eps!r}")
        if self.loss_temperature is not None and not self.loss_temperature > 0:
            raise ValueError(f"GRAOConfig.loss_temperature must be > 0 or None, got {self.loss_temperature!r}")
        if self.max_reference_length is not None and self.max_reference_length < 1:
            raise ValueError(f"GRAOConfig.max_reference_length must be >= 1 or None, got {self.max_reference_length}")
        if not isinstance(self.reference_column, str) or not self.reference_column:
            raise ValueError(f"GRAOConfig.reference_column must be a column name, got {self.reference_column!r}")
        if self.beta != 0.0:
            raise ValueError(f"GRAOConfig.beta is TRL's KL coefficient and must be 0.0 for GRAO (got {self.beta}); "
                             f"GRAO's imitation weight is `beta_imitation`")
        if self.num_iterations != 1:
            raise ValueError(f"GRAOConfig.num_iterations must be 1 (got {self.num_iterations}): GRAO's loss is "
                             f"on-policy, with no importance ratio to reuse samples")
        if getattr(self, "multi_objective_aggregation", "sum_then_normalize") != "sum_then_normalize":
            raise ValueError("GRAOConfig.multi_objective_aggregation must be 'sum_then_normalize': GRAO normalises "
                             "the weighted reward sum within each group of G samples + reference")
        if getattr(self, "entropy_coef", 0.0) != 0.0 or getattr(self, "use_adaptive_entropy", False) \
                or getattr(self, "top_entropy_quantile", 1.0) != 1.0:
            raise ValueError("GRAOConfig: entropy_coef, use_adaptive_entropy and top_entropy_quantile are GRPO loss "
                             "options that GRAO's loss does not have; leave them at 0.0, False, 1.0")
        if self.per_device_train_batch_size % self.num_generations != 0:
            raise ValueError(f"GRAOConfig.per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                             f"multiple of num_generations ({self.num_generations}): each micro-batch holds whole "
                             f"groups (a prompt's G samples and its reference)")
        num_eval = self.num_generations_eval or self.num_generations
        if self.do_eval and self.eval_strategy != "no" and self.per_device_eval_batch_size % num_eval != 0:
            raise ValueError(f"GRAOConfig.per_device_eval_batch_size ({self.per_device_eval_batch_size}) must be a "
                             f"multiple of the evaluation's num_generations ({num_eval})")


def _gather_lm_head(weight, bias):
    """Gather a DeepSpeed ZeRO-3 partitioned lm_head for a direct read (TRL's ``maybe_gather_lm_head_ctx``)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # older TRL: the same test TRL makes
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
        if not is_deepspeed_zero3_enabled():
            return nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters([p for p in (weight, bias) if p is not None])
    return maybe_gather_lm_head_ctx(weight, bias)


def _message_text(value):
    """A conversational reference (list of {"role", "content"}) -> its last assistant message's content."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        assistant = [m for m in value if m.get("role") == "assistant"]
        return (assistant or value)[-1]["content"]
    return value


class GRAOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` that trains GRAO (arXiv 2508.07750) with the fused GRAO loss.

    Same constructor as ``GRPOTrainer`` (``model, reward_funcs, args, train_dataset, ...``) with a
    :class:`GRAOConfig`. The dataset needs a ``prompt`` and a reference-answer column (see
    ``GRAOConfig.reference_column``); like every dataset column, it also reaches the reward
    functions as a keyword argument, so a reward can compare a completion with the reference.
    """

    _tag_names = ["trl", "grpo", "grao"]
    _name = "GRAO"

    def __init__(self, model, reward_funcs, args: GRAOConfig | None = None, **kwargs):
        if args is None:
            args = GRAOConfig(output_dir="grao-trl")
        if not isinstance(args, GRAOConfig):
            raise TypeError(f"GRAOTrainer needs args=GRAOConfig(...), got {type(args).__name__}")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if args.prefix_sharing:  # refuses an architecture the packed attention does not serve, here
            unwrapped = self.accelerator.unwrap_model(self.model)
            enable_prefix_sharing(unwrapped.get_base_model() if hasattr(unwrapped, "peft_config") else unwrapped)
        self._grao_redirect = _ForwardRedirection()
        self._grao_sample_rewards = None
        if self.use_vllm and getattr(args, "vllm_importance_sampling_correction", False):
            warnings.warn("GRAOTrainer: GRAO's loss has no importance ratio; set "
                          "vllm_importance_sampling_correction=False to skip TRL's extra log-prob pass", stacklevel=2)

    @property
    def _grao_tokenizer(self):
        tok = getattr(self, "_tokenizer", None)  # recent TRL sets it; else the processing class (or its tokenizer)
        return tok if tok is not None else getattr(self.processing_class, "tokenizer", self.processing_class)

    # ------------------------------------------------------------------------------------------ rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL's reward call, unchanged; keep its [N_all_processes, num_funcs] output, which TRL turns
        # into GRPO advantages and does not return.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._grao_sample_rewards = rewards_per_func
        return rewards_per_func

    def _weighted_rewards(self, rewards_per_func: torch.Tensor, what: str) -> torch.Tensor:
        """TRL's reward: sum_k w_k r_k over the functions that returned a value; NaN -> a clear error."""
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        if unscorable.any():
            row = int(unscorable.nonzero()[0])
            raise ValueError(f"GRAOTrainer: every reward function {list(self.reward_func_names)} returned None for "
                             f"{what} row {row}; GRAO needs a reward for each sample and for the reference answer")
        weights = self.reward_weights.to(rewards_per_func.device)
        return (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)

    def _reference_text(self, example: dict, index: int) -> str:
        keys = (self.args.reference_column,) + tuple(k for k in REFERENCE_ALIASES if k != self.args.reference_column)
        key = next((k for k in keys if example.get(k) is not None), None)
        if key is None:
            raise KeyError(f"GRAOTrainer needs the reference answer in the dataset column {keys[0]!r} (aliases: "
                           f"{list(keys[1:])}); example {index} has columns {sorted(example)}")
        text = _message_text(example[key])
        if not isinstance(text, str) or not text:
            raise ValueError(f"GRAOTrainer: the reference answer (column {key!r}) of example {index} must be a "
                             f"non-empty string or a list of messages, got {text!r:.80}")
        return text

    def _score_references(self, examples: list[dict], references: list[str]):
        """(R(y, y) [P] fp32 on this process, reference token ids [P lists]) for one process's prompts."""
        tok = self._grao_tokenizer
        conversational = is_conversational({"prompt": examples[0]["prompt"]})
        completions = [[{"role": "assistant", "content": y}] if conversational else y for y in references]
        limit = self.args.max_reference_length or self.max_completion_length
        ids = [(tok(y, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:limit] for y in references]
        prompts = [x["prompt"] for x in examples]
        # The reference rows are not sampled completions: keep what reward functions log for them
        # (log_extra / log_metric) out of TRL's completions table and metrics.
        saved = {name: getattr(self, name) for name in ("_pending_extra_logs", "_pending_metrics")
                 if hasattr(self, name)}
        for name in saved:
            setattr(self, name, defaultdict(list))
        try:
            per_func = super()._calculate_rewards(examples, prompts, completions, ids)  # gathered over processes
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        rows = len(examples)
        mine = slice(self.accelerator.process_index * rows, (self.accelerator.process_index + 1) * rows)
        return self._weighted_rewards(per_func, "reference")[mine], ids

    # ------------------------------------------------------------------------------------------ batches
    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        if len(inputs) % group != 0:
            raise ValueError(f"GRAOTrainer: a generation batch of {len(inputs)} rows does not hold whole groups of "
                             f"{group} (per-device batch sizes must be multiples of num_generations)")
        prompts = len(inputs) // group
        firsts = inputs[::group]
        for g in range(prompts):  # TRL's RepeatSampler yields each prompt G times in a row
            if any(x["prompt"] != firsts[g]["prompt"] for x in inputs[g * group:(g + 1) * group]):
                raise RuntimeError("GRAOTrainer: the rows of a generation batch are not grouped by prompt; "
                                   "this TRL version's sampler is not supported")
        references = [self._reference_text(x, i) for i, x in enumerate(firsts)]  # fail before generating

        self._grao_sample_rewards = None
        out = super()._generate_and_score_completions(inputs)
        for key in _UNSUPPORTED_KEYS:
            if out.get(key) is not None:
                raise NotImplementedError(f"GRAOTrainer does not support batches with {key!r} (tools, environments "
                                          f"and multimodal inputs)")
        device = out["completion_ids"].device
        rows = prompts * group
        mine = slice(self.accelerator.process_index * rows, (self.accelerator.process_index + 1) * rows)
        sample_rewards = self._weighted_rewards(self._grao_sample_rewards, "sample")[mine].view(prompts, group)
        ref_rewards, ref_ids = self._score_references(firsts, references)
        rewards = torch.cat([sample_rewards, ref_rewards.to(sample_rewards.device).unsqueeze(1)], dim=1)
        advantages = group_advantages(rewards, eps=self.args.advantage_eps,
                                      reference_in_stats=self.args.reference_in_stats)

        # [P*G, ...] -> [P, G+1, ...]: the reference row reuses its group's prompt tokens
        prompt_ids = out["prompt_ids"].view(prompts, group, -1)
        prompt_mask = out["prompt_mask"].view(prompts, group, -1)
        if not torch.equal(prompt_ids, prompt_ids[:, :1].expand_as(prompt_ids)):
            raise RuntimeError("GRAOTrainer: the G completions of a prompt do not share its prompt tokens")
        width = max(out["completion_ids"].size(1), max(len(r) for r in ref_ids))
        pad_id = self._grao_tokenizer.pad_token_id
        completion_ids = torch.full((prompts, group + 1, width), pad_id, dtype=out["completion_ids"].dtype,
                                    device=device)
        completion_mask = torch.zeros((prompts, group + 1, width), dtype=out["completion_mask"].dtype, device=device)
        sampled = out["completion_ids"].size(1)
        completion_ids[:, :group, :sampled] = out["completion_ids"].view(prompts, group, sampled)
        completion_mask[:, :group, :sampled] = out["completion_mask"].view(prompts, group, sampled)
        for g, ids in enumerate(ref_ids):
            completion_ids[g, group, :len(ids)] = torch.tensor(ids, dtype=completion_ids.dtype, device=device)
            completion_mask[g, group, :len(ids)] = 1
        batch = {
            "prompt_ids": torch.cat([prompt_ids, prompt_ids[:, :1]], dim=1),
            "prompt_mask": torch.cat([prompt_mask, prompt_mask[:, :1]], dim=1),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "grao_rewards": rewards,  # [P, G+1]: R(o_1..o_G, y), R(y, y)
            "advantages": advantages,  # [P, G+1] (logged; the fused loss recomputes them from the rewards)
            "num_items_in_batch": self.accelerator.gather(completion_mask.sum()).sum(),
        }

        all_adv = self.accelerator.gather(advantages)
        all_rewards = self.accelerator.gather(rewards)
        metrics = self._metrics[mode]
        metrics["grao/reward_reference"].append(all_rewards[:, -1].mean().item())
        metrics["grao/advantage_reference"].append(all_adv[:, -1].mean().item())
        constant = (all_rewards.amax(1) == all_rewards.amin(1)).float().mean().item()
        metrics["grao/frac_groups_constant"].append(constant)
        logged = getattr(self, "_logs", {}).get("advantages")
        if logged is not None and len(logged) >= all_adv.shape[0] * group:  # TRL logged its GRPO advantages
            for _ in range(all_adv.shape[0] * group):
                logged.pop()
            logged.extend(all_adv[:, :group].reshape(-1).tolist())
        return batch

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("GRAOTrainer does not support returning outputs")
        return self._compute_loss(model, inputs)

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        # Backbone + fused loss inside the wrapper's forward (TRL's _ForwardRedirection, as in its
        # fused-loss paths), so DDP / FSDP / DeepSpeed hooks fire around the parameters we read.
        loss, components = self._grao_redirect(model, unwrapped, self._grao_forward, unwrapped, inputs)
        # Collectives only after the wrapped forward has returned (as TRL's DistillationTrainer does).
        parts = self.accelerator.gather(components.detach().float().unsqueeze(0)).mean(0).tolist()
        for name, value in zip(COMPONENTS, parts):
            self._metrics[mode][f"grao/{name}"].append(value)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss / normalizer

    def grao_hidden_and_head(self, unwrapped, inputs):
        """(hidden, weight [V, D], bias [V] | None, labels, cu_seqlens | None) of a GRAO batch.

        Padded (``prefix_sharing=False``): hidden [p*(G+1), C, D] are the backbone's last hidden states at the
        positions that predict the C completion columns, labels [p*(G+1), C] the completion tokens, -100 on
        padding, cu_seqlens None. Packed (default): hidden [M, D] and labels [M] for the M completion tokens,
        row after row, and cu_seqlens [p*(G+1) + 1]. Call inside the lm_head gathering context (see
        ``_grao_forward``) when the head is ZeRO-3 partitioned.
        """
        prompt_ids, completion_ids = inputs["prompt_ids"].flatten(0, 1), inputs["completion_ids"].flatten(0, 1)
        prompt_mask, completion_mask = inputs["prompt_mask"].flatten(0, 1), inputs["completion_mask"].flatten(0, 1)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "peft_config") else unwrapped  # PEFT: LoRA'd model
        backbone, head = lm_parts(base)
        cu_seqlens = None
        if self.args.prefix_sharing:
            keep_p, keep_c = prompt_mask.bool(), completion_mask.bool()
            packed = pack_rows([(p[mp].tolist(), c[mc].tolist()) for p, mp, c, mc in
                                zip(prompt_ids, keep_p, completion_ids, keep_c)]).to(prompt_ids.device)
            kwargs = packed_forward_kwargs(packed.segments, prompt_ids.device)
            with self.accelerator.autocast():
                hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                                  **kwargs).last_hidden_state
            hidden, labels, cu_seqlens = hidden[0].index_select(0, packed.source), packed.labels, packed.cu_seqlens
        else:
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            with self.accelerator.autocast():
                hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
            hidden = hidden[:, prompt_ids.size(1) - 1:-1]  # state t predicts token t+1: the completion columns
            labels = completion_ids.masked_fill(completion_mask == 0, -100)
        weight, bias = head.weight, getattr(head, "bias", None)
        if DTensor is not None and isinstance(weight, DTensor):  # FSDP2 (as TRL's add_fused_lm_head)
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            dtype = torch.float32
        elif hidden.dtype != weight.dtype:
            dev = hidden.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        else:
            dtype = hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        return hidden, weight, bias, labels, cu_seqlens

    def _grao_forward(self, unwrapped, inputs):
        """(loss, components [3]) of one GRAO batch; runs inside the wrapped model's forward."""
        head = unwrapped.get_output_embeddings()
        with _gather_lm_head(head.weight, getattr(head, "bias", None)):
            hidden, weight, bias, labels, cu_seqlens = self.grao_hidden_and_head(unwrapped, inputs)
            args = self.args
            temperature = args.loss_temperature if args.loss_temperature is not None else self.temperature
            packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
            loss, stats = fused_linear_grao_loss(
                hidden, weight, labels, inputs["grao_rewards"], beta=args.beta_imitation, lam=args.lam,
                eps=args.advantage_eps, bias=bias, temperature=temperature,
                reference_in_stats=args.reference_in_stats, **packed)
        return loss, torch.stack([stats[name] for name in COMPONENTS])
