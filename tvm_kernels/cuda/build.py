"""Build the CUDA libraries ahead of time, for GPUs this machine need not have.

``python build_kernels.py build --target cuda --arch auto|sm_80,sm_86,...`` writes, per dtype, one
TVM library ``prebuilt/cuda/band_<dtype>_<archs>.so`` whose fatbin holds SASS for every listed
architecture plus PTX of the newest (so later GPUs can JIT it), and records it in the manifest.

How machine code is made without a GPU. TVM 0.27 keeps a CUDA module as source unless the global
``ffi.Module.create.cuda`` exists, which ``libtvm_runtime_cuda.so`` registers when it loads -- and
that needs the driver, ``libcuda.so.1``. Where no driver is installed, the build runs in a worker
process that first loads a stand-in ``libcuda.so.1`` (compiled here from C; every driver entry
point the runtime imports returns ``CUDA_ERROR_NO_DEVICE``), so TVM compiles through
``tvm_callback_cuda_compile``, which this module overrides to run ``nvcc --fatbin`` with one
``-gencode`` per architecture. The stand-in lives only in that worker: it is never loaded where a
real driver exists, nor in the calling process.

The worker writes the library to a temporary name beside its final one; this process checks its
machine code (:mod:`.fatbin`) and publishes it -- rename and manifest entry together, under the
manifest's lock (:func:`tvm_kernels.publish.publish_file`), as for the CPU libraries.

Tile sizes and thread mappings come from :mod:`tvm_kernels.cuda.schedules` (``hand``) or from a
tuning record ``prebuilt/tuning/cuda-<arch>-<dtype>.json`` (``tuned``; see
:mod:`tvm_kernels.cuda.tune`). Architectures whose records differ get separate libraries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longformer_tvm import _contract
from longformer_tvm._contract import (DEFAULT_CUDA_ARCHS, DTYPE_BYTES, DTYPES, MIN_DRIVER, PRODUCTS,
                                      TUNING_DIR, arch_number)

from .. import publish
from . import fatbin

logger = logging.getLogger("tvm_kernels")

#: The tree holding ``tvm_kernels`` (the worker process imports it from there): the checkout, or
#: an installed wheel's build tree.
REPO = Path(__file__).resolve().parents[2]


# ---- architectures -------------------------------------------------------------------------

def normalize_arch(arch: str) -> str:
    a = arch.strip().lower()
    if re.fullmatch(r"\d+", a):
        a = "sm_" + a
    if re.fullmatch(r"\d+\.\d+", a):
        a = "sm_" + a.replace(".", "")
    if not re.fullmatch(r"sm_\d{2,3}[af]?", a):
        raise SystemExit(f"--arch: {arch!r} is not an architecture like sm_80, sm_90 or 8.6")
    return a


def detect_archs() -> list[str]:
    """Architectures of this machine's GPUs: torch.cuda, else nvidia-smi."""
    try:
        import torch

        if torch.cuda.is_available():
            return sorted({"sm_%d%d" % torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())}, key=arch_number)
    except Exception as exc:  # a broken CUDA setup should fall through to nvidia-smi
        logger.debug("torch.cuda could not be queried: %s", exc)
    smi = shutil.which("nvidia-smi")
    if smi:
        proc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True)
        caps = [c.strip() for c in proc.stdout.splitlines() if c.strip()]
        if proc.returncode == 0 and caps:
            return sorted({normalize_arch(c) for c in caps}, key=arch_number)
    raise SystemExit("--arch auto: no GPU found (torch.cuda, nvidia-smi); name the architectures, "
                     f"e.g. --arch {','.join(DEFAULT_CUDA_ARCHS)}")


def parse_archs(spec: str) -> list[str]:
    if spec.strip().lower() == "auto":
        return detect_archs()
    if spec.strip().lower() == "default":
        return list(DEFAULT_CUDA_ARCHS)
    return sorted({normalize_arch(a) for a in spec.split(",") if a.strip()}, key=arch_number)


# ---- toolchain -----------------------------------------------------------------------------

def find_nvcc() -> str:
    """nvcc on PATH, else in a CUDA toolkit of ``_contract.cuda_homes()``."""
    found = shutil.which("nvcc")
    for home in _contract.cuda_homes():
        if not found and (home / "bin" / "nvcc").is_file():
            found = str(home / "bin" / "nvcc")
    if not found:
        raise SystemExit("nvcc not found: install the CUDA toolkit (13.x) and put its bin/ on PATH "
                         "or set CUDA_HOME")
    return found


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise SystemExit(f"could not read the CUDA version from `{nvcc} --version`:\n{out}")
    return f"{m.group(1)}.{m.group(2)}"


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for each architecture, plus PTX of the newest (JIT-compiled on later GPUs)."""
    flags = []
    for a in archs:
        n = a.removeprefix("sm_")
        flags += ["-gencode", f"arch=compute_{n},code=sm_{n}"]
    n = archs[-1].removeprefix("sm_")
    flags += ["-gencode", f"arch=compute_{n},code=compute_{n}"]
    return flags


STUB_SPECIAL = {
    "cuGetErrorName": 'int cuGetErrorName(int e, const char** s) { if (s) *s = "CUDA_ERROR_NO_DEVICE"; return 0; }',
    "cuGetErrorString": ('int cuGetErrorString(int e, const char** s) { if (s) *s = "no CUDA device '
                         '(build-time stand-in for libcuda.so.1)"; return 0; }'),
    "cuDriverGetVersion": "int cuDriverGetVersion(int* v) { if (v) *v = 0; return 100; }",
    "cuDeviceGetCount": "int cuDeviceGetCount(int* n) { if (n) *n = 0; return 100; }",
    "cuGetProcAddress": "int cuGetProcAddress(const char* s, void** p) { if (p) *p = 0; return 500; }",
    "cuGetProcAddress_v2": "int cuGetProcAddress_v2(const char* s, void** p) { if (p) *p = 0; return 500; }",
}


def driver_symbols(runtime_cuda: Path) -> list[str]:
    """The driver entry points (cu*) that libtvm_runtime_cuda.so imports."""
    nm = shutil.which("nm")
    if nm is None:
        raise SystemExit("nm (binutils) is needed to build the CUDA libraries without a driver")
    proc = subprocess.run([nm, "-D", "--undefined-only", str(runtime_cuda)], capture_output=True,
                          text=True, check=True)
    syms = re.findall(r"^\s*U\s+(cu[A-Z]\w*)$", proc.stdout, flags=re.M)
    return sorted(set(syms) | {"cuInit", "cuDriverGetVersion", "cuDeviceGetCount",
                               "cuGetProcAddress", "cuGetProcAddress_v2"})


def build_stub(runtime_cuda: Path, work: Path) -> Path:
    """Compile the stand-in libcuda.so.1: every imported driver call reports 'no device' (100)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("a C compiler (cc) is needed to build the CUDA libraries without a driver")
    lines = ["/* build-time stand-in for libcuda.so.1: there is no device */"]
    for sym in driver_symbols(runtime_cuda):
        lines.append(STUB_SPECIAL.get(sym, f"int {sym}(void) {{ return 100; }}"))
    src, lib = work / "cuda_stub.c", work / "libcuda.so.1"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(lib),
                    str(src)], check=True, capture_output=True, text=True)
    return lib


def real_driver_present() -> bool:
    """Whether libcuda.so.1 loads here (probed in a child, so no process of ours keeps it)."""
    probe = "import ctypes,sys\ntry:\n ctypes.CDLL('libcuda.so.1')\nexcept OSError:\n sys.exit(1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


# ---- schedules -----------------------------------------------------------------------------

def tuning_record(arch: str, dtype: str, root: Path | None = None) -> dict:
    """{kind: {"tiles": {...}, "knobs": {...}, ...}} for (arch, dtype); {} when never tuned."""
    path = Path(root or TUNING_DIR) / f"cuda-{arch}-{dtype}.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("best", {})
    except ValueError:
        logger.warning("ignoring unreadable tuning record %s", path)
        return {}


def configs_for(dtype: str, schedule: str, arch: str) -> dict:
    """{kind: {"tiles": {...}, "knobs": {...}}} for "qk" and "pv" (hand unless a record says)."""
    from . import schedules

    width = DTYPE_BYTES[dtype]  # TILES are by dtype width
    out = {}
    record = tuning_record(arch, dtype) if schedule == "tuned" else {}
    for kind in ("qk", "pv"):
        rec = record.get(kind)
        if rec:
            out[kind] = {"tiles": dict(rec["tiles"]), "knobs": dict(rec["knobs"]), "from": "tuned"}
        else:
            out[kind] = {"tiles": schedules.TILES[(kind, width)].as_dict(),
                         "knobs": dict(schedules.HAND[kind]), "from": "hand"}
    return out


def scheduled_funcs(dtype: str, configs: dict) -> dict:
    """{symbol: scheduled PrimFunc} of the three products, as :func:`configs_for` configures them."""
    from tvm import s_tir

    from . import kernels, schedules

    funcs = {}
    for product, symbol in PRODUCTS.items():
        kind = "qk" if product == "qk" else "pv"
        cfg = configs[kind]
        sch = s_tir.Schedule(kernels.make(product, dtype, kernels.Tiles(**cfg["tiles"])))
        schedules.schedule(sch, kind, cfg["knobs"])
        funcs[symbol] = sch.mod["main"].with_attr("global_symbol", symbol)
    return funcs


# ---- the worker (runs in its own process) --------------------------------------------------

def _load_cuda_runtime(stub: str | None) -> None:
    """Load what TVM's CUDA runtime links (libcudart, and the stand-in driver where there is no
    driver), then TVM; fail unless TVM would now compile CUDA to machine code."""
    import ctypes

    cudart = _contract.find_cudart()
    if cudart is not None:  # libtvm_runtime_cuda.so links libcudart.so.13 by name
        ctypes.CDLL(str(cudart), mode=os.RTLD_GLOBAL)
    if stub:
        ctypes.CDLL(stub, mode=os.RTLD_GLOBAL)
    import tvm  # noqa: F401  (loads libtvm_runtime_cuda.so)
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise SystemExit("TVM's CUDA runtime did not load (libtvm_runtime_cuda.so needs "
                         f"{_contract.CUDART_SONAME}: install nvidia-cuda-runtime 13 or the CUDA 13 "
                         "toolkit), so it would keep CUDA source instead of machine code")


def _route_nvcc(nvcc: str, archs: list[str], work: Path) -> list[float]:
    """Make TVM compile CUDA with ``nvcc --fatbin`` for ``archs``; returns the list that each
    nvcc call appends its seconds to."""
    import tvm_ffi

    calls: list[float] = []

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        src, out = work / "band.cu", work / "band.fatbin"
        src.write_text(str(code), encoding="utf-8")
        cmd = [nvcc, "--fatbin", "-O3", "-w", "-std=c++17", *gencode_flags(archs),
               "-o", str(out), str(src)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        calls.append(round(time.perf_counter() - t0, 1))
        return bytearray(out.read_bytes())

    return calls


def _worker(spec: dict) -> dict:
    """Compile one library as ``spec`` says into ``spec["out"]``; runs in a fresh process (see
    :func:`compile_library`)."""
    _load_cuda_runtime(spec["stub"])
    import tvm

    archs = spec["archs"]
    calls = _route_nvcc(spec["nvcc"], archs, Path(spec["work"]))
    target = tvm.target.Target({"kind": "cuda", "arch": archs[0]},
                               host={"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    module = tvm.compile(tvm.IRModule(scheduled_funcs(spec["dtype"], spec["configs"])), target=target)
    if not calls:
        raise SystemExit("TVM never called nvcc: the library would hold CUDA source, not machine code")
    publish.write_library(module, Path(spec["out"]))
    return {"nvcc_seconds": calls}


def compile_library(dtype: str, archs: list[str], configs: dict, out: Path) -> dict:
    """Build one library into the file ``out`` in a worker process (with the stand-in driver
    where there is none). Returns the worker's report ({"nvcc_seconds": [...]})."""
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory(prefix="lftvm-cuda-") as tmp:
        work = Path(tmp)
        stub = None
        if not real_driver_present():
            lib = _contract.tvm_lib_dir()
            if lib is None or not (lib / "libtvm_runtime_cuda.so").is_file():
                raise SystemExit("libtvm_runtime_cuda.so not found: install apache-tvm (pip install -e .)")
            stub = str(build_stub(lib / "libtvm_runtime_cuda.so", work))
            logger.info("no NVIDIA driver here: compiling through a stand-in libcuda.so.1")
        spec = {"dtype": dtype, "archs": archs, "configs": configs, "out": str(out), "nvcc": nvcc,
                "stub": stub, "work": str(work)}
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "tvm_kernels.cuda.build", "--worker",
                               str(work / "spec.json")], capture_output=True, text=True, env=env,
                              cwd=str(REPO))
        if proc.returncode != 0:
            raise SystemExit(f"building {out.name} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        result_file = work / "result.json"
        return json.loads(result_file.read_text()) if result_file.is_file() else {}


# ---- building and publishing ---------------------------------------------------------------

def _check_code(path: Path, name: str, archs: list[str]) -> dict:
    """The fatbin's SASS and PTX archs ({} without cuobjdump); SystemExit unless exactly SASS for
    ``archs`` and PTX of the newest."""
    try:
        code = fatbin.library_code(path)
    except fatbin.CuobjdumpNotFound as exc:
        logger.warning("not verifying the machine code: %s", exc)
        return {}
    if set(code["sass"]) != set(archs) or code["ptx"] != [archs[-1]]:
        raise SystemExit(f"{name}: cuobjdump lists SASS {code['sass']} and PTX {code['ptx']}, "
                         f"expected SASS {archs} and PTX {archs[-1]}")
    return code


def _arch_groups(dtype: str, archs: list[str], schedule: str) -> list[tuple[list[str], dict]]:
    """The archs grouped by configuration (one library per group), each group sorted."""
    groups: dict[str, tuple[list[str], dict]] = {}
    for arch in archs:
        cfg = configs_for(dtype, schedule, arch)
        key = json.dumps({k: {"tiles": v["tiles"], "knobs": v["knobs"]} for k, v in cfg.items()},
                         sort_keys=True)
        groups.setdefault(key, ([], cfg))[0].append(arch)
    return [(sorted(a, key=arch_number), cfg) for a, cfg in groups.values()]


def build_cuda(dtype: str, archs: list[str], out_dir: Path, schedule: str = "hand") -> list[dict]:
    """Build, verify and publish the libraries for ``dtype``; one per group of archs whose
    schedules agree. Returns their manifest entries."""
    cuda_version = nvcc_version(find_nvcc())
    min_driver, min_driver_cuda = MIN_DRIVER.get(int(cuda_version.split(".")[0]), ("unknown", 0))
    entries = []
    for group_archs, cfg in _arch_groups(dtype, archs, schedule):
        tag = "-".join(a.removeprefix("sm_") for a in group_archs)
        rel = Path("cuda") / f"band_{dtype}_sm{tag}.so"
        t0 = time.perf_counter()
        tmp = publish.temporary_beside(out_dir / rel)
        try:
            result = compile_library(dtype, group_archs, cfg, tmp)
            code = _check_code(tmp, rel.as_posix(), group_archs)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        schedules = sorted({v["from"] for v in cfg.values()})
        entry = {
            **publish.base_entry("cuda", dtype),
            "archs": group_archs,
            "ptx_arch": group_archs[-1],
            "cuda_version": cuda_version,
            "min_driver": min_driver,
            "min_driver_cuda": min_driver_cuda,
            "schedule": schedules[0] if len(schedules) == 1 else "+".join(schedules),
            "config": {k: {"tiles": v["tiles"], "knobs": v["knobs"]} for k, v in cfg.items()},
        }
        entries.append(publish.publish_file(tmp, out_dir, rel, entry))
        logger.info("cuda %-8s %-22s %5.1fs -> %s (%.1f MB; SASS %s, PTX %s; nvcc %s s)", dtype,
                    ",".join(group_archs), time.perf_counter() - t0, out_dir / rel,
                    (out_dir / rel).stat().st_size / 1e6, code.get("sass", "?"), code.get("ptx", "?"),
                    result.get("nvcc_seconds"))
    return entries


def main(args) -> int:
    """``build_kernels.py build --target cuda``: args has .arch, .dtype, .out, .schedule."""
    archs = parse_archs(args.arch or "auto")
    supported = DTYPES["cuda"]
    dtypes = [d.strip() for d in (args.dtype or ",".join(supported)).split(",") if d.strip()]
    bad = [d for d in dtypes if d not in supported]
    if bad:
        raise SystemExit(f"--dtype: the CUDA kernels support {supported}, got {bad}")
    if args.schedule == "naive":
        raise SystemExit("--schedule naive is a CPU baseline; the CUDA build takes hand or tuned")
    out = Path(args.out).resolve()
    for dtype in dtypes:
        build_cuda(dtype, archs, out, args.schedule)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="CUDA build worker (internal)")
    parser.add_argument("--worker", required=True, help="spec.json written by compile_library")
    ns = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    spec_path = Path(ns.worker)
    result = _worker(json.loads(spec_path.read_text(encoding="utf-8")))
    (spec_path.parent / "result.json").write_text(json.dumps(result), encoding="utf-8")
