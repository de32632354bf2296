"""CPU kernels on torch's OpenMP threads, not on a second pool beside them.

TVM runs a kernel's parallel loop on its own thread pool. In a model every kernel call follows a
torch op, whose OpenMP threads then spin-wait for their next region and hold the cores that TVM's
workers need: a QK call right after a torch matmul ran 1.7x slower than alone (2-core Sapphire
Rapids, w=64), the fused forward in the interleaved benchmark 1.11x (w=256) to 1.18x (w=64).
So each CPU library carries a launcher (``tvm_kernels/cpu/threads.c``) that runs the loop's tasks
on the OpenMP runtime torch loaded, and :func:`install` puts it in the library's
``__TVMBackendParallelLaunch`` slot when the library is loaded. The kernels' code is the same;
only the threads it runs on change, and their number follows ``torch.set_num_threads`` at each call.

``LONGFORMER_TVM_THREAD_POOL`` chooses: ``torch`` (the default) or ``tvm`` (TVM's pool, sized by
``TVM_NUM_THREADS``; the default when the user set that variable). TVM's pool also serves where
torch's runtime is not OpenMP or cannot be found, a library built before the launcher existed,
and a child made by ``fork()`` (a GNU OpenMP team there would wait for threads that do not exist,
as torch's own ops do with more than one thread): libraries loaded before the fork fall back in
the child (the launcher checks the process id), and libraries the child loads are not given the
launcher; :class:`._install.ForkedThreadPool` keeps TVM's pool from hanging there as before.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch

from . import _install

logger = logging.getLogger("longformer_tvm")

SLOT = "__TVMBackendParallelLaunch"
LAUNCHER = "lftvm_parallel_launch"
_OPENMP_PREFIXES = ("libgomp", "libiomp", "libomp")

_lock = threading.Lock()
_runtime: tuple[ctypes.CDLL, str] | None | bool = False  # False: not looked for yet
_libraries: dict[str, str] = {}  # library path -> the pool its kernels run on
_FORKED = "tvm (a child made by fork())"
_forked = False  # this process is a child made by fork() of the one that imported the package


def _after_fork_in_child() -> None:
    global _lock, _forked
    _lock, _forked = threading.Lock(), True
    # the launcher already sends these libraries' loops to TVM's pool here (it checks the pid)
    for path in _libraries:
        _libraries[path] = _FORKED


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _loaded_openmp() -> list[str]:
    """Paths of the OpenMP runtimes loaded in this process (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split(None, 5) for line in f]
    except OSError:
        return []
    paths = {f[5].strip() for f in fields if len(f) == 6}
    return sorted(p for p in paths if Path(p).name.startswith(_OPENMP_PREFIXES))


def openmp_runtime() -> tuple[ctypes.CDLL, str] | None:
    """torch's OpenMP runtime, as (library, path), or None: torch's parallel backend is not
    OpenMP, or no loaded runtime has the entry points the launcher calls."""
    global _runtime
    with _lock:
        if _runtime is False:
            _runtime = _find_openmp()
        return _runtime or None


def _find_openmp() -> tuple[ctypes.CDLL, str] | None:
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        logger.info("torch's parallel backend is not OpenMP; CPU kernels use TVM's thread pool")
        return None
    torch_dir = str(Path(torch.__file__).resolve().parent)
    found = _loaded_openmp()
    # torch's own runtime first (its wheel ships one), then any other already loaded
    for path in sorted(found, key=lambda p: not p.startswith(torch_dir)):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        if hasattr(lib, "GOMP_parallel") and hasattr(lib, "omp_get_max_threads"):
            return lib, path
    logger.info("no loaded OpenMP runtime with GOMP_parallel (found %s); CPU kernels use TVM's "
                "thread pool", found or "none")
    return None


def _wanted() -> str:
    """The pool the settings ask for: LONGFORMER_TVM_THREAD_POOL, else ``tvm`` where the user set
    TVM_NUM_THREADS (the package sets it itself otherwise), else ``torch``."""
    try:
        pool = _install.thread_pool()
    except ValueError as exc:
        logger.warning("%s; using the default", exc)
        pool = None
    if pool is None:
        pool = "tvm" if (_install.THREADS_ENV in os.environ
                         and not _install.AFTER_FORK.threads_follow_torch) else "torch"
    return pool


def install(path: Path | str) -> str:
    """Run the kernels of the CPU library at ``path`` (already loaded) on torch's OpenMP threads
    where the settings allow and the library has the launcher; returns the pool they run on:
    ``torch (<runtime path>)`` or ``tvm (<why>)``."""
    path = str(path)
    with _lock:
        if path in _libraries:
            return _libraries[path]
    try:
        pool = _install_in(path)
    except Exception as exc:  # noqa: BLE001  (the kernels still run, on TVM's pool)
        logger.warning("could not put %s's kernels on torch's threads (%s: %s); they use TVM's "
                       "thread pool", path, type(exc).__name__, exc)
        pool = f"tvm ({type(exc).__name__}: {exc})"
    with _lock:
        _libraries[path] = pool
    logger.info("CPU kernels of %s run on %s", path, pool)
    return pool


def _install_in(path: str) -> str:
    if _forked:  # torch's team may be the parent's, whose threads the child lacks
        return _FORKED
    if _wanted() == "tvm":
        return "tvm (chosen by the settings)"
    runtime = openmp_runtime()
    if runtime is None:
        return "tvm (torch's OpenMP runtime not found)"
    omp, omp_path = runtime
    lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the handle tvm_ffi loaded
    if not hasattr(lib, LAUNCHER) or not hasattr(lib, SLOT):
        return "tvm (the library has no OpenMP launcher: rebuild it)"
    if hasattr(lib, "__TVMBackendParallelBarrier"):  # the launcher gives no barrier
        return "tvm (the library's kernels use parallel barriers)"
    slot = ctypes.c_void_p.in_dll(lib, SLOT)
    launcher = ctypes.cast(getattr(lib, LAUNCHER), ctypes.c_void_p).value
    if slot.value is None:
        return "tvm (the runtime has not filled the library's launch slot)"
    if slot.value != launcher:
        init = lib.lftvm_threads_init
        init.argtypes = [ctypes.c_void_p] * 3
        init.restype = ctypes.c_int
        cptr = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
        if init(cptr(omp.GOMP_parallel), cptr(omp.omp_get_max_threads), slot.value) != 0:
            return "tvm (the launcher refused the OpenMP runtime)"
        slot.value = launcher
    return f"torch ({omp_path})"


def pools() -> dict[str, str]:
    """{library path: the pool its kernels run on} for the CPU libraries loaded so far."""
    with _lock:
        return dict(_libraries)
