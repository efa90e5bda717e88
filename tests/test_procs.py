"""tests/procs.py: a command's whole process tree ends with it, on success, failure and timeout."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests import procs

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc (Linux)")

# The child starts a sleeping grandchild in a session of its own (as torchrun starts each rank), writes both
# pids, prints, then sleeps too, or exits at once (the grandchild, orphaned, keeps the output pipe open).
CHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
print("child started", flush=True)
if sys.argv[2] == "sleep":
    time.sleep(600)
"""


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while procs.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _pids(path: Path) -> list[int]:
    for _ in range(200):  # written before the child prints, so present once it timed out; a guard anyway
        if path.exists() and path.read_text().strip():
            return [int(x) for x in path.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


@pytest.mark.parametrize("mode", ["sleep", "exit"], ids=["child and grandchild sleep", "orphaned grandchild"])
def test_timeout_kills_the_whole_tree_and_shows_the_output(tmp_path, mode):
    pid_file = tmp_path / "pids"
    t0 = time.monotonic()
    with pytest.raises(procs.ProcessTimeout) as err:
        procs.run([sys.executable, "-c", CHILD, pid_file, mode], timeout=3)
    assert time.monotonic() - t0 < 60
    child, grandchild = _pids(pid_file)
    assert _gone(child) and _gone(grandchild), procs.tagged("")
    assert "timed out after 3 s" in str(err.value) and "child started" in str(err.value)


def test_failure_shows_the_output_and_leaves_nothing(tmp_path):
    code = "import subprocess, sys; print('about to fail', flush=True); sys.exit(3)"
    with pytest.raises(AssertionError, match=r"(?s)exit status 3: .*about to fail"):
        procs.check([sys.executable, "-c", code], timeout=60)


def test_success_returns_the_output_and_kills_what_the_command_left_behind(tmp_path):
    """A command that ends normally but leaves a daemon (its output closed) behind: that one is killed too."""
    pid_file = tmp_path / "pid"
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
            "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('done')")
    assert procs.check([sys.executable, "-c", code], timeout=60).strip() == "done"
    assert _gone(int(pid_file.read_text()))
