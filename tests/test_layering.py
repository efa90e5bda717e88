"""Dependencies point one way: ``grao`` -> ``grao_kernels`` -> torch/triton (and the stdlib).

The kernel package holds the eager reference (the judge) and the input checks; it must never
import the algorithm layer, and ``grao`` re-exports the very same objects.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import grao
import grao.reference
import grao_kernels
import grao_kernels.reference

KERNELS_DIR = Path(grao_kernels.__file__).resolve().parent
ROOT = KERNELS_DIR.parent


def _is_grao_module(name: str) -> bool:
    """'grao' or 'grao.x', not 'grao_kernels' (which also starts with 'grao')."""
    return name == "grao" or name.startswith("grao.")


def grao_imports(source: str, filename: str = "<src>") -> list[str]:
    """Modules of the ``grao`` package that ``source`` imports (absolute imports; relative ones stay in-package)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"{filename}:{node.lineno}: import {a.name}" for a in node.names if _is_grao_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_grao_module(node.module):
            found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
    return found


def test_scan_catches_grao_imports():
    """The AST scan itself: it flags the algorithm layer and passes the kernel package."""
    assert grao_imports("import grao")
    assert grao_imports("import grao.reference as r")
    assert grao_imports("def f():\n    from grao._checks import GRAOInputError")
    assert grao_imports("from grao import demo")
    assert not grao_imports("import grao_kernels\nfrom grao_kernels.reference import COMPONENTS\nimport graotools")
    assert not grao_imports("from . import reference\nfrom ._checks import check_tensor")


def test_kernel_sources_never_import_grao():
    files = sorted(KERNELS_DIR.rglob("*.py"))
    assert KERNELS_DIR / "reference.py" in files and KERNELS_DIR / "checks.py" in files
    bad = [hit for f in files for hit in grao_imports(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not bad, "grao_kernels must depend on torch/triton/stdlib only:\n" + "\n".join(bad)


_PROBE = """
import sys
import grao_kernels, grao_kernels.reference, grao_kernels.ops.grao_loss, grao_kernels.ops.linear_logprob
import grao_kernels.ops.logprob_dot, grao_kernels.checks, grao_kernels.options, grao_kernels.dispatch
import grao_kernels.autograd, grao_kernels.autocast, grao_kernels.cpu.chunked, grao_kernels.cpu.native
loaded = sorted(m for m in sys.modules if m == "grao" or m.startswith("grao."))
print("LOADED:" + ",".join(loaded))
"""


def _loaded_grao_modules(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("LOADED:")][-1]
    return [m for m in line[len("LOADED:"):].split(",") if m]


@pytest.mark.parametrize("extra, expect_grao", [("", False), ("import grao.reference", True)])
def test_importing_grao_kernels_loads_no_grao_module(extra, expect_grao):
    """A fresh interpreter imports the kernel package and its submodules; no ``grao`` module gets loaded.
    The second case (which does import grao) shows the probe would notice."""
    loaded = _loaded_grao_modules(_PROBE.replace("import sys\n", "import sys\n" + extra + "\n", 1))
    if expect_grao:
        assert "grao" in loaded and "grao.reference" in loaded
    else:
        assert loaded == [], f"importing grao_kernels loaded {loaded}"


def test_grao_reexports_the_same_objects():
    assert grao.GRAOInputError is grao_kernels.GRAOInputError
    assert grao.GRAOInputError is grao_kernels.reference.GRAOInputError
    assert grao.linear_grao_loss is grao_kernels.reference.linear_grao_loss
    assert grao.COMPONENTS is grao_kernels.COMPONENTS
    for name in grao.reference.__all__:
        assert getattr(grao.reference, name) is getattr(grao_kernels.reference, name), name
    for name in ("token_logprobs", "sequence_logprob", "group_advantages", "grao_objective", "grao_row_grad",
                 "grao_loss", "linear_logits"):
        assert getattr(grao, name) is getattr(grao_kernels.reference, name), name


PACKAGE_FILES = sorted(p for d in (ROOT / "grao", KERNELS_DIR) for p in d.rglob("*.py"))


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_says_what_it_owns_and_stays_small(path):
    """A file does one job and says so in its first lines; past ~500 lines it is two files."""
    source = path.read_text(encoding="utf-8")
    if path.name == "__init__.py" and not source.strip():
        return
    doc = ast.get_docstring(ast.parse(source, str(path)))
    assert doc and len(doc.split()) >= 4, f"{path}: no module docstring saying what it owns"
    assert source.count("\n") <= 500, f"{path}: {source.count(chr(10))} lines (split it)"

