"""The shipped CUDA libraries' kernels, executed on the CPU under the thread-block emulator.

No GPU: :mod:`tvm_kernels.cuda.emulate` regenerates each library's kernels from its manifest
entry's configuration (the build's definitions and schedules), compiles TVM's CUDA source with
g++ against a small emulation header and runs it with TVM's own host code. Every product and
dtype is checked against the float64 reference at the GPU selfcheck's tolerance, with strided
inputs and outputs inside canaries and NaN in the invalid diagonals; the emulator itself must
catch a deleted barrier and an off-by-one staging guard; and the inner loops' shared-memory
reads have the bank conflicts the schedule's docstring promises.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from benchmarks.selfcheck import EMULATED, check_functions
from longformer_tvm import _manifest, reference
from longformer_tvm._checks import normalize_band
from longformer_tvm.ops import apply_kernel

emulate = pytest.importorskip("tvm_kernels.cuda.emulate", reason="needs the TVM compiler")
if emulate.find_gxx() is None:
    pytest.skip("g++ not found: the CUDA emulator compiles TVM's CUDA source with it",
                allow_module_level=True)

PREBUILT = Path(__file__).resolve().parent.parent / "prebuilt"
ENTRIES = [e for e in _manifest.read_manifest(PREBUILT) if e.device == "cuda"]
_LIBRARIES: dict = {}


def library(entry):
    """The emulated library of a shipped entry, built once per test session."""
    if entry.path.name not in _LIBRARIES:
        _LIBRARIES[entry.path.name] = emulate.EmulatedLibrary(entry.dtype, entry.info["config"])
    return _LIBRARIES[entry.path.name]


def _case_id(case):
    b, n, h, d, w, dil, ar = case
    return f"B{b}-N{n}-H{h}-D{d}-w{w}-d{dil}{'-ar' if ar else ''}".replace(" ", "")


def _failures(rows):
    return [(r["case"], r["product"], f"err {r['err']:.2e} tol {r['tol']:.2e}", r["problems"])
            for r in rows if not r["ok"]]


def test_every_cuda_dtype_is_shipped_with_its_schedule():
    assert sorted(e.dtype for e in ENTRIES) == sorted(["float32", "float16", "bfloat16"])
    assert all(set(e.info["config"]) == {"qk", "pv"} for e in ENTRIES)


@pytest.mark.parametrize("case", EMULATED, ids=_case_id)
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.dtype)
def test_shipped_schedule_matches_reference(entry, case):
    rows = check_functions(library(entry).functions, getattr(torch, entry.dtype), "cpu", [case],
                           guarded=True)
    assert len(rows) == 3 and not _failures(rows), _failures(rows)


def test_shipped_configurations_are_what_the_build_chooses():
    from tvm_kernels.cuda.build import configs_for

    for entry in ENTRIES:
        for arch in entry.info["archs"]:
            chosen = configs_for(entry.dtype, "tuned", arch)
            assert {k: {"tiles": v["tiles"], "knobs": v["knobs"]} for k, v in chosen.items()} == \
                entry.info["config"], (entry.path.name, arch)


@pytest.mark.parametrize("dtype, candidate", [("float32", 2), ("float32", 7), ("float16", 3)])
def test_tuning_candidates_match_reference(dtype, candidate):
    """Other tile sizes and thread grids of the offline tuning space (8x16 threads, KD = 8)."""
    from tvm_kernels.cuda import tune

    qk, pv = tune.OFFLINE_SPACE[candidate]
    lib = emulate.EmulatedLibrary(dtype, {"qk": tune._config(qk), "pv": tune._config(pv)})
    rows = check_functions(lib.functions, getattr(torch, dtype), "cpu", [EMULATED[3]],
                           guarded=True)
    assert not _failures(rows), _failures(rows)


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.dtype)
def test_thread_order_does_not_matter(entry, order):
    lib = library(entry)
    lib.configure(order, seed=7)
    try:
        rows = check_functions(lib.functions, getattr(torch, entry.dtype), "cpu",
                               [EMULATED[3], EMULATED[5]], guarded=True)
    finally:
        lib.configure("forward")
    assert not _failures(rows), _failures(rows)


def test_16_bit_conversions_round_to_nearest_even(tmp_path):
    """The header's half / nv_bfloat16 against torch's float32 -> 16-bit rounding on random bit
    patterns (every exponent, subnormals, infinities, NaN), and a double just above a half-way
    point, which rounds up directly (as __double2half does) but to even through float."""
    import ctypes
    import subprocess

    src = tmp_path / "conv.cc"
    src.write_text(f'#include "{emulate.HEADER}"\n' + """
extern "C" void convert(const double* x, long n, uint16_t* h, uint16_t* b, float* wh, float* wb) {
  for (long i = 0; i < n; ++i) {
    half a(x[i]); nv_bfloat16 c(x[i]);
    h[i] = a.bits; b[i] = c.bits; wh[i] = (float)a; wb[i] = (float)c;
  }
}""")
    lib = tmp_path / "conv.so"
    subprocess.run([emulate.find_gxx(), "-std=c++17", "-O1", "-shared", "-fPIC", "-w", str(src),
                    "-o", str(lib)], check=True)
    convert = ctypes.CDLL(str(lib)).convert
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(0),
                         dtype=torch.int64).to(torch.int32)
    x32 = torch.cat([bits.view(torch.float32), torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0,
                                                              float("inf"), -float("inf"), 2.0**-25])])
    x = torch.cat([x32.double(), torch.tensor([1 + 2.0**-11 + 2.0**-40], dtype=torch.float64)])
    n = len(x)
    h, b = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    wh, wb = torch.empty(n), torch.empty(n)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    convert(ptr(x), ctypes.c_long(n), ptr(h), ptr(b), ptr(wh), ptr(wb))
    for got, widened, dtype in ((h, wh, torch.float16), (b, wb, torch.bfloat16)):
        want = x32.to(dtype)
        nan = torch.isnan(want)
        assert torch.isnan(got[:-1].view(dtype)[nan]).all()
        assert torch.equal(got[:-1][~nan], want.view(torch.int16)[~nan]), dtype
        assert torch.equal(widened[:-1][~nan], want[~nan].float()), dtype  # exact widening
    assert h[-1].item() == 0x3C01  # 1 + 2^-10: rounded once, from the double


# ---- non-finite values stay where the band puts them ------------------------------------------

@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.dtype)
def test_infinite_values_spread_only_along_the_band(entry):
    """An inf in one row of V (X) reaches exactly the outputs whose band holds that row. With C
    = 35 diagonals, not a multiple of any chunk TJ, the last chunk's columns past C hold zero
    weights that meet real rows of the slab: 0 * inf must not turn into NaN there."""
    dtype = getattr(torch, entry.dtype)
    b, n, h, d, w = 1, 150, 2, 24, 17
    band = normalize_band("test", w, [1, 2], False, h)
    g = torch.Generator().manual_seed(3)
    p = torch.randn(b, n, h, band.columns, generator=g).to(dtype)
    v = torch.randn(b, n, h, d, generator=g).to(dtype)
    v[:, 70] = float("inf")
    v[:, 90, :, 3] = float("-inf")
    lib = library(entry)
    for product, ref in (("pv", reference.band_pv), ("tpv", reference.band_pv_transposed)):
        want = ref(p.double(), v.double(), band)
        out = torch.empty(b, n, h, d, dtype=dtype)
        apply_kernel(lib.functions[product], p, v, band, out, None)
        wrong = (torch.isfinite(out) != torch.isfinite(want)).any(-1).nonzero()[:, 1].unique()
        assert not len(wrong), f"{product}: rows {wrong.tolist()} differ in non-finite entries"
        finite = torch.isfinite(want)
        assert (out.double()[finite] - want[finite]).abs().max() < 0.1 * d


# ---- the harness can fail ----------------------------------------------------------------------

def _kernel_span(source: str, name: str) -> tuple[int, int]:
    """Where the body of kernel ``name`` starts and ends in the CUDA source."""
    m = re.search(r'extern "C" __global__ void [^;{]*\b' + name + r"\([^)]*\)\s*\{", source)
    end = source.find('extern "C"', m.end())
    return m.end(), len(source) if end < 0 else end


def _delete_barrier(index: int):
    def mutate(source: str) -> str:
        start, end = _kernel_span(source, "band_qk_kernel")
        spots = [m.start() for m in re.finditer(r"__syncthreads\(\);", source[start:end])]
        at = start + spots[index]
        return source[:at] + source[at + len("__syncthreads();"):]
    return mutate


def _shift_staging_guard(delta: int):
    """The first staging loop guard of the QK kernel, one row wider or narrower."""
    def mutate(source: str) -> str:
        start, end = _kernel_span(source, "band_qk_kernel")
        m = re.compile(r"\) < (\d+)\) \{").search(source, start, end)
        return source[:m.start(1)] + str(int(m.group(1)) + delta) + source[m.end(1):]
    return mutate


@pytest.fixture(scope="module")
def float32_entry():
    (entry,) = [e for e in ENTRIES if e.dtype == "float32"]
    return entry


@pytest.mark.parametrize("fault", [
    pytest.param(_delete_barrier(0), id="barrier-before-staging-deleted"),
    pytest.param(_delete_barrier(1), id="barrier-after-staging-deleted"),
    pytest.param(_shift_staging_guard(+1), id="staging-guard-one-row-past"),
    pytest.param(_shift_staging_guard(-1), id="staging-guard-one-row-short"),
])
def test_injected_faults_are_reported(float32_entry, fault):
    lib = emulate.EmulatedLibrary("float32", float32_entry.info["config"], mutate=fault)
    assert lib.source != library(float32_entry).source
    case = (1, 150, 2, 40, 40, 1, False)  # several tiles, diagonal chunks and head-column chunks
    rows = check_functions(lib.functions, torch.float32, "cpu", [case], guarded=True)
    qk = [r for r in rows if r["product"] == "qk"]
    assert not qk[0]["ok"], "the emulator missed an injected fault"
    assert all(r["ok"] for r in rows if r["product"] != "qk"), "a fault in QK broke PV"


def test_a_stray_shared_write_names_the_canary(float32_entry):
    lib = emulate.EmulatedLibrary("float32", float32_entry.info["config"],
                                  mutate=_shift_staging_guard(+1))
    q = torch.randn(1, 150, 2, 40)
    out = torch.empty(1, 150, 2, 41)
    with pytest.raises(emulate.EmulationError, match=r"band_qk_kernel: block \d+: shared-memory canary"):
        lib.functions["qk"](q, q, out, 20, 20, 1, 0.0)


def test_barrier_divergence_is_reported(float32_entry):
    def diverge(source):
        start, end = _kernel_span(source, "band_qk_kernel")
        at = source.index("__syncthreads();", start)
        return source[:at] + "if (threadIdx.x != 3) __syncthreads();" + source[at + 16:]
    lib = emulate.EmulatedLibrary("float32", float32_entry.info["config"], mutate=diverge)
    q = torch.randn(1, 10, 1, 8)
    with pytest.raises(emulate.EmulationError, match="barrier divergence"):
        lib.functions["qk"](q, q, torch.empty(1, 10, 1, 3), 1, 1, 1, 0.0)
