"""LoRA adapters (through ``peft``) and the dtype of the weights as loaded.

``--lora-r N`` (N > 0) freezes every weight of the policy and trains LoRA adapters on the linear layers named
by ``--lora-target-modules``; ``--model-dtype`` says in which dtype the weights are loaded. ``peft`` is imported
here only, and only when LoRA is asked for: ``grao`` and ``grao_kernels`` work without it.

Precision (the usual mixed-precision practice): the frozen weights stay in the dtype they were loaded in (bf16
halves them), the trainable ones are fp32 master weights: adapters are created in fp32
(``autocast_adapter_dtype``), AdamW's state is fp32, and the bf16 activations are cast to fp32 at each
adapter. Full fine-tuning keeps fp32 weights: a bf16 copy of the weights beside fp32 masters would cost as
much as fp32 weights with bf16 autocast (which the trainer uses on a GPU with bf16), and pure bf16 weights lose
AdamW updates smaller than bf16's resolution (2^-8 of the weight), so ``model_dtype='bf16'`` without LoRA is
refused (``TrainConfig.validate``).

The lm_head stays frozen and is read by the fused loss as it is (bf16 when loaded so); LoRA on it (or on the
input embedding it is tied to) is refused, since the fused ops take the head's weight, not an adapted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def lora_enabled(config) -> bool:
    return int(getattr(config, "lora_r", 0) or 0) > 0


def lora_alpha(config) -> float:
    """The adapter's alpha: ``lora_alpha``, or 2 x ``lora_r`` when it is 0 (auto)."""
    return float(config.lora_alpha) if config.lora_alpha else 2.0 * int(config.lora_r)


def target_modules(config) -> list[str] | str:
    """``lora_target_modules`` as peft takes it: a list of module names, or "all-linear"."""
    names = [x.strip() for x in str(config.lora_target_modules).split(",") if x.strip()]
    return "all-linear" if names == ["all-linear"] else names


def weight_dtype(config, device: torch.device) -> torch.dtype:
    """The dtype the policy's weights are loaded in. ``model_dtype`` bf16 / fp32 as given; auto: fp32 for full
    fine-tuning, bf16 for LoRA on a CUDA device that supports bf16, else fp32 (a CPU without fast bf16
    matmuls would be slower; ask for bf16 there with ``--model-dtype bf16``)."""
    choice = str(getattr(config, "model_dtype", "auto"))
    if choice in DTYPES:
        return DTYPES[choice]
    if lora_enabled(config) and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def import_peft():
    """peft, or an ImportError saying how to install it (LoRA was asked for)."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA (--lora-r > 0) needs the peft package, which is not installed: "
                          "pip install peft (or pip install -e '.[lora]')") from None
    return peft


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _linear_names(model) -> list[str]:
    """The last name component of every module LoRA can adapt (Linear, Conv1D, Embedding), sorted."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d)
    names = set()
    for name, mod in model.named_modules():
        if name and (isinstance(mod, kinds) or type(mod).__name__ == "Conv1D"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model, config) -> None:
    """ValueError unless every name of ``lora_target_modules`` is a module of ``model`` (listing the names it
    has), and none is its lm_head or the input embedding a tied lm_head shares."""
    targets = target_modules(config)
    kind = type(model).__name__
    if targets == "all-linear":
        return
    have = _linear_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise ValueError(f"lora_target_modules: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a "
                         f"module of {kind}; its linear and embedding layers are named {', '.join(have)} "
                         f"(--lora-target-modules takes a comma-separated list of them, or all-linear)")
    head = model.get_output_embeddings()
    frozen = {id(head)} | ({id(model.get_input_embeddings())} if getattr(model.config, "tie_word_embeddings", False)
                           else set())
    for name, mod in model.named_modules():
        if id(mod) in frozen and name.rsplit(".", 1)[-1] in targets:
            raise ValueError(f"lora_target_modules: {name.rsplit('.', 1)[-1]} is {kind}'s lm_head (or the "
                             f"embedding tied to it), which the fused loss reads as it is: it stays frozen; target "
                             f"the attention and MLP projections")


def apply_lora(model, config):
    """``model`` with fresh LoRA adapters (a ``peft.PeftModel``): every other weight frozen, adapters in fp32."""
    check_targets(model, config)
    peft = import_peft()
    lcfg = peft.LoraConfig(r=int(config.lora_r), lora_alpha=lora_alpha(config), lora_dropout=float(config.lora_dropout),
                           target_modules=target_modules(config), bias="none", task_type="CAUSAL_LM")
    with _quiet():
        return peft.get_peft_model(model, lcfg, autocast_adapter_dtype=True)


def load_lora(model, path, *, trainable: bool):
    """``model`` with the adapter saved in ``path`` (a checkpoint folder), adapters in fp32."""
    peft = import_peft()
    with _quiet():
        return peft.PeftModel.from_pretrained(model, str(path), is_trainable=trainable, autocast_adapter_dtype=True)


def adapters_follow_autocast(model) -> None:
    """Every forward of ``model`` runs under autocast: let its adapters take their input as it is. peft casts
    an adapter's input to the adapter's dtype (fp32) first; under bf16 autocast the matmul casts it back, and
    that bf16 copy is what the backward keeps, for each of the 7 adapters of a layer. Without the cast the
    adapter reads the tensor its base layer has already kept."""
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False


@contextlib.contextmanager
def _quiet():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning per wrap): not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_adapter_dir(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path) -> dict:
    """The settings of the run that wrote the adapter checkpoint ``path``: its trainer state's config (the base
    model, the demo's seed and task, ...) and ``weight_dtype`` (bf16 / fp32: the dtype the run held the frozen
    weights in), else the adapter's ``base_model_name_or_path``."""
    from grao.trainer.checkpoint import STATE_FILE, read_trainer_state
    path = Path(path)
    if (path / STATE_FILE).is_file():
        state = read_trainer_state(path)
        cfg = state.get("config")
        if isinstance(cfg, dict) and cfg.get("model"):
            return {**cfg, "weight_dtype": state.get("weight_dtype")}
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        base = None
    if not base:
        raise ValueError(f"{path} holds a LoRA adapter but names no base model (no trainer_state.pt, no "
                         f"base_model_name_or_path in {ADAPTER_CONFIG})")
    return {"model": base}
