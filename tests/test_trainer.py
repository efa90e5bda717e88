"""Trainer: micro-batched updates equal full-batch ones, checkpoints and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grao import demo
from grao.trainer import Rollout, TrainConfig, Trainer, checkpoint_dirs, pad_rows, resolve_loss_impl

REPO = Path(__file__).resolve().parents[1]


def fused_available() -> bool:
    try:
        return resolve_loss_impl("fused") == "fused"
    except ImportError:
        return False


IMPLS = ["eager"] + (["fused"] if fused_available() else [])


def tiny_trainer(method="grao", impl="eager", micro=0, G=3, tmp_path=None, dtype=torch.float32, **kw):
    tok = demo.build_tokenizer()
    model = demo.build_model(tok, seed=7, size=demo.DemoModelConfig(hidden_size=32, intermediate_size=64,
                                                                   num_attention_heads=2))
    model.to(dtype)
    train, _ = demo.make_task("reverse", num_train=16, num_eval=2)
    cfg = TrainConfig(method=method, loss_impl=impl, micro_batch_rows=micro, group_size=G, prompts_per_step=3,
                      max_new_tokens=5, output_dir=str(tmp_path or "runs/test"), progress=False, plot=False,
                      tensorboard="false", **kw)
    return Trainer(cfg, model=model, tokenizer=tok, train_records=train)


def fixed_rollout(trainer: Trainer, G=3, seed=0) -> Rollout:
    """A rollout with random completions of varied lengths and rewards with ties and distinct values."""
    g = torch.Generator().manual_seed(seed)
    records = trainer.train_records[:3]
    tok = trainer.tokenizer
    prompt_ids = [tok(r["prompt"])["input_ids"] for r in records]
    samples = [[torch.randint(4, len(tok), (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
                for _ in range(G)] for _ in records]
    refs = [tok(r["reference"])["input_ids"] + [tok.eos_token_id] for r in records]
    rewards = torch.randint(0, 3, (3, G + 1), generator=g).float()
    rewards[0] = torch.tensor([0.0] * G + [1.0])  # the all-samples-failed group
    return Rollout(records, [r["prompt"] for r in records], prompt_ids, samples,
                   [[""] * G for _ in records], refs, rewards)


def grads_of(trainer: Trainer, ro: Rollout) -> tuple[dict, dict]:
    trainer.model.zero_grad(set_to_none=True)
    stats = trainer.accumulate_gradients(ro)
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}, stats


def test_pad_rows_shifts_labels():
    ids, mask, labels = pad_rows([([5, 6], [7, 8]), ([9], [10])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # hidden state t predicts token t + 1: completion tokens only
    assert labels.tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("micro", [4, 3, 1])  # whole groups (G+1 = 4), rows (3: crosses groups), single rows
def test_grao_micro_batches_match_full_batch_and_float64(impl, micro):
    full = tiny_trainer(impl=impl, micro=0)
    ro = fixed_rollout(full)
    g_full, s_full = grads_of(full, ro)
    part = tiny_trainer(impl=impl, micro=micro)
    g_part, s_part = grads_of(part, ro)
    ref = tiny_trainer(impl="eager", micro=0, dtype=torch.float64)
    g_ref, s_ref = grads_of(ref, ro)
    assert set(g_full) == set(g_part) == set(g_ref) and len(g_full) > 5
    assert abs(s_full["loss"] - s_ref["loss"]) < 1e-5 and abs(s_part["loss"] - s_ref["loss"]) < 1e-5
    for name in g_full:
        scale = g_ref[name].abs().max().item() + 1e-12
        assert (g_part[name] - g_full[name]).abs().max().item() <= 1e-6 * max(1.0, scale), name
        assert (g_part[name].double() - g_ref[name]).abs().max().item() <= 2e-5 * max(1.0, scale), name
    assert any(g.abs().max() > 0 for g in g_full.values())


@pytest.mark.parametrize("method", ["grpo", "sft", "dpo"])
def test_baseline_micro_batches_match_full_batch(method):
    ro = fixed_rollout(tiny_trainer())
    g_full, s_full = grads_of(tiny_trainer(method=method, micro=0), ro)
    g_part, s_part = grads_of(tiny_trainer(method=method, micro=2), ro)
    g_ref, _ = grads_of(tiny_trainer(method=method, micro=0, dtype=torch.float64), ro)
    assert abs(s_full["loss"] - s_part["loss"]) < 1e-6
    for name in g_full:
        scale = max(1.0, g_ref[name].abs().max().item())
        assert (g_part[name] - g_full[name]).abs().max().item() <= 1e-6 * scale, name
        assert (g_full[name].double() - g_ref[name]).abs().max().item() <= 2e-5 * scale, name


def test_grpo_all_failed_group_gives_no_gradient_but_grao_does():
    """The spec's point: rewards 0..0 with R(y, y) = 1 -> GRPO advantages 0, GRAO learns from y."""
    t = tiny_trainer()
    ro = fixed_rollout(t)
    ro.rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 3)
    g_grpo, _ = grads_of(tiny_trainer(method="grpo"), ro)
    g_grao, _ = grads_of(tiny_trainer(method="grao"), ro)
    assert all(g.abs().max() == 0 for g in g_grpo.values())
    assert any(g.abs().max() > 0 for g in g_grao.values())


def test_train_steps_are_deterministic(tmp_path):
    # generate() samples from the global RNG, which each Trainer seeds: run one trainer after the other
    a = tiny_trainer(tmp_path=tmp_path / "a", lr=1e-2, seed=3)
    ma = [a.train_step() for _ in range(2)]
    b = tiny_trainer(tmp_path=tmp_path / "b", lr=1e-2, seed=3)
    mb = [b.train_step() for _ in range(2)]
    assert [m["sample"] for m in ma] == [m["sample"] for m in mb]
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def _run_train(out: Path, steps: int, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grao.cli", "train", "--model", "demo", "--steps", str(steps), "--output-dir",
           str(out), "--save-every", "2", "--save-total-limit", "3", "--prompts-per-step", "2", "--group-size", "2",
           "--max-new-tokens", "4", "--lr", "1e-2", "--no-progress", "--no-plot", "--tensorboard", "false",
           "--seed", "5", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _final_weights(out: Path) -> dict:
    from safetensors.torch import load_file
    last = checkpoint_dirs(out)[-1]
    return load_file(str(last / "model.safetensors"))


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    steps = 40  # long enough that the kill lands well before the end, even on an idle machine
    straight = _run_train(tmp_path / "straight", steps)
    assert straight.wait(timeout=300) == 0, straight.stdout.read().decode()[-3000:]

    out = tmp_path / "killed"
    proc = _run_train(out, steps)
    deadline = time.time() + 240
    while time.time() < deadline and not any(int(p.name[5:]) >= 4 for p in checkpoint_dirs(out)):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(0.1)  # somewhere inside a later step (or a later save)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed: " + proc.stdout.read().decode()[-2000:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoint_dirs(out)
    assert done and int(done[-1].name[5:]) < steps
    # a torn metrics line and a half-written checkpoint, as a kill during a write leaves them
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "rew')
    junk = out / "checkpoints" / ".tmp-step-00000099-1"
    junk.mkdir()
    (junk / "trainer_state.pt").write_bytes(b"garbage")

    resumed = _run_train(out, steps, extra=("--resume",))
    log = resumed.stdout.read().decode()
    assert resumed.wait(timeout=300) == 0, log[-3000:]
    assert not junk.exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    a, b = _final_weights(tmp_path / "straight"), _final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    state = torch.load(checkpoint_dirs(out)[-1] / "trainer_state.pt", weights_only=True)
    assert state["step"] == steps
