"""pytest-benchmark suite and checks of the benchmark harness.

    pytest benchmarks/ --benchmark-only      # the timings (forward + backward per implementation)
    pytest benchmarks/                       # also the checks below (a few seconds; no GPU needed)

The timed shapes are small (CPU: N = 1024, D = 256, V = 8192; CUDA: N = 8192, D = 4096, V = 151936 bf16);
the sweeps with memory figures are ``python -m benchmarks.compare``. Implementations that are not
installed or cannot run on this device are skipped with the reason.

The checks make sure the comparison is fair: every implementation's loss gradient (hidden, weight)
at a small fp32 point of the shared problem builder agrees with the float64 eager reference as closely as the eager
fp32 path does, by the rule and tolerance table of tests/numerics.py (Liger's GRPO is fed advantages that give the GRAO gradient, see
``benchmarks.implementations.grao_equivalent_advantages``), and the harness records OOM rather than dropping it.
"""

from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

from benchmarks.common import Point, make_inputs, step
from benchmarks.implementations import IMPLEMENTATIONS
from tests.numerics import assert_no_worse_than_eager, make_problem

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BENCH_POINTS = ([Point("bench", 1, 7, 1024, 4096, 151936, "bf16", "Qwen3-8B")] if CUDA
                else [Point("bench", 1, 7, 128, 256, 8192, "fp32")])


def _load_or_skip(name: str, device: str = DEVICE):
    ok, why = IMPLEMENTATIONS[name].available(device)
    if not ok:
        pytest.skip(f"{name}: {why}")
    return IMPLEMENTATIONS[name].load(device)


@pytest.mark.parametrize("point", BENCH_POINTS, ids=lambda p: f"N{p.N}-D{p.D}-V{p.V}-{p.dtype}")
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_bench_forward_backward(benchmark, impl, point):
    loss_fn = _load_or_skip(impl)
    inputs = make_inputs(point, DEVICE)
    benchmark.group = f"GRAO loss fwd+bwd {point.label()}"
    benchmark.extra_info.update(point.to_dict(), impl=impl, computes=IMPLEMENTATIONS[impl].computes,
                                device=DEVICE, versions=IMPLEMENTATIONS[impl].versions())

    def run():
        step(loss_fn, inputs)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    assert inputs["weight"].grad is not None and torch.isfinite(inputs["weight"].grad).all()


# ------------------------------------------------------------------------------------ harness checks

def _grads(loss_fn, inputs):
    step(loss_fn, inputs)
    return inputs["hidden"].grad.detach().double(), inputs["weight"].grad.detach().double()


@pytest.mark.parametrize("impl", [n for n in IMPLEMENTATIONS if n != "eager"])
def test_peer_gradient_matches_grao(impl):
    """Each implementation's gradient is GRAO's: as close to the float64 eager result as eager fp32 is."""
    loss_fn = _load_or_skip(impl)
    # the shared builder (tests/numerics.py): P=2, G=3, T=24, D=32, V=300 fp32, ignored tokens and a prompt prefix
    prob = make_problem(2, 3, 24, 32, 300, dtype=torch.float32, device=DEVICE, seed=3, ignore_frac=0.1,
                        prompt_len=3, rewards="ternary")
    inputs = {"hidden": prob.hidden.requires_grad_(), "weight": prob.weight.requires_grad_(), "labels": prob.labels,
              "rewards": prob.rewards, "bias": None}
    eager = IMPLEMENTATIONS["eager"].load(DEVICE)
    ref_inputs = {k: (v.detach().double().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point()
                      and k != "rewards" else v) for k, v in inputs.items()}
    ref = _grads(eager, ref_inputs)
    e32 = _grads(eager, inputs)
    got = _grads(loss_fn, inputs)
    for name, r, e, g in zip(("hidden", "weight"), ref, e32, got):
        assert r.abs().max().item() > 0
        assert_no_worse_than_eager(g, e, r, dtype=torch.float32, what=f"{impl} d{name} (vs eager fp32)")


def test_measure_records_time_and_memory():
    from benchmarks.compare import run_one

    point = Point("check", 1, 3, 64, 64, 32000)
    # CPU: in a fresh worker process, as the comparison does (peak RSS is per process)
    res = run_one(DEVICE, "eager", point, warmup=1, repeats=2, timeout=120)
    assert res["status"] == "ok", res
    assert len(res["times_ms"]) == 2 and res["time_ms"] > 0
    # eager holds at least the [N, V] fp32 logits: N * V * 4 bytes above the inputs
    assert res["peak_extra_bytes"] >= point.N * point.V * 4


@pytest.mark.skipif(CUDA or not os.path.exists("/proc/self/status"), reason="CPU address-space budget (Linux)")
def test_cpu_budget_records_oom_not_drop():
    from benchmarks.compare import run_cpu_worker

    point = Point("check", 1, 3, 64, 64, 32000)  # eager logits alone: 256 * 32000 * 4 = 31 MiB per copy
    res = run_cpu_worker("eager", point, warmup=0, repeats=1, timeout=120, budget_bytes=48 * 2 ** 20)
    assert res["status"] == "OOM", res
    res = run_cpu_worker("eager", point, warmup=0, repeats=1, timeout=120, budget_bytes=1024 * 2 ** 20)
    assert res["status"] == "ok", res


def test_compare_writes_results(tmp_path):
    from benchmarks.compare import main

    rc = main(["--device", DEVICE, "--sweep", "tiny", "--only", "T", "--impls", "eager,fused",
               "--out", str(tmp_path), "--budget-gb", "0.25", "--verify-limit", "0", "--repeats", "2"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("date", "command", "device_name", "cpu_model", "torch", "triton", "peers"):
        assert key in data["env"]
    eager = [r for r in data["results"] if r["impl"] == "eager"]
    assert len(eager) == 3 and all(r["status"] == "ok" for r in eager)
    # Every row's time and ratio are the measured ones: time_ms the median of its own timed runs, time_vs_eager
    # the ratio of that median to eager's at the same point (eager's own row included: its ratio is eager's median
    # over itself, not a constant), and the spread the ratios of its runs over eager's.
    by_point = {json.dumps(r["point"], sort_keys=True): r for r in eager}
    fused = [r for r in data["results"] if r["impl"] == "fused" and r["status"] == "ok"]
    assert len(fused) == 3, [r["status"] for r in data["results"] if r["impl"] == "fused"]
    for r in eager + fused:
        e = by_point[json.dumps(r["point"], sort_keys=True)]
        assert len(r["times_ms"]) == 2 and all(t > 0 for t in r["times_ms"]), r
        assert r["time_ms"] == pytest.approx(statistics.median(r["times_ms"]), rel=1e-12), r
        assert r["time_vs_eager"] == pytest.approx(r["time_ms"] / statistics.median(e["times_ms"]), rel=1e-12), r
        s = r["time_vs_eager_spread"]
        assert s["lo"] == pytest.approx(min(r["times_ms"]) / max(e["times_ms"]), rel=1e-12), r
        assert s["hi"] == pytest.approx(max(r["times_ms"]) / min(e["times_ms"]), rel=1e-12), r
        assert s["lo"] <= r["time_vs_eager"] <= s["hi"], r
        assert r["mem_vs_eager"] == pytest.approx(r["peak_extra_bytes"] / e["peak_extra_bytes"], rel=1e-12), r
    assert (tmp_path / "results.csv").read_text().startswith("sweep,")
    assert "| eager |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "sweep_T.png").stat().st_size > 0
    assert {b["impl"] for b in data["largest_n"]} >= {"eager"}
