"""CLI smoke tests: a 2-step run from flags and YAML, eval of its checkpoint, a tiny compare."""

from __future__ import annotations

import json

import pytest

from grao.cli import build_config, build_parser, main
from grao.trainer import checkpoint_dirs

TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
        "--task-train-size", "16", "--task-eval-size", "4", "--eval-prompts", "4", "--no-progress",
        "--tensorboard", "false"]


def test_flags_override_yaml_and_defaults(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lr: 0.003\ngroup_size: 4\nmethod: grpo\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--group-size", "6", "--no-plot"])
    cfg = build_config(args)
    assert (cfg.lr, cfg.group_size, cfg.method, cfg.plot) == (0.003, 6, "grpo", False)
    cfg_file.write_text("learning_rate: 1\n")
    with pytest.raises(SystemExit, match="unknown option"):
        build_config(build_parser().parse_args(["train", "--config", str(cfg_file)]))
    with pytest.raises(ValueError, match="method must be one of"):
        build_config(build_parser().parse_args(["train", "--method", "ppo"]))


def test_train_two_steps_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "demo", "--output-dir", str(out), *TINY]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "loss_exploration", "loss_imitation", "loss_alignment",
                "share_imitation", "completion_len_mean", "gen_tokens_per_s", "peak_memory_mb"):
        assert key in rows[0], key
    parts = rows[0]["loss_exploration"] + rows[0]["loss_imitation"] + rows[0]["loss_alignment"]
    assert parts == pytest.approx(rows[0]["loss"], abs=1e-5)
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = checkpoint_dirs(out)[-1]
    assert ckpt.name == "step-00000002" and (ckpt / "config.json").exists()
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--base", "demo", "--limit", "4", "--max-new-tokens", "4",
                 "--task-train-size", "16", "--task-eval-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 4 and 0 <= result["ras"] <= 1 and 0 <= result["nag"] <= 1


def test_compare_writes_table_and_curves(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "sft,grao", "--seeds", "0,1", "--output-dir", str(out), "--runs-dir",
                 str(tmp_path / "runs"), "--eval-every", "0", *TINY]) == 0
    table = (out / "table.md").read_text()
    assert "| SFT |" in table and "| GRAO |" in table and "Command:" in table
    res = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in res["results"]["grao"]] == [0, 1]
    assert (out / "curves.png").exists()
    assert len((out / "curves.jsonl").read_text().splitlines()) == 2 * 2 * 2
