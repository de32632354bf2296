"""This installation: where libraries live, which TVM releases they must match, which backend
mode is asked for, and loading the TVM runtime. No device knowledge here."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import torch

from ._contract import BUILD_SCRIPT, KERNEL_SOURCES, PREBUILT_DIR, REPO_DIR, RUNTIME_DIR_ENV, \
    installed_versions, source_hash, tvm_lib_dir
from ._errors import KernelNotAvailableError

#: Layout of the per-user cache (the name of its versioned folders); bump it when that changes.
CACHE_LAYOUT = 1


def prebuilt_dirs() -> list[Path]:
    """Where shipped libraries live: inside the package (wheel) or beside it (checkout)."""
    return [PREBUILT_DIR] if PREBUILT_DIR.is_dir() else []


def cache_dir() -> Path:
    env = os.environ.get("LONGFORMER_TVM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longformer_tvm"


def runtime_versions() -> dict[str, str]:
    """The TVM and tvm-ffi releases libraries must have been built with: the installed ones, with
    the release named by ``$LONGFORMER_TVM_RUNTIME_DIR/VERSION`` where runtime libraries come
    from such a folder instead of the apache-tvm wheel."""
    versions = installed_versions()
    env = os.environ.get(RUNTIME_DIR_ENV)
    if env:
        try:
            named = (Path(env).expanduser() / "VERSION").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            named = ""
        versions["tvm"] = named or versions["tvm"]
    return versions


def kernel_sources_hash() -> str | None:
    """sha256 over every kernel source of this checkout (``tvm_kernels/**/*.py`` and
    ``build_kernels.py``); None without them (an installed wheel, which builds nothing)."""
    if not KERNEL_SOURCES.is_dir():
        return None
    files = sorted(p.relative_to(REPO_DIR).as_posix() for p in KERNEL_SOURCES.rglob("*.py"))
    if (REPO_DIR / "build_kernels.py").is_file():
        files.append("build_kernels.py")
    return source_hash(files, REPO_DIR)


def cache_library_dir() -> Path:
    """The cache folder this installation builds into and loads from: the key holds the cache
    layout, the TVM and tvm-ffi versions and the kernel-source hash (``none`` where unknown)."""
    versions = installed_versions()
    src = kernel_sources_hash()
    safe = lambda v: re.sub(r"[^A-Za-z0-9._+-]", "_", v) or "none"  # noqa: E731
    return cache_dir() / (f"v{CACHE_LAYOUT}-tvm{safe(versions['tvm'])}-ffi{safe(versions['tvm_ffi'])}"
                          f"-src{src[:16] if src else 'none'}")


def backend_mode() -> str:
    mode = os.environ.get("LONGFORMER_TVM_BACKEND", "auto").strip().lower() or "auto"
    if mode not in ("auto", "reference"):
        raise ValueError(f"LONGFORMER_TVM_BACKEND must be 'auto' or 'reference', got {mode!r}")
    return mode


def compiler_available() -> bool:
    lib = tvm_lib_dir()
    return lib is not None and (lib / "libtvm_compiler.so").exists() and BUILD_SCRIPT.is_file()


def load_tvm_runtime() -> None:
    """``tvm_ffi`` and ``libtvm_runtime.so`` (from the apache-tvm wheel), with the thread-pool
    settings this package wants; loading an already loaded library again costs nothing."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime links against)

    lib = tvm_lib_dir()
    if lib is None or not (lib / "libtvm_runtime.so").exists():
        raise KernelNotAvailableError(
            "the TVM runtime library (libtvm_runtime.so from the apache-tvm wheel) is not "
            "installed; install the pinned apache-tvm (pip install -e .)")
    # TVM's CPU thread pool sizes itself from TVM_NUM_THREADS when first used (its own default is
    # half the logical CPUs); follow torch's setting unless the user chose.
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    # TVM's workers spin-wait after each kernel and take the cores from torch's threads in the
    # ops that follow (softmax, projections); let them sleep instead.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    ctypes.CDLL(str(lib / "libtvm_runtime.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
