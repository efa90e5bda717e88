"""The native CPU kernel's build (grao_kernels.cpu.native): its cache folder is keyed by what the library depends
on, and a build says so in one stderr line while loading a cached one says nothing (issue 22, item 4).

No test here compiles anything: the key is computed directly, and the build is torch's ``load`` replaced by a fake.
"""

from __future__ import annotations

import re
import shutil

import pytest
from torch.utils import cpp_extension

from grao_kernels.cpu import native as cpu_native


@pytest.fixture
def csrc_copy(tmp_path):
    copy = tmp_path / "csrc"
    shutil.copytree(cpu_native.CSRC, copy)
    return copy


def test_name_is_prefix_and_twelve_hex_digits():
    name = cpu_native.extension_name()
    assert re.fullmatch(r"grao_kernels_cpu_[0-9a-f]{12}", name), name
    assert name == cpu_native.extension_name()  # deterministic


def test_same_sources_elsewhere_share_the_key(csrc_copy):
    # another checkout with the same sources: same folder, one build for both
    assert cpu_native.build_key(csrc=csrc_copy) == cpu_native.build_key()


@pytest.mark.parametrize("path", ["grao_cpu.cpp", "rows.h"])
def test_one_source_byte_changes_the_key(csrc_copy, path):
    before = cpu_native.build_key(csrc=csrc_copy)
    data = bytearray((csrc_copy / path).read_bytes())
    data[len(data) // 2] ^= 1
    (csrc_copy / path).write_bytes(bytes(data))
    assert cpu_native.build_key(csrc=csrc_copy) != before


def test_torch_and_compiler_versions_change_the_key():
    key = cpu_native.build_key()
    assert cpu_native.build_key(torch_version="2.13.0+cpu") != cpu_native.build_key(torch_version="2.13.1+cpu")
    assert cpu_native.build_key(cxx_version="c++: g++ 12.2.0") != cpu_native.build_key(cxx_version="c++: g++ 13.1.0")
    assert key == cpu_native.build_key(torch_version=cpu_native.torch.__version__)


def test_digest_define_is_kept():
    assert f"-DGRAO_CSRC_DIGEST={cpu_native.source_digest()}" in cpu_native.cflags()


def test_build_prints_one_line_and_cached_load_prints_none(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builds, imports = [], []

    def fake_load(name, sources, build_directory, **kwargs):  # what a build leaves: the library in its folder
        builds.append((name, build_directory))
        (tmp_path / name / (name + cpp_extension.LIB_EXT)).write_bytes(b"built")
        return "module"

    def fake_import(name, folder):
        imports.append(folder)
        return "cached module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpu_native, "_import_built", fake_import)
    monkeypatch.setattr(cpu_native, "_state", {})
    name = cpu_native.extension_name()
    for _ in range(3):  # one process: built once, then the loaded module is kept
        assert cpu_native.load_native() == "module"
    err = capsys.readouterr().err.splitlines()
    assert builds == [(name, str(tmp_path / name))]
    lines = [x for x in err if x.startswith("grao_kernels:")]
    assert len(lines) == 1, err
    assert "building the native CPU kernel" in lines[0] and cpu_native.BUILD_TIME in lines[0]
    assert lines[0].endswith(f" in {tmp_path / name}")

    monkeypatch.setattr(cpu_native, "_state", {})  # a later process: the cached build is imported, silently
    assert cpu_native.load_native() == "cached module"
    assert len(builds) == 1 and imports == [str(tmp_path / name)]
    assert "grao_kernels:" not in capsys.readouterr().err


def test_build_in_progress_elsewhere_is_waited_for(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = cpu_native.extension_name()
    (tmp_path / name).mkdir()
    (tmp_path / name / (name + cpp_extension.LIB_EXT)).write_bytes(b"half-linked")
    (tmp_path / name / "lock").write_text("")  # torch's FileBaton of the other process
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: "module")
    monkeypatch.setattr(cpu_native, "_import_built", lambda *a: pytest.fail("imported a library being built"))
    assert cpu_native._build() == "module"
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("grao_kernels:")]
    assert len(err) == 1 and "waiting for another process's build" in err[0], err
