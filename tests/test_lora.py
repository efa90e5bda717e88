"""LoRA adapters (peft) and --model-dtype in the grao trainer (issue 24).

Tiny models built from configs. Checks: only the adapters train (the lm_head and every other weight stay as they
were, the optimizer holds the adapters only), the fused loss reads the frozen head through a PeftModel, bf16
frozen weights with fp32 adapters, checkpoints hold the adapter and a resume continues it exactly,
``grao merge-lora`` writes a plain model equal to base + adapter, shared-prompt sampling runs the adapters,
prefix sharing and gradient checkpointing give the unshared / plain gradients, ``grao eval`` reads a LoRA
checkpoint, and bad combinations are one ``grao: error:`` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (extra: pip install -e '.[lora]')")

from grao import demo  # noqa: E402
from grao.cli import main  # noqa: E402
from grao.trainer import TrainConfig, Trainer, checkpoint_dirs, lm_parts  # noqa: E402
from grao.trainer import lora  # noqa: E402
from tests.test_shared_sampling import (  # noqa: E402
    prompts_of,
    sample_recording,
    tiny_model,
    worst_teacher_forced_error,
)

REPO = Path(__file__).resolve().parents[1]
TARGETS = lora.DEFAULT_TARGET_MODULES


def small_model(seed=7):
    tok = demo.build_tokenizer()
    model = demo.build_model(tok, seed=seed, size=demo.DemoModelConfig(hidden_size=32, intermediate_size=64,
                                                                      num_attention_heads=2))
    return model, tok


def lora_trainer(tmp_path, *, model=None, tok=None, **kw):
    if model is None:
        model, tok = small_model()
    train, _ = demo.make_task("reverse", num_train=16, num_eval=2)
    values = dict(lora_r=4, group_size=3, prompts_per_step=3, max_new_tokens=5, output_dir=str(tmp_path),
                  progress=False, plot=False, tensorboard="false", lr=1e-2, loss_impl="fused")
    values.update(kw)
    return Trainer(TrainConfig(**values), model=model, tokenizer=tok, train_records=train)


def randomise_adapters(model, seed=0, scale=0.5):
    """Non-zero lora_B (peft initialises it to 0, so a fresh adapter is the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(tmp_path):
    tr = lora_trainer(tmp_path)
    assert lora.is_peft_model(tr.model)
    named = dict(tr.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # every default target got an adapter: 7 projections x 2 layers x (A, B)
    assert len(trainable) == 7 * 2 * 2
    in_optimizer = {id(p) for group in tr.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(named[n]) for n in trainable}
    backbone, head = lm_parts(tr.model)
    base = tr.model.get_base_model()
    assert backbone is base.model and head is base.lm_head  # the HF backbone, not peft's tuner
    assert not head.weight.requires_grad
    frozen = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    for _ in range(2):
        m = tr.train_step()
        assert m["loss"] == m["loss"] and not m["skipped"]
    after = dict(tr.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert max((after[n] - v).abs().max().item() for n, v in adapters.items()) > 1e-4


def test_fused_loss_reads_the_head_through_the_peft_model(tmp_path):
    """The same LoRA step with the fused and the eager loss: the same loss and adapter gradients."""
    grads, losses = {}, {}
    for impl in ("fused", "eager"):
        tr = lora_trainer(tmp_path / impl, loss_impl=impl)
        randomise_adapters(tr.model)
        torch.manual_seed(1)
        ro = tr.sample().kept()
        stats, _ = tr.compute_gradients(ro)
        losses[impl] = stats["loss"]
        grads[impl] = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert losses["fused"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)
    assert any(g.abs().max() > 0 for g in grads["eager"].values())
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["fused"][n], g, rtol=1e-4, atol=1e-6)


def test_bf16_weights_fp32_adapters(tmp_path):
    tr = lora_trainer(tmp_path, model_dtype="bf16")
    for n, p in tr.model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    # bf16 compute on the CPU too, the adapters reading their input as their base layer keeps it
    assert tr.autocast_dtype == torch.bfloat16
    layers = [m for m in tr.model.modules() if hasattr(m, "lora_A")]
    assert len(layers) == 14 and all(m.cast_input_dtype_enabled is False for m in layers)
    off = lora_trainer(tmp_path / "off", model_dtype="bf16", bf16="false")
    assert off.autocast_dtype is None and off.train_step()["grad_norm"] > 0  # fp32 adapters on bf16 input
    m = tr.train_step()
    assert not m["skipped"] and m["grad_norm"] > 0
    states = [s for s in tr.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


def test_model_dtype_auto():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert lora.weight_dtype(TrainConfig(), cpu) == torch.float32
    assert lora.weight_dtype(TrainConfig(lora_r=8), cpu) == torch.float32
    assert lora.weight_dtype(TrainConfig(lora_r=8, model_dtype="bf16"), cpu) == torch.bfloat16
    assert lora.weight_dtype(TrainConfig(), cuda) == torch.float32  # full fine-tuning: fp32 master weights
    assert lora.lora_alpha(TrainConfig(lora_r=8)) == 16 and lora.lora_alpha(TrainConfig(lora_r=8, lora_alpha=8)) == 8


@pytest.mark.parametrize("variant", ["prefix sharing", "gradient checkpointing"])
def test_adapter_gradients_equal_the_plain_path(tmp_path, variant):
    """Prefix sharing against padded rows; gradient checkpointing against none: the same adapter gradients."""
    kw = {"prefix sharing": ("prefix_sharing", True, False),
          "gradient checkpointing": ("gradient_checkpointing", True, False)}[variant]
    grads = {}
    for value in kw[1:]:
        model, tok = small_model()
        tr = lora_trainer(tmp_path / str(value), model=model, tok=tok, loss_impl="eager", **{kw[0]: value})
        randomise_adapters(tr.model)
        torch.manual_seed(1)
        ro = tr.sample().kept()
        tr.compute_gradients(ro)
        grads[value] = {n: p.grad for n, p in tr.model.named_parameters() if p.requires_grad}
    assert set(grads[True]) == set(grads[False])
    assert all(g is not None for g in grads[True].values()), "an adapter got no gradient"
    assert max(g.abs().max().item() for g in grads[False].values()) > 1e-6
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_shared_sampling_runs_the_adapters():
    """Samples of a LoRA model with non-zero adapters come from its own logits (an unshared forward of the
    PeftModel, 1e-10 in float64), not the base model's."""
    model = tiny_model("qwen2")
    base_logits = None
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.split(","))
    prompts = prompts_of([7, 3])
    with torch.no_grad():
        base_logits = model(torch.tensor([prompts[0]])).logits.clone()
    pm = peft.get_peft_model(model, cfg).to(torch.float64).eval()
    randomise_adapters(pm)
    with torch.no_grad():
        lora_logits = pm(torch.tensor([prompts[0]])).logits
    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapters change the model
    torch.manual_seed(0)
    out, seen = sample_recording(pm, prompts, 4, max_new_tokens=6)
    assert worst_teacher_forced_error(pm, prompts, out, seen) < 1e-10
    with pm.disable_adapter():
        base_err = worst_teacher_forced_error(pm, prompts, out, seen)
    assert base_err > 1e-3  # what was sampled from is not the base model


def test_checkpoint_holds_the_adapter_and_resume_continues_it(tmp_path):
    common = ["--model", "demo", "--task", "copy", "--task-train-size", "16", "--prompts-per-step", "2",
              "--group-size", "3", "--max-new-tokens", "4", "--lora-r", "4", "--lr", "1e-2", "--save-every", "2",
              "--no-progress", "--no-plot", "--tensorboard", "false"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *common, "--steps", "4", "--output-dir", str(straight)]) == 0
    assert main(["train", *common, "--steps", "2", "--output-dir", str(split)]) == 0
    ck = checkpoint_dirs(split)[-1]
    files = {p.name for p in ck.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= files
    assert "model.safetensors" not in files  # the adapter, not the full model
    assert main(["train", "--resume", "--steps", "4", "--output-dir", str(split)]) == 0
    from safetensors.torch import load_file
    a = load_file(str(checkpoint_dirs(straight)[-1] / "adapter_model.safetensors"))
    b = load_file(str(checkpoint_dirs(split)[-1] / "adapter_model.safetensors"))
    init = {}
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
        init[k] = a[k].abs().max().item()
    assert max(v for k, v in init.items() if "lora_B" in k) > 1e-4  # lora_B started at 0: the run trained
    state = torch.load(checkpoint_dirs(split)[-1] / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and state["weight_dtype"] == "fp32"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_run")
    assert main(["train", "--model", "demo", "--task", "copy", "--steps", "2", "--prompts-per-step", "2",
                 "--group-size", "3", "--max-new-tokens", "4", "--lora-r", "4", "--lr", "5e-2", "--model-dtype", "bf16",
                 "--no-progress", "--no-plot", "--tensorboard", "false", "--output-dir", str(out)]) == 0
    return checkpoint_dirs(out)[-1]


def test_merge_lora_writes_a_plain_model_equal_to_base_plus_adapter(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "merged"
    assert main(["merge-lora", str(lora_run), str(out)]) == 0
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.bfloat16  # auto: the dtype the run held its weights in
    base = demo.build_model(demo.build_tokenizer(), seed=0, size=demo.model_size("copy")).to(torch.bfloat16)
    with_adapter = peft.PeftModel.from_pretrained(base, str(lora_run))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = with_adapter(ids).logits.float()
        with with_adapter.disable_adapter():
            plain = with_adapter(ids).logits.float()
        got = merged(ids).logits.float()
    assert (want - plain).abs().max() > 1e-2  # the adapter changed the model
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # bf16 weights: merged before the rounding
    # fp32 merge: the same as base + adapter to fp32 rounding
    out32 = tmp_path / "merged32"
    assert main(["merge-lora", str(lora_run), str(out32), "--dtype", "fp32"]) == 0
    m32 = AutoModelForCausalLM.from_pretrained(out32)
    base32 = demo.build_model(demo.build_tokenizer(), seed=0, size=demo.model_size("copy")).to(torch.bfloat16).float()
    ref = peft.PeftModel.from_pretrained(base32, str(lora_run))
    with torch.no_grad():
        torch.testing.assert_close(m32(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert main(["merge-lora", str(lora_run), str(out32)]) == 2  # not empty: refused without --overwrite


def test_eval_and_model_of_a_lora_checkpoint(lora_run, capsys):
    assert main(["eval", str(lora_run), "--base", "demo", "--limit", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 4
    from grao.trainer import load_model_and_tokenizer
    model, _ = load_model_and_tokenizer(TrainConfig(), source=str(lora_run))
    assert not lora.is_peft_model(model) and type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    # the run's base (its bf16 weights) + the adapter, merged: what the trained policy computes
    base = demo.build_model(demo.build_tokenizer(), seed=0, size=demo.model_size("copy")).to(torch.bfloat16).float()
    ref = peft.PeftModel.from_pretrained(base, str(lora_run))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def _cli_error(args, tmp_path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "grao.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                         check=False, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("grao: error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--lora-alpha", "32"], "lora_r is 0 (LoRA off), but --lora-alpha is given: add --lora-r N"),
    (["--lora-dropout", "0.1", "--lora-target-modules", "q_proj"],
     "but --lora-dropout, --lora-target-modules are given"),
    (["--model-dtype", "bf16"], "model_dtype bf16 is for LoRA (--lora-r N): full fine-tuning keeps fp32 master"),
    (["--lora-r", "8", "--lora-target-modules", "c_attn,q_proj"],
     "lora_target_modules: c_attn is not a module of LlamaForCausalLM; its linear and embedding layers are named "
     "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (["--lora-r", "8", "--lora-target-modules", "q_proj,lm_head"], "lm_head is LlamaForCausalLM's lm_head"),
    (["--lora-r", "8", "--lora-target-modules", "q_proj;v_proj"], "lora_target_modules must be comma-separated"),
    (["--lora-r", "-1"], "--lora-r must be an integer >= 0, got -1"),
    (["--lora-r", "8", "--lora-dropout", "1"], "--lora-dropout must be a number in [0, 1), got 1"),
    (["--model-dtype", "fp16"], "--model-dtype must be one of auto, bf16, fp32, got 'fp16'"),
])
def test_bad_combinations_are_one_error_line(tmp_path, args, expected):
    line = _cli_error(["train", "--model", "demo", "--steps", "1", "--output-dir", str(tmp_path / "o"), *args],
                      tmp_path)
    assert expected in line, line


def test_merge_lora_of_a_full_checkpoint_is_one_error_line(tmp_path):
    (tmp_path / "ck").mkdir()
    line = _cli_error(["merge-lora", str(tmp_path / "ck"), str(tmp_path / "out")], tmp_path)
    assert "is not a LoRA checkpoint (no adapter_config.json in it)" in line


def test_peft_is_imported_only_for_lora_and_missing_peft_is_a_clear_error(tmp_path):
    code = ("import sys, grao, grao.trainer, grao.cli, grao_kernels\n"
            "from grao.trainer import Trainer, TrainConfig\n"
            "assert 'peft' not in sys.modules, 'peft imported without LoRA'\n"
            "sys.modules['peft'] = None\n"  # as if it were not installed
            "from grao.cli import main\n"
            "sys.exit(main(['train', '--model', 'demo', '--steps', '1', '--lora-r', '4', '--output-dir', 'o']))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=False, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "grao: error: LoRA (--lora-r > 0) needs the peft package, which is not installed: pip install peft" \
        in res.stderr, res.stderr


def test_lora_settings_are_not_resume_safe():
    from grao.trainer.config import RESUME_SAFE
    assert not {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "model_dtype"} & set(RESUME_SAFE)


def test_two_processes_match_one_process_with_lora(tmp_path):
    """DDP (gloo, 2 processes) trains the adapters as one process does on the global batch; the frozen weights
    are not DDP's (no gradient), and rank 0 saves the adapter."""
    from safetensors.torch import load_file

    from tests.test_distributed import ARGS, LR, _launcher, _metrics, _run
    lora_args = [*ARGS, "--lora-r", "4", "--micro-batch-rows", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "grao.cli", "train", *lora_args, "--output-dir", str(one)])
    _run(_launcher(2) + ["train", *lora_args, "--output-dir", str(two)])
    m1, m2 = _metrics(one), _metrics(two)
    assert all(r["world_size"] == 2 and r["parallel"] == "ddp" for r in m2)
    for a, b in zip(m1, m2, strict=True):
        assert (a["sample"], a["reward_mean"]) == (b["sample"], b["reward_mean"])
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    w1 = load_file(str(checkpoint_dirs(one)[-1] / "adapter_model.safetensors"))
    w2 = load_file(str(checkpoint_dirs(two)[-1] / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys() and any("lora_B" in k for k in w1)
    assert max(w1[k].abs().max().item() for k in w1 if "lora_B" in k) > 0.5 * LR  # lora_B moved from 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0.05 * LR, msg=k)


def test_benchmark_quick_runs(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/lora_memory.py", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600, check=False,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["full_fp32", "lora_fp32", "lora_bf16"]
    full, lora_bf16 = summary["rows"][0], summary["rows"][2]
    assert lora_bf16["trainable"] < full["trainable"] and lora_bf16["weight_dtypes"] == ["bfloat16", "float32"]
    assert "| LoRA r = 4, bf16 weights (adapters fp32) |" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("method, kw", [("dpo", {}), ("grpo", {"grpo_kl_beta": 0.1})])
def test_methods_with_a_reference_model_train_the_adapters(tmp_path, method, kw):
    tr = lora_trainer(tmp_path, method=method, model_dtype="bf16", **kw)
    assert tr.ref_model is not None and not any(p.requires_grad for p in tr.ref_model.parameters())
    randomise_adapters(tr.model, scale=0.05)  # away from the reference (at lora_B = 0 the KL has no gradient)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.train_step()
    assert not m["skipped"] and m["grad_norm"] > 0
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
