"""Build-time mapping of the repository into the wheel (the metadata is in pyproject.toml).

The repository keeps ``prebuilt/``, ``tvm_kernels/``, ``benchmarks/`` and ``build_kernels.py`` at
its top. A wheel carries them inside the package, where ``longformer_tvm._contract`` looks when
the package is installed rather than checked out:

    longformer_tvm/prebuilt/          the shipped libraries, manifest.json, tuning databases
    longformer_tvm/_build/            build_kernels.py, tvm_kernels/, benchmarks/ (for cache builds
                                      and the ``longformer-tvm`` console script)

The wheel holds machine code (x86-64 shared libraries that need glibc >= 2.2.5 and nothing but
libc and the TVM runtime wheel's libraries), so it is tagged for the platform, and for any
Python 3: the libraries are loaded through tvm-ffi, not as Python extension modules.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PLATFORM = "manylinux_2_17_x86_64"
#: (source in the repository, destination under the package, file patterns)
TREE = [
    ("prebuilt", "prebuilt", ("**/*",)),
    # emulate.h: the CUDA emulator; threads.c: the CPU libraries' OpenMP launcher
    ("tvm_kernels", "_build/tvm_kernels", ("**/*.py", "**/*.h", "**/*.c")),
    ("benchmarks", "_build/benchmarks", ("*.py",)),
    (".", "_build", ("build_kernels.py",)),
]


def tree_files() -> list[tuple[Path, Path]]:
    """(source, destination relative to the package) of every file the wheel maps in."""
    out = []
    for src, dest, patterns in TREE:
        for pattern in patterns:
            for path in sorted((ROOT / src).glob(pattern)):
                if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".lock"):
                    out.append((path, Path(dest) / path.relative_to(ROOT / src)))
    return out


class BuildPy(build_py):
    """build_py, then the repository's tree copied into the package (not for editable installs,
    which use the checkout itself)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        package = Path(self.build_lib) / "longformer_tvm"
        for _, dest, _ in TREE:  # an earlier build's copies (of files since removed) go first
            if dest != "_build":
                shutil.rmtree(package / dest, ignore_errors=True)
        for source, rel in tree_files():
            target = package / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


class BinaryDistribution(Distribution):
    """Holds machine code: installed to platlib, and the wheel is not ``none-any``."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", PLATFORM


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildPy, "bdist_wheel": PlatformWheel})
