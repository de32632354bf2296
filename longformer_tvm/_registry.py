"""Finds, verifies and loads compiled libraries for any backend; knows no device.

Libraries come from manifests (``manifest.json``) in three kinds of folder, searched in order:

* ``prebuilt/`` shipped with the package (inside it in a wheel, beside it in a checkout);
* this installation's cache folder, ``<cache>/v1-tvm<ver>-ffi<ver>-src<hash>/`` (see
  :func:`cache_library_dir`), where builds on demand go; one per TVM / tvm-ffi release and
  kernel-source hash, so installations sharing one cache never overwrite each other's libraries;
* the top of the cache (``$LONGFORMER_TVM_CACHE``, else ``$XDG_CACHE_HOME/longformer_tvm``, else
  ``~/.cache/longformer_tvm``): libraries built there by hand with ``build_kernels.py --out``.

Each device is a :class:`Backend` (``_cpu.py``, ``_cuda.py``): how it keys a request, which
reasons of its own rule an entry out, how it ranks entries, how it loads its runtime and wraps a
function, what build command it suggests. :func:`unusable_reasons` is the one eligibility rule
(the reasons common to every device, then the backend's); loading, ``backend_info()`` and the
"no kernel fits" message all use it.

A library is loaded only after its sha256 matches its manifest (loading runs its code). When it
does not, or the file does not load: a **shipped** library raises :class:`KernelIntegrityError`
(a broken or altered installation; running something else would hide it); a **cache** library is
logged and the next candidate tried, and a backend that builds on demand rebuilds it once.
Builds on demand run ``build_kernels.py`` in a subprocess under a file lock in the cache folder:
of several processes that need the same library one builds, the others wait and load its result.
Writers rename files into place and update the manifest under its lock
(``tvm_kernels/publish.py``); a reader whose file does not match its entry looks again holding
that lock, so a library being replaced is never mistaken for a corrupt one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import filelock
import torch

from . import _install
from ._contract import KERNEL_SOURCES, WINDOW_ARG, source_hash
from ._errors import KernelIntegrityError, KernelNotAvailableError
from ._manifest import LibraryEntry, digest, read_manifest

logger = logging.getLogger("longformer_tvm")

#: How long a reader waits for a writer's manifest lock before it judges a file on its own.
MANIFEST_LOCK_TIMEOUT_S = 60.0

#: A request for a library: (device, dtype, arch); arch is '' where the device has none, or for
#: "any architecture" in queries.
Key = tuple[str, str, str]


# ---- the backend interface and the one eligibility rule ------------------------------------

class Backend:
    """What the registry asks of a device. Subclasses set ``device`` and ``dtypes``."""

    device: str = ""
    dtypes: tuple[str, ...] = ()
    #: Whether a missing library is built into the cache at call time (needs the TVM compiler).
    builds_on_demand = False

    def key(self, device: torch.device, dtype: str) -> Key:
        return (self.device, dtype, "")

    def reasons(self, entry: LibraryEntry, key: Key) -> list[str]:
        """This device's reasons why ``entry`` cannot serve ``key`` (from the manifest alone)."""
        return []

    def rank(self, entry: LibraryEntry, key: Key):
        """Sort key among usable entries: the smallest is tried first."""
        return 0

    def load_runtime(self) -> None:
        _install.load_tvm_runtime()

    def admit(self, entry: LibraryEntry, key: Key) -> None:
        """Last check before ``entry`` is loaded for ``key``; raises KernelNotAvailableError."""

    def wrap(self, functions: dict, key: Key) -> dict:
        return functions

    def loaded(self, entry: LibraryEntry) -> None:
        """Called once a library of this device has been loaded (before its functions are used)."""

    def build_command(self, key: Key) -> str:
        """The command a user runs to build a library for ``key``."""
        raise NotImplementedError

    def build_args(self, key: Key) -> list[str]:
        """``build_kernels.py build`` arguments of a build on demand (after --target, before --dtype)."""
        return []

    def builds(self, entry: LibraryEntry, key: Key) -> bool:
        """Whether ``entry`` is what a build on demand for ``key`` writes."""
        return True

    def repair_args(self, entry: LibraryEntry) -> list[str]:
        """``build_kernels.py build`` arguments that rebuild ``entry`` (after --target)."""
        return []

    def describe(self, key: Key) -> str:
        return f"device={self.device!r}, dtype={key[1]}"

    def info(self) -> dict:
        return {}


class Dispatch:
    """A product's compiled variants, chosen per call by the band's width: the first row whose
    ``max_columns`` is at least ``left + right + 1`` (the manifest's ``variants`` table, which
    tuning produced). Called like the kernels themselves."""

    __slots__ = ("product", "rows", "_left")

    def __init__(self, product: str, rows: list):
        self.product, self.rows = product, rows
        self._left = WINDOW_ARG[product]

    def choose(self, left: int, right: int) -> tuple[str, object]:
        """(symbol, function) serving a band of ``left`` and ``right`` diagonals."""
        columns = left + right + 1
        for most, name, fn in self.rows:
            if most is None or columns <= most:
                return name, fn
        return self.rows[-1][1], self.rows[-1][2]

    def __call__(self, *args):
        return self.choose(args[self._left], args[self._left + 1])[1](*args)

    def __repr__(self) -> str:
        return f"Dispatch({self.product}: {[(m, n) for m, n, _ in self.rows]})"


def unusable_reasons(entry: LibraryEntry, key: Key, backend: Backend,
                     versions: dict[str, str]) -> list[str]:
    """Every reason ``entry`` cannot serve ``key`` here ([] if it can): the rules every device
    shares (versions, stale sources, the file), then ``backend``'s own."""
    info, out = entry.info, []
    if info["device"] != key[0] or info["dtype"] != key[1]:
        out.append(f"built for {info['device']}/{info['dtype']}, not {key[0]}/{key[1]}")
    if info.get("tvm_ffi_version") != versions["tvm_ffi"]:
        out.append(f"built with tvm-ffi {info.get('tvm_ffi_version')}, installed "
                   f"{versions['tvm_ffi'] or 'none'}")
    if info.get("tvm_version") != versions["tvm"]:
        out.append(f"built with TVM {info.get('tvm_version')}, installed {versions['tvm'] or 'none'}")
    if (KERNEL_SOURCES.is_dir() and info.get("sources")
            and source_hash(info["sources"]) not in (None, info.get("source_hash"))):
        out.append("built from other tvm_kernels sources (stale: rebuild)")
    if not entry.path.is_file():
        out.append(f"file missing: {entry.path}")
    return out + backend.reasons(entry, key)


class Candidate:
    """A manifest entry considered for a key, with every reason it cannot serve it."""

    __slots__ = ("entry", "reasons")

    def __init__(self, entry: LibraryEntry, reasons: list[str]):
        self.entry, self.reasons = entry, tuple(reasons)

    @property
    def usable(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def __repr__(self) -> str:
        return f"Candidate({self.entry.path.name}, {self.reason or 'usable'})"


def label(key: Key) -> str:
    """``cpu/float32``, ``cuda/sm_90/float32``."""
    return "/".join(part for part in (key[0], key[2], key[1]) if part)


#: Every Registry, so that a child made by fork() gets each one's lock unheld.
_LIVE: weakref.WeakSet[Registry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # a lock another thread held at fork time (loading or building a library) is never released
    # in the child, where that thread does not exist
    for registry in list(_LIVE):
        registry._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Registry:
    """The one owner of loaded libraries and of the library chosen per key, for every backend in
    its table; ``clear()`` forgets all of them.

    ``prebuilt_dirs`` and ``compiler`` default to this installation's (:mod:`._install`); tools and
    tests pass their own to look at other folders.
    """

    def __init__(self, backends: dict[str, Backend], prebuilt_dirs: list[Path] | None = None,
                 compiler: bool | None = None) -> None:
        self.backends = backends
        self._prebuilt, self._compiler = prebuilt_dirs, compiler
        self._lock = threading.RLock()
        _LIVE.add(self)
        self._modules: dict[Path, object] = {}
        self._chosen: dict[Key, tuple[LibraryEntry, dict]] = {}
        self._build_attempted: set[Key] = set()

    def clear(self) -> None:
        with self._lock:
            self._modules.clear()
            self._chosen.clear()
            self._build_attempted.clear()

    def backend(self, device: str) -> Backend:
        try:
            return self.backends[device]
        except KeyError:
            raise KernelNotAvailableError(
                f"no compiled band kernel for device {device!r}: there are kernels for "
                f"{sorted(self.backends)} only") from None

    def prebuilt_dirs(self) -> list[Path]:
        return _install.prebuilt_dirs() if self._prebuilt is None else list(self._prebuilt)

    def compiler_available(self) -> bool:
        return _install.compiler_available() if self._compiler is None else self._compiler

    def library_dirs(self) -> list[tuple[Path, bool]]:
        """(folder, is_cache) in the order searched: shipped, this version's cache, cache top."""
        dirs = [(d, False) for d in self.prebuilt_dirs()]
        dirs += [(_install.cache_library_dir(), True), (_install.cache_dir(), True)]
        seen: set[Path] = set()
        return [(d, c) for d, c in dirs if not (d in seen or seen.add(d))]

    # ---- eligibility ---------------------------------------------------------------------
    def reasons(self, entry: LibraryEntry, key: Key) -> list[str]:
        return unusable_reasons(entry, key, self.backend(key[0]), _install.runtime_versions())

    def candidates(self, key: Key) -> list[Candidate]:
        """Every manifest entry for key's device and dtype, with its reasons ([] if usable)."""
        backend, versions = self.backend(key[0]), _install.runtime_versions()
        return [Candidate(entry, unusable_reasons(entry, key, backend, versions))
                for directory, cached in self.library_dirs()
                for entry in read_manifest(directory, cached)
                if entry.info["device"] == key[0] and entry.info["dtype"] == key[1]]

    def explain(self, key: Key) -> str:
        """The error text when no library fits: every candidate with its reasons, then the build."""
        backend = self.backend(key[0])
        cands = self.candidates(key)
        lines = [f"no compiled band kernel for {backend.describe(key)}."]
        lines += [f"  {c.entry.path.name}: {c.reason or 'usable'}" for c in cands]
        if not cands:
            where = [str(d) for d, _ in self.library_dirs()]
            lines.append(f"  no library for this device and dtype ({key[0]}/{key[1]}) is listed "
                         f"in {where}")
        lines.append(f"Build one with `{backend.build_command(key)}` (needs the TVM compiler: pip "
                     "install -e .[build]), or set LONGFORMER_TVM_BACKEND=reference for the "
                     "plain-PyTorch products.")
        return "\n".join(lines)

    # ---- choosing and loading ------------------------------------------------------------
    def functions(self, key: Key) -> dict:
        """{product: function} of the best library for ``key``, loaded once; builds on demand."""
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen[1]
        backend = self.backend(key[0])
        if key[1] not in backend.dtypes:
            raise KernelNotAvailableError(
                f"the {key[0]} band kernels support dtype in {backend.dtypes}, got dtype={key[1]}; "
                "cast the inputs (on CUDA, torch.autocast('cuda') runs them in half precision)")
        with self._lock:
            if key in self._chosen:
                return self._chosen[key][1]
            chosen, corrupt = self._choose(key)
            if ((chosen is None or corrupt) and backend.builds_on_demand
                    and key not in self._build_attempted and self.compiler_available()):
                self._build_attempted.add(key)
                self._build(key)
                chosen, corrupt = self._choose(key)
            if chosen is None:
                if corrupt:
                    raise corrupt[0]
                raise KernelNotAvailableError(self.explain(key))
            if corrupt:
                logger.warning("using %s instead of the corrupt cache libraries above", chosen[0].path)
            logger.info("%s: %s", label(key), chosen[0].path)
            self._chosen[key] = chosen
            return chosen[1]

    def _choose(self, key: Key) -> tuple[tuple[LibraryEntry, dict] | None, list[KernelIntegrityError]]:
        """The best usable library that verifies and loads, and the cache libraries that did not.
        A shipped library that fails verification raises at once (see the module docstring)."""
        backend = self.backend(key[0])
        usable = sorted((c.entry for c in self.candidates(key) if c.usable),
                        key=lambda e: backend.rank(e, key))
        corrupt = []
        for entry in usable:
            try:
                backend.admit(entry, key)
                return (entry, backend.wrap(self.open(entry), key)), corrupt
            except KernelIntegrityError as exc:
                if not entry.cached:
                    raise
                logger.warning("%s", exc)
                corrupt.append(exc)
        return None, corrupt

    def open(self, entry: LibraryEntry) -> dict:
        """Verify ``entry``'s file against its sha256, load it once, return {product: function}."""
        with self._lock:
            module = self._modules.get(entry.path)
            if module is None:
                entry = self._verified(entry)
                self.backend(entry.device).load_runtime()
                import tvm_ffi

                try:
                    module = tvm_ffi.load_module(str(entry.path))
                except Exception as exc:  # noqa: BLE001  (whatever the runtime raises)
                    raise KernelIntegrityError(
                        f"{entry.path} matches its sha256 but did not load ({exc}). "
                        f"{self._repair_hint(entry)}") from exc
                self.backend(entry.device).loaded(entry)
                self._modules[entry.path] = module
                logger.info("loaded %s (%s, %s)", entry.path,
                            entry.info.get("isa") or entry.info.get("archs"), entry.dtype)
            try:
                functions = {p: module[name] for p, name in entry.info["functions"].items()}
                for product, rows in (entry.info.get("variants") or {}).items():
                    functions[product] = Dispatch(product, [
                        (row["max_columns"], row["function"], module[row["function"]]) for row in rows])
                return functions
            except Exception as exc:  # noqa: BLE001
                raise KernelIntegrityError(
                    f"{entry.path} lacks a function its manifest names ({entry.info['functions']}): "
                    f"{exc}. {self._repair_hint(entry)}") from exc

    def _verified(self, entry: LibraryEntry) -> LibraryEntry:
        """``entry``, or its manifest's newer entry for the same file, whose sha256 the file has.

        A writer renames a new file into place and then rewrites the manifest, both under the
        manifest's lock; a reader that sees the new file with the old entry looks again holding
        that lock, so a library being rebuilt is not mistaken for a corrupt one.
        """
        want = entry.info["sha256"]
        found = digest(entry.path)
        if found == want:
            return entry
        if entry.directory is not None:
            fresh, found = self._look_again(entry)
            same_build = lambda e: all(e.info.get(k) == entry.info.get(k)  # noqa: E731
                                       for k in ("device", "dtype", "tvm_version", "tvm_ffi_version"))
            for e in fresh:
                if found == e.info["sha256"] and same_build(e):
                    logger.info("%s was replaced while loading; using its new manifest entry", e.path)
                    return e
            want = fresh[0].info["sha256"] if fresh else want
        raise KernelIntegrityError(
            f"{entry.path}: sha256 {found or '(unreadable)'} does not match its manifest "
            f"{(entry.directory or entry.path.parent) / 'manifest.json'} ({want}); the file is "
            f"truncated, corrupted or was replaced, and was not loaded. {self._repair_hint(entry)}")

    @staticmethod
    def _look_again(entry: LibraryEntry) -> tuple[list[LibraryEntry], str | None]:
        """The manifest's entries for entry's file and the file's digest, read under the lock."""
        def read():
            return ([e for e in read_manifest(entry.directory, entry.cached) if e.path == entry.path],
                    digest(entry.path))

        lock = filelock.FileLock(str(entry.directory / "manifest.json.lock"),
                                 timeout=MANIFEST_LOCK_TIMEOUT_S)
        try:
            with lock:
                return read()
        except (OSError, filelock.Timeout) as exc:  # a read-only folder, a stuck writer
            logger.debug("could not take %s (%s); judging %s as it is", lock.lock_file, exc, entry.path)
            return read()

    def _repair_hint(self, entry: LibraryEntry) -> str:
        spec = " ".join(["--target", entry.device, *self.backend(entry.device).repair_args(entry)])
        build = (f"`python build_kernels.py build {spec} --dtype {entry.dtype} "
                 f"--out {entry.directory or entry.path.parent}`")
        if entry.cached:
            return (f"It is in the kernel cache: delete it and call again to rebuild it (needs the "
                    f"TVM compiler: pip install -e .[build]), or run {build}.")
        return (f"It is a shipped library: reinstall longformer-tvm, or rebuild it with {build}; "
                f"deleting it makes the loader use the next library that fits (or build one into "
                f"the cache).")

    # ---- building on demand --------------------------------------------------------------
    def _cache_holds(self, key: Key, directory: Path) -> bool:
        """Whether ``directory`` has a usable, verified library a build for ``key`` would write."""
        backend = self.backend(key[0])
        return any(c.usable and c.entry.directory == directory and backend.builds(c.entry, key)
                   and digest(c.entry.path) == c.entry.info["sha256"] for c in self.candidates(key))

    def _build(self, key: Key) -> None:
        """Build key's library into the cache folder, unless another process did while this one
        waited for the build lock."""
        device, dtype, _ = key
        out = _install.cache_library_dir()
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(out / f".loader-build-{device}-{dtype}.lock"))
            lock.acquire()
        except OSError as exc:
            raise KernelNotAvailableError(
                f"cannot write the kernel cache {out} ({exc}); set LONGFORMER_TVM_CACHE to a "
                "writable folder") from exc
        try:
            if self._cache_holds(key, out):
                logger.info("another process built the %s kernels into %s", label(key), out)
                return
            cmd = [sys.executable, str(_install.BUILD_SCRIPT), "build", "--target", device,
                   *self.backend(device).build_args(key), "--dtype", dtype, "--out", str(out)]
            logger.warning("no usable %s kernel for %s here; building into %s (%s)", device, dtype,
                           out, " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelNotAvailableError(
                    f"building the {device} {dtype} kernels failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
        finally:
            lock.release()

    # ---- queries -------------------------------------------------------------------------
    def chosen(self) -> dict[Key, LibraryEntry]:
        with self._lock:
            return {k: v[0] for k, v in self._chosen.items()}
