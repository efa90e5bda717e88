"""The policy model: loading it and its tokenizer, splitting it into backbone and lm_head, precision.

The losses never call the causal LM's own forward (which would build [tokens x vocab] logits): they
run the backbone to its last hidden states and hand those and the lm_head weight to the fused loss.
:func:`lm_parts` finds the two pieces and refuses heads the fused loss cannot represent.
"""

from __future__ import annotations

import contextlib
import os

import torch

from grao.trainer.config import ConfigError, TrainConfig, check_model_source


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone returning last_hidden_state, lm_head Linear) of a causal LM, or of a PEFT model's causal LM (its
    adapters live inside that model's modules, so its backbone runs them; a PeftModel's own ``base_model`` is
    peft's tuner, whose forward is the causal LM's full forward with its logits)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = model.get_output_embeddings()
    backbone = getattr(model, "base_model", None)
    if head is None or backbone is None or backbone is model or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__}: need a causal LM with a base model and a linear lm_head "
                        f"(get_output_embeddings)")
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        val = getattr(cfg, attr, None)
        if val not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(model).__name__} transforms its logits ({attr}={val}); the fused "
                                      f"hidden-state loss covers plain linear heads only")
    return backbone, head


def disable_dropout(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _where(src: str) -> str:
    return "" if os.path.isdir(src) else " (not a local directory, so as a Hugging Face hub id)"


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype`` (transformers >= 4.56), ``torch_dtype`` before."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_model_and_tokenizer(config: TrainConfig, source: str | None = None, device=None, *, name: str = "model",
                             dtype: torch.dtype | None = None):
    """The policy and its tokenizer: the demo model, or ``AutoModelForCausalLM.from_pretrained``, with its
    weights in ``dtype`` (default: fp32; transformers 5 would otherwise keep a checkpoint's own dtype).
    A LoRA checkpoint of a grao run (a folder with ``adapter_config.json``) is loaded as its base model (the
    run's ``model``) with the adapter merged into it: a plain model. ``name``: how errors call the source
    (``model``, ``base``, ...); a source that cannot be loaded is a ConfigError naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grao.trainer import lora

    src = source or config.model
    dtype = dtype or torch.float32
    try:
        check_model_source(src)
    except ValueError as exc:
        raise ConfigError(f"{name} {exc}") from None
    if lora.is_adapter_dir(src):
        return load_merged_adapter(config, src, device, name=name, dtype=dtype)
    if src == "demo":
        from grao import demo
        tok = demo.build_tokenizer()
        model = demo.build_model(tok, seed=config.seed, size=demo.model_size(config.task),
                                 attn_implementation=config.attn_implementation).to(dtype)
    else:
        # trust_remote_code: a hub repository's own Python code runs only when the user asked for it
        remote = bool(config.trust_remote_code)
        tok_src, tok_name = (config.tokenizer, "tokenizer") if config.tokenizer and source is None else (src, name)
        kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
        kwargs.update(_dtype_kwarg(dtype))
        try:
            tok = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=remote)
        except OSError as exc:
            raise ConfigError(f"{tok_name} {tok_src!r} cannot be loaded{_where(tok_src)}: "
                              f"{str(exc).splitlines()[0]}") from exc
        try:
            model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=remote, **kwargs)
        except OSError as exc:
            raise ConfigError(f"{name} {src!r} cannot be loaded{_where(src)}: {str(exc).splitlines()[0]}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {src} has no eos token: completions could not end")
    if device is not None:
        model.to(device)
    return model, tok


def base_config(config: TrainConfig, run: dict) -> TrainConfig:
    """``config`` with the base-model settings of ``run`` (a saved run's TrainConfig values): model, tokenizer,
    the demo model's seed and task, model_dtype (not the adapter's: the base is loaded plain)."""
    import dataclasses
    keys = ("model", "tokenizer", "seed", "task", "model_dtype", "trust_remote_code")
    values = {k: run[k] for k in keys if k in run and k in {f.name for f in dataclasses.fields(config)}}
    return dataclasses.replace(config, **values)


def load_adapter_base(config: TrainConfig, path, device=None, *, name: str = "model", dtype=None):
    """(base model, tokenizer of ``path``, the run's settings) of the LoRA checkpoint ``path``: the base model
    the run trained its adapter on, in ``dtype`` (default: the dtype the run loaded it in)."""
    from transformers import AutoTokenizer

    from grao.trainer import lora
    run = lora.adapter_base(path)
    base_cfg = base_config(config, run)
    if dtype is None:  # the dtype the run held the frozen weights in
        dtype = lora.DTYPES.get(str(run.get("weight_dtype")), lora.DTYPES.get(str(run.get("model_dtype")), torch.float32))
    try:
        base, _ = load_model_and_tokenizer(base_cfg, device=device, name=f"{name} (the base of {path})", dtype=dtype)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; a LoRA checkpoint needs the base model it was trained on") from None
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(base_cfg.trust_remote_code))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return base, tok, run


def load_merged_adapter(config: TrainConfig, path, device=None, *, name: str = "model", dtype=None):
    """(plain model in ``dtype``, default fp32; tokenizer) of the LoRA checkpoint ``path``: its base model as the
    run held it (bf16, say: the adapter was trained on those rounded weights) with the adapter merged in, in
    fp32 (as ``grao merge-lora`` does)."""
    from grao.trainer import lora
    base, tok, _ = load_adapter_base(config, path, device, name=name)
    model = lora.load_lora(base.float(), path, trainable=False).merge_and_unload().to(dtype or torch.float32)
    if device is not None:
        model.to(device)
    return model, tok


def prepare_policy(config: TrainConfig, device: torch.device, model=None, tokenizer=None, resume_from=None):
    """(policy on ``device``, tokenizer, dtype of its frozen weights) with the run's model options: loaded (or
    the ``model`` given) in ``model_dtype``, from the checkpoint ``resume_from`` when resuming, dropout off,
    LoRA adapters (fresh, or the checkpoint's: with LoRA a checkpoint holds the adapter only, so the base is
    loaded and the adapter onto it), gradient checkpointing."""
    from grao.trainer import lora
    use_lora = lora.lora_enabled(config)
    dtype = lora.weight_dtype(config, device)
    from_ckpt = str(resume_from) if resume_from is not None and not use_lora else None
    if model is None:
        model, tok = load_model_and_tokenizer(config, source=from_ckpt, dtype=dtype)
        tokenizer = tokenizer or tok
    else:
        if use_lora and lora.is_peft_model(model):
            raise ValueError("lora_r > 0 adds LoRA adapters itself: pass the base model, not a PEFT model")
        if from_ckpt is not None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(from_ckpt, trust_remote_code=bool(config.trust_remote_code))
        if config.model_dtype != "auto":  # auto keeps a given model's dtype
            model = model.to(dtype)
    if tokenizer is None:
        raise ValueError("a tokenizer is required when a model object is passed")
    model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = next(model.parameters()).dtype  # the frozen weights' dtype under LoRA
    if config.disable_dropout:  # before the adapters: --lora-dropout is the adapters' own
        disable_dropout(model)
    if use_lora:
        model = (lora.apply_lora(model, config) if resume_from is None
                 else lora.load_lora(model, resume_from, trainable=True))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        if use_lora:  # frozen embeddings: the checkpointed blocks' inputs must carry a gradient
            model.enable_input_require_grads()
    return model, tokenizer, dtype


def autocast_dtype(config: TrainConfig, device: torch.device, weights: torch.dtype | None = None) -> torch.dtype | None:
    """bf16 autocast on CUDA when ``config.bf16`` asks for it ("auto": when the card supports bf16), else None.
    On another device, bf16 when the model's frozen ``weights`` are bf16 (LoRA on bf16 weights) unless
    ``bf16`` is false: the fp32 adapters then compute in bf16 too, as on a GPU, instead of each adapter
    keeping an fp32 copy of its input for the backward."""
    choice = str(config.bf16).lower()
    if device.type != "cuda":
        return torch.bfloat16 if weights == torch.bfloat16 and choice != "false" else None
    if choice not in ("true", "auto"):
        return None
    if choice == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


@contextlib.contextmanager
def maybe_autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast(device, dtype)``, or nothing when dtype is None."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield
