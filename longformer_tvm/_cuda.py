"""The CUDA backend: the TVM CUDA runtime, and the library that fits a GPU.

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
import logging
import os
import threading

import torch

from . import _install
from ._contract import CUDART_ENV, CUDART_SONAME, DTYPES, RUNTIME_DIR_ENV, arch_number, find_cudart, \
    tvm_lib_dir
from ._errors import KernelNotAvailableError
from ._manifest import LibraryEntry
from ._registry import Backend, Key

logger = logging.getLogger("longformer_tvm")


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def fits(info: dict, arch: str) -> bool:
    """SASS for exactly this architecture, or PTX of one not above it (the driver compiles it)."""
    if arch in info.get("archs", ()):
        return True
    ptx = info.get("ptx_arch")
    return bool(ptx) and arch_number(ptx) <= arch_number(arch)


class CudaBackend(Backend):
    device = "cuda"
    dtypes = DTYPES["cuda"]

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cudart: ctypes.CDLL | None = None

    def key(self, device: torch.device, dtype: str) -> Key:
        return ("cuda", dtype, device_arch(device))

    def reasons(self, entry: LibraryEntry, key: Key) -> list[str]:
        arch = key[2]
        if arch and not fits(entry.info, arch):
            return [f"holds SASS for {entry.info.get('archs')} and PTX for "
                    f"{entry.info.get('ptx_arch')}, not {arch}"]
        return []

    def rank(self, entry: LibraryEntry, key: Key):
        # exact SASS first; then PTX from the newest architecture not above this GPU
        return (key[2] not in entry.info.get("archs", ()),
                -arch_number(entry.info.get("ptx_arch") or "sm_0"))

    def load_runtime(self) -> None:
        with self._lock:
            if self._cudart is not None:
                return
            lib = tvm_lib_dir()
            if lib is None or not (lib / "libtvm_runtime_cuda.so").is_file():
                raise KernelNotAvailableError(
                    "the TVM CUDA runtime (libtvm_runtime_cuda.so from the apache-tvm wheel) was not "
                    f"found; install apache-tvm (pip install -e .[cuda]) or set {RUNTIME_DIR_ENV} to a "
                    "folder holding libtvm_runtime.so and libtvm_runtime_cuda.so")
            _install.load_tvm_runtime()
            cudart = find_cudart()
            try:
                handle = ctypes.CDLL(str(cudart) if cudart else CUDART_SONAME,
                                     mode=os.RTLD_GLOBAL | os.RTLD_NOW)
            except OSError as exc:
                raise KernelNotAvailableError(
                    f"the CUDA 13 runtime ({CUDART_SONAME}) could not be loaded ({exc}); install the "
                    f"cuda extra (pip install -e .[cuda], which brings nvidia-cuda-runtime 13) or "
                    f"set {CUDART_ENV}=/path/to/{CUDART_SONAME}") from exc
            try:
                ctypes.CDLL(str(lib / "libtvm_runtime_cuda.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
            except OSError as exc:
                raise KernelNotAvailableError(
                    f"libtvm_runtime_cuda.so did not load ({exc}); it needs the NVIDIA driver "
                    "(libcuda.so.1) of a version that supports CUDA 13 (Linux driver >= 580)") from exc
            self._cudart = handle
            logger.info("loaded the TVM CUDA runtime from %s with %s", lib, cudart or CUDART_SONAME)

    def driver_version(self) -> int:
        """The CUDA version the driver supports (e.g. 13000), 0 if unknown."""
        self.load_runtime()
        version = ctypes.c_int(0)
        if self._cudart.cudaDriverGetVersion(ctypes.byref(version)) != 0:
            return 0
        return version.value

    def admit(self, entry: LibraryEntry, key: Key) -> None:
        need = int(entry.info.get("min_driver_cuda", 0))
        have = self.driver_version()
        if have and need and have < need:
            raise KernelNotAvailableError(
                f"{entry.path.name} was built with CUDA {entry.info.get('cuda_version')} and needs a "
                f"driver supporting CUDA {need // 1000}.{need % 1000 // 10} (Linux >= "
                f"{entry.info.get('min_driver')}); this driver supports {have // 1000}."
                f"{have % 1000 // 10}. Update the NVIDIA driver.")

    def wrap(self, functions: dict, key: Key) -> dict:
        return {p: _on_device(fn) for p, fn in functions.items()}

    def build_command(self, key: Key) -> str:
        return (f"python build_kernels.py build --target cuda --arch {key[2] or 'auto'} "
                f"--dtype {key[1]}")

    def repair_args(self, entry: LibraryEntry) -> list[str]:
        return ["--arch", ",".join(entry.info.get("archs", [])) or "auto"]

    def describe(self, key: Key) -> str:
        return f"CUDA ({key[2] or 'any arch'}), dtype={key[1]}"

    def info(self) -> dict:
        gpus = []
        if torch.cuda.is_available():
            gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)} ({device_arch(torch.device('cuda', i))})"
                    for i in range(torch.cuda.device_count())]
        return {"runtime_dir": str(tvm_lib_dir() or ""),
                "runtime_version": _install.runtime_versions()["tvm"],
                "cudart": str(find_cudart() or CUDART_SONAME), "gpus": gpus}


def _on_device(fn):
    """Run ``fn`` with its tensors' device current (TVM launches on the current device)."""

    def call(a: torch.Tensor, *args):
        index = a.device.index
        if index is None or index == torch.cuda.current_device():
            return fn(a, *args)
        with torch.cuda.device(index):
            return fn(a, *args)

    return call
