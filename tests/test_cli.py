"""CLI runs: a 2-step run from flags and YAML, eval of its checkpoint, a tiny compare; one output folder holds
one run (issue 12, item 1); ``grao eval --model`` (item 2); progress bars and the end-of-run summary (item 7)."""

from __future__ import annotations

import json

import pytest

from grao.cli import build_config, build_parser, main
from grao.trainer import checkpoint_dirs
from grao.trainer.checkpoint import claim_output_dir, clear_run, run_summary
from grao.trainer.config import ConfigError

TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
        "--task-train-size", "16", "--task-eval-size", "4", "--eval-prompts", "4", "--no-progress",
        "--tensorboard", "false"]


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_flags_override_yaml_and_defaults(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lr: 3e-3\ngroup_size: 4\nmethod: grpo\nbf16: true\n")  # 3e-3 is a string to YAML 1.1
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--group-size", "6", "--no-plot"])
    cfg = build_config(args)
    assert (cfg.lr, cfg.group_size, cfg.method, cfg.plot, cfg.bf16) == (0.003, 6, "grpo", False, "true")
    cfg_file.write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match="run.yaml: unknown option 'learning_rate'"):
        build_config(build_parser().parse_args(["train", "--config", str(cfg_file)]))


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
    assert main(["eval", str(ckpt), "--base", "demo", "--limit", "4", "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 4 and 0 <= result["ras"] <= 1 and 0 <= result["nag"] <= 1


def test_compare_writes_table_and_curves(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "sft,grao", "--seeds", "0,1", "--output-dir", str(out), "--runs-dir",
            str(tmp_path / "runs"), "--eval-every", "0", *TINY]
    assert main(argv) == 0
    table = (out / "table.md").read_text()
    assert "| SFT |" in table and "| GRAO |" in table and "Command:" in table
    res = json.loads((out / "results.json").read_text())
    assert res["methods"]["grao"]["seeds"] == [0, 1] and len(res["methods"]["sft"]["accuracy"]) == 2
    runs = json.loads((out / "runs.json").read_text())
    assert [r["seed"] for r in runs["results"]["grao"]] == [0, 1]
    assert (out / "curves.png").exists()
    assert len((out / "curves.jsonl").read_text().splitlines()) == 2 * 2 * 2
    assert main(argv) == 2  # its runs are there now: refused before training anything ...
    assert main([*argv, "--overwrite"]) == 0  # ... unless replaced


# ------------------------------------------------------------------------------- item 1: one run per folder


def test_reusing_an_output_folder_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    """The issue's sequence: 4 steps, then 2 steps into the same folder, then resume to 6."""
    out = tmp_path / "run"
    base = ["train", "--output-dir", str(out), *TINY, "--no-plot"]
    assert main([*base, "--steps", "4"]) == 0
    assert steps_logged(out) == [1, 2, 3, 4]
    capsys.readouterr()
    assert main([*base, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grao: error: output_dir") and err.count("\n") == 1
    assert "already holds a run (metrics.jsonl with 4 steps, checkpoints up to step 4)" in err
    assert "--resume" in err and "--overwrite" in err
    assert steps_logged(out) == [1, 2, 3, 4]  # untouched
    assert main([*base, "--steps", "6", "--resume"]) == 0
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # one run
    assert main([*base, "--steps", "2", "--overwrite"]) == 0
    assert steps_logged(out) == [1, 2]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000002"]  # no checkpoint of the old run is left


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    out = tmp_path / "fresh"
    with pytest.warns(UserWarning, match=r"resume: .*fresh has no complete checkpoint to resume from; starting a new"):
        assert main(["train", "--output-dir", str(out), *TINY, "--no-plot", "--resume"]) == 0
    assert steps_logged(out) == [1, 2]


def test_claim_and_clear_touch_only_what_a_run_wrote(tmp_path):
    assert run_summary(tmp_path) is None and claim_output_dir(tmp_path, resume=False, overwrite=False) is None
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # e.g. a model's, not a run's
    assert run_summary(tmp_path) is None  # no run here: a new one may start
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints" / ".tmp-step-00000002-1").mkdir(parents=True)
    assert run_summary(tmp_path) == "metrics.jsonl with 1 steps, an incomplete checkpoint"
    with pytest.raises(ValueError, match="already holds a run"):
        claim_output_dir(tmp_path, resume=False, overwrite=False)
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt"]


# ------------------------------------------------------------------------------- item 2: eval --model


def test_eval_takes_the_model_as_a_flag_and_its_runs_task(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *TINY, "--no-plot", "--task", "copy", "--task-min-len", "3",
                 "--task-max-len", "4"]) == 0
    ckpt = str(checkpoint_dirs(out)[-1])
    capsys.readouterr()
    assert main(["eval", "--model", ckpt, "--base", "demo", "--limit", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 3 and result["data"].startswith("task copy (3-4 digits)")  # the run's task
    assert main(["eval", "--model", ckpt, "--base", "demo", "--limit", "3", "--task", "sort"]) == 0
    assert json.loads(capsys.readouterr().out)["data"].startswith("task sort")  # a flag wins
    assert main(["eval", ckpt, "--model", "demo", "--base", "demo"]) == 2
    assert "two models given" in capsys.readouterr().err


# ------------------------------------------------------------------------------- item 7: output of a run


def test_no_progress_silences_every_bar_and_the_summary_shows_eval(tmp_path, capsys):
    import transformers
    argv = ["train", *TINY, "--no-plot", "--save-every", "1", "--eval-every", "1"]
    try:
        assert main([*argv, "--output-dir", str(tmp_path / "a"), "--progress"]) == 0
        shown = capsys.readouterr()
        assert "it/s" in shown.err or "s/it" in shown.err  # bars exist (ours at least) ...
        assert main([*argv, "--output-dir", str(tmp_path / "b")]) == 0  # TINY has --no-progress
        shown = capsys.readouterr()
        assert "it/s" not in shown.err and "s/it" not in shown.err and "%|" not in shown.err  # ... none here
        assert "greedy reward on held-out prompts: step 1: " in shown.out
    finally:
        transformers.utils.logging.enable_progress_bar()


def test_eval_takes_only_valid_settings_from_the_checkpoints_run(tmp_path):
    from grao.cli.commands import run_values
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"task": "sort", "seed": 3, "reward": "my_python_function", "lr": 0.1, "device": "cuda", "method": "grao"}))
    assert run_values(str(ckpt)) == {"task": "sort", "seed": 3}  # a reward saved by name only is left to --reward
    assert run_values(str(tmp_path / "run")) == {}  # not a checkpoint of a run
