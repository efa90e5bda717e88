"""``--resume`` never silently changes a run (issue 22, item 2): a resumed run takes the saved run's settings for
every option not given, and one given that differs from the saved value is refused, listed, unless it is in
``RESUME_SAFE`` (where the run stops, evaluation, checkpoints, display, how a step is computed)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from grao import demo
from grao.cli import build_config, build_parser, main
from grao.trainer import TrainConfig, Trainer, checkpoint_dirs
from grao.trainer.config import OPTIONS, RESUME_SAFE, ConfigError

# the saved run: the demo's `copy` task with settings that are none of grao train's defaults
SAVED = ["--model", "demo", "--task", "copy", "--task-min-len", "3", "--task-max-len", "3", "--lr", "2e-3",
         "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "3", "--task-train-size", "16",
         "--task-eval-size", "4", "--eval-prompts", "2", "--steps", "1", "--loss-impl", "eager", "--no-progress",
         "--no-plot", "--tensorboard", "false"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    assert main(["train", "--output-dir", str(out), *SAVED]) == 0
    return out


@pytest.fixture
def run(saved_run, tmp_path):
    """A copy of the saved 1-step run (its config.json names the original folder: a moved run)."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


def config_of(out) -> dict:
    return json.loads((out / "config.json").read_text())


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_no_flags_continues_the_saved_run(run, capsys):
    """The report's case without its --group-size: the task, lr and G are the saved run's, not train's defaults."""
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resume: continuing {run} from step 1 with its saved settings, changed: steps: 1 -> 2" in out
    cfg = config_of(run)
    assert (cfg["task"], cfg["lr"], cfg["group_size"], cfg["task_max_len"], cfg["steps"]) == ("copy", 2e-3, 2, 3, 2)
    assert (cfg["progress"], cfg["plot"], cfg["tensorboard"]) == (False, False, "false")  # the saved ones too
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["train_rows"] == 2 * (2 + 1) and rows[1]["lr"] == pytest.approx(2e-3)  # P (G+1), its lr


def test_resume_that_changes_a_setting_is_refused_listing_each(run, capsys):
    """The report's command: --group-size 3 --steps 201 (and, here, a task and lr of its own)."""
    before = ((run / "config.json").read_text(), (run / "metrics.jsonl").read_text(),
              [p.name for p in checkpoint_dirs(run)])
    capsys.readouterr()
    argv = ["train", "--output-dir", str(run), "--resume", "--group-size", "3", "--steps", "201"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("grao: error: resume: ")
    assert err == (f"grao: error: resume: {run} holds a run with other settings ({run / 'config.json'}): "
                   "group_size: 2 -> 3. A resume may change only the options listed under --resume in grao train "
                   "--help (config.RESUME_SAFE); leave these out to keep the saved values, or start a new run "
                   "(another output_dir, or overwrite)\n")  # steps may change: not listed
    assert main(["train", "--output-dir", str(run), "--resume", "--task", "reverse", "--lr", "1e-4",
                 "--eval-every", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "): task: 'copy' -> 'reverse', lr: 0.002 -> 0.0001. " in err
    cfg_file = run / "other.yaml"  # a YAML --config is given as well as flags are
    cfg_file.write_text("temperature: 0.9\n")
    assert main(["train", "--output-dir", str(run), "--resume", "--config", str(cfg_file)]) == 2
    assert "config.json): temperature: 0.7 -> 0.9. " in capsys.readouterr().err
    after = ((run / "config.json").read_text(), (run / "metrics.jsonl").read_text(),
             [p.name for p in checkpoint_dirs(run)])
    assert after == before  # nothing of the run was touched


def test_resume_with_only_safe_changes_continues(run, capsys):
    capsys.readouterr()
    argv = ["train", "--output-dir", str(run), "--resume", "--steps", "3", "--eval-every", "2", "--save-every", "1",
            "--task", "copy", "--lr", "0.002", "--micro-batch-rows", "3"]  # equal to the saved values: no change
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "changed: steps: 1 -> 3, micro_batch_rows: 0 -> 3, save_every: 0 -> 1, eval_every: 0 -> 2" in out
    assert steps_logged(run) == [1, 2, 3]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval_reward" in rows[1] and "eval_reward" in rows[2]
    cfg = config_of(run)
    assert (cfg["task"], cfg["group_size"], cfg["eval_every"], cfg["steps"]) == ("copy", 2, 2, 3)
    assert [p.name for p in checkpoint_dirs(run)][-1] == "step-00000003"


def test_the_checkpoint_config_is_used_without_config_json(run, capsys):
    (run / "config.json").unlink()
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume", "--method", "sft"]) == 2
    err = capsys.readouterr().err
    where = checkpoint_dirs(run)[-1] / "trainer_state.pt"
    assert err.count("\n") == 1 and f"({where}): method: 'grao' -> 'sft'. " in err
    cfg = build_config(build_parser().parse_args(["train", "--output-dir", str(run), "--resume"]))
    assert (cfg.task, cfg.group_size, cfg.lr, cfg.resume, cfg.output_dir) == ("copy", 2, 2e-3, True, str(run))


def test_the_python_api_refuses_a_changed_config_too(run):
    tok = demo.build_tokenizer()
    saved = config_of(run)
    keep = {k: v for k, v in saved.items() if k not in ("resume", "overwrite", "output_dir")}
    with pytest.raises(ConfigError) as err:  # TrainConfig's defaults are not the saved run's
        Trainer(TrainConfig(output_dir=str(run), resume=True, loss_impl="eager", progress=False), tokenizer=tok)
    for change in ("task: 'copy' -> 'reverse'", "task_max_len: 3 -> 5", "group_size: 2 -> 8", "lr: 0.002 -> 0.0001"):
        assert change in str(err.value)
    assert "progress" not in str(err.value) and "loss_impl" not in str(err.value)  # safe ones
    with pytest.raises(ConfigError, match=re.escape("): lr_schedule: 'constant' -> 'linear'. ")):
        Trainer(TrainConfig(**{**keep, "lr_schedule": "linear", "output_dir": str(run), "resume": True}))
    with pytest.warns(UserWarning, match=r"resume: .* is at step 1 and steps is 1: nothing to train"):
        t = Trainer(TrainConfig(**{**keep, "output_dir": str(run), "resume": True}))
    assert t.step == 1 and t.resume_changes == []
    saved["lr_schedule"] = "linear"  # as if the run had a decaying schedule: more steps re-time it
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"resume: steps 1 -> 3 re-times the linear learning-rate decay: it now "
                                         r"ends at step 3"):
        t = Trainer(TrainConfig(**{**keep, "lr_schedule": "linear", "steps": 3, "output_dir": str(run),
                                   "resume": True}))
    assert t.resume_changes == ["steps: 1 -> 3"]


def test_the_safe_set_is_documented():
    fields = TrainConfig.__dataclass_fields__
    for name, why in RESUME_SAFE.items():
        assert name in fields and why and "\n" not in why, name
    for name in ("task", "data", "model", "method", "lr", "group_size", "beta", "lam", "seed", "temperature",
                 "lr_schedule", "bf16", "sample_seeding", "task_eval_size"):
        assert name not in RESUME_SAFE, name  # what a run trains never changes on a resume
    text = OPTIONS["resume"].help
    for name in RESUME_SAFE:
        if name not in ("resume", "overwrite", "output_dir"):
            assert "--" + name.replace("_", "-") in text, name
