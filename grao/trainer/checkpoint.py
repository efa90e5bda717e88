"""Checkpoints: atomic writes, pruning, repair after a kill, and the safe load of the trainer state.

Checkpoints are written with ``save_pretrained`` into a temporary directory that is renamed atomically
to ``checkpoints/step-XXXXXXXX``; the trainer state (optimizer, scheduler, RNG, data position, step) is a
``torch.save`` of tensors and plain containers, loaded with ``weights_only=True`` (a state file holding
any other pickled object is refused). Resuming continues from the newest complete checkpoint; an
interrupted run leaves at most a ``.tmp-*`` directory, which is ignored and removed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

FAULT_ENV = "GRAO_FAULT_INJECT"  # test hook, see fault_point
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.pt"
RUN_CONFIG = "config.json"  # the run's TrainConfig, in output_dir (written by Trainer.train)


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed from their temp dir and holding the trainer state), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class OutputDirError(ValueError):
    """A new run's output_dir already holds another run (see :func:`claim_output_dir`)."""


def run_summary(output_dir: str | os.PathLike) -> str | None:
    """What of a grao run ``output_dir`` holds, in words (``metrics.jsonl with 4 steps, checkpoints up to step 4``),
    or None when it holds none (missing, empty, or only files that grao does not write)."""
    root = Path(output_dir)
    parts = []
    if (root / "metrics.jsonl").is_file():
        with open(root / "metrics.jsonl", encoding="utf-8", errors="replace") as fh:
            parts.append(f"metrics.jsonl with {sum(1 for line in fh if line.strip())} steps")
    found = checkpoint_dirs(root)
    if found:
        parts.append(f"checkpoints up to step {int(found[-1].name[len(CHECKPOINT_PREFIX):])}")
    elif (root / "checkpoints").is_dir() and any((root / "checkpoints").iterdir()):
        parts.append("an incomplete checkpoint")
    return ", ".join(parts) or None


def clear_run(output_dir: str | os.PathLike) -> None:
    """Remove what a grao run wrote into ``output_dir`` (and only that: other files stay)."""
    root = Path(output_dir)
    for name in ("checkpoints", "tensorboard"):
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    for name in ("metrics.jsonl", "metrics.jsonl.tmp", "curves.png", "summary.json"):
        (root / name).unlink(missing_ok=True)
    if _read_run_config(root / RUN_CONFIG) is not None:  # the run's TrainConfig; a model's config.json stays
        (root / RUN_CONFIG).unlink()


def _read_run_config(path: Path) -> dict | None:
    """The TrainConfig values in ``path`` (a run's config.json), or None: missing, unreadable, or another
    file of that name (a model's config.json has no "method", "group_size", "output_dir")."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and {"method", "group_size", "output_dir"} <= set(data):
        return data
    return None


def saved_run_config(output_dir: str | os.PathLike) -> tuple[dict, str] | None:
    """(TrainConfig values, where they were read) of the run in ``output_dir``, or None when it holds none.

    Read from its config.json (written when each ``Trainer.train`` starts, so it is the run's latest settings;
    a resume may have changed only ``config.RESUME_SAFE`` ones since its newest checkpoint), else from the
    trainer state of its newest complete checkpoint (every checkpoint holds its run's config)."""
    path = Path(output_dir) / RUN_CONFIG
    data = _read_run_config(path)
    if data is not None:
        return data, str(path)
    found = checkpoint_dirs(output_dir)
    if found:
        state = read_trainer_state(found[-1])
        if isinstance(state.get("config"), dict):
            return dict(state["config"]), str(found[-1] / STATE_FILE)
    return None


def claim_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path | None:
    """Make ``output_dir`` hold one run only; return the checkpoint to resume from, or None for a new run.

    * ``resume``: the newest complete checkpoint (after repairing an interrupted save). With none, a
      UserWarning says so and the run starts anew (replacing what an earlier, checkpoint-less run logged).
    * otherwise, a folder that holds a run is refused (:class:`OutputDirError`) unless ``overwrite``, which
      removes that run's files first (:func:`clear_run`).
    """
    held = run_summary(output_dir)
    if resume:
        recover_interrupted_saves(output_dir)
        found = checkpoint_dirs(output_dir)
        if found:
            return found[-1]
        warnings.warn(f"resume: {output_dir} has no complete checkpoint to resume from"
                      + (f" (it holds {held}, which this run replaces)" if held else "") + "; starting a new run",
                      UserWarning, stacklevel=2)
    elif held and not overwrite:
        raise OutputDirError(f"output_dir {output_dir} already holds a run ({held}); use resume (--resume) to "
                             f"continue it, overwrite (--overwrite) to replace it, or another output_dir")
    if held:
        clear_run(output_dir)
    return None


def recover_interrupted_saves(output_dir: str | os.PathLike) -> None:
    """Repair what a process killed inside :func:`write_checkpoint` can leave behind.

    A kill between the two renames of a re-save leaves the complete old checkpoint as
    ``.old-step-N-<pid>`` and no ``step-N``: it is renamed back. Half-written ``.tmp-*`` directories and
    ``.old-*`` ones that have a ``step-N`` again are removed.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".old-"):
            m = re.fullmatch(rf"\.old-({CHECKPOINT_PREFIX}\d+)-\d+", entry.name)  # not the "-pruned" ones
            if m and not (root / m.group(1)).exists() and (entry / STATE_FILE).is_file():
                os.rename(entry, root / m.group(1))
                continue
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)


def fault_point(name: str, step: int) -> None:
    """Test hook: with ``GRAO_FAULT_INJECT="<name>@<step>"`` the process announces it on stdout and
    sleeps, so that a test can SIGKILL it at exactly this point (e.g. inside a checkpoint write).
    Points: ``save_weights`` (weights written to the temp dir, trainer state not yet), ``save_state``
    (everything written, not yet renamed). Unset in normal runs: a dictionary lookup, nothing else."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{name}@{step}":
        print(f"{FAULT_ENV}: paused at {name} step {step} pid {os.getpid()}", flush=True)
        time.sleep(600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def plain(value):
    """Config values as YAML/JSON/weights_only-safe plain types (callables become their names)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return getattr(value, "__name__", type(value).__name__)


def write_checkpoint(output_dir: str | os.PathLike, step: int, *, model, tokenizer, state: dict,
                     full_state_dict: dict | None = None, architecture: str | None = None,
                     keep_last: int = 0) -> Path:
    """Write checkpoints/step-XXXXXXXX atomically (temp dir, fsync, rename); keep the ``keep_last`` newest.

    A process killed at any point leaves the previous checkpoints complete: the new one only appears under
    its final name once every file is written and fsynced; pruning renames a checkpoint away before deleting
    it. ``full_state_dict`` (FSDP: the gathered weights) replaces the model's own state dict, and
    ``architecture`` the class name written to config.json (fully_shard renames the class FSDP<Name>).
    One process writes; with several, the caller makes the others wait."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if full_state_dict is None:
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=full_state_dict)
    if architecture is not None:
        cfg_path = tmp / "config.json"
        conf = json.loads(cfg_path.read_text(encoding="utf-8"))
        conf["architectures"] = [architecture]
        cfg_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(tmp)
    fault_point("save_weights", step)
    torch.save(state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    fault_point("save_state", step)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way first
        trash = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, trash)  # a kill right here is repaired by recover_interrupted_saves
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    if keep_last and keep_last > 0:
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            trash = root / f".old-{old.name}-{os.getpid()}-pruned"
            os.rename(old, trash)  # never leave a half-deleted directory under a checkpoint's name
            shutil.rmtree(trash, ignore_errors=True)
    return final


def read_trainer_state(path: Path) -> dict:
    """The trainer state saved in checkpoint ``path``, loaded with ``torch.load(weights_only=True)``: tensors
    and plain containers only. A file holding any other pickled object (which could run code when
    unpickled) is refused with a ValueError; a state written by an FSDP run (no optimizer state) with
    NotImplementedError."""
    try:
        state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ValueError(f"refusing to load {path / STATE_FILE}: it holds objects other than tensors and plain "
                         f"containers (loaded with torch.load(weights_only=True), which never runs pickled "
                         f"code). Details: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or "optimizer" not in state:
        raise ValueError(f"{path / STATE_FILE} is not a grao trainer state (expected a dict with 'optimizer')")
    if state.get("parallel") == "fsdp":
        raise NotImplementedError(f"{path} was written by an FSDP run, which does not save the (sharded) "
                                  f"optimizer state: resuming it is not supported. Start a new run from its "
                                  f"weights instead (--model {path}).")
    return state


def as_tuple(x):
    """Lists back to tuples, recursively (``random.setstate`` after a JSON-like round trip)."""
    return tuple(as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
