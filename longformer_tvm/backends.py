"""Which compiled library serves which call: the backend table, and a small query API for tools.

    import longformer_tvm.backends as lb
    lb.candidates("cpu", "float32")      # every listed library, each with the reasons it can't run
    lb.functions("cpu", "float32")       # the chosen library's {product: function} (loads it)
    lb.chosen()                          # {"cpu/float32": path, "cuda/sm_90/float16": path, ...}
    lb.open_library(entry)               # verify and load one particular library
    lb.clear()                           # forget every loaded and chosen library, on every device

The table maps a torch device type to its backend (``_cpu.CpuBackend``, ``_cuda.CudaBackend``);
adding a device means adding a row. ``REGISTRY`` is the one owner of loaded libraries.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import _install
from ._cpu import CpuBackend
from ._cuda import CudaBackend
from ._errors import KernelIntegrityError, KernelNotAvailableError
from ._manifest import LibraryEntry
from ._registry import Candidate, Key, Registry, label

__all__ = ["TABLE", "REGISTRY", "Registry", "Candidate", "LibraryEntry", "KernelNotAvailableError",
           "KernelIntegrityError", "key", "kernel_for", "functions", "candidates", "chosen",
           "open_library", "chosen_entries", "arch", "load_runtime", "compiler_available", "clear",
           "backend_info"]

TABLE = {"cpu": CpuBackend(), "cuda": CudaBackend()}
REGISTRY = Registry(TABLE)

_DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in
                (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def key(device: str | torch.device, dtype: str | torch.dtype, arch: str | None = None) -> Key:
    """The registry's key for a device and dtype (a CUDA device's key holds its arch; pass
    ``arch`` to ask about an architecture this machine need not have)."""
    device = torch.device(device)
    name = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if arch is not None:
        return (device.type, name, arch)
    return REGISTRY.backend(device.type).key(device, name)


def kernel_for(product: str, t: torch.Tensor):
    """The compiled function for ``product`` on t's device and dtype; None under the reference
    backend (``LONGFORMER_TVM_BACKEND=reference``)."""
    if _install.backend_mode() == "reference":
        return None
    device = t.device
    dtype = _DTYPE_NAMES.get(t.dtype) or str(t.dtype).removeprefix("torch.")
    if device.type == "cpu":
        # in a child made by fork(), a call from the forking thread would hang in TVM's thread pool
        return _install.AFTER_FORK.guard(REGISTRY.functions(("cpu", dtype, ""))[product])
    return REGISTRY.functions(REGISTRY.backend(device.type).key(device, dtype))[product]


def functions(device: str | torch.device, dtype: str | torch.dtype) -> dict:
    """{product: function} of the library chosen for (device, dtype); builds one if needed."""
    return REGISTRY.functions(key(device, dtype))


def candidates(device: str, dtype: str, arch: str | None = None) -> list[Candidate]:
    """Every library listed for (device, dtype) with the reasons it cannot run here (for CUDA,
    on ``arch`` when given; without it, architecture is not judged)."""
    return REGISTRY.candidates((device, dtype, arch or ""))


def chosen() -> dict[str, Path]:
    """{``cpu/float32`` | ``cuda/<arch>/<dtype>``: path} of the libraries chosen so far."""
    return {name: e.path for name, e in chosen_entries().items()}


def chosen_entries() -> dict[str, LibraryEntry]:
    """As :func:`chosen`, with each library's manifest entry (its ISA, archs, schedule, ...)."""
    return {label(k): e for k, e in REGISTRY.chosen().items()}


def open_library(entry: LibraryEntry) -> dict:
    """Verify one library against its sha256, load it (and its device's runtime), and return its
    unwrapped {product: function}; raises KernelIntegrityError."""
    return REGISTRY.open(entry)


def arch(device: str | torch.device) -> str:
    """The architecture a CUDA device's libraries are chosen by (``sm_90``)."""
    return key(device, "float32")[2]


def load_runtime(device: str) -> None:
    """Load the runtime a device's libraries need (for tools that load libraries themselves)."""
    REGISTRY.backend(device).load_runtime()


def compiler_available() -> bool:
    """Whether libraries can be built here (the TVM compiler and build_kernels.py are present)."""
    return REGISTRY.compiler_available()


def clear() -> None:
    """Forget every loaded and chosen library on every device (the next call chooses again)."""
    REGISTRY.clear()


def _listing(cands: list[Candidate]) -> list[dict]:
    return [{"file": str(c.entry.path), "isa": c.entry.info.get("isa"),
             "archs": c.entry.info.get("archs"), "ptx_arch": c.entry.info.get("ptx_arch"),
             "schedule": c.entry.info.get("schedule"), "cached": c.entry.cached,
             "usable": c.usable, "reason": c.reason, "reasons": list(c.reasons)} for c in cands]


def backend_info() -> dict:
    """Which backend serves which (device, dtype): the libraries loaded, and every candidate
    considered with the reasons it was ruled out. Per device, its backend's own facts (the
    CPU's ISA and features; CUDA's runtime, GPUs and libraries per arch).

    ``mode`` is ``auto`` or ``reference`` (``LONGFORMER_TVM_BACKEND``), or ``invalid`` where that
    variable holds anything else (the band products then raise); ``errors`` says what is wrong
    with each environment setting the package reads ([] when nothing is)."""
    loaded = REGISTRY.chosen()
    try:
        mode = _install.backend_mode()
    except ValueError:
        mode = "invalid"
    info = {"mode": mode, "errors": _install.setting_errors(),
            "tvm_num_threads": os.environ.get(_install.THREADS_ENV),
            "versions": _install.runtime_versions(),
            "prebuilt_dirs": [str(p) for p in REGISTRY.prebuilt_dirs()],
            "cache_dir": str(_install.cache_dir()),
            "cache_library_dir": str(_install.cache_library_dir()),
            "loaded": {label(k): str(e.path) for k, e in loaded.items()}, "available": {}}
    for device, backend in REGISTRY.backends.items():
        section = {**backend.info(), "available": {},
                   "loaded": {label(k).removeprefix(f"{device}/"): str(e.path)
                              for k, e in loaded.items() if k[0] == device}}
        for dtype in backend.dtypes:
            listing = _listing(REGISTRY.candidates((device, dtype, "")))
            section["available"][f"{device}/{dtype}"] = info["available"][f"{device}/{dtype}"] = listing
        info[device] = section
    info["cpu_features"] = info["cpu"]["cpu_features"]
    return info
