"""The CUDA kernels at run time: the TVM CUDA runtime, and the library that fits a GPU.

Needs no ``import tvm``: the TVM runtime libraries come from the apache-tvm wheel's ``lib/``
(found with ``importlib.util.find_spec`` only) or, where apache-tvm is not installed, from
``$LONGFORMER_TVM_RUNTIME_DIR`` (a folder holding ``libtvm_runtime.so`` and
``libtvm_runtime_cuda.so``, plus optionally a ``VERSION`` file naming the apache-tvm release they
came from). Load order, each with ``RTLD_GLOBAL``:

1. ``tvm_ffi`` (``libtvm_ffi.so``) and ``libtvm_runtime.so`` (as for the CPU kernels);
2. the CUDA 13 runtime ``libcudart.so.13`` by absolute path -- from ``$LONGFORMER_TVM_CUDART``, the
   ``nvidia-cuda-runtime`` wheel (the ``cuda`` extra), or ``$CUDA_HOME`` -- so that it is found
   even beside a PyTorch built for another CUDA version;
3. ``libtvm_runtime_cuda.so``, which registers TVM's CUDA module loader (needs the driver,
   ``libcuda.so.1``, of at least the version the libraries were built for).

A library is chosen per (GPU architecture, dtype): one whose fatbin holds SASS for the GPU's
``sm_XY`` first, else one whose PTX the driver can compile for it. Each call runs on the tensor's
device (made current for the call when it is not) and on that device's *current* PyTorch stream:
tvm-ffi reads the stream of the first CUDA tensor argument and sets it as the call's environment
stream, which is the stream TVM launches on.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import threading
from pathlib import Path

import torch

from . import _loader

logger = logging.getLogger("longformer_tvm")

RUNTIME_DIR_ENV = "LONGFORMER_TVM_RUNTIME_DIR"
CUDART_ENV = "LONGFORMER_TVM_CUDART"
CUDART_SONAME = "libcudart.so.13"
DTYPES = ("float32", "float16", "bfloat16")
BUILD_HINT = "python build_kernels.py build --target cuda --arch {arch} --dtype {dtype}"
BUILD_NEEDS = "on any machine with nvcc; needs the TVM compiler: pip install -e .[build]"


def runtime_dir() -> Path | None:
    """Folder of libtvm_runtime*.so: $LONGFORMER_TVM_RUNTIME_DIR, else the apache-tvm wheel's."""
    return _loader._tvm_lib_dir()


def runtime_version() -> str:
    """The apache-tvm release of the runtime libraries in use ('' when unknown)."""
    env = os.environ.get(RUNTIME_DIR_ENV)
    if env:
        version = Path(env).expanduser() / "VERSION"
        if version.is_file():
            return version.read_text(encoding="utf-8").strip()
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return ""


def find_cudart() -> Path | None:
    """Absolute path of libcudart.so.13, or None (then the system loader is asked by name)."""
    env = os.environ.get(CUDART_ENV)
    if env:
        return Path(env).expanduser()
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13/lib", "cuda_runtime/lib"):
            cand = Path(base) / sub / CUDART_SONAME
            if cand.is_file():
                return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if home and (Path(home) / sub / CUDART_SONAME).is_file():
                return Path(home) / sub / CUDART_SONAME
    return None


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _arch_number(arch: str) -> int:
    return int("".join(ch for ch in arch.removeprefix("sm_").removeprefix("compute_") if ch.isdigit()))


def _fits(info: dict, arch: str) -> bool:
    """SASS for exactly this architecture, or PTX of one not above it (the driver compiles it)."""
    if arch in info.get("archs", ()):
        return True
    ptx = info.get("ptx_arch")
    return bool(ptx) and _arch_number(ptx) <= _arch_number(arch)


class _CudaRuntime:
    """Loads the CUDA runtime pieces once; the chosen library per (arch, dtype). ``clear()`` resets."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cudart: ctypes.CDLL | None = None
        self._chosen: dict[tuple[str, str], tuple[_loader.LibraryEntry, dict]] = {}

    def clear(self) -> None:
        with self._lock:
            self._chosen.clear()

    def load(self) -> None:
        with self._lock:
            if self._cudart is not None:
                return
            lib = runtime_dir()
            if lib is None or not (lib / "libtvm_runtime_cuda.so").is_file():
                raise _loader.KernelNotAvailableError(
                    "the TVM CUDA runtime (libtvm_runtime_cuda.so from the apache-tvm wheel) was not "
                    f"found; install apache-tvm (pip install -e .[cuda]) or set {RUNTIME_DIR_ENV} to a "
                    "folder holding libtvm_runtime.so and libtvm_runtime_cuda.so")
            _loader.REGISTRY._load_runtime()
            cudart = find_cudart()
            try:
                handle = ctypes.CDLL(str(cudart) if cudart else CUDART_SONAME,
                                     mode=os.RTLD_GLOBAL | os.RTLD_NOW)
            except OSError as exc:
                raise _loader.KernelNotAvailableError(
                    f"the CUDA 13 runtime ({CUDART_SONAME}) could not be loaded ({exc}); install the "
                    f"cuda extra (pip install -e .[cuda], which brings nvidia-cuda-runtime 13) or "
                    f"set {CUDART_ENV}=/path/to/{CUDART_SONAME}") from exc
            try:
                ctypes.CDLL(str(lib / "libtvm_runtime_cuda.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
            except OSError as exc:
                raise _loader.KernelNotAvailableError(
                    f"libtvm_runtime_cuda.so did not load ({exc}); it needs the NVIDIA driver "
                    "(libcuda.so.1) of a version that supports CUDA 13 (Linux driver >= 580)") from exc
            self._cudart = handle
            logger.info("loaded the TVM CUDA runtime from %s with %s", lib, cudart or CUDART_SONAME)

    def driver_version(self) -> int:
        """The CUDA version the driver supports (e.g. 13000), 0 if unknown."""
        self.load()
        version = ctypes.c_int(0)
        if self._cudart.cudaDriverGetVersion(ctypes.byref(version)) != 0:
            return 0
        return version.value

    def candidates(self, dtype: str, arch: str | None = None) -> list[tuple[_loader.LibraryEntry, str]]:
        """Every CUDA manifest entry for ``dtype`` with the reason it is unusable ('' if usable)."""
        versions = {"tvm": runtime_version(), "tvm_ffi": _loader.installed_versions()["tvm_ffi"]}
        out = []
        for directory in [*_loader.prebuilt_dirs(), _loader.cache_dir()]:
            for entry in _loader.read_manifest(directory):
                info = entry.info
                if info.get("device") != "cuda" or info.get("dtype") != dtype:
                    continue
                reason = ""
                if info.get("tvm_ffi_version") != versions["tvm_ffi"]:
                    reason = (f"built with tvm-ffi {info.get('tvm_ffi_version')}, installed "
                              f"{versions['tvm_ffi'] or 'none'}")
                elif info.get("tvm_version") != versions["tvm"]:
                    reason = (f"built with TVM {info.get('tvm_version')}, runtime "
                              f"{versions['tvm'] or 'unknown'}")
                elif (_loader.KERNEL_SOURCES.is_dir() and info.get("sources")
                      and _loader.source_hash(info["sources"]) not in (None, info.get("source_hash"))):
                    reason = "built from other tvm_kernels sources (stale: rebuild)"
                elif not entry.path.is_file():
                    reason = f"file missing: {entry.path}"
                elif arch is not None and not _fits(info, arch):
                    reason = (f"holds SASS for {info.get('archs')} and PTX for {info.get('ptx_arch')}, "
                              f"not {arch}")
                out.append((entry, reason))
        return out

    def functions(self, device: torch.device, dtype: str) -> dict:
        arch = device_arch(device)
        key = (arch, dtype)
        with self._lock:
            if key in self._chosen:
                return self._chosen[key][1]
            self.load()
            usable = [e for e, reason in self.candidates(dtype, arch) if not reason]
            # exact SASS first; then PTX from the newest architecture not above this GPU
            usable.sort(key=lambda e: (arch not in e.info.get("archs", ()),
                                       -_arch_number(e.info.get("ptx_arch") or "sm_0")))
            if not usable:
                raise _loader.KernelNotAvailableError(self._explain(device, arch, dtype))
            entry = usable[0]
            need = int(entry.info.get("min_driver_cuda", 0))
            have = self.driver_version()
            if have and need and have < need:
                raise _loader.KernelNotAvailableError(
                    f"{entry.path.name} was built with CUDA {entry.info.get('cuda_version')} and needs a "
                    f"driver supporting CUDA {need // 1000}.{need % 1000 // 10} (Linux >= "
                    f"{entry.info.get('min_driver')}); this driver supports {have // 1000}."
                    f"{have % 1000 // 10}. Update the NVIDIA driver.")
            raw = _loader.REGISTRY.open(entry)
            wrapped = {p: _on_device(fn) for p, fn in raw.items()}
            self._chosen[key] = (entry, wrapped)
            logger.info("CUDA %s %s: %s (%s)", arch, dtype, entry.path,
                        "SASS" if arch in entry.info.get("archs", ()) else "PTX JIT")
            return wrapped

    def _explain(self, device: torch.device, arch: str, dtype: str) -> str:
        name = torch.cuda.get_device_name(device)
        return _loader.explain_missing(
            f"no compiled CUDA band kernel for {device} ({name}, {arch}), dtype={dtype}.",
            self.candidates(dtype, arch), "for CUDA and this dtype",
            BUILD_HINT.format(arch=arch, dtype=dtype), BUILD_NEEDS)

    def chosen(self) -> dict[str, str]:
        with self._lock:
            return {f"{arch}/{dtype}": str(e.path) for (arch, dtype), (e, _) in self._chosen.items()}


def _on_device(fn):
    """Run ``fn`` with its tensors' device current (TVM launches on the current device)."""

    def call(a: torch.Tensor, *args):
        index = a.device.index
        if index is None or index == torch.cuda.current_device():
            return fn(a, *args)
        with torch.cuda.device(index):
            return fn(a, *args)

    return call


RUNTIME = _CudaRuntime()


def kernel_for(product: str, t: torch.Tensor):
    """The compiled CUDA function for ``product`` on t's GPU and dtype."""
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise _loader.KernelNotAvailableError(
            f"the CUDA band kernels support {DTYPES}, got dtype={dtype}; cast the inputs "
            "(or use torch.autocast('cuda'))")
    return RUNTIME.functions(t.device, dtype)[product]


def info() -> dict:
    """CUDA part of :func:`longformer_tvm.backend_info`: runtime, GPUs and candidate libraries."""
    out = {"runtime_dir": str(runtime_dir() or ""), "runtime_version": runtime_version(),
           "cudart": str(find_cudart() or CUDART_SONAME), "loaded": RUNTIME.chosen(),
           "available": {}}
    gpus = []
    if torch.cuda.is_available():
        gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)} ({device_arch(torch.device('cuda', i))})"
                for i in range(torch.cuda.device_count())]
    out["gpus"] = gpus
    for dtype in DTYPES:
        out["available"][f"cuda/{dtype}"] = [
            {"file": str(e.path), "archs": e.info.get("archs"), "ptx_arch": e.info.get("ptx_arch"),
             "schedule": e.info.get("schedule"), "usable": not reason, "reason": reason}
            for e, reason in RUNTIME.candidates(dtype)]
    return out
