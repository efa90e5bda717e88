"""Child processes of the tests that leave nothing behind: on success, failure, timeout or interrupt.

:func:`run` starts a command in its own session (``start_new_session=True``), captures its output
(stdout and stderr together) and waits for it; on a timeout, or when the wait is interrupted, it kills
every process the command started and raises :class:`ProcessTimeout` with the output the processes wrote
(and, where ``py-spy`` is installed, their stacks taken before the kill). :func:`check` also asserts a
zero exit status, with the output's tail in the message.

Killing the child's process group is not enough: ``torchrun`` (and ``accelerate launch``, which runs it)
starts each rank in a session of its own, and a rank whose launcher has died is re-parented to init, out
of the launcher's process tree. So every child is tagged with an environment variable (inherited by all
its descendants, the ranks included) and the kill takes every process of this user that carries the tag,
plus the child's descendants and their process groups. At exit, the test process kills anything still
carrying one of its tags.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

TAG_VAR = "GRAO_TEST_PROCESS_TAG"
_SESSION = uuid.uuid4().hex[:12]  # this test process's prefix of every tag
_counter = 0


class Finished(NamedTuple):
    returncode: int
    output: str  # stdout and stderr, interleaved as written


class ProcessTimeout(AssertionError):
    """The command ran past its timeout (or the wait was interrupted); every process it started is dead."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _proc_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # no /proc: only the child's process group can be killed
        return []


def _ppid(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


def tagged(tag: str) -> set[int]:
    """Live processes whose environment holds ``TAG_VAR=<tag>...`` (a prefix: a session tag finds all its
    calls' processes). A zombie's environment reads empty, so the dead are not listed."""
    needle = f"{TAG_VAR}={tag}".encode()
    me = os.getpid()
    return {pid for pid in _proc_pids() if pid != me
            and any(entry.startswith(needle) for entry in _read(f"/proc/{pid}/environ").split(b"\0"))}


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` in the process tree."""
    children: dict[int, list[int]] = {}
    for p in _proc_pids():
        parent = _ppid(p)
        if parent is not None:
            children.setdefault(parent, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    if Path("/proc").is_dir():
        stat = _read(f"/proc/{pid}/stat")
        return bool(stat) and stat[stat.rfind(b")") + 2:][:1] != b"Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def kill_all(tag: str, root: int | None = None) -> None:
    """SIGKILL every process carrying ``tag``, and ``root``, its descendants and their process groups
    (never this process's own group), until none is left (a few rounds: a dying launcher may still fork).
    ``root``: a child not yet reaped (a reaped one's pid may belong to another process by now)."""
    own_group = os.getpgrp()
    for _ in range(20):
        pids = tagged(tag)
        if root is not None:
            pids |= descendants(root) | ({root} if alive(root) else set())
        if not pids:
            return
        for pid in pids:
            try:
                group = os.getpgid(pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _stacks(pids: set[int]) -> str:
    """``py-spy dump --native`` of each Python process among ``pids`` (empty without py-spy)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not spy:
        return ""
    out = []
    for pid in sorted(pids):
        if b"python" not in _read(f"/proc/{pid}/cmdline"):
            continue
        try:
            res = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                                 timeout=20, check=False)
            out.append(f"--- py-spy dump --native --pid {pid}\n{res.stdout}{res.stderr}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.append(f"--- py-spy dump --pid {pid}: {exc!r}")
    return "\n".join(out)


def _kill_leftovers() -> None:
    kill_all(_SESSION)


atexit.register(_kill_leftovers)


def run(cmd: list[str], *, timeout: float, cwd=None, env: dict | None = None, tail: int = 6000) -> Finished:
    """Run ``cmd`` to its end (at most ``timeout`` seconds); returns its exit status and output.

    On a timeout (or an interrupt of the wait) every process it started is killed, then
    :class:`ProcessTimeout` is raised with the last ``tail`` characters of the output and the stacks."""
    global _counter
    _counter += 1
    tag = f"{_SESSION}-{_counter}"
    env = dict(os.environ if env is None else env, **{TAG_VAR: tag})
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except BaseException as exc:  # the timeout, or KeyboardInterrupt / a test-runner signal
            root = proc.pid if proc.returncode is None else None  # not reaped yet: its pid is still its own
            live = tagged(tag) | (descendants(root) | ({root} if alive(root) else set()) if root else set())
            stacks = _stacks(live) if isinstance(exc, subprocess.TimeoutExpired) else ""
            kill_all(tag, root)
            out, _ = proc.communicate()  # every writer is dead: the pipe ends
            text = out.decode(errors="replace")
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            raise ProcessTimeout(
                f"timed out after {timeout:.0f} s, killed processes {sorted(live)}: {' '.join(map(str, cmd))}\n"
                + (f"{stacks}\n" if stacks else "") + f"--- output (last {tail} characters)\n{text[-tail:]}") from None
    finally:
        kill_all(tag)  # the command is done, but a process it left behind may not be: none outlives it
    return Finished(proc.returncode, out.decode(errors="replace"))


def check(cmd: list[str], *, timeout: float, cwd=None, env: dict | None = None, tail: int = 6000) -> str:
    """:func:`run`, asserting exit status 0 (the message: the status, the command and the output's tail);
    returns the output."""
    res = run(cmd, timeout=timeout, cwd=cwd, env=env, tail=tail)
    assert res.returncode == 0, (f"exit status {res.returncode}: {' '.join(map(str, cmd))}\n"
                                 f"--- output (last {tail} characters)\n{res.output[-tail:]}")
    return res.output
