"""The long-context ``needle`` task: its prompts hide exactly one digit run (the answer) in a letter context of
the documented length, its reward gives positional partial credit, and ``grao demo --task needle`` runs."""

from __future__ import annotations

import json
import random

import pytest

from grao import demo
from grao import tasks_needle as tn
from grao.cli import main
from grao.cli.commands import demo_defaults
from grao.cli.options import build_config


def test_prompts_hide_one_needle_in_a_letter_context():
    train, ev = demo.make_task("needle", num_train=200, num_eval=20, min_len=1, max_len=3)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    for r in train + ev:
        p, y = r["prompt"], r["reference"]
        assert p.startswith(tn.PREFIX) and p.endswith(tn.SUFFIX)
        lo, hi = tn.CONTEXT_CHARS
        context = p[len(tn.PREFIX):-len(tn.SUFFIX)]
        assert tn.SHORT_CHARS[0] <= len(context) <= tn.SHORT_CHARS[1] or lo <= len(context) <= hi
        assert 1 <= len(y) <= 3 and y.isdigit()
        assert tn.needle_of(p) == y  # exactly one run of digits, and it is the answer
        assert set(context) <= set(tn.LETTERS + " " + "0123456789")
        assert f" {y} " in f" {context} "  # a word of its own
        assert all(ch in demo.CHARS for ch in p)  # the demo tokenizer has every character
    starts = {r["prompt"].index(r["reference"]) for r in train}
    assert len(starts) > 50  # the needle sits anywhere in the context, not at a fixed place
    lengths = [len(r["prompt"]) - len(tn.PREFIX) - len(tn.SUFFIX) for r in train]
    assert max(lengths) - min(lengths) > (hi - lo) // 2  # contexts of many lengths, long ones included
    short = sum(n <= tn.SHORT_CHARS[1] for n in lengths) / len(lengths)
    assert abs(short - tn.SHORT_SHARE) < 0.12  # the short share that lets the 2-layer model start learning
    assert sum(n >= 128 for n in lengths) / len(lengths) > 0.1  # long prompts are common


def test_context_length_and_errors():
    rng = random.Random(0)
    for length in (16, 64, 300):
        ctx = tn.make_context(rng, "42", length)
        assert len(ctx) == length and tn.needle_of(ctx) == "42"
    with pytest.raises(ValueError):
        tn.make_context(rng, "4a")
    with pytest.raises(ValueError):
        tn.needle_of("find ab 1 cd 2:")


def test_reward_partial_credit():
    r = tn.needle_reward(prompts=["p"] * 8, completions=["47", " 47 ", "4", "43", "74", "471", "", "x"],
                         references=["47"] * 8)
    assert r == [1.0, 1.0, 0.5, 0.5, 0.0, pytest.approx(2 / 3), 0.0, 0.0]
    assert tn.needle_score("7", "7") == 1.0 and tn.needle_score("3", "7") == 0.0


def test_demo_defaults_and_model_positions():
    cfg = build_config(type("A", (), {"task": "needle"})(), demo_defaults(type("A", (), {"task": "needle"})()))
    assert cfg.reward == tn.REWARD_SPEC and cfg.prefix_sharing and cfg.task == "needle"
    assert demo_defaults(type("A", (), {"task": "copy"})())["task"] == "copy"
    prompt_tokens = len(tn.PREFIX) + tn.CONTEXT_CHARS[1] + len(tn.SUFFIX) + 1  # + bos
    assert demo.model_size("needle").max_position_embeddings >= prompt_tokens + cfg.max_new_tokens
    assert demo.model_size("copy") == demo.DemoModelConfig()


def test_demo_cli_runs_two_steps(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--task", "needle", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
            "--eval-every", "0", "--eval-prompts", "4", "--task-train-size", "8", "--task-eval-size", "4",
            "--save-every", "0", "--no-progress", "--output-dir", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "task=needle" in text and "held-out (4 prompts" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["prefix_sharing"] and summary["config"]["reward"] == tn.REWARD_SPEC
