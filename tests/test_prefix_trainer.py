"""Trainer with prefix sharing: the same update as padded rows, for every method, micro-batched or not."""

from __future__ import annotations

import pytest
import torch

from grao.trainer import TrainConfig
from grao.trainer.plan import plan_micro_batches
from grao.trainer.update import grao_rows

from .test_trainer import IMPLS, fixed_rollout, grads_of, tiny_trainer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def compare(method="grao", impl="eager", dtype=torch.float64, grad_tol=1e-6, loss_tol=1e-10, shared_kw=None,
            **kw):
    ro = fixed_rollout(tiny_trainer(prefix_sharing=False))
    g_pad, s_pad = grads_of(tiny_trainer(method=method, impl=impl, dtype=dtype, prefix_sharing=False,
                                         micro_batch_tokens=0, **kw), ro)
    g_sh, s_sh = grads_of(tiny_trainer(method=method, impl=impl, dtype=dtype, prefix_sharing=True,
                                       **{**kw, **(shared_kw or {})}), ro)
    assert set(g_pad) == set(g_sh) and any(g.abs().max() > 0 for g in g_pad.values())
    assert abs(s_sh["loss"] - s_pad["loss"]) <= loss_tol * max(1.0, abs(s_pad["loss"])), (s_sh["loss"], s_pad["loss"])
    for name in g_pad:
        assert rel(g_sh[name], g_pad[name]) <= grad_tol, f"{name}: {rel(g_sh[name], g_pad[name]):.2e}"
    return s_sh, s_pad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("micro", [{"micro_batch_tokens": 0}, {"micro_batch_tokens": 12},
                                   {"micro": 3}, {"micro": 4}],
                         ids=["one pass", "token budget splits groups", "3 rows", "whole groups"])
def test_grao_shared_equals_padded_float64(impl, micro):
    s_sh, s_pad = compare("grao", impl, shared_kw=micro)
    for k in ("loss_exploration", "loss_imitation", "loss_alignment"):
        assert abs(s_sh[k] - s_pad[k]) <= 1e-10


def test_grao_rows_inside_and_across_groups_float64():
    """micro_batch_rows 3 with groups of 8 rows: two ranges inside the first group (they share its prompt's
    keys and values) and one across the first and second (it forwards both prompts itself)."""
    ro = fixed_rollout(tiny_trainer(prefix_sharing=False, G=7), G=7)
    g_pad, s_pad = grads_of(tiny_trainer(impl="fused", G=7, dtype=torch.float64, prefix_sharing=False,
                                         micro_batch_tokens=0), ro)
    g_sh, s_sh = grads_of(tiny_trainer(impl="fused", G=7, dtype=torch.float64, micro=3), ro)
    assert abs(s_sh["loss"] - s_pad["loss"]) <= 1e-10 * max(1.0, abs(s_pad["loss"]))
    for name in g_pad:
        assert rel(g_sh[name], g_pad[name]) <= 1e-6, f"{name}: {rel(g_sh[name], g_pad[name]):.2e}"


@pytest.mark.parametrize("method", ["grpo", "sft", "dpo"])
def test_baselines_shared_equal_padded_float64(method):
    compare(method, shared_kw={"micro_batch_tokens": 10})


def test_grao_shared_fp32_and_gradient_checkpointing():
    compare("grao", IMPLS[-1], dtype=torch.float32, grad_tol=2e-5, loss_tol=1e-6, gradient_checkpointing=True)


def test_plan_micro_batches_by_tokens():
    cfg = TrainConfig(group_size=2, micro_batch_tokens=20, prefix_sharing=True)
    p1, p2 = [1] * 8, [2] * 3
    rows = [(p1, [5] * 4), (p1, [5] * 4), (p1, [5] * 3)] + [(p2, [6] * 2)] * 3
    # group 1 forwards 8 + 3 + 3 + 2 = 16 tokens, group 2 forwards 3 + 1 * 3 = 6: together 22 > 20
    assert plan_micro_batches(cfg, rows, 3, splittable=True) == [(0, 3), (3, 6)]
    cfg.micro_batch_tokens = 25
    assert plan_micro_batches(cfg, rows, 3, splittable=True) == [(0, 6)]
    cfg.micro_batch_tokens = 12  # group 1 is over, but its completions (8 tokens) fit: not split
    assert plan_micro_batches(cfg, rows, 3, splittable=True) == [(0, 3), (3, 6)]
    cfg.micro_batch_tokens = 5  # group 1's completions (8) are over, but so is its prompt (8): ranges of <= 8
    assert plan_micro_batches(cfg, rows, 3, splittable=True) == [(0, 3), (3, 6)]
    short = [(p2, [5] * 4), (p2, [5] * 4), (p2, [5] * 3)] + [(p1, [6] * 2)] * 3
    # group 1 now has a 3-token prompt: its completions (3 + 3 + 2) split into ranges of <= 5 tokens
    assert plan_micro_batches(cfg, short, 3, splittable=True) == [(0, 1), (1, 3), (3, 6)]
    assert plan_micro_batches(cfg, short, 3, splittable=False) == [(0, 3), (3, 6)]
    cfg.prefix_sharing = False  # padded: rows x longest row
    cfg.micro_batch_tokens = 24
    assert plan_micro_batches(cfg, rows, 3, splittable=True) == [(0, 2), (2, 3), (3, 6)]
    cfg.micro_batch_rows = 4  # the override
    assert plan_micro_batches(cfg, rows, 3, splittable=True) == [(0, 4), (4, 6)]
    cfg.micro_batch_rows, cfg.micro_batch_tokens = 0, 0
    assert plan_micro_batches(cfg, rows, 3, splittable=True) == [(0, 6)]
    # balanced: 9 rows of 256 + 511 tokens under 4096 need 2 passes; greedy would make them 7 + 2 rows
    cfg.prefix_sharing, cfg.micro_batch_tokens = True, 4096
    group = [([3] * 256, [4] * 512)] * 9
    assert plan_micro_batches(cfg, group, 9, splittable=True) == [(0, 5), (5, 9)]
    # a prompt longer than the budget: one pass for the group, not one prompt forward per row
    long_prompt = [([3] * 5000, [4] * 128)] * 9
    assert plan_micro_batches(cfg, long_prompt, 9, splittable=True) == [(0, 9)]
    cfg.micro_batch_tokens = 1024  # a budget under the prompt: ranges of up to 5000 completion tokens, one pass
    assert plan_micro_batches(cfg, long_prompt, 9, splittable=True) == [(0, 9)]
    long_completions = [([3] * 2000, [4] * 1001)] * 9  # 9 x 1000 inputs: ranges of <= 2000 (the prompt), 2 rows
    assert plan_micro_batches(cfg, long_completions, 9, splittable=True) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    # the prompt forwarded once for a split group's passes (PromptKV): ranges held to the budget itself
    assert plan_micro_batches(cfg, long_prompt, 9, splittable=True, prompt_kv=True) == [(0, 5), (5, 9)]
    assert plan_micro_batches(cfg, long_completions, 9, splittable=True, prompt_kv=True) == [(r, r + 1)
                                                                                          for r in range(9)]
    cfg.prefix_sharing, cfg.micro_batch_tokens = False, 4096  # padded rows repeat the prompt: one row per pass
    assert plan_micro_batches(cfg, long_prompt, 9, splittable=True) == [(r, r + 1) for r in range(9)]


def test_planned_passes_match_the_passes_made():
    """Under data parallelism the passes are agreed before the update: the plan must be what the update does."""
    for method, kw in (("grao", {"micro_batch_tokens": 12}), ("grao", {"micro": 3}),
                       ("grpo", {"micro_batch_tokens": 10}), ("dpo", {"micro_batch_tokens": 10}),
                       ("sft", {"micro_batch_tokens": 5})):
        t = tiny_trainer(method=method, **kw)
        ro = fixed_rollout(t)
        planned = t.method.planned_passes(t.config, ro, t.tokenizer, prompt_kv=t.forward.can_share_prompt_kv)
        made: list[bool] = []
        prompt_forwards: list[bool] = []

        def hook(_module, _args, kwargs, _out, made=made, prompt_forwards=prompt_forwards):
            kv = getattr(kwargs.get("grao_packing"), "prompt_kv", None)
            if kv is not None and kv.recording:  # a split group's prompt, forwarded once: not a pass of its own
                prompt_forwards.append(True)
            else:
                made.append(torch.is_grad_enabled())

        handle = t.model.model.register_forward_hook(hook, with_kwargs=True)
        try:
            t.accumulate_gradients(ro)
        finally:
            handle.remove()
        assert planned > 1 and sum(made) == planned, (method, kw, planned, made)
        if method in ("grao", "grpo") and "micro_batch_tokens" in kw:  # split groups share their prompt's K/V
            assert prompt_forwards, "a split group's passes did not share one prompt forward"


def test_unsupported_model_refused_with_the_flag_named():
    import transformers

    from grao import demo
    from grao.trainer import Trainer
    tok = demo.build_tokenizer()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2))
    train, _ = demo.make_task("reverse", num_train=4, num_eval=1)
    cfg = TrainConfig(group_size=2, prompts_per_step=2, progress=False, plot=False, tensorboard="false",
                      output_dir="runs/test-gpt2")
    with pytest.raises(NotImplementedError, match="--no-prefix-sharing"):
        Trainer(cfg, model=gpt2, tokenizer=tok, train_records=train)


def test_grao_rows_order():
    ro = fixed_rollout(tiny_trainer())
    rows = grao_rows(ro)
    assert len(rows) == 3 * 4 and rows[3][1] == ro.reference_ids[0] and rows[0][0] == ro.prompt_ids[0]


@pytest.mark.parametrize("flag, expected", [((), True), (("--no-prefix-sharing",), False)])
def test_cli_prefix_sharing_flag(tmp_path, flag, expected):
    """On by default in ``grao train``; ``--no-prefix-sharing`` (generated from the config field) turns it off."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "grao.cli", "train", "--model", "demo", "--steps", "1", "--prompts-per-step", "2",
           "--group-size", "2", "--max-new-tokens", "3", "--no-progress", "--no-plot", "--tensorboard", "false",
           "--output-dir", str(tmp_path / "run"), *flag]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["prefix_sharing"] is expected and config["micro_batch_tokens"] == 1024
