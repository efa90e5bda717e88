"""Rewards (exact match, F1, reward-model and pairwise-judge wrappers) and data loading."""

from __future__ import annotations

import json

import pytest
import torch

from grao import demo
from grao.data import DataError, PromptSampler, load_records, render_prompt, split_hh
from grao.rewards import (
    PairwiseJudgeReward,
    RewardError,
    RewardModelReward,
    WeightedReward,
    call_reward,
    char_f1,
    exact_match,
    resolve_reward,
    token_f1,
)


def test_exact_match_normalises_whitespace():
    got = exact_match(completions=["42", " 4  2", "43", "42 "], references=["42", "4 2", "42", "42"])
    assert got == [1.0, 1.0, 0.0, 1.0]


def test_token_and_char_f1():
    # "the cat sat" vs "the cat ran": 2 common of 3 -> precision = recall = 2/3 -> F1 = 2/3
    assert token_f1(completions=["The cat sat"], references=["the cat ran"])[0] == pytest.approx(2 / 3)
    # precision 1/1, recall 1/4 -> 2 * 0.25 / 1.25 = 0.4
    assert token_f1(completions=["a"], references=["a b c d"])[0] == pytest.approx(0.4)
    assert token_f1(completions=["x"], references=["y"]) == [0.0]
    assert char_f1(completions=["321", "1 2 3"], references=["123", "123"]) == [1.0, 1.0]
    assert char_f1(completions=["12"], references=["1234"])[0] == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_call_reward_trl_keywords_and_checks():
    def trl_style(completions, solution, **kwargs):  # a TRL reward function: references arrive as `solution`
        assert kwargs["prompts"] == ["p", "p"] and kwargs["level"] == [1, 2]
        return [float(c == s) for c, s in zip(completions, solution)]

    assert call_reward(trl_style, prompts=["p", "p"], completions=["a", "b"], references=["a", "a"],
                       level=[1, 2]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        call_reward(lambda **k: [1.0], prompts=["p", "p"], completions=["a", "b"], references=["a", "a"])
    with pytest.raises(RewardError, match="non-finite"):
        call_reward(lambda **k: [float("nan")], prompts=["p"], completions=["a"], references=["a"])


def test_weighted_and_resolved_rewards():
    r = resolve_reward("exact_match*2,char_f1*0.5")
    assert isinstance(r, WeightedReward)
    got = call_reward(r, prompts=["", ""], completions=["12", "21"], references=["12", "12"])
    assert got == [pytest.approx(2.0 + 0.5), pytest.approx(0.0 + 0.5)]
    assert resolve_reward("exact_match") is exact_match
    assert resolve_reward("grao.rewards:token_f1") is token_f1
    with pytest.raises(RewardError, match="reward must be one of exact_match, .*got .no_such_reward."):
        resolve_reward("no_such_reward")


@pytest.fixture(scope="module")
def reward_model():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = demo.build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return LlamaForSequenceClassification(cfg).eval(), tok


def test_reward_model_wrapper_scores_difference_to_reference(reward_model):
    model, tok = reward_model
    rm = RewardModelReward(model, tok, batch_size=2)
    prompts = ["reverse 123:"] * 3 + ["copy 9:"]
    completions = ["321", "3", "reverse me", "9"]
    references = ["321"] * 3 + ["9"]
    got = rm(prompts=prompts, completions=completions, references=references)

    def alone(text):  # unpadded, one text at a time: independent of the wrapper's batching and padding
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt")).logits[0, 0].double().item()

    want = [alone(p + c) - alone(p + r) for p, c, r in zip(prompts, completions, references)]
    assert got[0] == 0.0 and got[3] == 0.0  # R(y, y) = 0
    assert got == pytest.approx(want, abs=1e-5)
    sign = RewardModelReward(model, tok, mode="sign")(prompts=prompts, completions=completions, references=references)
    assert sign == [float((w > 0) - (w < 0)) if abs(w) > 1e-6 else 0.0 for w in want]
    with pytest.raises(RewardError, match="mode"):
        RewardModelReward(model, tok, mode="ratio")


def test_pairwise_judge_wrapper():
    calls = []

    def longer_is_better(prompts, pairs):  # TRL interface: index of the preferred completion, -1 = no verdict
        calls.append(len(pairs))
        return [0 if len(a) > len(b) else 1 if len(a) < len(b) else -1 for a, b in pairs]

    judge = PairwiseJudgeReward(longer_is_better)
    got = judge(prompts=["q"] * 4, completions=["long answer", "s", "same", "ref"],
                references=["ref", "ref", "abcd", "ref"])
    assert got == [1.0, -1.0, 0.0, 0.0]
    assert calls == [3]  # the identical pair (R(y, y)) never reaches the judge

    class FirstAlwaysWins:  # a position-biased judge object with a .judge method
        def judge(self, prompts, pairs):
            return [0] * len(pairs)

    assert PairwiseJudgeReward(FirstAlwaysWins())(prompts=["q"], completions=["a"], references=["b"]) == [1.0]
    assert PairwiseJudgeReward(FirstAlwaysWins(), symmetric=True)(prompts=["q"], completions=["a"],
                                                                  references=["b"]) == [0.0]
    with pytest.raises(RewardError, match="verdicts"):
        PairwiseJudgeReward(lambda p, pairs: [0])(prompts=["q", "q"], completions=["a", "b"], references=["c", "c"])


# ------------------------------------------------------------------------------------------------------ data


def test_jsonl_with_aliases(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a", "reference": "1"}, {"prompt": "b", "solution": "2", "level": 3},
            {"prompt": "c", "chosen": "c 3", "rejected": "c x"}, {"prompt": "d", "answer": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_records(path)
    assert [r["reference"] for r in recs] == ["1", "2", " 3", "4"]  # a chosen that repeats the prompt is cut
    assert recs[1]["level"] == 3 and recs[2]["rejected"] == "c x"


def test_data_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_records(bad)
    with pytest.raises(DataError, match="no reference column"):
        load_records([{"prompt": "a"}])
    with pytest.raises(DataError, match="non-empty"):
        load_records([{"prompt": "a", "reference": "  "}])
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "missing.jsonl")


def test_hh_format():
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: Five."
    prompt, answer = split_hh(chosen)
    assert prompt.endswith("\n\nAssistant:") and prompt.count("Human:") == 2 and answer == "It is 4."
    rec = load_records([{"chosen": chosen, "rejected": rejected}])[0]
    assert rec["prompt"] == prompt and rec["reference"] == "It is 4." and rec["rejected"] == "Five."
    with pytest.raises(DataError, match="Assistant"):
        split_hh("\n\nHuman: no answer")


def test_chat_template_prompts():
    tok = demo.build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }},{% endfor %}"
                         "{% if add_generation_prompt %}a:{% endif %}")
    rec = load_records([{"prompt": [{"role": "user", "content": "copy 12"}],
                         "reference": [{"role": "assistant", "content": "12"}]}])[0]
    assert rec["reference"] == "12"
    assert render_prompt(rec["prompt"], tok) == "u:copy 12,a:"
    with pytest.raises(DataError, match="chat_template"):
        render_prompt(rec["prompt"], demo.build_tokenizer())


def test_prompt_sampler_epochs_and_state():
    s = PromptSampler(5, seed=1)
    first = s.next_indices(5)
    assert sorted(first) == list(range(5))
    s.next_indices(2)
    state = s.state_dict()
    rest = s.next_indices(7)
    t = PromptSampler(5, seed=1)
    t.load_state_dict(state)
    assert t.next_indices(7) == rest
