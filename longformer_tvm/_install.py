"""This installation: where libraries live, which TVM releases they must match, the settings read
from the environment, and loading the TVM runtime (with its CPU thread pool across ``fork()``).
No device knowledge here."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ._contract import BUILD_SCRIPT, KERNEL_SOURCES, PREBUILT_DIR, REPO_DIR, RUNTIME_DIR_ENV, \
    installed_versions, source_hash, tvm_lib_dir
from ._errors import KernelNotAvailableError

logger = logging.getLogger("longformer_tvm")

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


# ---- settings from the environment ---------------------------------------------------------
# Each reader returns the setting, or raises ValueError naming the variable, its value and what it
# accepts. Where a variable is read decides what a bad value does: LONGFORMER_TVM_LOG_LEVEL (at
# import) and LONGFORMER_TVM_POOL_MB (at import, _pool.py) warn and keep the default;
# TVM_NUM_THREADS warns and is replaced when the runtime loads; LONGFORMER_TVM_THREAD_POOL warns and
# keeps the default when a library loads (_threads.py); LONGFORMER_TVM_BACKEND makes every
# band product raise. None of them makes ``import longformer_tvm`` fail, and backend_info() lists
# them all under "errors".

LOG_LEVEL_ENV = "LONGFORMER_TVM_LOG_LEVEL"
BACKEND_ENV = "LONGFORMER_TVM_BACKEND"
POOL_ENV = "LONGFORMER_TVM_POOL_MB"
THREADS_ENV = "TVM_NUM_THREADS"
THREAD_POOL_ENV = "LONGFORMER_TVM_THREAD_POOL"
THREAD_POOLS = ("torch", "tvm")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BACKEND_MODES = ("auto", "reference")
#: Idle output memory kept by default (MiB), see _pool.py.
DEFAULT_POOL_MB = 1024


def _setting(name: str) -> str | None:
    raw = os.environ.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


def log_level() -> int | None:
    """``LONGFORMER_TVM_LOG_LEVEL``: a level name (any case) or a number; None where unset."""
    raw = _setting(LOG_LEVEL_ENV)
    if raw is None:
        return None
    if raw.upper() in LOG_LEVELS:
        return getattr(logging, raw.upper())
    if raw.isdigit():
        return int(raw)
    raise ValueError(f"{LOG_LEVEL_ENV}={raw!r} is not a log level: use one of "
                     f"{', '.join(LOG_LEVELS)} (any case) or a number")


def backend_mode() -> str:
    """``LONGFORMER_TVM_BACKEND``: ``auto`` (compiled kernels, the default) or ``reference``."""
    raw = _setting(BACKEND_ENV)
    mode = "auto" if raw is None else raw.lower()
    if mode not in BACKEND_MODES:
        raise ValueError(f"{BACKEND_ENV}={raw!r} is not a backend mode: use 'auto' (compiled "
                         "kernels, the default) or 'reference' (plain-PyTorch products), or unset it")
    return mode


def pool_limit_mb() -> int:
    """``LONGFORMER_TVM_POOL_MB``: MiB of idle output memory kept, a whole number >= 0."""
    raw = _setting(POOL_ENV)
    if raw is None:
        return DEFAULT_POOL_MB
    if not raw.isdigit():
        raise ValueError(f"{POOL_ENV}={raw!r} is not a whole number of MiB >= 0 (0 turns the "
                         f"output pool off; the default is {DEFAULT_POOL_MB})")
    return int(raw)


def tvm_num_threads() -> int | None:
    """``TVM_NUM_THREADS``: threads of TVM's CPU pool, a whole number >= 1; None where unset."""
    raw = _setting(THREADS_ENV)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        # TVM itself reads it with atoi: anything else would silently run single-threaded
        raise ValueError(f"{THREADS_ENV}={raw!r} is not a whole number of threads >= 1 (unset, "
                         "it follows torch.get_num_threads())")
    return int(raw)


def thread_pool() -> str | None:
    """``LONGFORMER_TVM_THREAD_POOL``: the threads CPU kernels run on, ``torch`` (torch's OpenMP
    threads) or ``tvm`` (TVM's own pool); None where unset (see :mod:`._threads`)."""
    raw = _setting(THREAD_POOL_ENV)
    if raw is None:
        return None
    if raw.lower() not in THREAD_POOLS:
        raise ValueError(f"{THREAD_POOL_ENV}={raw!r} is not a thread pool: use 'torch' (torch's "
                         "OpenMP threads, the default) or 'tvm' (TVM's own pool), or unset it")
    return raw.lower()


def setting_errors() -> list[str]:
    """What is wrong with the settings in the environment now ([] if nothing)."""
    errors = []
    for read in (log_level, backend_mode, pool_limit_mb, tvm_num_threads, thread_pool):
        try:
            read()
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def apply_import_settings() -> None:
    """At import: the package logger's level, and a warning for a bad LONGFORMER_TVM_BACKEND
    (which will make every band product raise)."""
    try:
        level = log_level()
    except ValueError as exc:
        logger.warning("%s; the log level is left as it is", exc)
        level = None
    if level is not None:
        logger.setLevel(level)
    try:
        backend_mode()
    except ValueError as exc:
        logger.warning("%s; until then the band products raise", exc)


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
    try:
        tvm_num_threads()
    except ValueError as exc:
        logger.warning("%s; using torch.get_num_threads() = %d", exc, torch.get_num_threads())
        del os.environ[THREADS_ENV]
    if THREADS_ENV not in os.environ:
        os.environ[THREADS_ENV] = str(torch.get_num_threads())
        AFTER_FORK.threads_follow_torch = True
    # TVM's workers spin-wait after each kernel and take the cores from torch's threads in the
    # ops that follow (softmax, projections); let them sleep instead.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    ctypes.CDLL(str(lib / "libtvm_runtime.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    AFTER_FORK.runtime_loaded = True


# ---- TVM's CPU thread pool across fork() ----------------------------------------------------

class ForkedThreadPool:
    """Runs CPU kernels in a child made by ``fork()`` (a DataLoader worker, say) that would hang.

    TVM runs a CPU kernel on a thread pool that belongs to the calling thread (thread-local),
    created on that thread's first parallel kernel; the caller waits for the pool's workers.
    ``fork()`` copies only the forking thread, so in the child that thread's pool has workers that
    do not exist, and its next kernel would wait for them forever. The pool cannot be rebuilt from
    outside (TVM's reset joins the missing workers), but any other thread gets a new pool of its
    own. So, in a child, :meth:`guard` sends the forking thread's kernel calls to one thread
    started in the child, which runs them on a fresh pool; other threads call as usual.

    In the child TVM_NUM_THREADS follows torch.get_num_threads() as read at the child's first
    kernel call (torch runs one thread in a DataLoader worker), unless the user set it; with one
    thread TVM runs kernels on the calling thread, without a pool, and none is started. The parent
    is not affected.
    """

    def __init__(self) -> None:
        self.runtime_loaded = False  # in this process, or in the parent before the fork
        self.threads_follow_torch = False  # TVM_NUM_THREADS was set by load_tvm_runtime
        self._forked_thread: int | None = None  # the thread whose pool lost its workers
        self._resync_threads = False
        self._runner: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._runner = None  # its thread, if any, stayed in the parent
        if self.runtime_loaded:
            self._forked_thread = threading.get_ident()
            self._resync_threads = self.threads_follow_torch

    def guard(self, fn):
        """``fn`` (a CPU kernel), or a stand-in that runs it where it cannot hang."""
        if self._forked_thread is None:  # not a child of a process that had loaded TVM
            return fn
        with self._lock:
            if self._resync_threads:
                self._resync_threads = False
                os.environ[THREADS_ENV] = str(torch.get_num_threads())
        if threading.get_ident() != self._forked_thread or self.threads() == 1:
            return fn
        return functools.partial(self._run, fn)

    def threads(self) -> int:
        """The threads a TVM CPU kernel uses now (TVM reads TVM_NUM_THREADS at each call)."""
        try:
            return tvm_num_threads() or 1
        except ValueError:
            return 1  # TVM's atoi reads it as 0, and runs on the calling thread

    def _run(self, fn, *args):
        with self._lock:
            if self._runner is None:
                self._runner = ThreadPoolExecutor(1, thread_name_prefix="longformer_tvm-forked")
            runner = self._runner
        return runner.submit(fn, *args).result()


#: The one owner of the state above (per process: fork() gives the child its copy).
AFTER_FORK = ForkedThreadPool()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=AFTER_FORK.after_fork_in_child)
