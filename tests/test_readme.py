"""The README's quick start is two commands that set everything up (``./run``), CI runs the same test command,
and the README's ``grao`` commands and facts match the code (issue 12, item 8 and "what to deliver")."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from grao.cli import main
from grao.cli.commands import DEMO_TIME
from grao.data import REFERENCE_ALIASES

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def code_lines(text: str) -> list[str]:
    """Lines of the indented (4-space) code blocks of ``text`` (not of fenced ones), comments dropped."""
    out, fenced = [], False
    for x in text.splitlines():
        if x.startswith("```"):
            fenced = not fenced
        elif not fenced and x.startswith("    ") and x.strip():
            out.append(re.sub(r"\s+#.*$", "", x[4:]).strip())
    return out


# ------------------------------------------------------------------------------------------------ quick start


def dry_run(tmp_path: Path, *args: str, gpu: bool | None = None) -> subprocess.CompletedProcess:
    """./run with GRAO_RUN_DRY=1 in a fresh copy (no .venv), with nvidia-smi present and working (gpu=True),
    present and failing (False), as the machine has it (None)."""
    work = tmp_path / "clone"
    work.mkdir(exist_ok=True)
    for name in ("run", "setup.py"):
        shutil.copy2(REPO / name, work / name)
    env = dict(os.environ, GRAO_RUN_DRY="1")
    env.pop("TORCH_INDEX_URL", None)
    if gpu is not None:
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\nexit {0 if gpu else 1}\n")
        (fake / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{fake}:{env['PATH']}"
    return subprocess.run(["bash", str(work / "run"), *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_quick_start_is_two_commands_of_the_run_script():
    assert code_lines(section("Quick start")) == ["./run demo", "./run test"]
    assert os.access(REPO / "run", os.X_OK)


@pytest.mark.parametrize("gpu, torch_spec", [(False, "torch==2.13.0"), (True, "torch===2.13.0")],
                         ids=["no-gpu", "gpu"])
def test_run_sets_up_a_fresh_clone_then_runs(tmp_path, gpu, torch_spec):
    res = dry_run(tmp_path, "demo", "--steps", "2", gpu=gpu)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "+ python3 -m venv .venv",
        "+ .venv/bin/python -m pip install -q --upgrade pip",
        f"+ .venv/bin/python -m pip install -q {torch_spec}",
        "+ .venv/bin/python -m pip install -q -e .[dev,bench,trl,peers,lora]",
        "+ .venv/bin/grao demo --steps 2",
    ]


def test_run_test_is_what_ci_runs(tmp_path):
    res = dry_run(tmp_path, "test", gpu=False)
    assert res.returncode == 0, res.stderr
    commands = [x for x in res.stdout.splitlines() if "pytest" in x]
    assert commands == ["+ .venv/bin/python -m pytest benchmarks/ -q --benchmark-disable",
                        "+ .venv/bin/python -m pytest tests/ -q"]
    ci = [x.strip() for x in (REPO / ".ci" / "run").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert ci[-1] == "exec bash ./run test"


def test_run_refuses_an_unknown_command_before_setting_anything_up(tmp_path):
    res = dry_run(tmp_path, "dmeo")
    assert res.returncode == 2 and "./run: unknown command 'dmeo'" in res.stderr and res.stdout == ""
    assert not (tmp_path / "clone" / ".venv").exists()
    res = dry_run(tmp_path, "--help")
    assert res.returncode == 0 and DEMO_TIME in res.stdout


# ------------------------------------------------------------------------------------------------ README commands

CHEAP = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3",
         "--task-train-size", "16", "--task-eval-size", "4", "--eval-prompts", "4", "--eval-every", "0",
         "--no-progress", "--tensorboard", "false"]
EXTRA = {"demo": [*CHEAP, "--save-every", "0", "--no-plot"], "train": [*CHEAP, "--save-every", "0", "--no-plot"],
         "compare": ["--methods", "grao", "--seeds", "0", *CHEAP], "eval": ["--limit", "2"]}


def readme_grao_commands() -> list[str]:
    found = []
    for line in code_lines(README):
        if re.match(r"grao (demo|train|eval|compare|merge-lora)\b", line) and line not in found:
            found.append(line)
    return found


def test_every_readme_grao_command_runs(tmp_path, monkeypatch, capsys):
    """Each ``grao`` command of the README, verbatim, with flags appended that make it cheap (fewer steps,
    prompts, samples). The eval and merge-lora commands name a run's last checkpoint (the demo's step 200, the
    LoRA run's step 100): the cheap runs stop at step 2, so that checkpoint is copied there."""
    commands = readme_grao_commands()
    assert {c.split()[1] for c in commands} == {"demo", "train", "eval", "compare", "merge-lora"}, commands
    shutil.copytree(REPO / "docs" / "cli", tmp_path / "docs" / "cli")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = command.split()[1:]
        if "--help" in argv:
            assert main(argv) == 0, command
            continue
        if argv[0] in ("eval", "merge-lora"):  # a checkpoint of an earlier command's (cheap, shorter) run
            ckpt = Path(argv[argv.index("--model") + 1] if argv[0] == "eval" else argv[1])
            if not ckpt.exists():
                shutil.copytree(max(ckpt.parent.glob("step-*")), ckpt)
        code = main([*argv, *EXTRA.get(argv[0], [])])
        assert code == 0, f"{command}: {capsys.readouterr().err[-2000:]}"


# ------------------------------------------------------------------------------------------------ README facts


def test_readme_lists_the_reference_columns_the_code_accepts():
    m = re.search(r"with `prompt` and `reference` \(or ((?:`\w+`(?:, )?)+)\)", README)
    assert m, "the README no longer says which reference columns are read"
    assert tuple(re.findall(r"`(\w+)`", m.group(1))) == REFERENCE_ALIASES[1:]
    assert "`.json` list" in README  # .json files of a list of records are read too


def test_readme_says_where_each_helper_it_uses_lives():
    told = re.findall(r"`(\w+)` \(in `([\w/.]+\.py)`", README)
    assert told, "the README no longer says where any helper lives (`name` (in `path.py`)): nothing was checked"
    for name, path in told:
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.MULTILINE), (name, path)
    # every helper the README's code calls that is not in the packages: the README's code calls collate_groups
    used = set(re.findall(r"\b(collate_groups)\(", README))
    assert used == {"collate_groups"}, "the README's example no longer calls collate_groups: update this test"
    assert used <= {name for name, _ in told}, used - {name for name, _ in told}


def test_the_readmes_error_examples_are_what_the_cli_prints(capsys):
    examples = re.findall(r"`(grao: error: (--[\w-]+) must [^`]*?, got '?([^'` ]+)'?[^`]*)`", " ".join(README.split()))
    assert len(examples) >= 2
    for line, flag, value in examples:
        assert main(["train", flag, value]) == 2
        assert capsys.readouterr().err == line + "\n"


def test_the_demo_time_is_stated_once_the_same_everywhere(capsys):
    assert main(["demo", "--help"]) == 0
    assert DEMO_TIME in " ".join(capsys.readouterr().out.split())
    assert DEMO_TIME in " ".join(section("Quick start").split())


def test_every_readme_benchmark_command_runs(tmp_path):
    """The README's ``python ...`` benchmark commands, verbatim, with ``--out`` into a temporary folder (the
    committed results stay as they are)."""
    import sys
    commands = [x for x in code_lines(section("Use 2: the benchmarks against the eager loss")) if x.startswith("python ")]
    assert len(commands) == 3, commands
    for i, command in enumerate(commands):
        argv = command.split()[1:]
        res = subprocess.run([sys.executable, *argv, "--out", str(tmp_path / str(i))], cwd=REPO, capture_output=True,
                             text=True, timeout=900, check=False, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert res.returncode == 0, f"{command}: {res.stderr[-2000:]}"
        assert any((tmp_path / str(i)).rglob("*.json")), command
