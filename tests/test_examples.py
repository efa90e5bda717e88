"""The examples (examples/hf_trainer_grao.py, examples/bare_loop.py) run as functions on tiny models.

Checked: the loss each example computes with the fused ops equals the eager one (full logits) on
the same batch, loss and every parameter gradient, against a float64 copy of the model; the
Trainer's gradient accumulation scales the GRAO loss correctly; a few steps run and change the
weights. Nothing is downloaded: the model is built from a config.
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import grao
from tests.numerics import assert_no_worse_than_eager

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ex():
    sys.path.insert(0, str(EXAMPLES))
    try:
        mods = {name: importlib.import_module(name) for name in ("toy_data", "bare_loop", "hf_trainer_grao")}
    finally:
        sys.path.remove(str(EXAMPLES))
    return mods


def shifted(labels):
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def eager_grao_from_logits(model, batch):
    """GRAO from the model's own full logits (the eager baseline the fused examples must match)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = shifted(batch["labels"])
    rewards = batch["rewards"].to(logits.dtype)
    loss, _ = grao.grao_loss(grao.token_logprobs(logits, labels), labels, rewards, beta=0.5, lam=0.6)
    return loss


def loss_and_grads(fn, model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = fn(model, batch)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def assert_matches(fused, eager, ref, what):
    assert_no_worse_than_eager(fused[0], eager[0], ref[0], what=f"{what} loss", **TOL)
    assert len(fused[1]) == len(ref[1])
    for i, (f, e, r) in enumerate(zip(fused[1], eager[1], ref[1], strict=True)):
        if r is None:
            assert f is None and e is None
            continue
        assert_no_worse_than_eager(f, e, r, what=f"{what} grad of parameter {i}", **TOL)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def changed(before, model):
    return [k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())]


# --------------------------------------------------------------------------------------- HF Trainer


def test_trainer_compute_loss_matches_eager(ex, tmp_path):
    trainer = ex["hf_trainer_grao"].build_trainer(str(tmp_path), max_steps=1)
    model = trainer.model
    batch = ex["toy_data"].collate_groups(trainer.train_dataset[:3])
    assert batch["rewards"].shape == (3, 5) and batch["input_ids"].shape[0] == 15

    fused = loss_and_grads(lambda m, b: trainer.compute_loss(m, b), model, batch)
    eager = loss_and_grads(eager_grao_from_logits, model, batch)
    model64 = copy.deepcopy(model).double()
    ref = loss_and_grads(eager_grao_from_logits, model64, batch)
    assert fused[0].dtype == torch.float32 and ref[0].dtype == torch.float64
    assert_matches(fused, eager, ref, "Trainer.compute_loss")
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in fused[1]) >= len(fused[1]) - 1

    # the label shift is the model's own: its built-in loss is the mean NLL of the same shifted labels
    # (to fp32 rounding: transformers computes that loss on logits cast to float32)
    out = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    labels = shifted(batch["labels"])
    logp = grao.token_logprobs(model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               labels)
    assert abs(out.loss.item() - grao.sft_loss(logp, labels != -100).item()) < 1e-5


def test_trainer_gradient_accumulation_scales_the_mean_loss(ex, tmp_path):
    """One SGD step on 2 prompts at once == 2 micro-batches of 1 prompt with accumulation 2."""
    hf = ex["hf_trainer_grao"]
    results = []
    for per_device, accumulation in ((2, 1), (1, 2)):
        # two prompts in all: each run's one optimizer step sees both, whatever the sampling order
        trainer = hf.build_trainer(str(tmp_path / f"run{per_device}"), max_steps=1, num_prompts=2, learning_rate=0.5,
                                   per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                                   optim="sgd", max_grad_norm=0.0)
        before = params_of(trainer.model)
        trainer.train()
        results.append({k: v.detach() - before[k] for k, v in trainer.model.named_parameters()})
    whole, accumulated = results
    assert any(bool(d.abs().sum() > 0) for d in whole.values())
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_trainer_runs_and_changes_weights(ex, tmp_path):
    trainer = ex["hf_trainer_grao"].build_trainer(str(tmp_path), max_steps=3)
    before = params_of(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 3
    moved = changed(before, trainer.model)
    assert "lm_head.weight" in moved and any("layers.0" in k for k in moved)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3
    for entry in logs:
        parts = [entry[f"loss_{k}"] for k in grao.COMPONENTS]
        assert all(math.isfinite(v) for v in parts + [entry["loss"]])
        assert abs(sum(parts) - entry["loss"]) < 1e-3  # the logged loss is rounded to 4 decimals


# --------------------------------------------------------------------------------------- bare loop


def eager_logprob(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100):
    return grao.token_logprobs(grao.linear_logits(hidden, weight, bias, temperature), labels, ignore_index=ignore_index)


@pytest.mark.parametrize("method", ["grao", "grpo", "sft"])
def test_bare_loop_fused_matches_eager(ex, method, monkeypatch):
    bare, toy = ex["bare_loop"], ex["toy_data"]
    model = toy.tiny_model(seed=1)
    batch = toy.collate_groups(toy.toy_groups(num_prompts=3, group=3, vocab_size=model.config.vocab_size, seed=1))
    fn = bare.LOSSES[method]
    fused = loss_and_grads(fn, model, batch)
    with monkeypatch.context() as mp:  # the same example code on the eager ops (full logits)
        mp.setattr(bare, "fused_linear_grao_loss", grao.linear_grao_loss)
        mp.setattr(bare, "linear_logprob", eager_logprob)
        eager = loss_and_grads(fn, model, batch)
        batch64 = dict(batch, rewards=batch["rewards"].double())
        ref = loss_and_grads(fn, copy.deepcopy(model).double(), batch64)
    assert_matches(fused, eager, ref, f"bare loop {method}")
    if method == "grao":  # and the example's GRAO equals GRAO on the model's own logits
        ref_logits = loss_and_grads(eager_grao_from_logits, copy.deepcopy(model).double(), batch64)
        assert abs(ref[0].item() - ref_logits[0].item()) < 1e-10


@pytest.mark.parametrize("method", ["grao", "grpo", "sft"])
def test_bare_loop_trains(ex, method):
    initial = params_of(ex["toy_data"].tiny_model(seed=0))
    model, losses = ex["bare_loop"].train(method, steps=2)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    moved = changed(initial, model)
    assert "lm_head.weight" in moved and any("layers.1" in k for k in moved)
