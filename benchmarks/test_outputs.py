"""The benchmarks write scratch output by default and report time ratios with their spread (issue 22, item 3).

Committed results under benchmarks/results/ change only when a run names them with ``--out``; a summary's
"N x eager" always states its repeats and range, and a range holding 1.0 is called a tie.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from benchmarks.compare import ROOT, TINY_BUDGET_GB, default_out, sweep_points
from benchmarks.report import ratio_text, time_spread

BENCH = Path(__file__).resolve().parent
#: a path into the committed results built in code: os.path.join(..., "benchmarks", "results") or
#: REPO / "benchmarks" / "results" (the help texts' "--out benchmarks/results/..." are not matched)
COMMITTED = re.compile(r"""["']benchmarks["']\s*[,/]\s*["']results["']""")


SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("test_"))


def test_the_scan_can_fail():
    """The check below could pass forever with a pattern that matches nothing or an empty list of scripts."""
    assert {"compare.py", "rollout.py", "gpu_check.py", "common.py"} <= set(SCRIPTS), SCRIPTS
    assert COMMITTED.search('out = os.path.join(ROOT, "benchmarks", "results")')
    assert COMMITTED.search("out = REPO / 'benchmarks' / 'results' / 'cpu'")
    assert not COMMITTED.search('help="--out benchmarks/results/cpu to update the committed table"')


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_defaults_to_the_committed_results(script):
    source = (BENCH / script).read_text(encoding="utf-8")
    assert not COMMITTED.search(source), f"{script} builds a path into benchmarks/results/: use runs/ by default"


def test_compare_default_out_is_scratch():
    runs = os.path.join(ROOT, "runs") + os.sep
    assert default_out("cpu", "small").startswith(runs)
    assert default_out("cpu", "tiny") == os.path.join(default_out("cpu", "small"), "tiny")
    assert default_out("cuda", "full").startswith(runs)


def test_tiny_sweep_is_small():
    points = sweep_points("cpu", "tiny")
    assert len(points) <= 9 and {p.sweep for p in points} == {"headline", "G", "T", "V", "D", "dtype"}
    assert len([p for p in points if p.sweep == "T"]) >= 2  # the budget search fits a line over them
    assert TINY_BUDGET_GB <= 0.5


def test_ratio_states_repeats_and_spread():
    r = {"time_vs_eager": 0.91, "time_vs_eager_spread": time_spread([91, 88, 95, 90, 93], [100, 99, 101, 98, 102])}
    text = ratio_text(r)
    assert text.startswith("0.91x eager (median of 5 runs each; range 0.86-0.97")
    assert "not distinguishable" not in text


def test_ratio_range_holding_one_is_a_tie_and_one_run_has_no_spread():
    noisy = {"time_vs_eager": 5.15, "time_vs_eager_spread": time_spread([5.0, 0.7, 7.0], [1.0, 0.9])}
    assert "median of 3 runs, eager's of 2; range 0.70-7.78" in ratio_text(noisy)
    assert "not distinguishable from eager" in ratio_text(noisy)
    single = {"time_vs_eager": 0.5, "time_vs_eager_spread": time_spread([1.0], [2.0])}
    assert "a single run: no spread measured" in ratio_text(single)
    assert ratio_text({"time_vs_eager": None}) == "time vs eager: -"
