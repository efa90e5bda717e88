"""Values are checked where they enter (flags, YAML, TrainConfig, the loss APIs) with the same messages, and what
used to pass silently raises or warns once (issue 12, items 3-5)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import grao
import grao_kernels
from grao.cli import build_config, build_parser, main
from grao.trainer import TrainConfig, Trainer
from grao.trainer.config import ConfigError
from grao_kernels import checks as _checks

# (field, value as typed in Python or YAML, the same as typed on the command line, the problem)
SAME = [
    ("group_size", 0, "0", "must be an integer >= 1, got 0"),
    ("lr", -1, "-1", "must be a number > 0, got -1"),
    ("method", "gpro", "gpro", "must be one of grao, grpo, sft, dpo, ppo, got 'gpro' (did you mean 'grpo'?)"),
    ("bf16", "maybe", "maybe", "must be one of auto, true, false, got 'maybe'"),
    ("adam_beta2", 1, "1", "must be a number in [0, 1), got 1"),
    ("reward", "exact_mtch", "exact_mtch", "(did you mean 'exact_match'?)"),
]


@pytest.mark.parametrize("field, value, text, problem", SAME, ids=[s[0] for s in SAME])
def test_python_yaml_and_flags_give_the_same_message(tmp_path, capsys, field, value, text, problem):
    with pytest.raises(ConfigError) as api:
        TrainConfig(**{field: value}).validate()
    assert str(api.value).startswith(field + " ") and problem in str(api.value)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"{field}: {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as yaml_err:
        build_config(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert str(yaml_err.value) == f"{cfg}: {api.value}"
    assert main(["train", "--" + field.replace("_", "-"), text]) == 2
    assert capsys.readouterr().err == f"grao: error: --{field.replace('_', '-')}{str(api.value)[len(field):]}\n"


def test_values_are_normalised_where_they_enter():
    cfg = TrainConfig(bf16=True, lr="1e-4", tensorboard="False", temperature=1).validate()
    assert (cfg.bf16, cfg.lr, cfg.tensorboard, cfg.temperature) == ("true", 1e-4, "false", 1.0)
    for bad in ({"steps": 2.0}, {"steps": True}, {"progress": "no"}, {"data": 3}, {"eps": 0}, {"beta": float("nan")}):
        with pytest.raises(ConfigError, match=f"^{next(iter(bad))} must be"):
            TrainConfig(**bad).validate()


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    P, G, T, D, V = 2, 3, 5, 8, 11
    return (torch.randn(P * (G + 1), T, D, generator=g), torch.randn(V, D, generator=g),
            torch.randint(0, V, (P * (G + 1), T), generator=g), torch.rand(P, G + 1, generator=g))


@pytest.mark.parametrize("loss", [grao.linear_grao_loss, grao_kernels.fused_linear_grao_loss],
                         ids=["eager", "fused"])
def test_loss_weights_outside_0_1_warn_once_with_the_configs_message(loss):
    _checks._warned_weights.clear()
    with pytest.warns(UserWarning) as config_warnings:
        TrainConfig(beta=-1, lam=5).validate()
    expected = ["beta=-1 is outside [0, 1] (paper: 0.5): a negative weight reverses the imitation term",
                "lam=5 is outside [0, 1] (paper: 0.6): the alignment term outweighs exploration (weight 1)"]
    assert [str(w.message) for w in config_warnings] == expected
    _checks._warned_weights.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            loss(*_loss_inputs(), beta=-1, lam=5)
        loss(*_loss_inputs())  # the defaults (0.5, 0.6) never warn
    assert [str(w.message) for w in seen if "outside [0, 1]" in str(w.message)] == expected  # once each


def test_grpo_advantages_refuse_non_finite_rewards_like_group_advantages():
    bad = torch.tensor([[1.0, float("nan"), 0.0]])
    with pytest.raises(grao.GRAOInputError) as grao_err:
        grao.group_advantages(bad)
    with pytest.raises(grao.GRAOInputError) as grpo_err:
        grao.grpo_advantages(bad)
    assert str(grpo_err.value) == str(grao_err.value) == "rewards must be finite; found NaN or inf"
    with pytest.raises(grao.GRAOInputError, match="eps must be > 0"):
        grao.grpo_advantages(torch.ones(1, 3), eps=0)
    logp = torch.zeros(2, 3)
    with pytest.raises(grao.GRAOInputError, match="epsilon_low must be >= 0"):
        grao.grpo_loss(logp, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2), epsilon_low=-0.1)


def test_data_that_trains_silently_badly_warns(tmp_path):
    data, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"copy {i}:", "reference": r}) + "\n"
                            for i, r in enumerate(["12", "ÉTÉ", "34", "56"])))
    held_out.write_text(json.dumps({"prompt": "copy 7:", "reference": "7"}) + "\n")
    cfg = TrainConfig(model="demo", data=str(data), eval_data=str(held_out), prompts_per_step=8, group_size=2,
                      output_dir=str(tmp_path / "run"), progress=False, plot=False, tensorboard="false")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(cfg)
    messages = [str(w.message) for w in seen]
    assert "prompts_per_step (8) is more than the 4 records of data: prompts repeat within a step" in messages
    assert any(m.startswith("1 of the 4 references of data hold text the tokenizer cannot represent (it becomes "
                            "<unk>), e.g. record 1: 'ÉTÉ'") for m in messages), messages
    assert "eval_data is set but eval_every is 0: it is never evaluated during training" in messages
    cfg.prompts_per_step, cfg.eval_every = 4, 5
    data.write_text("".join(json.dumps({"prompt": f"copy {i}:", "reference": str(i)}) + "\n" for i in range(4)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(cfg)
    assert not [w for w in seen if issubclass(w.category, UserWarning) and "grao" in w.filename], \
        [str(w.message) for w in seen]
