"""GRAO inside TRL's GRPOTrainer (grao.integrations.trl): a few real CPU steps with a tiny model.

Checks: the reference answer joins each group with its reward R(y, y) from the same reward
function; the loss (and its gradients) on a trainer batch equal grao's eager reference on the same
hidden states / labels / rewards; the weights change; TRL's metrics carry the three components.
Skipped when TRL (the optional extra ``trl``) is not installed.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (optional extra: pip install 'grao-kernels[trl]')")
datasets = pytest.importorskip("datasets", reason="datasets (a TRL dependency) is not installed")

from grao import demo  # noqa: E402
from grao.integrations.trl import GRAOConfig, GRAOTrainer  # noqa: E402
from grao.reference import COMPONENTS, group_advantages, linear_grao_loss  # noqa: E402

G = 3  # num_generations
PROMPTS_PER_STEP = 2
STEPS = 3
SEEN: list[tuple[str, str]] = []  # (completion, reference) pairs the reward function was called with


def overlap_reward(completions, reference, **kwargs):
    """Character-multiset overlap with the reference, in [0, 1]; R(y, y) = 1."""
    out = []
    for c, y in zip(completions, reference):
        SEEN.append((c, y))
        common = sum((Counter(c) & Counter(y)).values())
        out.append(common / max(len(c), len(y), 1))
    return out


def tiny_model_and_tokenizer():
    tok = demo.build_tokenizer()
    model = demo.build_model(tok, seed=3, size=demo.DemoModelConfig(hidden_size=32, intermediate_size=64,
                                                                    num_attention_heads=2))
    return model, tok


def make_config(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
              per_device_train_batch_size=G * PROMPTS_PER_STEP, num_generations=G, max_completion_length=6,
              max_steps=STEPS, learning_rate=5e-3, logging_steps=1, seed=0, gradient_checkpointing=False,
              dataloader_num_workers=0)
    kw.update(overrides)
    return GRAOConfig(**kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model, tok = tiny_model_and_tokenizer()
    train, _ = demo.make_task("reverse", num_train=12, num_eval=1, min_len=3, max_len=4)
    dataset = datasets.Dataset.from_list(train)
    args = make_config(tmp_path_factory.mktemp("trl"))
    trainer = GRAOTrainer(model=model, reward_funcs=overlap_reward, args=args, train_dataset=dataset,
                          processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, tok, train, before


def completion_text(tok, ids, mask):
    return tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)


def test_reference_row_joins_each_group(trained):
    trainer, tok, train, _ = trained
    trainer.model.train()
    records = [train[0]] * G + [train[1]] * G
    SEEN.clear()
    batch = trainer._generate_and_score_completions(records)
    P = 2
    assert batch["completion_ids"].shape[:2] == (P, G + 1)
    assert batch["grao_rewards"].shape == (P, G + 1)
    for g, rec in enumerate(records[::G]):
        y = rec["reference"]
        ids, mask = batch["completion_ids"][g], batch["completion_mask"][g]
        # row G+1 is the reference answer followed by EOS
        expected = tok(y, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[G][mask[G].bool()].tolist() == expected
        # every row of the group carries the group's prompt
        prompt = tok(rec["prompt"])["input_ids"]
        for row in range(G + 1):
            got = batch["prompt_ids"][g, row][batch["prompt_mask"][g, row].bool()].tolist()
            assert got == prompt
        # R(y, y) came from the reward function, called with the reference as the completion
        assert (y, y) in SEEN
        assert batch["grao_rewards"][g, G].item() == pytest.approx(overlap_reward([y], [y])[0])
        # the sample rewards belong to the decoded sampled completions of this group
        for i in range(G):
            text = completion_text(tok, ids[i], mask[i])
            assert batch["grao_rewards"][g, i].item() == pytest.approx(overlap_reward([text], [y])[0], abs=1e-6)
    # GRAO advantages (reference inside the statistics), not TRL's
    expected_adv = group_advantages(batch["grao_rewards"].double(), eps=1e-6)
    torch.testing.assert_close(batch["advantages"].double(), expected_adv, atol=1e-6, rtol=1e-6)
    trained[0]._grao_test_batch = batch


def test_trainer_loss_matches_eager_reference(trained):
    trainer, _, train, _ = trained
    trainer.args.prefix_sharing = False  # TRL's left-padded layout, against a reference built from it
    try:
        _loss_matches_eager_reference(trainer, train)
    finally:
        trainer.args.prefix_sharing = True


def _equal_prompt_length_batch(trainer, tok, train):
    """Two groups of G samples for two prompts of the same token length (so no prompt is padded),
    generated and scored by the trainer, with its model in train mode -> (the two records, the batch)."""
    by_len: dict[int, list[dict]] = {}
    for rec in train:
        by_len.setdefault(len(tok(rec["prompt"])["input_ids"]), []).append(rec)
    recs = next(v for v in by_len.values() if len(v) >= 2)[:2]
    trainer.model.train()
    return recs, trainer._generate_and_score_completions([recs[0]] * G + [recs[1]] * G)


def test_prefix_sharing_matches_padded_rows(trained):
    """The packed layout (default) gives the padded layout's loss and gradients when no prompt is padded."""
    trainer, tok, train, _ = trained
    model = trainer.model
    _, batch = _equal_prompt_length_batch(trainer, tok, train)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for shared in (True, False):
        trainer.args.prefix_sharing = shared
        model.zero_grad(set_to_none=True)
        trainer.compute_loss(model, batch).backward()
        out[shared] = (sum(trainer._metrics["train"][f"grao/{k}"][-1] for k in COMPONENTS),
                       [p.grad.detach().clone() for p in params])
    trainer.args.prefix_sharing = True
    model.zero_grad(set_to_none=True)
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6, rel=1e-6)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _loss_matches_eager_reference(trainer, train):
    batch = getattr(trainer, "_grao_test_batch", None)
    if batch is None:
        trainer.model.train()
        batch = trainer._generate_and_score_completions([train[2]] * G + [train[3]] * G)
    model = trainer.model
    model.train()
    assert trainer.current_gradient_accumulation_steps == 1
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    fused_parts = {k: trainer._metrics["train"][f"grao/{k}"][-1] for k in COMPONENTS}

    # independent reference: the backbone's hidden states at the completion positions, the lm_head,
    # grao's eager linear_grao_loss (float64 for the value, float32 autograd for the gradients)
    prompt_ids, completion_ids = batch["prompt_ids"].flatten(0, 1), batch["completion_ids"].flatten(0, 1)
    prompt_mask, completion_mask = batch["prompt_mask"].flatten(0, 1), batch["completion_mask"].flatten(0, 1)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([prompt_mask, completion_mask], 1)
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    hidden = hidden[:, prompt_ids.shape[1] - 1:-1]
    labels = completion_ids.masked_fill(completion_mask == 0, -100)
    weight = model.lm_head.weight
    rewards = batch["grao_rewards"]
    cfg = trainer.args
    kw = dict(beta=cfg.beta_imitation, lam=cfg.lam, eps=cfg.advantage_eps, temperature=trainer.temperature)
    ref64, parts64 = linear_grao_loss(hidden.double(), weight.double(), labels, rewards.double(), **kw)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref64.item()) <= 1e-5 + 1e-5 * abs(ref64.item()), (loss.item(), ref64.item())
    for k in COMPONENTS:
        assert fused_parts[k] == pytest.approx(parts64[k].item(), abs=1e-5, rel=1e-5)
    assert abs(ref64.item()) > 1e-4  # a batch with a learning signal

    ref32, _ = linear_grao_loss(hidden, weight, labels, rewards, **kw)
    ref32.backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_loss_matches_grao_trainer_on_the_same_batch(trained, tmp_path):
    """The same groups through grao's own trainer (its padding, its backbone call, the eager loss)."""
    from grao.trainer import Rollout, TrainConfig, Trainer

    trainer, tok, train, _ = trained
    # equal prompt lengths: TRL left-pads prompts and (like TRL's GRPO) passes no position_ids,
    # grao's trainer right-pads whole rows; without prompt padding both run the same positions
    model = trainer.model
    recs, batch = _equal_prompt_length_batch(trainer, tok, train)
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, batch).backward()
    trl_loss = sum(trainer._metrics["train"][f"grao/{k}"][-1] for k in COMPONENTS)
    trl_grads = [p.grad.detach().clone() for p in params]

    ids, mask = batch["completion_ids"], batch["completion_mask"].bool()
    prompt_ids = [batch["prompt_ids"][g, 0][batch["prompt_mask"][g, 0].bool()].tolist() for g in range(2)]
    samples = [[ids[g, i][mask[g, i]].tolist() for i in range(G)] for g in range(2)]
    refs = [ids[g, G][mask[g, G]].tolist() for g in range(2)]
    texts = [[tok.decode(s, skip_special_tokens=True) for s in group] for group in samples]
    rollout = Rollout(recs, [r["prompt"] for r in recs], prompt_ids, samples, texts, refs,
                      batch["grao_rewards"].float())
    cfg = TrainConfig(loss_impl="eager", group_size=G, prompts_per_step=2, loss_temperature=trainer.temperature,
                      beta=trainer.args.beta_imitation, lam=trainer.args.lam, eps=trainer.args.advantage_eps,
                      output_dir=str(tmp_path), device="cpu", progress=False, plot=False, tensorboard="false")
    own = Trainer(cfg, model=model, tokenizer=tok, train_records=train, reward=overlap_reward)
    model.zero_grad(set_to_none=True)
    stats = own.accumulate_gradients(rollout)
    assert stats["loss"] == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    for p, g in zip(params, trl_grads):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_weights_change(trained):
    trainer, _, _, before = trained
    assert trainer.state.global_step == STEPS
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in changed or "model.embed_tokens.weight" in changed
    assert len(changed) == len(before)


def test_metrics_carry_the_components(trained):
    trainer = trained[0]
    logs = [h for h in trainer.state.log_history if "grao/exploration" in h]
    assert len(logs) == STEPS
    for h in logs:
        for key in [f"grao/{k}" for k in COMPONENTS] + ["grao/reward_reference", "reward", "loss"]:
            assert key in h and math.isfinite(h[key]), (key, h)
        parts = sum(h[f"grao/{k}"] for k in COMPONENTS)
        assert parts == pytest.approx(h["loss"], abs=2e-4, rel=1e-3)  # the Trainer rounds the logged loss
        assert h["grao/reward_reference"] == pytest.approx(1.0)  # R(y, y) of the overlap reward


def test_bad_config_and_data(trained, tmp_path):
    with pytest.raises(ValueError, match="beta_imitation"):
        make_config(tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        make_config(tmp_path, num_generations=2, per_device_train_batch_size=3, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="num_iterations"):
        make_config(tmp_path, num_iterations=2)
    trainer = trained[0]
    with pytest.raises(KeyError, match="reference"):
        trainer._generate_and_score_completions([{"prompt": "copy 12:"}] * G)
    with pytest.raises(ValueError, match="non-empty"):
        trainer._generate_and_score_completions([{"prompt": "copy 12:", "solution": ""}] * G)


def test_gradient_accumulation_and_eval(tmp_path):
    """2 micro-batches of one group each: the step's gradient is the mean of their GRAO gradients
    (no double scaling by TRL/transformers); evaluation logs the components too."""
    import copy

    from transformers import TrainerCallback

    model, tok = tiny_model_and_tokenizer()
    train, evals = demo.make_task("copy", num_train=4, num_eval=2, min_len=3, max_len=3)
    initial = copy.deepcopy(model)
    seen_batches, step_grads = [], {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            step_grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})

    args = make_config(tmp_path, per_device_train_batch_size=G, gradient_accumulation_steps=2, max_steps=1,
                       max_grad_norm=0.0, per_device_eval_batch_size=G, eval_strategy="no")
    trainer = GRAOTrainer(model=model, reward_funcs=overlap_reward, args=args,
                          train_dataset=datasets.Dataset.from_list(train),
                          eval_dataset=datasets.Dataset.from_list(evals), processing_class=tok, callbacks=[Grab()])
    inner = trainer._compute_loss

    def recording(m, inputs):
        seen_batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return inner(m, inputs)

    trainer._compute_loss = recording
    trainer.train()
    assert len(seen_batches) == 2 and all(b["grao_rewards"].shape == (1, G + 1) for b in seen_batches)

    initial.train()
    for b in seen_batches:  # expected: mean over the two micro-batches of the eager GRAO loss
        ids = torch.cat([b["prompt_ids"].flatten(0, 1), b["completion_ids"].flatten(0, 1)], 1)
        attn = torch.cat([b["prompt_mask"].flatten(0, 1), b["completion_mask"].flatten(0, 1)], 1)
        hidden = initial.model(input_ids=ids, attention_mask=attn).last_hidden_state
        hidden = hidden[:, b["prompt_ids"].shape[-1] - 1:-1]
        labels = b["completion_ids"].flatten(0, 1).masked_fill(b["completion_mask"].flatten(0, 1) == 0, -100)
        loss, _ = linear_grao_loss(hidden, initial.lm_head.weight, labels, b["grao_rewards"],
                                   temperature=trainer.temperature)
        (loss / 2).backward()
    for n, p in initial.named_parameters():
        torch.testing.assert_close(step_grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)

    trainer.evaluate()
    metrics = trainer.state.log_history[-1]  # TRL adds its metrics to the logged dict
    for k in COMPONENTS:
        assert math.isfinite(metrics[f"eval_grao/{k}"])
    assert metrics["eval_grao/reward_reference"] == pytest.approx(1.0)


def test_readme_example(tmp_path, monkeypatch):
    """grao/integrations/README_trl.md's usage block runs as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "grao" / "integrations" / "README_trl.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, "README_trl.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    assert all(f"grao/{k}" in trainer.state.log_history[-2] for k in COMPONENTS)


def test_peft_config_trains_lora_adapters_with_the_fused_loss(tmp_path):
    """GRAOTrainer(peft_config=LoraConfig): TRL wraps the model; only the adapters move (the lm_head the fused
    loss reads stays as it was), and the loss and adapter gradients on a batch equal grao's eager reference on
    the LoRA'd backbone's hidden states."""
    peft = pytest.importorskip("peft", reason="peft is not installed (extra: pip install -e '.[lora]')")
    from grao.trainer import lm_parts

    torch.manual_seed(0)
    model, tok = tiny_model_and_tokenizer()
    train, _ = demo.make_task("reverse", num_train=12, num_eval=1, min_len=3, max_len=4)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"], task_type="CAUSAL_LM")
    trainer = GRAOTrainer(model=model, reward_funcs=overlap_reward, args=make_config(tmp_path, learning_rate=5e-2),
                          train_dataset=datasets.Dataset.from_list(train), processing_class=tok, peft_config=lcfg)
    pm = trainer.model
    assert isinstance(pm, peft.PeftModel)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainer.train()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    backbone, head = lm_parts(pm)
    assert not head.weight.requires_grad

    pm.train()
    batch = trainer._generate_and_score_completions([train[2]] * G + [train[3]] * G)
    params = [p for p in pm.parameters() if p.requires_grad]
    pm.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(pm, batch)
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    prompt_ids, completion_ids = batch["prompt_ids"].flatten(0, 1), batch["completion_ids"].flatten(0, 1)
    prompt_mask, completion_mask = batch["prompt_mask"].flatten(0, 1), batch["completion_mask"].flatten(0, 1)
    ids, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    pm.zero_grad(set_to_none=True)
    hidden = backbone(input_ids=ids, attention_mask=attn).last_hidden_state[:, prompt_ids.shape[1] - 1:-1]
    labels = completion_ids.masked_fill(completion_mask == 0, -100)
    cfg = trainer.args
    kw = dict(beta=cfg.beta_imitation, lam=cfg.lam, eps=cfg.advantage_eps, temperature=trainer.temperature)
    ref, _ = linear_grao_loss(hidden, head.weight, labels, batch["grao_rewards"], **kw)
    assert abs(ref.item()) > 1e-4
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    ref.backward()
    assert any(g.abs().max() > 0 for g in grads)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
