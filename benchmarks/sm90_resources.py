"""Registers, spills and shared memory of every Triton kernel config, compiled for sm_90 without a GPU.

    python benchmarks/sm90_resources.py            # -> runs/bench/sm90/resources.md and .json
    python benchmarks/sm90_resources.py --out benchmarks/results/sm90   # the committed results

Triton compiles for ``GPUTarget("cuda", 90, 32)`` on a CPU-only machine; ``ptxas -v`` (shipped with
Triton) reports each kernel's registers, spill stores/loads and shared memory. A regression (a config
that starts spilling, or outgrows shared memory) shows here before any GPU run. The device image runs
triton 3.6: run this with triton 3.6 (e.g. a side venv: ``pip install torch==2.13.0 triton==3.6.0``)
to see what the GPU will compile. The configs are the kernels' own GPU configs (``_fwd_config``,
``_bwd_config``, the GEMM design's row kernel), so the table follows the code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_kernel(fn, args: dict, constexprs: dict, *, num_warps: int, num_stages: int):
    """Compile ``fn`` for sm_90 as a launch with these arguments would: ``args`` maps every runtime argument
    to a value (CPU tensors stand in for device buffers: only their dtype and 16-byte alignment matter;
    ints are specialised as the JIT does, e.g. divisibility by 16), ``constexprs`` the compile-time ones.
    The JIT's own binder computes the specialisation, so the result is the kernel a GPU run compiles."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    options, signature, consts, attrs = fn._pack_args(backend, {"num_warps": num_warps, "num_stages": num_stages},
                                                      bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=TARGET, options=options.__dict__)


def ptxas_report(compiled) -> dict:
    """Registers, spill bytes and shared memory from ``ptxas -v`` on the kernel's PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "shared_bytes": int(compiled.metadata.shared)}


def kernel_cases(n: int = 16384, d: int = 4096, v: int = 151936):
    """(name, fn, args, constexprs, num_warps, num_stages) for each kernel and dtype the GPU runs, with the
    arguments of a launch at N tokens, D, V (contiguous inputs)."""
    from grao_kernels.triton import gemm
    from grao_kernels.triton import tiles as lin

    f32, i64 = torch.empty(16, dtype=torch.float32), torch.empty(16, dtype=torch.int64)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, name = torch.empty(16, dtype=dtype), TYPES[dtype]
        common = dict(h_ptr=x, w_ptr=x, b_ptr=x, labels_ptr=i64, N=n, D=d, V=v, stride_hn=d, stride_hd=1,
                      stride_wv=d, stride_wd=1, stride_b=0, stride_l=1, inv_temp=1.0, ignore_index=-100)
        cfg = lin._fwd_config(dtype)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        yield (f"logprob forward (tiles) {name} {cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_D']}",
               lin._logprob_fwd_kernel,
               dict(common, max_part_ptr=f32, logs_part_ptr=f32, ent_part_ptr=f32, tgt_ptr=f32, cols_per_split=v,
                    n_blocks=triton.cdiv(n, cfg["BLOCK_N"])),
               dict(HAS_BIAS=False, NEED_ENTROPY=False, DOT_FP32=False, PRECISION=lin._dot_precision(dtype, "ieee"),
                    **cfg),
               warps, stages)
        cfg = lin._bwd_config(dtype)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        yield (f"logprob backward (tiles) {name} {cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_D']}",
               lin._logprob_bwd_kernel,
               dict(common, lse_ptr=f32, g_ptr=f32, dh_ptr=f32, dw_ptr=f32, db_ptr=f32,
                    n_blocks=triton.cdiv(n, cfg["BLOCK_N"]), v_blocks=triton.cdiv(v, cfg["BLOCK_V"]), stride_lse=1,
                    stride_g=1),
               dict(HAS_BIAS=False, NEED_H=True, NEED_W=True, NEED_B=False, DOT_FP32=False,
                    PRECISION=lin._dot_precision(dtype, "ieee"), **cfg), warps, stages)
        rows = gemm.rows_config()
        yield (f"row kernel (gemm design) {name} BLOCK_V={rows['BLOCK_V']}", gemm._rows_kernel,
               dict(z_ptr=x, b_ptr=x, labels_ptr=i64, g_ptr=f32, logp_ptr=f32, lse_ptr=f32, C=1024, V=v, stride_zc=v,
                    stride_b=0, inv_temp=1.0),
               dict(HAS_BIAS=False, NEED_GRAD=True, BLOCK_V=rows["BLOCK_V"]), rows["num_warps"], 1)


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.0f} KiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "sm90"),
                    help="output folder (default runs/bench/sm90; the committed results change only with "
                         "--out benchmarks/results/sm90)")
    args = ap.parse_args(argv)
    rows = []
    for name, fn, types, consts, warps, stages in kernel_cases():
        try:
            rep = ptxas_report(compile_kernel(fn, types, consts, num_warps=warps, num_stages=stages))
            rows.append({"kernel": name, "num_warps": warps, "num_stages": stages, **rep})
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a row too
            rows.append({"kernel": name, "num_warps": warps, "num_stages": stages,
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"})
        print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "triton": triton.__version__, "torch": torch.__version__, "target": "cuda sm_90 (ptxas --gpu-name=sm_90a)",
           "command": "python benchmarks/sm90_resources.py"}
    with open(os.path.join(args.out, "resources.json"), "w", encoding="utf-8") as fh:
        json.dump({"env": env, "rows": rows}, fh, indent=1)
    lines = ["# Triton kernels compiled for sm_90 (no GPU)", "",
             f"{env['date']}; triton {env['triton']}, torch {env['torch']}; `{env['command']}`.", "",
             "| kernel / config | warps | stages | registers | spill stores / loads (bytes) | shared memory |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | does not compile: {r['error']} | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                         f"{r['spill_store_bytes']} / {r['spill_load_bytes']} | {_size(r['shared_bytes'])} |")
    with open(os.path.join(args.out, "resources.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
