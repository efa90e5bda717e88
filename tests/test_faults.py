"""Faults and bad input: failing reward functions, non-finite losses / gradients, a process killed inside a
checkpoint write, and untrusted input (YAML tags, pickled objects in a state file, remote model code)."""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grao import demo
from grao.rewards import RewardError, exact_match, resolve_reward
from grao.trainer import (
    STATE_FILE,
    TrainConfig,
    Trainer,
    checkpoint_dirs,
    recover_interrupted_saves,
)

REPO = Path(__file__).resolve().parents[1]
G = 2


def records(n=4, poison=()):
    train, _ = demo.make_task("copy", num_train=n, num_eval=1, min_len=3, max_len=3)
    return [dict(r, poison=i in poison) for i, r in enumerate(train)]


def tiny(tmp_path, reward, *, recs=None, **kw):
    tok = demo.build_tokenizer()
    model = demo.build_model(tok, seed=1, size=demo.DemoModelConfig(hidden_size=32, intermediate_size=64,
                                                                   num_attention_heads=2))
    opts = {"group_size": G, "prompts_per_step": 4, "max_new_tokens": 3, "lr": 1e-2, "loss_impl": "eager",
            "output_dir": str(tmp_path / "run"), "progress": False, "plot": False, "tensorboard": "false"}
    cfg = TrainConfig(**{**opts, **kw})
    return Trainer(cfg, model=model, tokenizer=tok, train_records=recs or records(), reward=reward)


def snapshot(trainer):
    return ({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            copy.deepcopy(trainer.optimizer.state_dict()), copy.deepcopy(trainer.scheduler.state_dict()))


def assert_same_state(trainer, snap):
    params, opt, sched = snap
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, params[n]), n
    now = trainer.optimizer.state_dict()
    assert now["param_groups"] == opt["param_groups"]
    assert now["state"].keys() == opt["state"].keys() and len(opt["state"]) > 0
    for k, st in opt["state"].items():
        for name, v in st.items():
            assert torch.equal(now["state"][k][name], v), (k, name)
    assert trainer.scheduler.state_dict() == sched


# ------------------------------------------------------------------------------------------------ reward errors


def exploding_reward(completions, **_):
    raise ConnectionError("judge service down")


def short_reward(completions, **_):
    return [0.0] * (len(completions) - 1)


def none_reward(completions, **_):
    return None


def holey_reward(completions, **_):
    return [None] + [1.0] * (len(completions) - 1)


def nan_reward(completions, **_):
    return [math.nan] * len(completions)


class ScoreService:  # a callable object without __name__: errors name its class
    def __call__(self, completions, **_):
        return [math.inf] * len(completions)


@pytest.mark.parametrize("reward, pattern", [
    (exploding_reward, r"'exploding_reward' raised ConnectionError: judge service down"),
    (short_reward, r"'short_reward' returned 11 values for 12 completions"),
    (none_reward, r"'none_reward' returned NoneType instead of a list of 12 floats"),
    (holey_reward, r"'holey_reward' returned None \(not a number\) for completion 0"),
    (nan_reward, r"'nan_reward' returned a non-finite value nan"),
    (ScoreService(), r"'ScoreService' returned a non-finite value inf"),
])
def test_bad_reward_raises_error_naming_the_function(tmp_path, reward, pattern):
    t = tiny(tmp_path, reward)
    with pytest.raises(RewardError, match=pattern):
        t.train_step()


def test_bad_reward_inside_weighted_reward_names_both(tmp_path):
    t = tiny(tmp_path, resolve_reward([{"name": exact_match, "weight": 1.0}, {"name": nan_reward, "weight": 0.5}]))
    with pytest.raises(RewardError, match=r"1\*exact_match\+0\.5\*nan_reward.*'nan_reward' returned a non-finite"):
        t.train_step()


def poisoned_nan(completions, poison, **_):
    return [math.nan if p else float(len(c)) for c, p in zip(completions, poison)]


def poisoned_raise(completions, poison, **_):
    if any(poison):  # fails on any batch holding the poisoned prompt: only its own group must be dropped
        raise ValueError("cannot score this prompt")
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("reward", [poisoned_nan, poisoned_raise])
def test_drop_group_leaves_out_the_bad_group_and_counts_it(tmp_path, reward):
    t = tiny(tmp_path, reward, recs=records(4, poison={2}), on_reward_error="drop_group")
    seen = []
    inner = t.accumulate_gradients
    t.accumulate_gradients = lambda ro: seen.append(ro) or inner(ro)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    m = t.train_step()
    assert (m["groups_dropped"], m["total_groups_dropped"], m["skipped"]) == (1, 1, False)
    assert m["train_rows"] == 3 * (G + 1) and math.isfinite(m["loss"]) and math.isfinite(m["reward_mean"])
    assert reward.__name__ in " ".join(m["reward_errors"])
    (ro,) = seen  # the update saw the 3 good groups only
    assert len(ro.prompt_ids) == 3 and not any(r["poison"] for r in ro.records)
    assert ro.rewards.shape == (3, G + 1) and torch.isfinite(ro.rewards).all()
    assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters())


def test_every_group_dropped_skips_the_step_cleanly(tmp_path):
    state = {"broken": False}

    def sometimes_none(completions, **_):
        return [None] * len(completions) if state["broken"] else [float(len(c)) for c in completions]

    t = tiny(tmp_path, sometimes_none, on_reward_error="drop_group", steps=3, plot=True, max_consecutive_skips=0)
    t.train_step()  # a good step: the optimizer has state now
    snap = snapshot(t)
    state["broken"] = True
    m = t.train_step()
    assert (m["skipped"], m["skipped_all_dropped"], m["groups_dropped"]) == (True, 1, 4)
    assert math.isnan(m["loss"]) and math.isnan(m["reward_mean"]) and m["step"] == 2
    assert_same_state(t, snap)
    assert all(p.grad is None for p in t.model.parameters())
    history = t.train()  # step 3 is skipped too; logging, the curves and the checkpoint still work
    assert [h["total_skipped_all_dropped"] for h in history] == [2]
    assert (Path(t.config.output_dir) / "curves.png").exists() and checkpoint_dirs(t.config.output_dir)
    rows = [json.loads(line) for line in (Path(t.config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_all_dropped"] == 1


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path):
    t = tiny(tmp_path, nan_reward, on_reward_error="drop_group", max_consecutive_skips=2)
    t.train_step()
    with pytest.raises(RuntimeError, match="2 steps in a row made no update"):
        t.train_step()


# ------------------------------------------------------------------------------------------------ non-finite


def _nan_loss(t):
    inner = t.backend._grao

    def bad(*args, **kw):
        loss, stats = inner(*args, **kw)
        return loss * math.nan, stats
    t.backend._grao = bad
    return lambda: setattr(t.backend, "_grao", inner)


def _grad_hook(value):
    def inject(t):
        handle = t.model.model.norm.weight.register_hook(lambda g: g * value)
        return handle.remove
    return inject


@pytest.mark.parametrize("inject", [_nan_loss, _grad_hook(math.nan), _grad_hook(math.inf)],
                         ids=["nan_loss", "nan_grad", "inf_grad"])
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_nonfinite_step_is_skipped_and_leaves_weights_and_optimizer_alone(tmp_path, inject, clip):
    t = tiny(tmp_path, lambda completions, **_: [float(len(c)) for c in completions], max_grad_norm=clip)
    assert t.train_step()["skipped_nonfinite"] == 0
    snap = snapshot(t)
    undo = inject(t)
    m = t.train_step()
    assert (m["skipped"], m["skipped_nonfinite"], m["total_skipped_nonfinite"]) == (True, 1, 1)
    assert not math.isfinite(m["grad_norm"])
    assert_same_state(t, snap)
    assert all(p.grad is None for p in t.model.parameters())
    undo()
    m = t.train_step()  # training goes on
    assert (m["skipped_nonfinite"], m["total_skipped_nonfinite"]) == (0, 1) and math.isfinite(m["grad_norm"])
    assert any(not torch.equal(p, snap[0][n]) for n, p in t.model.named_parameters())


# ------------------------------------------------------------------------------------------------ kill during a save


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grao.cli", "train", "--model", "demo", "--task", "copy", "--task-train-size", "16",
            "--task-eval-size", "2", "--steps", "4", "--save-every", "2", "--prompts-per-step", "2", "--group-size",
            "2", "--max-new-tokens", "3", "--output-dir", str(out), "--no-progress", "--no-plot", "--tensorboard",
            "false", "--loss-impl", "eager", *extra]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    env.pop("WORLD_SIZE", None)
    return env


def test_kill_inside_checkpoint_write_keeps_previous_checkpoint_and_resume_uses_it(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out), cwd=REPO, env=_env(GRAO_FAULT_INJECT="save_weights@4"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 240
    try:
        for line in proc.stdout:  # the run announces that it sits inside the write of step 4
            lines.append(line)
            if line.startswith("GRAO_FAULT_INJECT: paused at save_weights step 4") or time.time() > deadline:
                break
        assert lines and lines[-1].startswith("GRAO_FAULT_INJECT"), "".join(lines)[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt_root = out / "checkpoints"
    partial = [p for p in ckpt_root.iterdir() if p.name.startswith(".tmp-step-00000004")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert not (partial[0] / STATE_FILE).exists()  # killed between the weights and the trainer state
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000002"]

    # the previous checkpoint is complete and loads
    from transformers import AutoModelForCausalLM
    prev = checkpoint_dirs(out)[-1]
    AutoModelForCausalLM.from_pretrained(prev)
    assert torch.load(prev / STATE_FILE, weights_only=True)["step"] == 2

    res = subprocess.run(_train_cmd(out, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=240, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000002", "step-00000004"]
    assert not [p for p in ckpt_root.iterdir() if p.name.startswith(".")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert torch.load(checkpoint_dirs(out)[-1] / STATE_FILE, weights_only=True)["step"] == 4


def test_recover_a_resave_killed_between_its_renames(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-00000002", ".old-step-00000004-123", ".tmp-step-00000004-123", ".old-step-00000001-9-pruned"):
        (root / name).mkdir(parents=True)
        (root / name / STATE_FILE).write_bytes(b"x")
    recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000004"]


# ------------------------------------------------------------------------------------------------ untrusted input


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/apply:pathlib.Path.touch"])
def test_yaml_config_cannot_run_code(tmp_path, tag):
    from grao.cli import build_config, build_parser
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if tag.endswith("os.system") else str(marker)
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"lr: 0.001\nseed: {tag} [{json.dumps(arg)}]\n")
    with pytest.raises(ValueError, match=r"evil\.yaml: refused: the config may hold only plain YAML values"):
        build_config(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert not marker.exists()
    cfg.write_text("lr: [0.001\n")
    with pytest.raises(ValueError, match=r"evil\.yaml: not valid YAML"):
        build_config(build_parser().parse_args(["train", "--config", str(cfg)]))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_state_file_with_pickled_object_is_refused(tmp_path):
    t = tiny(tmp_path, exact_match, steps=1)
    t.save_checkpoint()  # step 0, a genuine checkpoint
    ckpt = checkpoint_dirs(t.config.output_dir)[-1]
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    marker = tmp_path / "pwned"
    state["optimizer"] = _Evil(str(marker))
    torch.save(state, ckpt / STATE_FILE)
    with pytest.raises(ValueError, match=r"refusing to load .*trainer_state\.pt: it holds objects other than"):
        tiny(tmp_path, exact_match, steps=1, resume=True)
    assert not marker.exists()


class _Stop(Exception):
    pass


def test_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    import transformers

    from grao.cli import build_config, build_parser
    calls = []

    def tokenizer(*args, **kw):
        calls.append(("tokenizer", kw.get("trust_remote_code", "missing")))
        return demo.build_tokenizer()

    def model(*args, **kw):
        calls.append(("model", kw.get("trust_remote_code", "missing")))
        raise _Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", model)
    assert build_config(build_parser().parse_args(["train"])).trust_remote_code is False
    assert build_config(build_parser().parse_args(["train", "--trust-remote-code"])).trust_remote_code is True
    for flag in (False, True):
        calls.clear()
        kw = {"trust_remote_code": True} if flag else {}
        with pytest.raises(_Stop):
            Trainer(TrainConfig(model="someone/model", output_dir=str(tmp_path), **kw), train_records=records())
        with pytest.raises(_Stop):
            resolve_reward("reward_model:someone/rm", **kw)
        assert calls == [("tokenizer", flag), ("model", flag)] * 2
    # resuming with a ready model object reloads the weights from the checkpoint, also without remote code
    t = tiny(tmp_path, exact_match, steps=1)
    t.save_checkpoint()
    calls.clear()
    with pytest.raises(_Stop):
        tiny(tmp_path, exact_match, steps=1, resume=True)
    assert calls == [("model", False)]
