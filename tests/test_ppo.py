"""PPO (issue 25): its reference pieces against hand-worked numbers and autograd, and ``--method ppo`` in the
trainer (fused = eager gradients, micro-batching exact, the value head checkpointed and resumed)."""

from __future__ import annotations

import math

import pytest
import torch

import grao
from grao.cli import main
from grao.trainer import checkpoint_dirs

from .test_trainer import IMPLS, fixed_rollout, tiny_trainer


# ----------------------------------------------------------------------------------- the reference, by hand


def _close(t, expected, abs=0.0, rel=0.0):
    torch.testing.assert_close(t.detach(), torch.tensor(expected, dtype=t.dtype), atol=abs, rtol=rel)


def test_ppo_rewards_put_the_kl_on_every_token_and_the_score_on_the_last():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = grao.ppo_rewards(torch.tensor([1.0, 2.0], dtype=torch.float64), logp, ref, mask, kl_coef=0.1)
    # kl = logp - ref: row 0 [0.5, 0, 0.5], row 1 [-0.5, 0, (padding) 0]; r = -0.1 kl, + score at the last token
    _close(kl, [[0.5, 0.0, 0.5], [-0.5, 0.0, 0.0]], abs=1e-15)
    _close(rewards, [[-0.05, 0.0, 0.95], [0.05, 2.0, 0.0]], abs=1e-15)


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]], dtype=torch.float64)  # 7.0: padding, ignored
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 0.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = grao.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: delta_2 = 1 - 0.4 = 0.6, A_2 = 0.6; delta_1 = 0.9 * 0.4 - 0.2 = 0.16, A_1 = 0.16 + 0.45 * 0.6 = 0.43;
    #        delta_0 = 0.9 * 0.2 - 0.5 = -0.32, A_0 = -0.32 + 0.45 * 0.43 = -0.1265
    # row 1: delta_1 = 2 - 0.5 = 1.5 (V after the last token is 0), A_1 = 1.5;
    #        delta_0 = 0.9 * 0.5 - 1.0 = -0.55, A_0 = -0.55 + 0.45 * 1.5 = 0.125
    _close(adv, [[-0.1265, 0.43, 0.6], [0.125, 1.5, 0.0]], abs=1e-14)
    _close(ret, [[0.3735, 0.63, 1.0], [1.125, 2.0, 0.0]], abs=1e-14)
    # gamma = lambda = 1: A_t = (sum of the rewards from t) - V_t
    adv1, _ = grao.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    _close(adv1, [[0.5, 0.8, 0.6], [1.0, 1.5, 0.0]], abs=1e-14)


def test_gae_in_a_padded_row_layout_ignores_the_prompt_positions():
    """The trainer's padded layout starts a row's completion after its prompt: what comes before is masked."""
    r = torch.tensor([[5.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[3.0, 0.2, 0.4]], dtype=torch.float64)
    adv, _ = grao.gae_advantages(r, v, torch.tensor([[False, True, True]]), gamma=1.0, lam=1.0)
    _close(adv, [[0.0, 0.8, 0.6]], abs=1e-14)


def test_whitening_is_over_the_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    w = grao.masked_whiten(x, mask)
    mean, var = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3  # 1, 2, 3, 6: Bessel-corrected
    sd = math.sqrt(var + 1e-8)
    _close(w, [[-2 / sd, -1 / sd, 0.0], [0.0, 0.0, 3 / sd]], rel=1e-12)


def test_ppo_loss_matches_a_hand_computation():
    # ratio = [1.5, 0.9]; A = [1, -1]; clip 0.2: token 0 clipped, max(-1.5, -1.2) = -1.2; token 1: 0.9
    logp = torch.tensor([[math.log(1.5), math.log(0.9)]], dtype=torch.float64, requires_grad=True)
    values = torch.tensor([[0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    loss, stats = grao.ppo_loss(logp, values, torch.ones(1, 2, dtype=torch.bool), old_token_logp=zeros,
                                old_values=torch.tensor([[0.0, 0.9]], dtype=torch.float64),
                                advantages=torch.tensor([[1.0, -1.0]], dtype=torch.float64),
                                returns=torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                                clip=0.2, value_clip=0.2, value_coef=0.5)
    # value: token 0 max((0.5 - 1)^2, (0 + 0.2 - 1)^2) = 0.64 -> 0.32; token 1 (1 - 0)^2 = 1 -> 0.5 (not clipped)
    # loss = (-1.2 + 0.9 + 0.5 * (0.32 + 0.5)) / 2 tokens = 0.055
    assert loss.item() == pytest.approx(0.055, abs=1e-14)
    assert stats["policy_loss"].item() == pytest.approx(-0.15, abs=1e-14)
    assert stats["value_loss"].item() == pytest.approx(0.41, abs=1e-14)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped tokens pass no gradient; token 1: d(-A ratio)/dlogp = -A ratio = 0.9, / 2; dV: 0.5 (V - R) / 2
    _close(logp.grad, [[0.0, 0.45]], abs=1e-14)
    _close(values.grad, [[0.0, 0.25]], abs=1e-14)


def _ppo_by_hand(logp, values, mask, old, old_v, adv, ret, clip, vclip, coef):
    total, n = 0.0, 0
    for i in range(len(logp)):
        for t in range(len(logp[0])):
            if not mask[i][t]:
                continue
            n += 1
            ratio = math.exp(logp[i][t] - old[i][t])
            pg = max(-adv[i][t] * ratio, -adv[i][t] * min(max(ratio, 1 - clip), 1 + clip))
            vc = old_v[i][t] + min(max(values[i][t] - old_v[i][t], -vclip), vclip)
            vf = 0.5 * max((values[i][t] - ret[i][t]) ** 2, (vc - ret[i][t]) ** 2)
            total += pg + coef * vf
    return total / n


def test_ppo_loss_against_a_loop_and_autograd():
    g = torch.Generator().manual_seed(3)
    shape = (3, 5)
    rnd = lambda s=1.0: (torch.randn(shape, generator=g, dtype=torch.float64) * s)  # noqa: E731
    old, old_v, adv, ret = rnd(), rnd(), rnd(), rnd()
    logp = (old + rnd(0.3)).requires_grad_()  # ratios on both sides of the clip range
    values = (old_v + rnd(0.3)).requires_grad_()
    mask = torch.rand(shape, generator=g) > 0.3
    kw = dict(old_token_logp=old, old_values=old_v, advantages=adv, returns=ret, clip=0.2, value_clip=0.2,
              value_coef=0.3)
    loss, _ = grao.ppo_loss(logp, values, mask, **kw)
    by_hand = _ppo_by_hand(logp.tolist(), values.tolist(), mask.tolist(), old.tolist(), old_v.tolist(),
                           adv.tolist(), ret.tolist(), 0.2, 0.2, 0.3)
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    loss.backward()
    # the closed form: dL/dlogp = -A ratio / n where the unclipped branch is the max, else 0
    n = int(mask.sum())
    ratio = torch.exp(logp.detach() - old)
    unclipped = (-adv * ratio) >= (-adv * ratio.clamp(0.8, 1.2))
    inside = (ratio >= 0.8) & (ratio <= 1.2)
    expected = torch.where(unclipped | inside, -adv * ratio, torch.zeros_like(ratio)) * mask / n
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda lp, v: grao.ppo_loss(lp, v, mask, **kw)[0],
                                    (logp.detach().requires_grad_(), values.detach().requires_grad_()))
    assert float(logp.grad.abs().sum()) > 0 and float(values.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------ the trainer


def _ppo_grads(impl, micro=0, prefix_sharing=True):
    t = tiny_trainer(method="ppo", impl=impl, micro=micro, prefix_sharing=prefix_sharing, ppo_minibatches=1)
    head = t.modules["value_head"]
    with torch.no_grad():  # a non-zero value head, so that the value loss reaches the backbone too
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
        head.bias.fill_(0.1)
    ro = fixed_rollout(t)
    phases = t.method.rollout_phases(t.config, t.forward, ro, ref_model=t.ref_model, modules=t.modules)
    assert len(phases) == t.config.ppo_epochs
    # a step on the first phase, so that the second phase's ratios differ from 1
    stats0, _ = t.compute_gradients(phases[0])
    assert stats0["ppo_approx_kl"] < 1e-10 and stats0["ppo_clipfrac"] == 0.0  # epoch 1: ratio = 1
    t.apply_update(stats0["loss"])
    t.optimizer.zero_grad(set_to_none=True)
    stats = t.accumulate_gradients(phases[1])
    grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None}
    grads.update({f"value_head.{n}": p.grad.detach().clone() for n, p in head.named_parameters()})
    return grads, stats


@pytest.mark.parametrize("impl", IMPLS)
def test_ppo_gradients_are_the_same_fused_or_eager_micro_batched_or_not(impl):
    ref, ref_stats = _ppo_grads("eager")
    assert ref_stats["ppo_approx_kl"] > 0  # the second epoch's ratios differ from 1
    for kw in ({"micro": 1}, {"prefix_sharing": False}, {}):
        got, stats = _ppo_grads(impl, **kw)
        assert got.keys() == ref.keys() and "value_head.weight" in got
        assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-4, abs=1e-7)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{impl} {kw} {name}")
        assert float(got["value_head.weight"].abs().sum()) > 0


def _run(out, steps, *extra):
    return main(["train", "--method", "ppo", "--model", "demo", "--steps", str(steps), "--output-dir", str(out),
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--lr", "1e-2",
                 "--ppo-minibatches", "2", "--save-every", "2", "--no-progress", "--no-plot", "--tensorboard",
                 "false", "--seed", "5", *extra])


def _state(out):
    last = checkpoint_dirs(out)[-1]
    return torch.load(last / "trainer_state.pt", weights_only=True), last


def test_grao_train_method_ppo_checkpoints_and_resumes_its_value_head(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _run(tmp_path / "full", 4) == 0
    assert _run(tmp_path / "cut", 2) == 0
    state2, _ = _state(tmp_path / "cut")
    head2 = state2["modules"]["value_head"]
    assert set(head2) == {"weight", "bias"} and float(head2["weight"].abs().sum()) > 0  # trained from zero
    # the optimizer holds the value head's parameters: model parameters + 2
    from grao import demo
    n_model = sum(1 for _ in demo.build_model(demo.build_tokenizer()).parameters())
    assert len(state2["optimizer"]["state"]) == n_model + 2
    assert _run(tmp_path / "cut", 4, "--resume") == 0
    full, last_full = _state(tmp_path / "full")
    resumed, last_resumed = _state(tmp_path / "cut")
    for k in ("weight", "bias"):
        torch.testing.assert_close(resumed["modules"]["value_head"][k], full["modules"]["value_head"][k],
                                   rtol=1e-5, atol=1e-7)
    assert not torch.equal(resumed["modules"]["value_head"]["weight"], head2["weight"])  # it kept training
    from safetensors.torch import load_file
    a, b = load_file(str(last_full / "model.safetensors")), load_file(str(last_resumed / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)  # float noise of a resumed run
    import json
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["method"] == "ppo" for r in rows)
    assert all(math.isfinite(r["ppo_value_loss"]) and "ppo_kl" in r for r in rows)


def test_ppo_steps_the_lr_schedule_once_per_rollout(tmp_path):
    t = tiny_trainer(method="ppo", tmp_path=tmp_path, ppo_epochs=2, ppo_minibatches=3, steps=4,
                     lr_schedule="linear")
    m = t.train_step()
    assert not m["skipped"] and t.scheduler.last_epoch == 1  # 6 optimizer steps, one schedule step
    assert t.optimizer.state[t.extra_params[0]]["step"] == 6


def test_ppo_with_lora_trains_its_adapters_and_value_head(tmp_path):
    t = tiny_trainer(method="ppo", tmp_path=tmp_path, lora_r=4, lora_target_modules="q_proj,v_proj")
    ro = fixed_rollout(t)  # rewards that differ: non-zero returns, so the value head has a gradient
    phases = t.method.rollout_phases(t.config, t.forward, ro, ref_model=t.ref_model, modules=t.modules)
    stats, _ = t.compute_gradients(phases[0])
    assert math.isfinite(stats["loss"])
    trained = {n for n, p in t.model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert trained and all("lora_" in n for n in trained)
    assert float(t.modules["value_head"].weight.grad.abs().sum()) > 0
    m = t.train_step()
    assert not m["skipped"] and math.isfinite(m["loss"])
