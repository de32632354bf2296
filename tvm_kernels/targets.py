"""Build targets: what each CPU ISA level compiles to and which CPU features it needs at run time."""

from __future__ import annotations

import dataclasses

from longformer_tvm._loader import CPU_ISAS

DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
CPU_DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class CpuTarget:
    isa: str
    mcpu: str
    vector_bits: int

    @property
    def features(self) -> tuple[str, ...]:
        return CPU_ISAS[self.isa]

    def llvm(self, num_cores: int | None = None) -> dict:
        target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": self.mcpu}
        if num_cores:
            target["num-cores"] = num_cores
        return target

    def lanes(self, dtype: str) -> int:
        return self.vector_bits // (8 * DTYPE_BYTES[dtype])


CPU_TARGETS = {
    "avx512": CpuTarget("avx512", "skylake-avx512", 512),
    "avx2": CpuTarget("avx2", "haswell", 256),
    "generic": CpuTarget("generic", "x86-64", 128),
}


def host_isa() -> str:
    """The best ISA level this machine runs."""
    from longformer_tvm._loader import host_cpu_features

    have = host_cpu_features()
    for isa, needs in CPU_ISAS.items():
        if set(needs) <= have:
            return isa
    return "generic"
