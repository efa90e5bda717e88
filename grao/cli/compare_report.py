"""What ``grao compare`` measures beyond RAS and NAG, and the files it writes from it.

* Held-out accuracy against the truth: exact match of the greedy answer with each record's ``truth``
  (the ``reference`` where a task has none), overall and on the prompts whose reference is wrong
  ("flawed") or right ("clean"); the references' own accuracy on the same prompts.
* The ablation arms of ``--ablation``: GRAO with loss components switched off through its weights
  (the objective is exploration + beta * imitation + lam * alignment, docs/spec.md), and with the
  reference left out of the advantage statistics.
* ``results.json`` in the form ``{"task", "reference_accuracy", "methods": {m: {"accuracy": [per seed],
  ...}}}`` and the markdown tables.
"""

from __future__ import annotations

import math

# name -> (label, method, TrainConfig overrides); "grao" itself is the full objective (+ alignment).
ABLATIONS = {
    "grao_explore": ("exploration only (beta = 0, lam = 0)", "grao", {"beta": 0.0, "lam": 0.0}),
    "grao_imitate": ("+ imitation (beta = 0.5, lam = 0)", "grao", {"lam": 0.0}),
    "grao": ("+ alignment = GRAO (beta = 0.5, lam = 0.6)", "grao", {}),
    "grao_no_ref_stats": ("GRAO, reference_in_stats off", "grao", {"reference_in_stats": False}),
}


def _norm(text) -> str:
    return " ".join(str(text).strip().split())


def truth_metrics(records: list[dict], completions: list[str]) -> dict:
    """Accuracy against the truth, overall and on the flawed / clean prompts (None where a subset is empty),
    and the references' own accuracy."""
    truths = [r.get("truth", r["reference"]) for r in records]
    hit = [_norm(c) == _norm(t) for c, t in zip(completions, truths, strict=True)]
    flawed = [_norm(r["reference"]) != _norm(t) for r, t in zip(records, truths)]

    def share(mask):
        xs = [h for h, m in zip(hit, mask) if m]
        return sum(xs) / len(xs) if xs else None
    return {"accuracy": sum(hit) / len(hit), "accuracy_flawed": share(flawed),
            "accuracy_clean": share([not f for f in flawed]),
            "reference_accuracy": 1 - sum(flawed) / len(flawed), "flawed_prompts": sum(flawed)}


def mean_std(xs: list) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))


KEYS = ("accuracy", "accuracy_flawed", "accuracy_clean", "ras", "nag", "reward_after")


def per_arm(results: dict[str, list[dict]], arms: list[str]) -> dict:
    """{arm: {"accuracy": [per seed], ..., "seeds": [...]}}."""
    return {a: {**{k: [r.get(k) for r in results[a]] for k in KEYS}, "seeds": [r["seed"] for r in results[a]]}
            for a in arms}


def results_json(task: str, reference_accuracy: float, results: dict, methods: list[str]) -> dict:
    return {"task": task, "reference_accuracy": reference_accuracy, "methods": per_arm(results, methods)}


def _cell(xs) -> str:
    m, s = mean_std(xs)
    return "n/a" if math.isnan(m) else f"{m:.3f} ± {s:.3f}"


def table_lines(results: dict, arms: list[str], labels: dict[str, str] | None = None) -> list[str]:
    """One row per arm: accuracy against the truth (all, flawed, clean prompts), RAS, NAG, per-seed accuracy."""
    lines = ["| method | accuracy vs truth | on flawed-reference prompts | on clean prompts | RAS | NAG | "
             "accuracy per seed |", "|---|---|---|---|---|---|---|"]
    for a in arms:
        rs = results[a]
        seeds = ", ".join(f"{r['accuracy']:.3f}" for r in rs)
        name = (labels or {}).get(a, a.upper())
        lines.append(f"| {name} | " + " | ".join(_cell([r.get(k) for r in rs]) for k in
                                                 ("accuracy", "accuracy_flawed", "accuracy_clean", "ras", "nag"))
                     + f" | {seeds} |")
    return lines
