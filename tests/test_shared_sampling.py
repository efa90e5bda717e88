"""Shared-prompt sampling (grao.sampling) against an unshared forward of each row, and against ``generate``.

Tiny float64 Llama, Qwen2, Qwen3 and Mistral models with grouped-query attention: at every decode step the
next-token logits that ``sample_shared`` sampled from must equal the logits of a plain forward of that row
(prompt + the tokens sampled so far, teacher-forced) to 1e-10 relative; greedy outputs must equal
``generate``'s; and the prompts' keys and values are held once per prompt, never per sample.
"""

from __future__ import annotations

import logging

import pytest
import torch

from grao import sampling
from grao.sampling import (
    SamplingBudgetError,
    SharedPromptCache,
    plan_batches,
    sample_shared,
)

EOS, PAD, VOCAB = 2, 0, 8  # a small vocabulary: EOS is sampled often, so rows stop at different steps


def tiny_model(kind: str, *, vocab: int = VOCAB, dtype=torch.float64, seed: int = 0):
    import transformers
    common = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 512, "eos_token_id": EOS, "pad_token_id": PAD}
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common, use_sliding_window=False), transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg, cls = transformers.Qwen3Config(**common, head_dim=8, use_sliding_window=False), transformers.Qwen3ForCausalLM
    elif kind == "mistral":
        cfg, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    else:
        raise ValueError(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(cfg, attn_implementation="sdpa")
    return model.to(dtype).eval()


def prompts_of(lengths, seed=1, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def sample_recording(model, prompts, G, **kwargs):
    """sample_shared, with every decode step's logits kept per (prompt, sample number)."""
    seen: dict[tuple[int, int], list[torch.Tensor]] = {}

    def on_logits(batch, rows, step, logits):
        g = rows[1] - rows[0]
        for j, p in enumerate(batch.prompts):
            for r in range(g):
                steps = seen.setdefault((p, rows[0] + r), [])
                assert len(steps) == step
                steps.append(logits[j * g + r].clone())

    kwargs.setdefault("temperature", 1.0)
    out = sample_shared(model, prompts, G, eos_token_id=EOS, pad_token_id=PAD, on_logits=on_logits, **kwargs)
    return out, seen


def worst_teacher_forced_error(model, prompts, out, seen) -> float:
    """Largest relative difference between the sampled-from logits and an unshared forward of the same row."""
    worst = 0.0
    for (p, s), steps in seen.items():
        sample = out[p][s]
        live = len(sample)  # the steps at which this row was still sampling (it stops after its EOS)
        assert len(steps) >= live
        ids = torch.tensor([prompts[p] + sample])
        with torch.no_grad():
            ref = model(ids).logits[0, len(prompts[p]) - 1:len(prompts[p]) - 1 + live]
        got = torch.stack(steps[:live])
        assert got.dtype == torch.float64
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    return worst


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_logits_equal_an_unshared_forward(kind):
    model = tiny_model(kind)
    prompts = prompts_of([9, 1, 5])  # different lengths in one call, a one-token prompt among them
    torch.manual_seed(0)
    out, seen = sample_recording(model, prompts, 16, max_new_tokens=10)
    assert worst_teacher_forced_error(model, prompts, out, seen) < 1e-10
    lengths = [len(s) for group in out for s in group]
    assert len(set(lengths)) > 2, "samples should stop at different steps"
    assert any(len(s) == 10 and EOS not in s for group in out for s in group), "some sample should reach max_new_tokens"
    assert any(s and s[-1] == EOS and len(s) < 10 for group in out for s in group)
    for group in out:
        for s in group:
            assert EOS not in s[:-1], "a sample is cut after its first EOS"


def test_one_sample_and_chunked_prefill_and_row_ranges():
    """G = 1; and a budget so small that prompts are prefilled in several chunks and one prompt's samples are
    decoded in several row ranges, sharing one prefill: still exact."""
    model = tiny_model("llama")
    prompts = prompts_of([40, 7])
    torch.manual_seed(0)
    out, seen = sample_recording(model, prompts, 1, max_new_tokens=6)
    assert worst_teacher_forced_error(model, prompts, out, seen) < 1e-10

    shape = sampling.ModelShape.of(model, torch.float64)
    budget = shape.kv_bytes(40) + 3 * shape.row_bytes(40, 6) + 16 * shape.chunk_token_bytes(40)
    plan = plan_batches([40, 7], 8, 6, shape, budget, strict=True)
    assert plan[0].prompts == (0,) and len(plan[0].row_ranges) > 1 and plan[0].chunk_tokens < 40
    torch.manual_seed(0)
    out, seen = sample_recording(model, prompts, 8, max_new_tokens=6, budget_bytes=budget, strict_budget=True)
    assert worst_teacher_forced_error(model, prompts, out, seen) < 1e-10
    assert all(len(group) == 8 and all(1 <= len(s) <= 6 for s in group) for group in out)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_greedy_equals_generate(kind):
    model = tiny_model(kind, vocab=40)
    prompts = prompts_of([6, 1, 11, 3], vocab=40)
    got = sample_shared(model, prompts, 1, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, temperature=0)
    for p, g in zip(prompts, got):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=EOS,
                             pad_token_id=PAD)[0, len(p):].tolist()
        ref = ref[:ref.index(EOS) + 1] if EOS in ref else ref
        assert g[0] == ref


def test_prompt_cache_is_held_once_per_prompt(monkeypatch):
    """The decode attention reads one copy of each prompt's keys and values: the cache's prompt tensors have one
    entry per prompt while the batch has G rows per prompt."""
    seen = []
    real = SharedPromptCache._decode_attention

    def spy(self, layer, query, scale):
        seen.append((self.prompt_k[layer].shape[0], query.shape[0], self.prompt_k[layer].data_ptr()))
        return real(self, layer, query, scale)

    monkeypatch.setattr(SharedPromptCache, "_decode_attention", spy)
    model = tiny_model("llama")
    sample_shared(model, prompts_of([30, 20]), 16, max_new_tokens=3, eos_token_id=-1, pad_token_id=PAD,
                  temperature=1.0)
    assert seen and all(n == 2 and rows == 32 for n, rows, _ in seen)
    assert len({ptr for *_, ptr in seen}) == 2  # one buffer per layer, the same one at every step


def test_low_precision_is_as_close_as_the_unshared_forward():
    """bf16: the shared decode's logits are no further from float64 than an unshared bf16 forward's (+ tol)."""
    model64 = tiny_model("qwen2", vocab=40)
    model16 = tiny_model("qwen2", vocab=40, dtype=torch.bfloat16)
    prompts = prompts_of([12, 5], vocab=40)
    torch.manual_seed(0)
    out, seen = sample_recording(model16, prompts, 4, max_new_tokens=5)
    err_shared = err_plain = 0.0
    for (p, s), steps in seen.items():
        sample, n = out[p][s], len(prompts[p])
        ids = torch.tensor([prompts[p] + sample])
        with torch.no_grad():
            ref = model64(ids).logits[0, n - 1:n - 1 + len(sample)]
            plain = model16(ids).logits[0, n - 1:n - 1 + len(sample)].double()
        got = torch.stack(steps[:len(sample)]).double()
        err_shared = max(err_shared, (got - ref).abs().max().item())
        err_plain = max(err_plain, (plain - ref).abs().max().item())
    assert err_shared <= 1.5 * err_plain + 1e-2, (err_shared, err_plain)


def test_budget_refusal_names_the_setting():
    model = tiny_model("llama")
    with pytest.raises(SamplingBudgetError, match="--sample-memory-mib"):
        sample_shared(model, prompts_of([200]), 4, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD,
                      temperature=1.0, budget_bytes=1024, strict_budget=True)


def test_rollout_engine_uses_it_and_prompt_seeding_is_per_prompt(caplog):
    """Through RolloutEngine: "prompt" seeding gives a prompt the same samples whatever else is in the call (so
    on one process or several); the default engine is the shared one; an unsupported model falls back to
    generate with one notice."""
    from grao import demo
    from grao.trainer import TrainConfig
    from grao.trainer.rollout import RolloutEngine

    tok = demo.build_tokenizer()
    model = demo.build_model(tok, seed=0).double()
    cfg = TrainConfig(group_size=4, max_new_tokens=6, output_dir="runs/unused", progress=False)
    engine = RolloutEngine(model, tok, cfg, reward_fn=None, device=torch.device("cpu"))
    a, b = tok("copy 123:")["input_ids"], tok("reverse 98765:")["input_ids"]
    both = engine.generate([a, b], 4, seeds=[11, 22])
    alone = engine.generate([b], 4, seeds=[22])
    assert both[1] == alone[0]
    plain = RolloutEngine(model, tok, TrainConfig(group_size=4, max_new_tokens=6, shared_sampling=False,
                                                  output_dir="runs/unused", progress=False),
                          reward_fn=None, device=torch.device("cpu"))
    greedy_shared = engine.generate([a, b], 1, temperature=0.0)
    greedy_generate = plain.generate([a, b], 1, temperature=0.0)
    assert greedy_shared == greedy_generate
    # "batch" seeding, prompts of different lengths in one call: the same draws as generate's, sample for sample
    torch.manual_seed(5)
    sampled_shared = engine.generate([a, b], 4)
    torch.manual_seed(5)
    assert sampled_shared == plain.generate([a, b], 4)

    import transformers
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                                                n_positions=64, eos_token_id=tok.eos_token_id))
    fallback = RolloutEngine(gpt2.eval(), tok, cfg, reward_fn=None, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="grao"):
        fallback.generate([a], 2)
        fallback.generate([b], 2)
    notices = [r for r in caplog.records if "shared-prompt sampling does not serve" in r.getMessage()]
    assert len(notices) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_on_cuda(dtype):
    """On the GPU: float64 exact against an unshared forward; bf16 as close to float64 as an unshared bf16
    forward (+ tol); greedy equal to generate in float64."""
    model64 = tiny_model("qwen2", vocab=40).cuda()
    model = tiny_model("qwen2", vocab=40, dtype=dtype).cuda()
    prompts = prompts_of([33, 1, 9], vocab=40)
    torch.manual_seed(0)
    out, seen = sample_recording(model, prompts, 8, max_new_tokens=6, device=torch.device("cuda"))
    err_shared = err_plain = 0.0
    for (p, s), steps in seen.items():
        sample, n = out[p][s], len(prompts[p])
        ids = torch.tensor([prompts[p] + sample], device="cuda")
        with torch.no_grad():
            ref = model64(ids).logits[0, n - 1:n - 1 + len(sample)]
            plain = model(ids).logits[0, n - 1:n - 1 + len(sample)].double()
        got = torch.stack(steps[:len(sample)]).double()
        err_shared = max(err_shared, ((got - ref).abs().max() / ref.abs().max()).item())
        err_plain = max(err_plain, ((plain - ref).abs().max() / ref.abs().max()).item())
    if dtype == torch.float64:
        assert err_shared < 1e-10
        got = sample_shared(model, prompts, 1, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, temperature=0)
        for p, g in zip(prompts, got):
            ref = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=8, do_sample=False,
                                 eos_token_id=EOS, pad_token_id=PAD)[0, len(p):].tolist()
            assert g[0] == (ref[:ref.index(EOS) + 1] if EOS in ref else ref)
    else:
        assert err_shared <= 1.5 * err_plain + 1e-2, (err_shared, err_plain)


def test_rollout_benchmark_quick_runs(tmp_path):
    """``python benchmarks/rollout.py --quick`` (the README's command, one sweep of it): both engines measured,
    the rows in the summary's documented form, nothing written to the committed results."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(repo / "benchmarks" / "rollout.py"), "--quick", "--sweep", "headline",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    rows = summary["rows"]
    assert {r["engine"] for r in rows} == {"shared", "generate"}
    for r in rows:
        assert set(r) >= {"prompt_len", "completion_len", "G", "P", "engine", "sample_s", "peak_mib"}
        assert r["sample_s"] > 0 and r["peak_mib"] is not None


def test_cli_refuses_a_budget_too_small_for_one_prompt_in_one_line(tmp_path):
    """``grao train --sample-memory-mib 1`` with 3000-token prompts: one ``grao: error:`` line naming the flag,
    exit 2, no traceback."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from grao import demo

    tok = demo.build_tokenizer()
    model = demo.build_model(tok, size=demo.DemoModelConfig(hidden_size=32, intermediate_size=64,
                                                            num_attention_heads=2, max_position_embeddings=4096))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "copy " + "7" * 3000 + ":", "reference": "7"}) + "\n"
                            for _ in range(2)))
    res = subprocess.run([sys.executable, "-m", "grao.cli", "train", "--model", str(tmp_path / "model"), "--data",
                          str(data), "--steps", "1", "--group-size", "2", "--prompts-per-step", "2",
                          "--max-new-tokens", "2", "--sample-memory-mib", "1", "--output-dir", str(tmp_path / "run"),
                          "--no-progress", "--no-plot", "--tensorboard", "false"],
                         capture_output=True, text=True, timeout=300, check=False,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("grao: error:")]
    assert len(errors) == 1 and "--sample-memory-mib" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
