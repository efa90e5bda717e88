"""One dispatch table for every op: resolve() picks the backend, TABLE[(pass, backend)] runs it.

Checks that the table covers every pass of every concrete backend, that every public op (padded and packed
GRAO loss, linear_logprob, fused_linear_logprob_dot) goes through it (spies on table entries), that
KernelOptions reach the pass, and that old names, the renamed environment variable and bad options get a
clear GRAOInputError.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import grao_kernels
from grao_kernels import GRAOInputError, KernelOptions, dispatch
from grao_kernels.cpu import chunked
from grao_kernels.cpu import native as cpu_native
from grao_kernels.options import BACKENDS, ProcessDefaults, read_env
from tests.test_fused import make_problem

IGN = -100
CONCRETE = [b for b in BACKENDS if b != "auto"]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (INTERPRETING or torch.cuda.is_available()),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def spy_all(monkeypatch) -> dict:
    """Wrap every table entry; returns {(pass, backend): [kwargs of each call]}."""
    calls: dict = {key: [] for key in dispatch.TABLE}
    for key, real in list(dispatch.TABLE.items()):
        def wrapper(*args, _key=key, _real=real, **kwargs):
            calls[_key].append(kwargs)
            return _real(*args, **kwargs)
        monkeypatch.setitem(dispatch.TABLE, key, wrapper)
    return calls


def called(calls: dict) -> set:
    return {key for key, seen in calls.items() if seen}


def problem(bias=True):
    hidden, weight, b, labels, rewards = make_problem(2, 3, 6, 16, 37, dtype=torch.float32, bias=bias, seed=3)
    return hidden, weight, b, labels, rewards


def packed(hidden, labels):
    """The padded problem's completion tokens, packed: hidden [N, D], labels [N], row_index [N]."""
    mask = labels != IGN
    rows = torch.arange(labels.shape[0]).repeat_interleave(labels.shape[1])[mask.reshape(-1)]
    return hidden[mask], labels[mask], rows


def _grao(backend, *, packed_layout=False, options=None):
    hidden, weight, bias, labels, rewards = problem()
    h = hidden.clone().requires_grad_()
    if packed_layout:
        hp, lp, rows = packed(h, labels)
        loss, _ = grao_kernels.fused_linear_grao_loss(hp, weight, lp, rewards, bias=bias, row_index=rows,
                                                      backend=backend, options=options)
    else:
        loss, _ = grao_kernels.fused_linear_grao_loss(h, weight, labels, rewards, bias=bias, backend=backend,
                                                      options=options)
    loss.backward()
    return loss.detach(), h.grad


def test_table_covers_every_pass_of_every_backend():
    assert set(CONCRETE) == {"triton-gemm", "triton-tiles", "native", "chunked"}
    assert set(dispatch.TABLE) == {(p, b) for p in dispatch.PASSES for b in CONCRETE}
    assert all(callable(fn) for fn in dispatch.TABLE.values())
    with pytest.raises(GRAOInputError, match="no 'forward' pass for backend 'auto'"):
        dispatch.lookup("forward", "auto")


@pytest.mark.parametrize("packed_layout", [False, True], ids=["padded", "packed"])
def test_grao_loss_goes_through_the_table(monkeypatch, packed_layout):
    calls = spy_all(monkeypatch)
    _grao("chunked", packed_layout=packed_layout)
    assert called(calls) == {("known_grad", "chunked")}


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("packed_layout", [False, True], ids=["padded", "packed"])
def test_grao_loss_on_triton_gemm_runs_the_gemm_pass(monkeypatch, packed_layout):
    """Before one table, a packed call on CUDA ran the tile kernels whatever the design said."""
    calls = spy_all(monkeypatch)
    loss, grad = _grao("triton-gemm", packed_layout=packed_layout)
    assert called(calls) == {("known_grad", "triton-gemm")}
    ref_loss, ref_grad = _grao("chunked", packed_layout=packed_layout)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.triton
@needs_triton
def test_grao_loss_on_triton_tiles_runs_the_tiles_pass(monkeypatch):
    calls = spy_all(monkeypatch)
    _grao("triton-tiles", packed_layout=True)
    assert called(calls) == {("known_grad", "triton-tiles")}


def test_linear_logprob_and_logprob_dot_go_through_the_table(monkeypatch):
    calls = spy_all(monkeypatch)
    hidden, weight, bias, labels, _ = problem()
    h = hidden.clone().requires_grad_()
    grao_kernels.linear_logprob(h, weight, labels, bias=bias, backend="chunked").sum().backward()
    assert called(calls) == {("forward", "chunked"), ("backward", "chunked")}
    for seen in calls.values():
        seen.clear()
    coef = torch.randn(labels.shape)
    value, _ = grao_kernels.fused_linear_logprob_dot(h, weight, labels, coef, bias=bias, backend="chunked")
    value.backward()
    assert called(calls) == {("known_grad", "chunked")}


def test_auto_on_cpu_runs_what_resolve_picks(monkeypatch):
    hidden, weight, bias, labels, rewards = problem()
    want = dispatch.resolve("auto", hidden).backend
    assert want == ("native" if cpu_native.native_built() else "chunked")
    calls = spy_all(monkeypatch)
    grao_kernels.fused_linear_grao_loss(hidden, weight, labels, rewards, bias=bias)
    grao_kernels.linear_logprob(hidden.double(), weight.double(), labels)  # float64: always chunked
    assert called(calls) == {("known_grad", want), ("forward", "chunked")}


def test_auto_on_cuda_is_triton_gemm_unless_the_environment_says_otherwise():
    """resolve() on a CUDA-like tensor (no GPU here: only is_cuda, device and dtype are read)."""
    def fake(dtype):
        return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=dtype)

    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    assert dispatch.resolve("auto", fake(torch.bfloat16), defaults=ProcessDefaults()).backend == "triton-gemm"
    tiles = ProcessDefaults(cuda="triton-tiles")
    assert dispatch.resolve("auto", fake(torch.float16), defaults=tiles).backend == "triton-tiles"
    assert dispatch.resolve("auto", fake(torch.float64), defaults=ProcessDefaults()).backend == "chunked"
    assert dispatch.resolve("auto", fake(torch.float32), defaults=ProcessDefaults(cuda="chunked")).backend == "chunked"


def test_options_reach_the_pass_and_small_chunks_give_the_same_result(monkeypatch):
    hidden, weight, _, labels, _ = problem()
    n_active = int((labels != IGN).sum())
    small = KernelOptions(chunk_bytes=4 * weight.shape[0] * 3)  # 3 tokens per chunk
    assert chunked.chunk_rows(weight.shape[0], small.chunk_bytes) == 3 and n_active > 9
    calls = spy_all(monkeypatch)
    base = _grao("chunked")
    many = _grao("chunked", options=small)
    seen = [kw["chunk_bytes"] for kw in calls[("known_grad", "chunked")]]
    assert seen == [KernelOptions().chunk_bytes, small.chunk_bytes]
    torch.testing.assert_close(many[0], base[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(many[1], base[1], rtol=1e-5, atol=1e-7)
    # linear_logprob's backward runs with the forward's options (saved on the autograd context)
    h = hidden.clone().requires_grad_()
    grao_kernels.linear_logprob(h, weight, labels, backend="chunked", options=small).sum().backward()
    assert calls[("forward", "chunked")][-1]["chunk_bytes"] == small.chunk_bytes
    assert calls[("backward", "chunked")][-1]["chunk_bytes"] == small.chunk_bytes


def test_each_backend_reads_its_own_option():
    t = torch.randn(2, 3)
    opts = KernelOptions(chunk_bytes=1000, native_tile_bytes=2000, gemm_chunk_bytes=3000, fp32_dot_precision="tf32")
    assert dispatch.resolve("chunked", t, opts) == ("chunked", 1000, "tf32")
    if cpu_native.native_built():
        assert dispatch.resolve("native", t, opts) == ("native", 2000, "tf32")
    if INTERPRETING:
        assert dispatch.resolve("triton-gemm", t, opts) == ("triton-gemm", 3000, "tf32")
        assert dispatch.resolve("triton-tiles", t, opts).dot_precision == "tf32"


@pytest.mark.triton
@needs_triton
def test_gemm_chunk_bytes_and_dot_precision_reach_the_triton_passes(monkeypatch):
    calls = spy_all(monkeypatch)
    hidden, weight, _, labels, _ = problem()
    opts = KernelOptions(gemm_chunk_bytes=4 * weight.shape[0] * 5)
    small = _grao("triton-gemm", options=opts)
    base = _grao("triton-gemm")
    assert [kw["chunk_bytes"] for kw in calls[("known_grad", "triton-gemm")]] == [opts.gemm_chunk_bytes,
                                                                                  KernelOptions().gemm_chunk_bytes]
    torch.testing.assert_close(small[0], base[0], rtol=1e-6, atol=1e-7)
    grao_kernels.linear_logprob(hidden, weight, labels, backend="triton-tiles",
                                options=KernelOptions(fp32_dot_precision="tf32"))
    assert calls[("forward", "triton-tiles")][-1]["dot_precision"] == "tf32"


@pytest.mark.skipif(not cpu_native.native_built(), reason="the native CPU kernel is not built here")
def test_native_tile_bytes_reach_the_native_pass(monkeypatch):
    seen = []
    real = cpu_native.native_pass
    monkeypatch.setattr(cpu_native, "native_pass", lambda *a, **k: seen.append(k["tile_bytes"]) or real(*a, **k))
    opts = KernelOptions(native_tile_bytes=16 * 4 * 37)
    small = _grao("native", options=opts)
    base = _grao("native")
    assert seen == [opts.native_tile_bytes, KernelOptions().native_tile_bytes]
    torch.testing.assert_close(small[0], base[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("old, new", [("triton", "triton-gemm"), ("torch", "chunked")])
def test_old_backend_names_say_what_replaced_them(old, new):
    hidden, weight, _, labels, rewards = problem()
    calls = [
        lambda: grao_kernels.fused_linear_grao_loss(hidden, weight, labels, rewards, backend=old),
        lambda: grao_kernels.linear_logprob(hidden, weight, labels, backend=old),
        lambda: grao_kernels.fused_linear_logprob_dot(hidden, weight, labels, torch.ones(labels.shape), backend=old),
        lambda: grao_kernels.group_advantages(rewards, backend=old),
    ]
    for call in calls:
        with pytest.raises(GRAOInputError, match=f"backend='{old}' was renamed: use .*'{new}'"):
            call()


def test_renamed_environment_variable_is_refused():
    with pytest.raises(GRAOInputError, match="GRAO_KERNELS_CUDA_DESIGN was renamed: set GRAO_KERNELS_CUDA="):
        read_env({"GRAO_KERNELS_CUDA_DESIGN": "gemm"})
    assert read_env({}) == ProcessDefaults(cpu="auto", cuda="triton-gemm")
    assert read_env({"GRAO_KERNELS_CUDA": "triton-tiles"}).cuda == "triton-tiles"


def test_renamed_environment_variable_fails_the_first_call_of_a_process():
    root = Path(grao_kernels.__file__).resolve().parent.parent
    code = ("import torch, grao_kernels\n"
            "try:\n    grao_kernels.linear_logprob(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]))\n"
            "except grao_kernels.GRAOInputError as exc:\n    print('ERR', exc)\n")
    env = {**os.environ, "GRAO_KERNELS_CUDA_DESIGN": "tiles", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "ERR GRAO_KERNELS_CUDA_DESIGN was renamed" in out.stdout, out.stdout


@pytest.mark.parametrize("field, value, match", [
    ("chunk_bytes", 0, "KernelOptions.chunk_bytes must be a positive int"),
    ("native_tile_bytes", -5, "KernelOptions.native_tile_bytes must be a positive int"),
    ("gemm_chunk_bytes", 1.5, "KernelOptions.gemm_chunk_bytes must be a positive int"),
    ("chunk_bytes", True, "KernelOptions.chunk_bytes must be a positive int"),
    ("fp32_dot_precision", "fast", r"KernelOptions.fp32_dot_precision must be one of \('ieee', 'tf32'\)"),
])
def test_bad_kernel_options_name_the_field(field, value, match):
    with pytest.raises(GRAOInputError, match=match):
        KernelOptions(**{field: value})


def test_options_must_be_kernel_options():
    hidden, weight, _, labels, _ = problem()
    with pytest.raises(GRAOInputError, match="options must be a grao_kernels.KernelOptions or None, got dict"):
        grao_kernels.linear_logprob(hidden, weight, labels, options={"chunk_bytes": 1})
