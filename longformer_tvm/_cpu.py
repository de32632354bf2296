"""The CPU backend: libraries per x86 ISA level, chosen by this machine's CPU features.

A CPU library runs here if it was built for this machine's architecture (its target triple) and
every CPU feature its ISA level needs is in ``/proc/cpuinfo``; of those, the highest ISA level
(``avx512`` > ``avx2`` > ``generic``) is loaded. A missing library is built into the cache on the
first call when the TVM compiler is installed. A loaded library's kernels run on torch's OpenMP
threads (:mod:`._threads`).
"""

from __future__ import annotations

import platform

from . import _threads
from ._contract import CPU_ISAS, DTYPES, host_cpu_features, host_isa
from ._manifest import LibraryEntry
from ._registry import Backend, Key

_RANK = {isa: i for i, isa in enumerate(CPU_ISAS)}


def _machine(name: str) -> str:
    name = name.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


class CpuBackend(Backend):
    device = "cpu"
    dtypes = DTYPES["cpu"]
    builds_on_demand = True

    def reasons(self, entry: LibraryEntry, key: Key) -> list[str]:
        out = []
        target = entry.info.get("target")
        triple = target.get("mtriple") if isinstance(target, dict) else None
        if isinstance(triple, str) and _machine(triple.split("-")[0]) != _machine(platform.machine()):
            out.append(f"built for {triple}, this machine is {platform.machine()}")
        missing = sorted(set(entry.info.get("cpu_features", ())) - host_cpu_features())
        if missing:
            out.append(f"needs CPU features {missing}")
        return out

    def rank(self, entry: LibraryEntry, key: Key) -> int:
        return _RANK.get(entry.info.get("isa"), len(_RANK))

    def build_command(self, key: Key) -> str:
        return f"python build_kernels.py build --target cpu --dtype {key[1]}"

    def build_args(self, key: Key) -> list[str]:
        return ["--isa", host_isa()]

    def builds(self, entry: LibraryEntry, key: Key) -> bool:
        return entry.info.get("isa") == host_isa()

    def repair_args(self, entry: LibraryEntry) -> list[str]:
        return ["--isa", entry.info.get("isa") or host_isa()]

    def loaded(self, entry: LibraryEntry) -> None:
        _threads.install(entry.path)

    def info(self) -> dict:
        features = host_cpu_features()
        return {"isa": host_isa(), "thread_pools": _threads.pools(),
                "cpu_features": sorted(f for f in features if f.startswith(("avx", "fma", "sse4")))}
