"""Old vs new native CPU kernel in one process (issue 23 item 6, csrc/pass.h split into variants): outputs compared
on a grid of small cases, then timings interleaved old / new, median of repeats.

    PYTHONPATH=$PWD python -m benchmarks.pass_split_compare --old-rev db1bc49 [--equal] [--time] [--threads 1 2]

The old kernel is csrc/ of --old-rev, written to a temporary folder and built (or loaded from torch's extension
cache) under its own build key; the new one is this checkout's (cpu_native.load_native()). Each call swaps the module
cpu_native.native_pass uses, so both run through the same Python argument preparation.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from grao_kernels.cpu import native as cpu_native


def load_old(rev: str):
    folder = Path(tempfile.mkdtemp(prefix="csrc_old_"))
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:csrc"], capture_output=True, text=True,
                           check=True).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "show", f"{rev}:csrc/{name}"], capture_output=True, check=True).stdout
        (folder / name).write_bytes(blob)
    from torch.utils import cpp_extension

    name = cpu_native.extension_name(csrc=folder)
    build = cpp_extension._get_build_directory(name, verbose=False)
    lib = os.path.join(build, name + cpp_extension.LIB_EXT)
    if os.path.isfile(lib):
        return cpp_extension._import_module_from_library(name, build, True)
    digest = cpu_native.source_digest(folder)
    return cpp_extension.load(name=name, sources=[str(folder / "grao_cpu.cpp")], extra_cflags=cpu_native.cflags(digest),
                              extra_include_paths=[str(folder)], extra_ldflags=list(cpu_native.LDFLAGS),
                              build_directory=build, verbose=False)


def run(module, *args, **kw):
    cpu_native._state["module"] = module
    return cpu_native.native_pass(*args, **kw)


FIELDS = ("logp", "lse", "entropy", "grad_hidden", "grad_weight", "grad_bias")


def case(n, d, v, dtype, *, bias, grads, temp, ignore, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.3).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore:
        labels[torch.rand(n, generator=g) < 0.2] = -100
    grad = None
    if grads:
        grad = torch.randn(n, generator=g)
        grad[torch.rand(n, generator=g) < 0.1] = 0.0
    return (h, w, labels, b), dict(temperature=temp, ignore_index=-100, grad_logp=grad)


def compare(old, new, threads):
    torch.set_num_threads(threads)
    worst = 0.0
    rows = []
    shapes = [(300, 64, 1000), (77, 33, 515)]
    for (n, d, v), dtype, bias, grads, temp, isa in itertools.product(
            shapes, (torch.float32, torch.bfloat16), (False, True), (False, True), (1.0, 0.7), (0, 1, 2, 3, 4, 8, 16)):
        args, kw = case(n, d, v, dtype, bias=bias, grads=grads, temp=temp, ignore=True)
        for extra in ({}, {"backward_only": True, "need_bias": False}, {"need_weight": False}) if grads else ({},):
            opts = dict(kw, return_entropy=True, tile_bytes=4 * v * 48, isa=isa, **extra)
            a, b_ = run(old, *args, **opts), run(new, *args, **opts)
            diffs = {}
            for f in FIELDS:
                x, y = getattr(a, f), getattr(b_, f)
                assert (x is None) == (y is None), f
                if x is None:
                    continue
                assert x.shape == y.shape and x.dtype == y.dtype, f
                bit = torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x.view(torch.int32), y.view(
                    torch.int16) if y.dtype == torch.bfloat16 else y.view(torch.int32))
                diffs[f] = 0.0 if bit else (x.double() - y.double()).abs().max().item()
            m = max(diffs.values())
            worst = max(worst, m)
            rows.append(((n, d, v), str(dtype).split(".")[-1], bias, grads, temp, isa, tuple(sorted(extra)), m))
    nonzero = [r for r in rows if r[-1] != 0.0]
    print(f"threads={threads}: {len(rows)} cases, {len(rows) - len(nonzero)} bitwise equal in every output, "
          f"max abs diff {worst:g}")
    for r in nonzero:
        print("  differs:", r)
    return len(rows), worst


CASES = list(itertools.product((torch.float32, torch.bfloat16), (False, True)))


def timing(old, new, threads, repeats):
    torch.set_num_threads(threads)
    n, d, v = 1024, 512, 32000
    out = []
    for dtype, grads in CASES:
        args, kw = case(n, d, v, dtype, bias=False, grads=grads, temp=1.0, ignore=False)
        times = {"old": [], "new": []}
        for mod in (old, new):  # warm-up
            run(mod, *args, **kw)
        for r in range(repeats):
            order = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
            for name, mod in order:
                t0 = time.perf_counter()
                run(mod, *args, **kw)
                times[name].append(time.perf_counter() - t0)
        mo, mn = statistics.median(times["old"]), statistics.median(times["new"])
        lo, ln = min(times["old"]), min(times["new"])
        paired = statistics.median(b / a for a, b in zip(times["old"], times["new"]))  # run r's old and new adjacent
        label = f"N={n} D={d} V={v} {str(dtype).split('.')[-1]} {'with gradients' if grads else 'forward only'}"
        out.append((threads, label, mo, mn))
        print(f"| {threads} | {label} | {mo * 1e3:.1f} | {mn * 1e3:.1f} | {mn / mo:.3f} | {lo * 1e3:.1f} | "
              f"{ln * 1e3:.1f} | {ln / lo:.3f} | {paired:.3f} |", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", default="db1bc49")
    ap.add_argument("--equal", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    old, new = load_old(a.old_rev), cpu_native.load_native()
    print("old:", old.__name__, "new:", new.__name__, "avx512:", new.has_avx512(), "brgemm:", new.has_brgemm())
    if a.equal:
        for t in a.threads:
            compare(old, new, t)
    if a.time:
        print("| threads | case | old ms (median) | new ms (median) | new / old | old ms (min) | new ms (min) | "
              "new / old (min) | new / old (median of pairs) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for t in a.threads:
            timing(old, new, t, a.repeats)


if __name__ == "__main__":
    main()
