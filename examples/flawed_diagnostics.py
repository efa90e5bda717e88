"""Why GRAO does (or does not) learn past the flawed references of ``copy_flawed``: training-time statistics.

Trains one GRAO run with the settings of ``grao compare`` (DEMO_DEFAULTS, task copy_flawed, the truth judge)
and records every group the trainer scores (training prompts only; the held-out set is never touched). Per
window of steps it reports, separately for the prompts whose reference is wrong ("flawed") and right:

* what the samples are: correct / equal to the wrong reference / other; the judge's tie rate (R = 0);
* the advantages A_y of the reference with and without the reference in the statistics (eq. 4), the share
  of groups with all-equal statistics (no gradient), and the reference's net coefficient in the gradient
  c_y = beta * A_y - lam * mean_i A_i (docs/spec.md, "Closed-form gradient"): c_y > 0 pulls the policy
  towards the reference, c_y < 0 pushes it away.

    python examples/flawed_diagnostics.py --seed 0 [--beta 0.5 --lam 0.6 --no-ref-stats --steps 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from grao import tasks_flawed as tf
from grao.cli.commands import DEMO_DEFAULTS
from grao.reference import group_advantages
from grao.trainer import Trainer
from grao.trainer.config import TrainConfig


class Recorder:
    """Wraps the judge; keeps (prompt, samples, rewards) of every training call (P * (G + 1) completions)."""

    def __init__(self, group_size: int):
        self.G, self.calls = group_size, []
        self.__name__ = "copy_flawed_judge"

    def __call__(self, prompts, completions, references, **kw):
        out = tf.copy_flawed_judge(prompts=prompts, completions=completions, references=references)
        n = self.G + 1
        if len(completions) % n == 0 and len(completions) > n:  # a training step (evaluation is off)
            groups = [(prompts[i], completions[i:i + self.G], references[i], out[i:i + n])
                      for i in range(0, len(completions), n)]
            self.calls.append(groups)
        return out


def summarise(calls, beta: float, lam: float, window: int) -> list[dict]:
    rows = []
    for start in range(0, len(calls), window):
        acc = {k: {"n_groups": 0, "n_samples": 0, "correct": 0, "as_reference": 0, "ties": 0, "any_correct": 0,
                   "A_y_in": 0.0, "A_y_out": 0.0, "c_y_in": 0.0, "c_y_out": 0.0, "flat_in": 0, "flat_out": 0}
               for k in ("flawed", "clean")}
        for groups in calls[start:start + window]:
            for prompt, samples, ref, rewards in groups:
                a = acc["flawed" if tf.is_flawed(prompt) else "clean"]
                truth = tf.truth_of(prompt)
                a["n_groups"] += 1
                a["n_samples"] += len(samples)
                a["correct"] += sum(s.strip() == truth for s in samples)
                a["as_reference"] += sum(s.strip() == ref for s in samples)
                a["ties"] += sum(r == 0 for r in rewards[:-1])
                a["any_correct"] += any(s.strip() == truth for s in samples)
                r = torch.tensor([rewards], dtype=torch.float32)
                for tag, ris in (("in", True), ("out", False)):
                    adv = group_advantages(r, reference_in_stats=ris)[0]
                    a[f"A_y_{tag}"] += float(adv[-1])
                    a[f"c_y_{tag}"] += float(beta * adv[-1] - lam * adv[:-1].mean())
                    a[f"flat_{tag}"] += bool((adv == 0).all())
        row = {"steps": f"{start + 1}-{start + len(calls[start:start + window])}"}
        for k, a in acc.items():
            g, s = max(1, a["n_groups"]), max(1, a["n_samples"])
            row[k] = {"groups": a["n_groups"], "samples_correct": a["correct"] / s,
                      "samples_equal_reference": a["as_reference"] / s, "tie_rate": a["ties"] / s,
                      "groups_with_a_correct_sample": a["any_correct"] / g,
                      "A_y": {"ref_in_stats": a["A_y_in"] / g, "ref_out_of_stats": a["A_y_out"] / g},
                      "c_y": {"ref_in_stats": a["c_y_in"] / g, "ref_out_of_stats": a["c_y_out"] / g},
                      "groups_no_gradient": {"ref_in_stats": a["flat_in"] / g, "ref_out_of_stats": a["flat_out"] / g}}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--lam", type=float, default=0.6)
    p.add_argument("--method", default="grao")
    p.add_argument("--no-ref-stats", action="store_true")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--output-dir", default="runs/flawed-diagnostics")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    values = {k: v for k, v in DEMO_DEFAULTS.items() if k != "output_dir"}
    values.update(task=tf.TASK, reward=tf.JUDGE_SPEC, steps=args.steps, eval_every=0, save_every=0, progress=False,
                  plot=False, seed=args.seed, method=args.method, beta=args.beta, lam=args.lam,
                  reference_in_stats=not args.no_ref_stats, overwrite=True,
                  output_dir=f"{args.output_dir}/{args.method}-b{args.beta}-l{args.lam}-s{args.seed}")
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    rec = Recorder(cfg.group_size)
    Trainer(cfg, reward=rec).train()
    rows = summarise(rec.calls, args.beta, args.lam, args.window)
    json.dump({"args": vars(args), "windows": rows}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
