"""Finds, verifies and loads the compiled band kernels. The one owner of loaded libraries.

Libraries come from two places, each described by a ``manifest.json``:

* ``prebuilt/`` shipped with the package (next to it in a source checkout, or inside it);
* a per-user cache (``$LONGFORMER_TVM_CACHE``, else ``$XDG_CACHE_HOME/longformer_tvm``, else
  ``~/.cache/longformer_tvm``), filled by ``build_kernels.py`` when nothing shipped fits.

A library is used only if its target runs here (CPU architecture and features), its TVM / tvm-ffi
versions are the installed ones, its sources are the checkout's, its file lies inside its
manifest's folder and its sha256 matches the manifest -- checked before it is loaded, since loading
a library runs its code. A malformed manifest entry is skipped with a warning. Loading needs only
the TVM *runtime* (``tvm_ffi`` plus ``libtvm_runtime.so`` from the apache-tvm wheel); the ``tvm``
compiler package is never imported here.

Integrity failures (the file differs from its sha256, or does not load):

* **prebuilt**: :class:`KernelIntegrityError`, naming the file and how to repair it. A shipped file
  that does not match its manifest means a broken or altered installation; running something
  else instead would hide that.
* **cache**: logged, then rebuilt once (when the compiler is installed) and loaded; without the
  compiler the next library that fits is used, and the error is raised only if none does.

The cache: builds go to ``<cache>/v1-tvm<version>-ffi<version>-src<hash>/`` (see
:func:`cache_library_dir`), one folder per TVM / tvm-ffi release and kernel-source hash, where
``cpu/band_<isa>_<dtype>.so`` completes the key; so installations of other versions sharing one
cache never overwrite each other's libraries. The manifest at the cache's top level is read too
(libraries built there by hand with ``build_kernels.py build --out``). Builds run
``build_kernels.py`` in a subprocess under a file lock in that folder: of several processes that
need the same library at once one builds, the others wait and load its result. Writers rename
files into place and update the manifest under its lock (``tvm_kernels/export.py``); a reader
whose file does not match its entry looks again holding that lock, so a library being replaced
is never mistaken for a corrupt one.

``LONGFORMER_TVM_BACKEND``: ``auto`` (default: compiled kernels, building into the cache if
needed) or ``reference`` (the plain-PyTorch products of :mod:`longformer_tvm.reference`).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import subprocess
import sys
import threading
from pathlib import Path

import filelock
import torch

# LibraryEntry, read_manifest and sha256_file are used through this module by _cuda.py,
# tvm_kernels/export.py, the benchmarks and the tests.
from ._manifest import PRODUCTS, LibraryEntry, digest, read_manifest, sha256_file  # noqa: F401

logger = logging.getLogger("longformer_tvm")

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_DIR = _PACKAGE_DIR.parent
BUILD_SCRIPT = _REPO_DIR / "build_kernels.py"
KERNEL_SOURCES = _REPO_DIR / "tvm_kernels"

#: x86 ISA levels in order of preference, with the /proc/cpuinfo flags each needs.
CPU_ISAS = {
    "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "avx2": ("avx2", "fma"),
    "generic": (),
}


class KernelNotAvailableError(RuntimeError):
    """No compiled kernel fits this device, dtype and installation."""


class KernelIntegrityError(RuntimeError):
    """A library file does not match the sha256 its manifest records, or does not load."""


#: Layout of the per-user cache (the name of its versioned folders); bump it when that changes.
CACHE_LAYOUT = 1
#: How long a reader waits for a writer's manifest lock before it judges a file on its own.
MANIFEST_LOCK_TIMEOUT_S = 60.0


def prebuilt_dirs() -> list[Path]:
    """Where shipped libraries may live: inside the package (wheel) or beside it (checkout)."""
    return [p for p in (_PACKAGE_DIR / "prebuilt", _REPO_DIR / "prebuilt") if p.is_dir()]


def cache_dir() -> Path:
    env = os.environ.get("LONGFORMER_TVM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longformer_tvm"


def kernel_sources_hash() -> str | None:
    """sha256 over every kernel source of this checkout (``tvm_kernels/**/*.py`` and
    ``build_kernels.py``); None without them (an installed wheel, which builds nothing)."""
    if not KERNEL_SOURCES.is_dir():
        return None
    files = sorted(p.relative_to(_REPO_DIR).as_posix() for p in KERNEL_SOURCES.rglob("*.py"))
    if (_REPO_DIR / "build_kernels.py").is_file():
        files.append("build_kernels.py")
    return source_hash(files)


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


def host_cpu_features() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_isa() -> str:
    """The best CPU ISA level of :data:`CPU_ISAS` this machine runs."""
    have = host_cpu_features()
    return next((isa for isa, needs in CPU_ISAS.items() if set(needs) <= have), "generic")


def _machine(name: str) -> str:
    name = name.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


def installed_versions() -> dict[str, str]:
    out = {}
    for dist, key in (("apache-tvm", "tvm"), ("apache-tvm-ffi", "tvm_ffi")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = ""
    return out


def source_hash(files: list[str]) -> str | None:
    """sha256 over kernel definition sources (paths relative to the repository), None if absent.

    Each manifest entry lists the sources its binary was compiled from, so an edit to the CPU
    schedules leaves the CUDA libraries valid and vice versa.
    """
    h = hashlib.sha256()
    for rel in sorted(files):
        path = _REPO_DIR / rel
        if not path.is_file():
            return None
        h.update(rel.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def _tvm_lib_dir() -> Path | None:
    env = os.environ.get("LONGFORMER_TVM_RUNTIME_DIR")  # runtime libraries without apache-tvm
    if env:
        return Path(env).expanduser()
    spec = importlib.util.find_spec("tvm")  # locates the wheel without importing the compiler
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return lib if lib.is_dir() else None


def compiler_available() -> bool:
    lib = _tvm_lib_dir()
    return lib is not None and (lib / "libtvm_compiler.so").exists() and BUILD_SCRIPT.is_file()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def explain_missing(headline: str, candidates, what: str, build_cmd: str, needs: str) -> str:
    """The error text when no library fits: every candidate with why it was skipped, then how to
    build one (shared by the CPU and CUDA loaders)."""
    lines = [headline]
    lines += [f"  {entry.path.name}: {reason or 'usable'}" for entry, reason in candidates]
    if not candidates:
        lines.append(f"  no library {what} is listed in "
                     f"{[str(d) for d in prebuilt_dirs()] + [str(cache_dir())]}")
    lines.append(f"Build one with `{build_cmd}` ({needs}), or set LONGFORMER_TVM_BACKEND=reference "
                 "for the plain-PyTorch products.")
    return "\n".join(lines)


class _Registry:
    """Loaded libraries and the kernel chosen per (device, dtype). One instance; ``clear()`` resets."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._runtime_loaded = False
        self._modules: dict[Path, object] = {}
        self._chosen: dict[tuple[str, str], tuple[LibraryEntry, dict]] = {}
        self._build_attempted: set[tuple[str, str]] = set()

    def clear(self) -> None:
        with self._lock:
            self._modules.clear()
            self._chosen.clear()
            self._build_attempted.clear()

    # ---- runtime -------------------------------------------------------------------------
    def _load_runtime(self) -> None:
        if self._runtime_loaded:
            return
        import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime links against)

        lib = _tvm_lib_dir()
        if lib is None or not (lib / "libtvm_runtime.so").exists():
            raise KernelNotAvailableError(
                "the TVM runtime library (libtvm_runtime.so from the apache-tvm wheel) is not "
                "installed; install the pinned apache-tvm (pip install -e .)")
        # TVM's CPU thread pool sizes itself from TVM_NUM_THREADS when first used (its own
        # default is half the logical CPUs); follow torch's setting unless the user chose.
        os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
        # TVM's workers spin-wait after each kernel and take the cores from torch's threads in
        # the ops that follow (softmax, projections); let them sleep instead.
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
        ctypes.CDLL(str(lib / "libtvm_runtime.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
        self._runtime_loaded = True

    # ---- selection -----------------------------------------------------------------------
    def _library_dirs(self) -> list[tuple[Path, bool]]:
        """(folder, is_cache) in the order searched: shipped, this version's cache, cache top."""
        dirs = [(d, False) for d in prebuilt_dirs()]
        dirs += [(cache_library_dir(), True), (cache_dir(), True)]
        seen, out = set(), []
        for d, cached in dirs:
            if d not in seen:
                seen.add(d)
                out.append((d, cached))
        return out

    @staticmethod
    def _unusable(entry: LibraryEntry, features: frozenset[str], versions: dict) -> str:
        """Why ``entry`` cannot run here ('' if it can), from the manifest alone."""
        info = entry.info
        if info["device"] == "cpu":
            target = info.get("target")
            triple = target.get("mtriple") if isinstance(target, dict) else None
            if isinstance(triple, str) and _machine(triple.split("-")[0]) != _machine(platform.machine()):
                return f"built for {triple}, this machine is {platform.machine()}"
            missing = sorted(set(info.get("cpu_features", ())) - features)
            if missing:
                return f"needs CPU features {missing}"
        if info.get("tvm_ffi_version") != versions["tvm_ffi"]:
            return (f"built with tvm-ffi {info.get('tvm_ffi_version')}, installed "
                    f"{versions['tvm_ffi'] or 'none'}")
        if info.get("tvm_version") != versions["tvm"]:
            return f"built with TVM {info.get('tvm_version')}, installed {versions['tvm'] or 'none'}"
        if (KERNEL_SOURCES.is_dir() and info.get("sources")
                and source_hash(info["sources"]) not in (None, info.get("source_hash"))):
            return "built from other tvm_kernels sources (stale: rebuild)"
        if not entry.path.is_file():
            return f"file missing: {entry.path}"
        return ""

    def candidates(self, device: str, dtype: str) -> list[tuple[LibraryEntry, str]]:
        """Every manifest entry for (device, dtype) with the reason it is unusable ('' if usable)."""
        features = host_cpu_features()
        versions = installed_versions()
        out = []
        for directory, cached in self._library_dirs():
            for entry in read_manifest(directory, cached):
                if entry.info["device"] == device and entry.info["dtype"] == dtype:
                    out.append((entry, self._unusable(entry, features, versions)))
        return out

    def _choose(self, device: str, dtype: str) -> tuple[tuple[LibraryEntry, dict] | None,
                                                        list[KernelIntegrityError]]:
        """The best usable library that verifies and loads, and the cache libraries that did not.

        A shipped library that fails verification raises at once (see the module docstring).
        """
        usable = [e for e, reason in self.candidates(device, dtype) if not reason]
        rank = list(CPU_ISAS)
        usable.sort(key=lambda e: (rank.index(e.info.get("isa", "generic"))
                                   if e.info.get("isa") in rank else len(rank)))
        corrupt = []
        for entry in usable:
            try:
                return (entry, self.open(entry)), corrupt
            except KernelIntegrityError as exc:
                if not entry.cached:
                    raise
                logger.warning("%s", exc)
                corrupt.append(exc)
        return None, corrupt

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
            def look_again():
                return ([e for e in read_manifest(entry.directory, entry.cached) if e.path == entry.path],
                        digest(entry.path))

            lock = filelock.FileLock(str(entry.directory / "manifest.json.lock"),
                                     timeout=MANIFEST_LOCK_TIMEOUT_S)
            try:
                with lock:
                    fresh, found = look_again()
            except (OSError, filelock.Timeout) as exc:  # a read-only folder, a stuck writer
                logger.debug("could not take %s (%s); judging %s as it is", lock.lock_file, exc,
                             entry.path)
                fresh, found = look_again()
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
    def _repair_hint(entry: LibraryEntry) -> str:
        info = entry.info
        spec = (f"--target cpu --isa {info.get('isa', host_isa())}" if info["device"] == "cpu"
                else f"--target {info['device']} --arch {','.join(info.get('archs', [])) or 'auto'}")
        build = (f"`python build_kernels.py build {spec} --dtype {info['dtype']} "
                 f"--out {entry.directory or entry.path.parent}`")
        if entry.cached:
            return (f"It is in the kernel cache: delete it and call again to rebuild it (needs the "
                    f"TVM compiler: pip install -e .[build]), or run {build}.")
        return (f"It is a shipped library: reinstall longformer-tvm, or rebuild it with {build}; "
                f"deleting it makes the loader use the next library that fits (or build one into "
                f"the cache).")

    def open(self, entry: LibraryEntry) -> dict:
        """Verify ``entry``'s file against its sha256, load it once, return {product: function}."""
        with self._lock:
            module = self._modules.get(entry.path)
            if module is None:
                entry = self._verified(entry)
                self._load_runtime()
                import tvm_ffi

                try:
                    module = tvm_ffi.load_module(str(entry.path))
                except Exception as exc:  # noqa: BLE001  (whatever the runtime raises)
                    raise KernelIntegrityError(
                        f"{entry.path} matches its sha256 but did not load ({exc}). "
                        f"{self._repair_hint(entry)}") from exc
                self._modules[entry.path] = module
                logger.info("loaded %s (%s, %s)", entry.path, entry.info.get("isa"), entry.dtype)
            try:
                return {p: module[name] for p, name in entry.info["functions"].items()}
            except Exception as exc:  # noqa: BLE001
                raise KernelIntegrityError(
                    f"{entry.path} lacks a function its manifest names ({entry.info['functions']}): "
                    f"{exc}. {self._repair_hint(entry)}") from exc

    def _cache_holds(self, device: str, dtype: str, isa: str, directory: Path) -> bool:
        """Whether ``directory`` has a usable, verified library for (device, dtype, isa)."""
        for entry, reason in self.candidates(device, dtype):
            if entry.directory == directory and not reason and entry.info.get("isa") == isa:
                if digest(entry.path) == entry.info["sha256"]:
                    return True
        return False

    def _build(self, device: str, dtype: str) -> None:
        """Build the host's library into :func:`cache_library_dir`, unless another process did
        while this one waited for the build lock."""
        out = cache_library_dir()
        isa = host_isa()
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(out / f".loader-build-{device}-{dtype}.lock"))
            lock.acquire()
        except OSError as exc:
            raise KernelNotAvailableError(
                f"cannot write the kernel cache {out} ({exc}); set LONGFORMER_TVM_CACHE to a "
                "writable folder") from exc
        try:
            if self._cache_holds(device, dtype, isa, out):
                logger.info("another process built the %s %s %s kernels into %s", device, isa,
                            dtype, out)
                return
            cmd = [sys.executable, str(BUILD_SCRIPT), "build", "--target", device, "--isa", isa,
                   "--dtype", dtype, "--out", str(out)]
            logger.warning("no usable %s kernel for %s here; building into %s (%s)", device, dtype,
                           out, " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelNotAvailableError(
                    f"building the {device} {dtype} kernels failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
        finally:
            lock.release()

    def functions(self, device: str, dtype: str) -> dict:
        key = (device, dtype)
        with self._lock:
            if key in self._chosen:
                return self._chosen[key][1]
            chosen, corrupt = self._choose(device, dtype)
            if ((chosen is None or corrupt) and key not in self._build_attempted
                    and compiler_available()):
                self._build_attempted.add(key)
                self._build(device, dtype)
                chosen, corrupt = self._choose(device, dtype)
            if chosen is None:
                if corrupt:
                    raise corrupt[0]
                raise KernelNotAvailableError(self._explain(device, dtype))
            if corrupt:
                logger.warning("using %s instead of the corrupt cache libraries above", chosen[0].path)
            self._chosen[key] = chosen
            return chosen[1]

    def _explain(self, device: str, dtype: str) -> str:
        return explain_missing(
            f"no compiled band kernel for device={device!r}, dtype={dtype}.",
            self.candidates(device, dtype), "for this device and dtype",
            f"python build_kernels.py build --target {device} --dtype {dtype}",
            "needs the TVM compiler: pip install -e .[build]")

    def chosen(self) -> dict[tuple[str, str], LibraryEntry]:
        with self._lock:
            return {k: v[0] for k, v in self._chosen.items()}


REGISTRY = _Registry()


def kernel_for(product: str, t: torch.Tensor):
    """The compiled function for ``product`` on t's device and dtype; None under the reference backend."""
    if backend_mode() == "reference":
        return None
    device = t.device.type
    if device == "cuda":
        from . import _cuda

        return _cuda.kernel_for(product, t)
    if device != "cpu":
        raise KernelNotAvailableError(
            f"no compiled band kernel for device {t.device}: there are CPU and CUDA kernels only")
    return REGISTRY.functions(device, _dtype_name(t.dtype))[product]


def backend_info() -> dict:
    """Which backend serves which (device, dtype): loaded libraries and the candidates considered."""
    info = {"mode": backend_mode(), "versions": installed_versions(),
            "cpu_features": sorted(f for f in host_cpu_features() if f.startswith(("avx", "fma", "sse4"))),
            "prebuilt_dirs": [str(p) for p in prebuilt_dirs()], "cache_dir": str(cache_dir()),
            "cache_library_dir": str(cache_library_dir()),
            "loaded": {f"{d}/{t}": str(e.path) for (d, t), e in REGISTRY.chosen().items()},
            "available": {}}
    for device, dtype in (("cpu", "float32"), ("cpu", "float64")):
        info["available"][f"{device}/{dtype}"] = [
            {"file": str(e.path), "isa": e.info.get("isa"), "schedule": e.info.get("schedule"),
             "usable": not reason, "reason": reason}
            for e, reason in REGISTRY.candidates(device, dtype)]
    from . import _cuda

    info["cuda"] = _cuda.info()
    return info
