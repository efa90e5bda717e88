"""The native CPU backend: csrc/'s C++ kernel (``module.logprob_pass``), built on first use and cached by a source hash.

It serves CPU fp32 / bf16 tensors (:func:`serves`); the dispatch table sends other dtypes to the chunked path.
It is built with ``torch.utils.cpp_extension.load`` the first time a process needs it, into torch's extension
cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) in a folder named by :func:`build_key` (a hash
of the csrc/ sources, the flags, torch, the C++ compiler and the Python ABI), so later processes and other
checkouts with the same sources load it without building. A build prints one stderr line first; a build that
fails warns once (unless GRAO_KERNELS_CPU=native, which makes it an error: grao_kernels.dispatch.resolve).
Flags: ``-O3`` and OpenMP, no ``-march`` (the AVX-512 row kernel is chosen at run time). Details and
measurements: docs/kernels.md and csrc/README.md.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

from grao_kernels.checks import GRAOInputError
from grao_kernels.options import CPU_ENV, DEFAULT_OPTIONS

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"  # grao_kernels/cpu/native.py -> <root>/csrc
SOURCE = CSRC / "grao_cpu.cpp"  # the one translation unit; it includes csrc/*.h
#: Prefix of the extension's name and cache folder; ``extension_name()`` appends ``build_key()``.
EXTENSION_PREFIX = "grao_kernels_cpu"
CFLAGS = ("-O3", "-fopenmp")  # plus -DGRAO_CSRC_DIGEST=<source_digest()>
LDFLAGS = ("-fopenmp",)
#: What a first build takes, for the build's one-line message (measured: docs/kernels.md).
BUILD_TIME = "about 45 s"
#: The default fp32 [tile x V] workspace (KernelOptions.native_tile_bytes) and, for it only, the fewest rows a
#: tile has (large vocabularies stay efficient); a budget set through KernelOptions is taken as given.
TILE_BYTES = DEFAULT_OPTIONS.native_tile_bytes
MIN_TILE_ROWS = 128
DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_state: dict = {}  # "module": the loaded extension, or "error": why it could not be built


class NativeBuildError(RuntimeError):
    """The native CPU kernel was required (backend="native" or GRAO_KERNELS_CPU=native) and could not be built
    or loaded."""


def source_digest(csrc: Path | None = None) -> str:
    """A digest of every file of csrc/ the build reads (``csrc``: another copy of that folder, for tests). It
    goes into the flags as ``-DGRAO_CSRC_DIGEST`` and into ``build_key()``: torch's extension cache itself looks
    only at the listed source file, not at the headers it includes."""
    folder = CSRC if csrc is None else Path(csrc)
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.h")) + [folder / SOURCE.name]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cflags(digest: str | None = None) -> list[str]:
    return [*CFLAGS, f"-DGRAO_CSRC_DIGEST={source_digest() if digest is None else digest}"]


def compiler() -> str:
    """The C++ compiler torch's build runs: ``$CXX``, else ``c++`` (as ``torch.utils.cpp_extension``)."""
    return os.environ.get("CXX", "c++")


_compiler_versions: dict = {}


def compiler_version(cxx: str | None = None) -> str:
    """The first line of ``<compiler> --version`` (cached per compiler), or a note that it could not be run."""
    cxx = compiler() if cxx is None else cxx
    if cxx not in _compiler_versions:
        try:
            res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=False)
            lines = (res.stdout or res.stderr).strip().splitlines()
            _compiler_versions[cxx] = f"{cxx}: {lines[0] if lines else f'exit {res.returncode}'}"
        except (OSError, subprocess.SubprocessError) as exc:
            _compiler_versions[cxx] = f"{cxx}: not runnable ({type(exc).__name__})"
    return _compiler_versions[cxx]


def build_key(*, csrc: Path | None = None, torch_version: str | None = None, cxx_version: str | None = None) -> str:
    """12 hex digits of a hash of what the built library depends on: the csrc/ sources (``source_digest``),
    the flags, ``torch.__version__`` (and its git revision), the C++ compiler's version and the Python ABI. The
    keyword arguments replace a part (tests). Same key, same library: a cached build under it is loaded as is."""
    digest = source_digest(csrc)
    parts = [digest, " ".join(cflags(digest) + list(LDFLAGS)),
             torch.__version__ if torch_version is None else torch_version,
             getattr(torch.version, "git_version", "") or "",
             compiler_version() if cxx_version is None else cxx_version,
             sys.implementation.cache_tag or "", sys.platform]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def extension_name(**parts) -> str:
    """``grao_kernels_cpu_<build_key()>``: the extension's module name and its folder in torch's cache."""
    return f"{EXTENSION_PREFIX}_{build_key(**parts)}"


def announce_build(folder, *, waiting: bool = False, stream=None) -> None:
    """The one stderr line a build prints before it starts (not printed when a cached build is loaded)."""
    if waiting:
        line = (f"grao_kernels: waiting for another process's build of the native CPU kernel in {folder} "
                f"({BUILD_TIME} from its start; delete its file 'lock' if no build is running)")
    else:
        line = (f"grao_kernels: building the native CPU kernel (first use of these csrc/ sources with this torch "
                f"and compiler; {BUILD_TIME}; {CPU_ENV}=chunked skips it) in {folder}")
    print(line, file=sys.stderr if stream is None else stream, flush=True)


def _import_built(name: str, folder: str):
    from torch.utils.cpp_extension import _import_module_from_library

    return _import_module_from_library(name, folder, True)


def _build():
    """Import the cached build of these sources, torch and compiler, or build it (one stderr line first)."""
    if not SOURCE.is_file():
        raise FileNotFoundError(f"{SOURCE} is missing (the native kernel needs the source tree)")
    from torch.utils import cpp_extension

    name = extension_name()
    folder = cpp_extension._get_build_directory(name, verbose=False)  # $TORCH_EXTENSIONS_DIR or torch's default
    busy = os.path.exists(os.path.join(folder, "lock"))  # another process is building it (torch's FileBaton)
    if not busy and os.path.isfile(os.path.join(folder, name + cpp_extension.LIB_EXT)):
        # The key names everything the library depends on: no need to run ninja, whose build file would name
        # this checkout's source path and so rebuild a library another checkout made from the same sources.
        try:
            return _import_built(name, folder)
        except ImportError:
            pass  # an unloadable leftover: build it again
    announce_build(folder, waiting=busy)
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags(),
                              extra_include_paths=[str(CSRC)], extra_ldflags=list(LDFLAGS), build_directory=folder,
                              verbose=False)


def _cpu_default() -> str:
    from grao_kernels.options import process_defaults
    try:
        return process_defaults().cpu
    except GRAOInputError:
        return "auto"


def load_native():
    """The built extension, or None when it cannot be built (one warning line, unless GRAO_KERNELS_CPU=native,
    whose callers raise NativeBuildError instead); building happens once per process."""
    with _lock:
        if "module" not in _state and "error" not in _state:
            try:
                _state["module"] = _build()
            except Exception as exc:  # noqa: BLE001 - compiler missing, build error, import error: all fall back
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                _state["error"] = f"{type(exc).__name__}: {reason}"
                if _cpu_default() != "native":
                    warnings.warn(f"grao_kernels: native CPU kernel unavailable ({_state['error']}); using the "
                                  f"chunked PyTorch path (set {CPU_ENV}=chunked to skip the build)",
                                  RuntimeWarning, stacklevel=3)
        return _state.get("module")


def build_error() -> str | None:
    """Why the kernel could not be built (None if it was, or was not tried yet)."""
    return _state.get("error")


@torch.compiler.assume_constant_result
def native_built() -> bool:
    """The kernel is built (building it on first use). Under torch.compile it runs once while tracing and its
    answer is a constant of the graph (no lock or build in the trace)."""
    return load_native() is not None


def serves(tensor: torch.Tensor) -> bool:
    """Whether the native kernel runs ``tensor``'s dtype and device (CPU fp32 / bf16) and is built."""
    return tensor.device.type == "cpu" and tensor.dtype in DTYPES and load_native() is not None


def require_native(tensor: torch.Tensor) -> None:
    """backend="native": a clear error unless ``tensor`` is a CPU tensor and the kernel is built (other float
    dtypes are accepted: they run on the chunked path, as fp16 under autocast does)."""
    if tensor.device.type != "cpu":
        raise GRAOInputError(f"backend='native' is the CPU kernel; got a tensor on {tensor.device}")
    if not native_built():
        raise NativeBuildError(f"backend='native': the native CPU kernel could not be built: {build_error()}")


def tile_rows(vocab: int, tile_bytes: int | None = None, min_rows: int | None = None) -> int:
    """Tokens per tile: the fp32 [rows x vocab] workspace within ``tile_bytes`` (default TILE_BYTES), a multiple of
    16 rows, at least ``min_rows`` (default MIN_TILE_ROWS)."""
    budget = TILE_BYTES if tile_bytes is None else tile_bytes
    floor = MIN_TILE_ROWS if min_rows is None else min_rows
    return max(floor, 1, int(budget) // (4 * max(1, vocab)) // 16 * 16)


def native_pass(hidden, weight, labels, bias, *, temperature, ignore_index, return_entropy=False, grad_logp=None,
                backward_only=False, need_hidden=True, need_weight=True, need_bias=True, tile_bytes=None, isa=0):
    """The native counterpart of ``cpu.chunked.chunked_linear_logprob`` (same arguments and ``ChunkedResult``).

    ``tile_bytes``: the tile workspace (None or TILE_BYTES: the default, at least MIN_TILE_ROWS rows; another
    value is taken as given, so tests get many ragged tiles).

    Only tokens whose label is not ``ignore_index`` are visited; with ``backward_only`` also only those with
    a non-zero incoming gradient. ``isa`` (tests of the fallbacks) is a bit set: 1 forces the scalar row kernel
    (CPUs without AVX-512), 2 ATen's GEMMs for bf16 (torch without MKL's bf16 GEMM), 4 MKL's bf16 GEMM instead of
    oneDNN's brgemm (CPUs without AMX), 8 a forward-only pass through a [tile x V] logits buffer, as the passes with
    gradients, instead of its online softmax over vocabulary blocks, 16 a bf16 pass with gradients through the fp32
    [tile x V] logits buffer instead of the compact tile of fp16 exponentials (twice the rows; csrc/compact.h).
    """
    from grao_kernels.cpu.chunked import ChunkedResult

    module = load_native()
    if module is None:
        raise NativeBuildError(f"native CPU kernel unavailable: {build_error()}")
    labels = labels.long().contiguous()
    mask = labels != ignore_index
    if grad_logp is not None:
        grad_logp = grad_logp.to(torch.float32).contiguous()
        if backward_only:
            mask &= grad_logp != 0
    rows = mask.nonzero().flatten()
    weight = weight.contiguous()  # tied / transposed views: one copy, the kernel reads rows of W
    want = grad_logp is not None
    logp, lse, entropy, dh, dw, db = module.logprob_pass(
        hidden, weight, labels, bias, rows, grad_logp, float(temperature), bool(return_entropy),
        want and need_hidden, want and need_weight, want and need_bias and bias is not None,
        tile_rows(weight.shape[0], tile_bytes, None if tile_bytes in (None, TILE_BYTES) else 1), int(isa))
    return ChunkedResult(logp=logp, lse=lse, entropy=entropy if return_entropy else None,
                         grad_hidden=dh if want and need_hidden else None,
                         grad_weight=dw if want and need_weight else None,
                         grad_bias=db if want and need_bias and bias is not None else None)
