"""A user error of the CLI is one ``grao: error: ...`` line naming the option or file and what it accepts, exit
status 2, no traceback (issue 12, items 3-5); ``--debug`` shows the traceback; ``--help`` of each command shows
its own options, each with a description and its allowed values (item 6)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grao.cli import COMMANDS, build_parser, main
from grao.demo import TASKS
from grao.trainer.config import OPTIONS, TrainConfig

REPO = Path(__file__).resolve().parent.parent

FILES = {
    "empty.jsonl": "",
    "badcol.jsonl": '{"prompt": "a", "ref": "b"}\n',
    "four.yaml": "group_size: four\n",
    "typo.yaml": "group_sise: 4\n",
    "list.yaml": "- 1\n",
}

CASES = [
    (["train", "--data", "missing.jsonl"], "--data must be an existing file, got 'missing.jsonl', which does not exist"),
    (["train", "--data", "empty.jsonl"], "empty.jsonl: holds no records"),
    (["train", "--data", "badcol.jsonl"], "badcol.jsonl: record 0 has no reference column: expected one of"),
    (["train", "--group-size", "0"], "--group-size must be an integer >= 1, got 0"),
    (["train", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["train", "--steps", "2.5"], "--steps must be an integer >= 1, got 2.5"),
    (["train", "--lr", "-1"], "--lr must be a number > 0, got -1"),
    (["train", "--top-p", "1.5"], "--top-p must be a number in (0, 1], got 1.5"),
    (["train", "--method", "gpro"], "--method must be one of grao, grpo, sft, dpo, ppo, got 'gpro' (did you mean 'grpo'?)"),
    (["train", "--task", "revrse"], f"--task must be one of {', '.join(TASKS)}, got 'revrse' (did you mean 'reverse'?)"),
    (["train", "--loss-impl", "fuse"], "--loss-impl must be one of auto, fused, eager, got 'fuse' (did you mean 'fused'?)"),
    (["train", "--reward", "exact_mtch"], "got 'exact_mtch' (did you mean 'exact_match'?)"),
    (["train", "--reward", "nosuchmodule:f"], "reward 'nosuchmodule:f': cannot import module 'nosuchmodule'"),
    (["train", "--model", "no/such/dir"], ("--model must be a local model directory, a Hugging Face hub id or 'demo', "
                                           "got 'no/such/dir': no such directory")),
    (["train", "--model", "./nosuchdir"], "got './nosuchdir': no such directory"),
    (["train", "--temperature", "0"], "--temperature must be a number > 0, got 0"),
    (["train", "--bf16", "maybe"], "--bf16 must be one of auto, true, false, got 'maybe'"),
    (["train", "--config", "four.yaml"], "four.yaml: group_size must be an integer >= 1, got 'four'"),
    (["train", "--config", "typo.yaml"], "typo.yaml: unknown option 'group_sise' (did you mean 'group_size'?)"),
    (["train", "--config", "list.yaml"], "list.yaml: must be a mapping of training options"),
    (["train", "--config", "nope.yaml"], "--config nope.yaml: cannot read it"),
    (["train", "--grop-size", "4"], "grao train has no option --grop-size (did you mean --group-size?)"),
    (["train", "--method", "grpo", "--group-size", "1"], "group_size must be >= 2 with method grpo"),
    (["train", "--task-min-len", "5", "--task-max-len", "3"], "task_max_len must be >= task_min_len (5), got 3"),
    (["train", "--resume", "--overwrite"], "resume and overwrite exclude each other"),
    (["trian"], "unknown command 'trian' (did you mean 'train'?"),
    (["compare", "--seeds", "a,b"], "--seeds must be comma-separated integers >= 0, got 'a,b'"),
    (["compare", "--methods", "sft,gpro"], "('gpro': did you mean 'grpo'?)"),
    (["compare", "--lr-schedule", "linear"], "grao compare has no option --lr-schedule"),
    (["eval", "--base", "demo"], "--model is required: the trained model"),
    (["eval", "--model", "demo", "--base", "demo", "--lr", "1"], "grao eval has no option --lr"),
    (["eval", "--model", "demo", "--base", "no/such/dir"], "--base must be a local model directory"),
    (["demo", "--threads", "-1"], "--threads must be an integer >= 0, got '-1'"),
]
if not torch.cuda.is_available():  # item 4: was a raw AssertionError of torch
    CASES.append((["train", "--device", "cuda"], "--device must be a device this machine has, got 'cuda'"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_user_error_is_one_line(workdir, capsys, argv, expected):
    assert main([*argv, "--output-dir", "out"] if argv[0] == "train" else argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("grao: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err and out == ""
    assert not (workdir / "out").exists()  # refused before anything was written


def test_debug_shows_the_traceback(workdir):
    from grao.data import DataError
    for argv in (["train", "--data", "empty.jsonl", "--debug"], ["--debug", "train", "--data", "empty.jsonl"]):
        with pytest.raises(DataError, match="holds no records"):
            main(argv)


def test_the_command_itself_exits_2_with_one_line():
    """The installed entry point (python -m grao.cli): exit status and stderr of a real process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "grao.cli", "train", "--group-size", "0"], capture_output=True,
                         text=True, timeout=300, env=env, check=False)
    assert (res.returncode, res.stdout, res.stderr) == (2, "", "grao: error: --group-size must be an integer >= 1, got 0\n")


def test_warnings_print_as_one_grao_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "grao.cli", "train", "--steps", "1", "--prompts-per-step", "2",
                          "--group-size", "2", "--max-new-tokens", "2", "--no-progress", "--no-plot", "--tensorboard",
                          "false", "--output-dir", str(tmp_path / "r"), "--resume", "--beta", "-1"],
                         capture_output=True, text=True, timeout=300, env=env, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert "grao: warning: beta=-1 is outside [0, 1] (paper: 0.5): a negative weight reverses the imitation term" \
        in lines and lines.count(lines[0]) == 1  # once, though the config check and each step's loss both see it
    assert any(x.startswith("grao: warning: resume: ") for x in lines)


# ------------------------------------------------------------------------------------------------- item 6: help


def test_every_option_has_a_description_and_its_allowed_values():
    build_parser()
    names = [f for f in TrainConfig.__dataclass_fields__]
    assert sorted(OPTIONS) == sorted(names), "a TrainConfig field without its Option (field metadata)"
    for name, opt in OPTIONS.items():
        assert opt.help and "\n" not in opt.help and opt.allowed(), name
    for cmd, parser in COMMANDS.items():
        for action in parser._actions:
            assert action.help, f"grao {cmd} {action.option_strings or action.dest}: no help"
    train = {a.dest: a for a in COMMANDS["train"]._actions}
    assert train["method"].metavar == "{grao,grpo,sft,dpo,ppo}"
    assert "an integer >= 1" in train["group_size"].help and "default: 8" in train["group_size"].help
    assert "a number in (0, 1]" in train["top_p"].help


def test_each_command_shows_only_its_own_options(capsys):
    texts = {}
    for cmd in ("train", "demo", "eval", "compare"):
        assert main([cmd, "--help"]) == 0
        texts[cmd] = capsys.readouterr().out
    def shows(cmd, flag):
        return re.search(rf"^  {flag}(?![\w-])", texts[cmd], re.MULTILINE) is not None
    assert all(shows("train", "--" + f.replace("_", "-")) for f in OPTIONS)
    for flag in ("--lr", "--steps", "--group-size", "--lr-schedule", "--output-dir", "--resume"):
        assert shows("demo", flag) and not shows("eval", flag), flag
    for flag in ("--lr-schedule", "--adam-beta1", "--method", "--seed", "--resume"):
        assert shows("train", flag) and not shows("compare", flag), flag
    assert "--methods LIST" in texts["compare"] and "--seeds LIST" in texts["compare"]
    assert "--model PATH" in texts["eval"] and "--base PATH" in texts["eval"]
    assert len(texts["compare"].splitlines()) < len(texts["train"].splitlines()) / 2
