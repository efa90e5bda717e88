"""No prompt is cut silently (issue 21, item 4): by default prompts are never cut; a prompt that with
max_new_tokens does not fit the model's positions is refused, naming its record and --max-prompt-length;
with max_prompt_length N a longer prompt keeps its last N tokens, with one warning and a per-step count."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from grao import demo
from grao.trainer import RolloutEngine, TrainConfig, Trainer
from grao.trainer.rollout import PromptLengthError

REPO = Path(__file__).resolve().parents[1]


def record(n_digits: int, seed: int = 0) -> dict:
    """A 'copy' record whose prompt is ``n_digits + 6`` tokens of the demo tokenizer (one per character)."""
    digits = "".join(str((seed + 3 * i) % 10) for i in range(n_digits))
    return {"prompt": f"copy {digits}:", "reference": digits[:3]}


def tiny_trainer(tmp_path, records, *, positions=64, G=2, P=2, new=3, eval_records=None, **kw) -> Trainer:
    tok = demo.build_tokenizer()
    model = demo.build_model(tok, seed=7, size=demo.DemoModelConfig(hidden_size=32, intermediate_size=64,
                                                                   num_attention_heads=2,
                                                                   max_position_embeddings=positions))
    cfg = TrainConfig(group_size=G, prompts_per_step=P, max_new_tokens=new, output_dir=str(tmp_path / "run"),
                      progress=False, plot=False, tensorboard="false", loss_impl="eager", **kw)
    return Trainer(cfg, model=model, tokenizer=tok, train_records=records, eval_records=eval_records)


def cut_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)
            and "max_prompt_length=" in str(w.message)]


def test_default_never_cuts_a_long_prompt(tmp_path):
    """600 prompt tokens (more than the old default 512) in a model of 1024 positions: all of them are kept."""
    assert TrainConfig().max_prompt_length == 0
    records = [record(594), record(3, seed=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny_trainer(tmp_path, records, positions=1024)
        ro = trainer.rollout(records, record_indices=[0, 1])
    full = [trainer.tokenizer(r["prompt"])["input_ids"] for r in records]
    assert len(full[0]) == 600
    assert ro.prompt_ids == full and ro.prompts_truncated == 0
    assert cut_warnings(caught) == []


def test_a_prompt_exactly_filling_the_positions_is_accepted(tmp_path):
    trainer = tiny_trainer(tmp_path, [record(55), record(3)], positions=64)  # 61 prompt + 3 new = 64
    assert len(trainer.rollout(trainer.train_records[:1]).prompt_ids[0]) == 61


def test_a_prompt_over_the_positions_is_refused_up_front_with_its_record(tmp_path):
    records = [record(3, seed=i) for i in range(8)]
    records[5] = record(56)  # 62 prompt tokens + 3 new tokens > 64 positions
    with pytest.raises(PromptLengthError) as err:
        tiny_trainer(tmp_path, records, positions=64)
    msg = str(err.value)
    assert msg.startswith("record 5 of data: its prompt is 62 tokens"), msg
    assert "with --max-new-tokens 3 it needs 65 positions, more than the model's 64" in msg
    assert "set --max-prompt-length N (at most 61) to keep each prompt's last N tokens" in msg
    assert "or use a model with more positions" in msg
    with pytest.raises(PromptLengthError, match="^record 1 of eval_data: its prompt is 62 tokens"):
        tiny_trainer(tmp_path, records[:2], positions=64, eval_records=[record(3), record(56)])


def test_the_step_and_evaluate_refuse_it_too(tmp_path):
    """The per-step guarantee (records not seen up front) names the record's index in the data."""
    trainer = tiny_trainer(tmp_path, [record(3, seed=i) for i in range(4)], positions=64)
    long = record(56)
    with pytest.raises(PromptLengthError, match="^record 17 of data: its prompt is 62 tokens.*--max-prompt-length"):
        trainer.rollout([trainer.train_records[0], long], record_indices=[3, 17])
    with pytest.raises(PromptLengthError, match="^prompt 1 of the batch: its prompt is 62 tokens"):
        trainer.rollout([trainer.train_records[0], long])
    with pytest.raises(PromptLengthError, match="^record 2 of the evaluated records: its prompt is 62 tokens"):
        trainer.evaluate([record(3), record(4), long])
    # N itself too large: the cut prompt still does not fit
    with pytest.raises(PromptLengthError, match="of 66 tokens is cut to --max-prompt-length 62, .* needs 65 positions"):
        tiny_trainer(tmp_path, [record(60), record(3)], positions=64, max_prompt_length=62)
    with pytest.raises(PromptLengthError, match="; set --max-new-tokens below 64 to leave room for a prompt"):
        tiny_trainer(tmp_path, [record(3), record(4)], positions=64, new=64)


def test_the_cli_refuses_it_in_one_line(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [record(3), record(80), record(4)]))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "grao.cli", "train", "--model", "demo", "--data", str(data),
                          "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
                          "--no-progress", "--no-plot", "--tensorboard", "false", "--output-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300, env=env, check=False)
    assert (res.returncode, res.stdout) == (2, ""), res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("grao: error: record 1 of data: its prompt is 86 tokens, and with --max-new-tokens 4 "
                                 "it needs 90 positions, more than the model's 64"), res.stderr
    assert "set --max-prompt-length N (at most 60)" in res.stderr


def test_max_prompt_length_keeps_the_last_tokens_warns_once_and_counts_per_step(tmp_path):
    N = 20
    records = [record(30, seed=1), record(3, seed=2), record(40, seed=3), record(14, seed=4)]  # 36, 9, 46, 20 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny_trainer(tmp_path, records, P=4, steps=3, max_prompt_length=N)
        history = trainer.train()
        ro = trainer.rollout(records, record_indices=[0, 1, 2, 3])
    msgs = cut_warnings(caught)
    assert len(msgs) == 1, msgs  # once for the run, not once per step
    assert "2 of the 4 prompts of data are longer and will be cut from the left" in msgs[0]
    assert "record 0: its first 16 of 36 tokens dropped, its last 20 kept" in msgs[0]
    full = [trainer.tokenizer(r["prompt"])["input_ids"] for r in records]
    assert ro.prompt_ids == [full[0][-N:], full[1], full[2][-N:], full[3]] and ro.prompts_truncated == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["prompts_truncated"] for r in rows] == [2, 2, 2]  # each step draws all 4 records
    assert [h["prompts_truncated"] for h in history] == [2, 2, 2]


def test_the_engine_alone_warns_on_its_first_cut_only(tmp_path):
    trainer = tiny_trainer(tmp_path, [record(3), record(4)])
    cfg = TrainConfig(group_size=2, max_new_tokens=3, max_prompt_length=10)
    engine = RolloutEngine(trainer.model, trainer.tokenizer, cfg, trainer.reward_fn, trainer.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = engine.rollout([record(12), record(2)], record_indices=[7, 8])
        second = engine.rollout([record(20), record(30)])
    msgs = cut_warnings(caught)
    assert len(msgs) == 1 and msgs[0].startswith("max_prompt_length=10: the prompt of record 7 of data has 18 "
                                                 "tokens: cut from the left, its first 8 tokens dropped"), msgs
    assert (first.prompts_truncated, second.prompts_truncated) == (1, 2)
    assert first.prompt_ids[0] == trainer.tokenizer(record(12)["prompt"])["input_ids"][-10:]
    kept = dataclasses.replace(second, keep=[True, False]).kept()
    assert kept.prompts_truncated == 2 and len(kept.prompt_ids) == 1

