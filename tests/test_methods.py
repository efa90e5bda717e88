"""Methods are objects (``grao.trainer.methods``), config fields carry their own help (issue 23, item 7).

Every registered method is a ``--method`` choice and trains through the same Trainer; an unknown one is the
one-line ``grao: error:``; nothing in ``grao/`` compares the method's name; every TrainConfig field has one help
text, in its metadata, and ``grao train --help`` shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from grao.cli import COMMANDS, build_parser, main
from grao.cli.options import build_config
from grao.trainer import REGISTRY, Method, TrainConfig, get_method
from grao.trainer.config import METHODS, OPTIONS, SECTIONS
from grao.trainer.methods import register

from .test_trainer import fixed_rollout, tiny_trainer

GRAO_DIR = Path(__file__).resolve().parent.parent / "grao"


def test_the_registry_is_the_methods():
    assert METHODS == tuple(REGISTRY) == ("grao", "grpo", "sft", "dpo", "ppo")
    for name, method in REGISTRY.items():
        assert isinstance(method, Method) and method.name == name and get_method(name) is method
    with pytest.raises(ValueError, match="one of grao, grpo, sft, dpo, ppo, got 'trpo'"):
        get_method("trpo")
    with pytest.raises(ValueError, match="a name of its own"):
        register(type(REGISTRY["grao"])())  # a second "grao"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_is_a_train_choice(name):
    build_parser()
    args = COMMANDS["train"].parse_args(["--method", name])
    assert build_config(args, saved_run=False).method == name


def test_an_unknown_method_is_one_line_listing_the_methods(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", "nosuch", "--output-dir", "out"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err == f"grao: error: --method must be one of {', '.join(REGISTRY)}, got 'nosuch'\n"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_method_trains_on_the_rows_it_says(name):
    """rows_per_group, batch, trained_samples and planned_passes agree, for each method's own rows."""
    t = tiny_trainer(method=name, micro_batch_tokens=10)
    ro = fixed_rollout(t)
    method = t.method
    assert method is REGISTRY[name]
    batch = method.batch(t.config, ro, t.tokenizer)
    P = len(ro.prompt_ids)
    assert len(batch.rows) == method.trained_samples(t.config, P) == P * batch.unit
    assert batch.unit == method.rows_per_group(t.config)
    assert method.planned_passes(t.config, ro, t.tokenizer) >= 1
    assert method.loss_normaliser(t.config, ro) > 0
    stats = t.accumulate_gradients(ro)
    assert set(stats) >= {"loss"}
    assert (t.ref_model is not None) == method.needs_reference_model(t.config)


def test_method_checks_are_the_methods():
    with pytest.raises(ValueError, match="group_size must be >= 2 with method grpo"):
        REGISTRY["grpo"].validate(TrainConfig(method="grpo", group_size=1))
    REGISTRY["grao"].validate(TrainConfig(group_size=1))
    with pytest.raises(ValueError, match="needs a 'rejected' column"):
        REGISTRY["dpo"].check_records(TrainConfig(method="dpo", dpo_rejected="column"), [{"prompt": "a"}])
    assert REGISTRY["grpo"].needs_reference_model(TrainConfig(grpo_kl_beta=0.1))
    assert not REGISTRY["grpo"].needs_reference_model(TrainConfig())
    assert REGISTRY["ppo"].needs_reference_model(TrainConfig(method="ppo"))  # its KL penalty, on by default
    assert not REGISTRY["ppo"].needs_reference_model(TrainConfig(method="ppo", ppo_kl_coef=0.0))
    with pytest.raises(ValueError, match=r"ppo_minibatches \(3\) must be <= prompts_per_step \(2\)"):
        REGISTRY["ppo"].validate(TrainConfig(method="ppo", ppo_minibatches=3, prompts_per_step=2))
    assert [m.name for m in REGISTRY.values() if m.make_modules(TrainConfig(), tiny_trainer().model)] == ["ppo"]
    assert [m.name for m in REGISTRY.values() if not m.data_parallel] == ["ppo"]


def test_no_code_branches_on_the_method_name():
    """The method's behaviour is its object's; its name is only shown (progress bar, metrics, plot labels)."""
    pattern = re.compile(r"""\bmethod\s*(==|!=)|\.method\s+(not\s+)?in\b|["'](grao|grpo|sft|dpo)["']\s*(==|!=|in\b)"""
                         r"""|\[\s*(cfg|config|self\.config)\.method\s*\]""")
    hits = []
    for path in sorted(GRAO_DIR.rglob("*.py")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(GRAO_DIR.parent)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ----------------------------------------------------------------------------------- one help text per field


def test_every_field_has_its_help_in_its_metadata():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert [n for section in SECTIONS.values() for n in section] == names  # each field once, in field order
    for f in dataclasses.fields(TrainConfig):
        text = f.metadata.get("help")
        assert isinstance(text, str) and text.strip() and "\n" not in text, f.name
        assert OPTIONS[f.name] is f.metadata["option"] and OPTIONS[f.name].help == text, f.name


def test_train_help_shows_every_fields_help(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    shown = re.sub(r"\s+", "", text)  # argparse wraps lines, also inside hyphenated words
    build_parser()
    actions = {a.dest: a for a in COMMANDS["train"]._actions}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"^  {flag}(?![\w-])", text, re.MULTILINE), flag
        assert re.sub(r"\s+", "", f.metadata["help"]) in shown, f"{flag}: its help text is not in grao train --help"
        action = actions[f.name]
        assert action.default is None  # a flag not given leaves the field's (or the saved run's) value
        assert isinstance(action, argparse.BooleanOptionalAction) == (OPTIONS[f.name].kind == "bool"), flag
