"""Finds, verifies and loads the compiled band kernels. The one owner of loaded libraries.

Libraries come from two places, each described by a ``manifest.json``:

* ``prebuilt/`` shipped with the package (next to it in a source checkout, or inside it);
* a per-user cache (``$LONGFORMER_TVM_CACHE``, else ``$XDG_CACHE_HOME/longformer_tvm``, else
  ``~/.cache/longformer_tvm``), filled by ``build_kernels.py`` when nothing shipped fits.

A library is used only if its target runs here (CPU features), its TVM / tvm-ffi versions are the
installed ones and its sha256 matches the manifest. Loading needs only the TVM *runtime*
(``tvm_ffi`` plus ``libtvm_runtime.so`` from the apache-tvm wheel); the ``tvm`` compiler package is
never imported here. Building runs ``build_kernels.py`` in a subprocess when the compiler is
installed.

``LONGFORMER_TVM_BACKEND``: ``auto`` (default: compiled kernels, building into the cache if
needed) or ``reference`` (the plain-PyTorch products of :mod:`longformer_tvm.reference`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

logger = logging.getLogger("longformer_tvm")

PRODUCTS = ("qk", "pv", "tpv")
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
    """A library file does not match the sha256 its manifest records."""


def prebuilt_dirs() -> list[Path]:
    """Where shipped libraries may live: inside the package (wheel) or beside it (checkout)."""
    return [p for p in (_PACKAGE_DIR / "prebuilt", _REPO_DIR / "prebuilt") if p.is_dir()]


def cache_dir() -> Path:
    env = os.environ.get("LONGFORMER_TVM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longformer_tvm"


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
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


@dataclasses.dataclass(frozen=True)
class LibraryEntry:
    """One manifest entry, resolved to a path."""

    path: Path
    info: dict

    @property
    def device(self) -> str:
        return self.info["device"]

    @property
    def dtype(self) -> str:
        return self.info["dtype"]


def read_manifest(directory: Path) -> list[LibraryEntry]:
    path = directory / "manifest.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [LibraryEntry(directory / e["file"], e) for e in data["libraries"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable manifest %s: %s", path, exc)
        return []


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        ctypes.CDLL(str(lib / "libtvm_runtime.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
        self._runtime_loaded = True

    # ---- selection -----------------------------------------------------------------------
    def candidates(self, device: str, dtype: str) -> list[tuple[LibraryEntry, str]]:
        """Every manifest entry for (device, dtype) with the reason it is unusable ('' if usable)."""
        features = host_cpu_features()
        versions = installed_versions()
        out = []
        for directory in [*prebuilt_dirs(), cache_dir()]:
            for entry in read_manifest(directory):
                info = entry.info
                if info.get("device") != device or info.get("dtype") != dtype:
                    continue
                reason = ""
                missing = sorted(set(info.get("cpu_features", ())) - features) if device == "cpu" else []
                if missing:
                    reason = f"needs CPU features {missing}"
                elif info.get("tvm_ffi_version") != versions["tvm_ffi"]:
                    reason = (f"built with tvm-ffi {info.get('tvm_ffi_version')}, installed "
                              f"{versions['tvm_ffi'] or 'none'}")
                elif info.get("tvm_version") != versions["tvm"]:
                    reason = f"built with TVM {info.get('tvm_version')}, installed {versions['tvm'] or 'none'}"
                elif (KERNEL_SOURCES.is_dir() and info.get("sources")
                      and source_hash(info["sources"]) not in (None, info.get("source_hash"))):
                    reason = "built from other tvm_kernels sources (stale: rebuild)"
                elif not entry.path.is_file():
                    reason = f"file missing: {entry.path}"
                out.append((entry, reason))
        return out

    def _choose(self, device: str, dtype: str) -> tuple[LibraryEntry, dict] | None:
        usable = [e for e, reason in self.candidates(device, dtype) if not reason]
        if not usable:
            return None
        rank = list(CPU_ISAS)
        usable.sort(key=lambda e: (rank.index(e.info.get("isa", "generic"))
                                   if e.info.get("isa") in rank else len(rank)))
        entry = usable[0]
        return entry, self.open(entry)

    def open(self, entry: LibraryEntry) -> dict:
        """Verify ``entry``'s file against its sha256, load it once, return {product: function}."""
        with self._lock:
            module = self._modules.get(entry.path)
            if module is None:
                digest = sha256_file(entry.path)
                if digest != entry.info.get("sha256"):
                    raise KernelIntegrityError(
                        f"{entry.path}: sha256 {digest} does not match its manifest "
                        f"({entry.info.get('sha256')}); the file was modified or truncated. "
                        f"Delete it and run `python build_kernels.py build` to rebuild.")
                self._load_runtime()
                import tvm_ffi

                module = tvm_ffi.load_module(str(entry.path))
                self._modules[entry.path] = module
                logger.info("loaded %s (%s, %s)", entry.path, entry.info.get("isa"), entry.dtype)
            return {p: module[name] for p, name in entry.info["functions"].items()}

    def _build(self, device: str, dtype: str) -> None:
        cmd = [sys.executable, str(BUILD_SCRIPT), "build", "--target", device, "--dtype", dtype,
               "--out", str(cache_dir())]
        logger.warning("no prebuilt %s kernel for %s fits this machine; building into %s (%s)",
                       device, dtype, cache_dir(), " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelNotAvailableError(
                f"building the {device} {dtype} kernels failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}")

    def functions(self, device: str, dtype: str) -> dict:
        key = (device, dtype)
        with self._lock:
            if key in self._chosen:
                return self._chosen[key][1]
            chosen = self._choose(device, dtype)
            if chosen is None and key not in self._build_attempted and compiler_available():
                self._build_attempted.add(key)
                self._build(device, dtype)
                chosen = self._choose(device, dtype)
            if chosen is None:
                raise KernelNotAvailableError(self._explain(device, dtype))
            self._chosen[key] = chosen
            return chosen[1]

    def _explain(self, device: str, dtype: str) -> str:
        lines = [f"no compiled band kernel for device={device!r}, dtype={dtype}."]
        cands = self.candidates(device, dtype)
        for entry, reason in cands:
            lines.append(f"  {entry.path.name}: {reason or 'usable'}")
        if not cands:
            lines.append("  no library for this device and dtype is listed in "
                         f"{[str(d) for d in prebuilt_dirs()] + [str(cache_dir())]}")
        lines.append("Build them with `python build_kernels.py build --target "
                     f"{device} --dtype {dtype}` (needs the TVM compiler: pip install -e .[build]), "
                     "or set LONGFORMER_TVM_BACKEND=reference for the plain-PyTorch products.")
        return "\n".join(lines)

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
