"""CPU build targets: what each ISA level of ``_contract.CPU_ISAS`` compiles to (LLVM target,
vector width) and which CPU features it needs at run time."""

from __future__ import annotations

import dataclasses

from longformer_tvm._contract import CPU_ISAS, DTYPE_BYTES


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
