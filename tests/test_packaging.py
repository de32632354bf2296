"""The package as people install it: one version, a platform wheel that carries every shipped
library and the build tree, and the console script."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import longformer_tvm as lt
from longformer_tvm import _contract

REPO = Path(__file__).resolve().parents[1]


def test_one_version_reported_by_the_package_the_metadata_and_every_manifest_entry():
    assert lt.__version__ == importlib.metadata.version("longformer-tvm") == _contract.__version__
    assert not re.search(r'^version\s*=\s*"', (REPO / "pyproject.toml").read_text(), re.M)
    manifest = json.loads((REPO / "prebuilt" / "manifest.json").read_text())
    assert {e.get("package_version") for e in manifest["libraries"]} == {lt.__version__}


def _glibc_needed(path: Path) -> tuple[int, ...]:
    out = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=True).stdout
    versions = [tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_([0-9.]+)", out)]
    return max(versions, default=(0,))


def test_shipped_libraries_need_no_newer_glibc_than_the_wheel_tag_says():
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    tag = tuple(int(x) for x in re.search(r"manylinux_(\d+)_(\d+)", _wheel_tag()).groups())
    for lib in sorted((REPO / "prebuilt").rglob("*.so")):
        assert _glibc_needed(lib) <= tag, lib


def _wheel_tag() -> str:
    text = (REPO / "setup.py").read_text()
    return re.search(r'PLATFORM = "([^"]+)"', text).group(1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                           str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("*.whl")
    return whl


def test_the_wheel_is_a_platform_wheel_carrying_every_library_and_the_build_tree(wheel):
    assert wheel.name == f"longformer_tvm-{lt.__version__}-py3-none-{_wheel_tag()}.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    manifest = json.loads((REPO / "prebuilt" / "manifest.json").read_text())
    shipped = {f"longformer_tvm/prebuilt/{e['file']}" for e in manifest["libraries"]}
    assert {e["device"] for e in manifest["libraries"]} == {"cpu", "cuda"}
    assert shipped | {"longformer_tvm/prebuilt/manifest.json"} <= names
    assert any(n.startswith("longformer_tvm/prebuilt/tuning/") for n in names)
    sources = {f"longformer_tvm/_build/{s}" for device in _contract.SOURCES.values() for s in device}
    assert sources | {"longformer_tvm/_build/build_kernels.py",
                      "longformer_tvm/_build/benchmarks/selfcheck.py",
                      "longformer_tvm/_build/tvm_kernels/cuda/emulate.h"} <= names
    assert not [n for n in names if n.endswith(".lock") or "__pycache__" in n or n.startswith("tests/")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "longformer-tvm = longformer_tvm._cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_console_script_runs_build_kernels_commands():
    script = Path(sys.executable).parent / "longformer-tvm"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(cmd in proc.stdout for cmd in ("build", "tune", "selfcheck", "compare"))


def test_the_wheel_smoke_test_refuses_a_checkout(tmp_path):
    """CI's smoke test of the installed wheel must not pass on an editable checkout install."""
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "smoke_installed.py")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "smoke test FAILED: the package is an installed wheel" in proc.stdout + proc.stderr
