"""What a run reports: the per-step metrics, metrics.jsonl and TensorBoard, plots and console curves.

Metric names say what they measure: ``reward_mean`` (mean sampled reward R(o_i, y) of the step),
``reward_reference`` (R(y, y)), ``loss_<component>`` and ``share_<component>`` (GRAO's exploration /
imitation / alignment terms and their shares of the loss magnitude), ``skipped_*`` / ``total_*``
(fault counters), ``*_seconds``, ``peak_memory_mb``. With several processes every number is global.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from grao.reference import COMPONENTS
from grao.trainer.distributed import all_gather, all_reduce_sum


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset; CPU: the process's max resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reduce_step_stats(local: dict[str, float], loss_weight: float, weight: float, device) -> dict[str, float]:
    """Global step statistics from each rank's local ones: the loss terms weighted by ``loss_weight`` (the
    rank's share of the loss normaliser), the others by ``weight`` (its share of the kept prompts), summed
    over ranks; GRAO's component shares recomputed from the global components."""
    keys = sorted(set().union(*all_gather(sorted(local))))
    vals = [local.get(k, 0.0) * (loss_weight if k == "loss" or k.startswith("loss_") else weight) for k in keys]
    out = dict(zip(keys, all_reduce_sum(vals, device)))
    parts = [f"loss_{k}" for k in COMPONENTS]
    if all(k in out for k in parts):
        total = sum(abs(out[k]) for k in parts) or 1.0
        for k in COMPONENTS:
            out[f"share_{k}"] = abs(out[f"loss_{k}"]) / total
    return out


def rollout_stats(rewards: list[list[float]], sample_lens: list[int], gen_seconds: float) -> dict[str, Any]:
    """Sampling metrics of one step from the kept groups' rewards [P, G+1] and every sample's length
    (all ranks' together)."""
    nan = math.nan
    r = torch.tensor(rewards, dtype=torch.float32)
    samples = r[:, :-1] if r.numel() else None
    return {
        "reward_mean": float(samples.mean()) if samples is not None else nan,
        "reward_std": float(samples.std(unbiased=False)) if samples is not None else nan,
        "reward_reference": float(r[:, -1].mean()) if samples is not None else nan,
        "frac_groups_all_equal": (float((samples.amax(-1) == samples.amin(-1)).float().mean())
                                  if samples is not None else nan),
        "completion_len_mean": sum(sample_lens) / max(1, len(sample_lens)),
        "completion_len_max": max(sample_lens),
        "gen_tokens_per_s": sum(sample_lens) / max(gen_seconds, 1e-9),
    }


class MetricsLog:
    """metrics.jsonl (one JSON object per step, flushed) and, when available, TensorBoard scalars.

    ``tensorboard``: "auto" (when installed) | "true" (required) | "false"."""

    def __init__(self, output_dir: str | os.PathLike, tensorboard: str = "auto"):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb_dir = Path(output_dir) / "tensorboard"
        self.tensorboard = str(tensorboard).lower()
        self._tb = None

    def start(self, *, resumed_step: int | None) -> list[dict]:
        """Open the log for a run: a fresh file, or (resuming) the rows of steps <= ``resumed_step``, which
        are returned (a killed run may have logged later steps or a torn line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 1 << 60) <= resumed_step:
                    kept.append(row)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        if self.tensorboard != "false":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.tb_dir))
            except Exception:
                if self.tensorboard == "true":
                    raise
        return kept

    def append(self, metrics: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
            fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average; missing values (None, NaN: skipped steps) are left out of the windows."""
    out, acc = [], []
    for v in values:
        acc.append(v if v is not None and math.isfinite(v) else None)
        if len(acc) > window:
            acc.pop(0)
        good = [a for a in acc if a is not None]
        out.append(sum(good) / len(good) if good else math.nan)
    return out


def plot_history(runs: dict[str, list[list[dict]]], path: str | os.PathLike, *, key: str = "reward_mean",
                 title: str | None = None, window: int = 5) -> Path | None:
    """PNG of ``key`` per step: one line per method (mean over its runs, band = min..max over runs).

    runs: {method: [history of run 1, ...]}. Returns the path, or None when matplotlib is missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, histories in runs.items():
        if not histories or not histories[0]:
            continue
        n = min(len(h) for h in histories)
        steps = [histories[0][i]["step"] for i in range(n)]
        curves = [smooth([h[i][key] for i in range(n)], window) for h in histories]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        line, = axes[0].plot(steps, mean, label=method)
        if len(curves) > 1:
            axes[0].fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                                 [max(c[i] for c in curves) for i in range(n)], color=line.get_color(), alpha=0.2)
        losses = [smooth([h[i]["loss"] for i in range(n)], window) for h in histories]
        axes[1].plot(steps, [sum(c[i] for c in losses) / len(losses) for i in range(n)], label=method)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"{key} (sampled, moving average {window})")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (each method its own objective)")
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ascii_curve(history: list[dict], key: str = "reward_mean", *, points: int = 12, window: int = 5) -> str:
    """A few rows "step | value | bar" of a smoothed curve for printing."""
    vals = smooth([h[key] for h in history], window)
    if not vals:
        return ""
    idx = sorted({round(i * (len(vals) - 1) / max(1, points - 1)) for i in range(points)})
    top = max([v for v in vals if math.isfinite(v)] + [1e-9])
    lines = [f"{'step':>6} | {key:>11} | "]
    for i in idx:
        bar = "#" * int(round(40 * max(vals[i], 0) / top)) if math.isfinite(vals[i]) else ""
        lines.append(f"{history[i]['step']:>6} | {vals[i]:>11.3f} | {bar}")
    return "\n".join(lines)
