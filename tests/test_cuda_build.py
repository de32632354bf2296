"""The CUDA build, checked without a GPU.

* every committed CUDA library matches its sha256 and holds SASS for every architecture its
  manifest entry lists, plus PTX of the newest -- read with cuobjdump (part of the test extra: a
  missing cuobjdump fails here, it does not skip);
* the thread-block definitions that the CUDA libraries are scheduled from compute the products:
  unscheduled they are ordinary sequential programs, so they run on the CPU (LLVM) against the
  float64 reference, with awkward sizes and garbage in the invalid diagonals;
* every schedule in the tuning space applies; the arch options and the stand-in driver behave.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from longformer_tvm import _contract, _manifest, backends, reference
from longformer_tvm._checks import normalize_band
from longformer_tvm.ops import apply_kernel
from tvm_kernels.cuda import build as cuda_build
from tvm_kernels.cuda import fatbin

REPO = Path(__file__).resolve().parent.parent
PREBUILT = REPO / "prebuilt"
REQUIRED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def _cuda_entries():
    return [e for e in _manifest.read_manifest(PREBUILT) if e.device == "cuda"]


def _entry_id(entry):
    return entry.path.name


@pytest.fixture(scope="module")
def cuobjdump():
    try:
        return fatbin.find_cuobjdump()
    except fatbin.CuobjdumpNotFound as exc:
        pytest.fail(f"{exc} -- the CPU-side CUDA tests need it to prove the machine code per arch")


def test_committed_libraries_cover_every_dtype_and_arch():
    covered = {(e.dtype, a) for e in _cuda_entries() for a in e.info["archs"]}
    missing = [(d, a) for d in _contract.DTYPES["cuda"] for a in REQUIRED_ARCHS if (d, a) not in covered]
    assert not missing, f"prebuilt/ lacks CUDA libraries for {missing}"


@pytest.mark.parametrize("entry", _cuda_entries(), ids=_entry_id)
def test_library_matches_sha256_and_sources(entry):
    assert entry.path.is_file(), f"{entry.path} is listed in the manifest but missing"
    assert _contract.sha256_file(entry.path) == entry.info["sha256"]
    assert entry.info["sources"] == _contract.SOURCES["cuda"]
    assert _contract.source_hash(entry.info["sources"]) == entry.info["source_hash"], (
        f"{entry.path.name} was built from other kernel sources: rebuild with "
        "`python build_kernels.py build --target cuda --arch sm_80,sm_86,sm_89,sm_90`")
    size = entry.path.stat().st_size
    assert size < 8 << 20, f"{entry.path.name} is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("entry", _cuda_entries(), ids=_entry_id)
def test_library_holds_sass_for_every_listed_arch(entry, cuobjdump):
    blobs = fatbin.extract_fatbins(entry.path.read_bytes())
    assert len(blobs) == 1, f"{entry.path.name}: expected one fatbin, found {len(blobs)}"
    code = fatbin.list_code(blobs[0], cuobjdump)
    assert code["sass"] == sorted(entry.info["archs"], key=_contract.arch_number), code
    assert code["ptx"] == [entry.info["ptx_arch"]], code
    assert entry.info["ptx_arch"] == max(entry.info["archs"], key=_contract.arch_number)


@pytest.mark.parametrize("entry", _cuda_entries(), ids=_entry_id)
def test_manifest_entry_fields(entry):
    info = entry.info
    for key in ("device", "dtype", "archs", "ptx_arch", "cuda_version", "min_driver",
                "min_driver_cuda", "functions", "tvm_version", "tvm_ffi_version", "sha256",
                "sources", "source_hash", "schedule"):
        assert key in info, key
    assert info["functions"] == _contract.PRODUCTS
    major = int(info["cuda_version"].split(".")[0])
    assert (info["min_driver"], info["min_driver_cuda"]) == _contract.MIN_DRIVER[major]
    versions = _contract.installed_versions()
    assert (info["tvm_version"], info["tvm_ffi_version"]) == (versions["tvm"], versions["tvm_ffi"])


def test_loader_lists_committed_libraries_as_usable_for_their_archs():
    for dtype in _contract.DTYPES["cuda"]:
        for arch in REQUIRED_ARCHS:
            usable = [c for c in backends.candidates("cuda", dtype, arch) if c.usable]
            assert usable, f"no usable CUDA library for {dtype} on {arch}"
    # a newer GPU runs the PTX; an older one has nothing
    assert [c for c in backends.candidates("cuda", "float32", "sm_120") if c.usable]
    reasons = [c.reason for c in backends.candidates("cuda", "float32", "sm_75")]
    assert reasons and all("not sm_75" in r for r in reasons)


# ---- the definitions, run on the CPU ------------------------------------------------------

# (B, N, H, D, w, dilation, autoregressive)
CASES = [
    (1, 1, 1, 8, 0, 1, False),
    (2, 37, 3, 16, 4, 1, False),
    (1, 100, 2, 7, 7, 3, True),        # odd head size, dilation
    (3, 7, 2, 8, 17, 2, False),        # w * d >= N
    (1, 53, 4, 5, 9, [1, 2, 3, 1], False),
    (1, 40, 2, 12, 3, [2, 100], True),  # dilation clamped to N
    (1, 70, 1, 40, 20, 1, False),      # several tiles, several diagonal and head chunks
]


def _case_id(case):
    b, n, h, d, w, dil, ar = case
    return f"B{b}-N{n}-H{h}-D{d}-w{w}-d{dil}{'-ar' if ar else ''}".replace(" ", "")


DEF_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cpu_definitions():
    """The three definitions per dtype at small tiles (more tile edges per case), on the CPU."""
    import tvm

    from tvm_kernels.cuda import kernels as ck

    out = {}
    for dtype in DEF_DTYPES:
        name = str(dtype).removeprefix("torch.")
        funcs = {"qk": ck.make_qk(name, ck.Tiles(8, 8, 4)),
                 "pv": ck.make_pv(name, ck.Tiles(8, 4, 8)),
                 "tpv": ck.make_pv(name, ck.Tiles(8, 4, 8), transposed=True)}
        for product, func in funcs.items():
            symbol = str(func.attrs["global_symbol"])
            out[dtype, product] = tvm.compile(tvm.IRModule({symbol: func}), target="llvm")[symbol]
    return out


@pytest.mark.parametrize("dtype", DEF_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_definitions_match_reference_on_cpu(cpu_definitions, case, dtype):
    b, n, h, d, w, dil, ar = case
    band = normalize_band("test", w, dil, ar, h)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    y = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    p = torch.randn(b, n, h, band.columns, generator=g, dtype=torch.float64)
    key, valid = reference.key_index(n, band)
    p_garbage = p.clone()
    p_garbage[:, ~valid.permute(1, 0, 2)] = float("nan")  # invalid diagonals hold anything
    # a strided view of a bigger tensor: the ABI takes any strides with a unit last stride
    xs = torch.zeros(b, n, h + 1, d + 3, dtype=dtype)[:, :, 1:, 2:2 + d]
    xs.copy_(x)
    inf = float("-inf")
    runs = {
        "qk": (xs, y.to(dtype), band.columns, inf, lambda a, c: reference.band_qk(a, c, band, inf), x, y),
        "pv": (p_garbage.to(dtype), xs, d, None, lambda a, c: reference.band_pv(a, c, band), p, x),
        "tpv": (p.to(dtype), xs, d, None, lambda a, c: reference.band_pv_transposed(a, c, band), p, x),
    }
    for product, (a, bb, last, pad, ref, a64, b64) in runs.items():
        out = torch.full((b, n, h, last), 7.0, dtype=dtype)
        apply_kernel(cpu_definitions[dtype, product], a, bb, band, out, pad)
        want = ref(a64, b64)
        plain = ref(a64.to(dtype), b64.to(dtype)).double()  # plain torch at this dtype
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(out), finite), f"{product}: non-finite entries differ"
        assert torch.equal(out[~finite].double(), want[~finite]), product
        if finite.any():
            err = (out.double()[finite] - want[finite]).abs().max().item()
            base = (plain[finite] - want[finite]).abs().max().item()
            assert err <= 8 * base + 1e-5 * math.sqrt(d * band.columns), (
                f"{product} {dtype}: error {err:.3e}, plain torch {base:.3e}")


# ---- schedules, options, stand-in driver ----------------------------------------------------

def test_every_schedule_in_the_space_applies():
    from tvm import s_tir

    from tvm_kernels.cuda import kernels as ck
    from tvm_kernels.cuda import schedules as sched

    for (kind, width), tiles in sched.TILES.items():
        dtype = "float32" if width == 4 else "float16"
        for ty in sched.SPACE[kind]["ty"]:
            for tx in sched.SPACE[kind]["tx"]:
                func = ck.make_qk(dtype, tiles) if kind == "qk" else ck.make_pv(dtype, tiles, True)
                sch = s_tir.Schedule(func)
                sched.schedule(sch, kind, {"ty": ty, "tx": tx, "unroll": 4})
    func = ck.make_qk("float32", sched.TILES[("qk", 4)])
    sch = s_tir.Schedule(func)
    sched.schedule(sch, "qk", {})  # every knob sampled: the MetaSchedule design space
    assert len([i for i in sch.trace.insts if i.kind.name == "SampleCategorical"]) == 3


def test_arch_options():
    assert cuda_build.parse_archs("sm_90,80,8.6, sm_89") == ["sm_80", "sm_86", "sm_89", "sm_90"]
    with pytest.raises(SystemExit, match="not an architecture"):
        cuda_build.parse_archs("ampere")
    flags = cuda_build.gencode_flags(["sm_80", "sm_90"])
    assert flags == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                     "-gencode", "arch=compute_90,code=compute_90"]


def test_stub_exports_every_driver_symbol_the_runtime_imports(tmp_path):
    import shutil
    import subprocess

    lib = _contract.tvm_lib_dir() / "libtvm_runtime_cuda.so"
    if shutil.which("cc") is None or shutil.which("nm") is None:
        pytest.skip("no C compiler / nm: the driverless build cannot run here either")
    stub = cuda_build.build_stub(lib, tmp_path)
    exported = subprocess.run(["nm", "-D", "--defined-only", str(stub)], capture_output=True,
                              text=True, check=True).stdout
    for sym in cuda_build.driver_symbols(lib):
        assert f" T {sym}\n" in exported, sym


def test_tuning_records_are_data(tmp_path, monkeypatch):
    rec = {"best": {"qk": {"tiles": {"tm": 32, "tj": 64, "kd": 16},
                           "knobs": {"ty": 8, "tx": 16, "unroll": 8}}}}
    (tmp_path / "cuda-sm_90-float32.json").write_text(json.dumps(rec))
    monkeypatch.setattr(cuda_build, "TUNING_DIR", tmp_path)
    tuned = cuda_build.configs_for("float32", "tuned", "sm_90")
    assert tuned["qk"]["from"] == "tuned" and tuned["qk"]["knobs"]["ty"] == 8
    assert tuned["pv"]["from"] == "hand"
    assert cuda_build.configs_for("float32", "tuned", "sm_80")["qk"]["from"] == "hand"


def test_metaschedule_space_and_decisions():
    from tvm import s_tir

    from tvm_kernels import band
    from tvm_kernels.cuda import kernels as ck
    from tvm_kernels.cuda import schedules as sched
    from tvm_kernels.cuda import tune as cuda_tune
    func = band.specialize(ck.make_pv("float16", sched.TILES[("pv", 2)]), "pv", "float16",
                           _contract.TUNING_SHAPE, pad=float("-inf"))
    sch = s_tir.Schedule(func, seed=3)
    sched.schedule(sch, "pv", {})
    knobs = cuda_tune.knob_values(sch.trace)
    assert set(knobs) == {"ty", "tx", "unroll"}
    assert all(knobs[k] in sched.SPACE["pv"][k] for k in knobs)


def test_offline_collect_keeps_the_fastest_correct_candidate(tmp_path):
    from tvm_kernels.cuda import tune as cuda_tune

    cfg = lambda i: {"qk": {"tiles": {"tm": i}, "knobs": {}}, "pv": {"tiles": {"tm": i}, "knobs": {}}}  # noqa: E731
    rows = []
    for cand, (qk, pv, tpv, ok) in enumerate([(1.0, 2.0, 2.0, True), (0.5, 3.0, 3.0, False), (0.8, 1.0, 1.5, True)]):
        for product, ms in (("qk", qk), ("pv", pv), ("tpv", tpv)):
            rows.append({"file": f"c{cand}", "arch": "sm_90", "dtype": "float16", "candidate": cand,
                         "config": cfg(cand), "product": product, "ms": ms, "ok": ok})
    timings = tmp_path / "timings.json"
    timings.write_text(json.dumps({"device": "test", "rows": rows}))
    (path,) = cuda_tune.offline_collect(timings, root=tmp_path)
    best = json.loads(path.read_text())["best"]
    assert best["qk"]["candidate"] == 2 and best["pv"]["candidate"] == 2  # 1 is faster but wrong
    assert best["pv"]["ms"] == 2.5
