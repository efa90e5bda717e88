"""The copy_flawed task: its references carry exactly the documented errors, and its pairwise judge scores the
documented cases as specified (R(o, y) in {+1, 0, -1}, R(y, y) = 0, correct beats wrong)."""

from __future__ import annotations

import json

from grao import demo
from grao import tasks_flawed as tf
from grao.cli import main
from grao.cli.compare_report import truth_metrics


def test_references_are_wrong_exactly_on_the_documented_subset():
    train, ev = demo.make_task("copy_flawed", min_len=3, max_len=4)
    for rec in train + ev:
        digits = rec["prompt"][len("copy "):-1]
        assert rec["truth"] == digits == tf.truth_of(rec["prompt"])
        if digits[0] in "789":
            assert tf.is_flawed(rec["prompt"]) and rec["reference"] == digits[:-1] != digits
        else:
            assert not tf.is_flawed(rec["prompt"]) and rec["reference"] == digits
    share = sum(tf.is_flawed(r["prompt"]) for r in train) / len(train)
    assert 0.25 < share < 0.35  # about 3 of the 10 first digits
    assert abs(tf.reference_accuracy(train) - (1 - share)) < 1e-9
    # the held-out split is fixed by the task's seed: the value the results quote
    assert tf.reference_accuracy(ev) == truth_metrics(ev, [r["reference"] for r in ev])["reference_accuracy"]


def test_judge_scores_the_documented_cases():
    j = tf.copy_flawed_judge
    cases = [  # (prompt, o, y, R(o, y))
        ("copy 7341:", "7341", "734", 1),    # correct answer beats the flawed reference
        ("copy 7341:", "734", "7341", -1),   # the flawed answer loses to a correct one
        ("copy 7341:", "734", "734", 0),     # R(y, y) = 0
        ("copy 7341:", "7341", "7341", 0),
        ("copy 2580:", "2580", "2580", 0),   # a clean prompt: reproducing the reference ties
        ("copy 2580:", "258", "2580", -1),   # dropping the last digit is worse
        ("copy 2580:", "9999", "2580", -1),  # garbage loses to a correct reference
        ("copy 7341:", "9999", "734", -1),   # ... and to a reference one digit off
        ("copy 7341:", "7342", "734", 0),    # two answers one edit from the truth tie
        ("copy 7341:", " 7341 ", "734", 1),  # whitespace is ignored
    ]
    got = j(prompts=[c[0] for c in cases], completions=[c[1] for c in cases], references=[c[2] for c in cases])
    assert got == [float(c[3]) for c in cases]
    assert set(got) <= {-1.0, 0.0, 1.0}


def test_accuracy_is_against_the_truth_not_the_reference():
    recs = [{"prompt": "copy 7341:", "reference": "734", "truth": "7341"},
            {"prompt": "copy 2580:", "reference": "2580", "truth": "2580"}]
    m = truth_metrics(recs, ["7341", "2580"])
    assert m["accuracy"] == 1.0 and m["accuracy_flawed"] == 1.0 and m["reference_accuracy"] == 0.5
    assert truth_metrics(recs, ["734", "2580"])["accuracy"] == 0.5


def test_compare_on_the_flawed_task_writes_the_issue_form(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "copy_flawed", "--reward", tf.JUDGE_SPEC, "--methods", "sft,grao", "--seeds", "0",
            "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
            "--eval-every", "0", "--eval-prompts", "4", "--ablation", "--output-dir", str(out),
            "--runs-dir", str(tmp_path / "runs")]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"task", "reference_accuracy", "methods"} and res["task"] == "copy_flawed"
    assert set(res["methods"]) == {"sft", "grao"} and len(res["methods"]["grao"]["accuracy"]) == 1
    abl = json.loads((out / "ablation.json").read_text())
    assert list(abl["methods"]) == ["grao_explore", "grao_imitate", "grao", "grao_no_ref_stats"]
    assert "reference_in_stats off" in (out / "table.md").read_text()
