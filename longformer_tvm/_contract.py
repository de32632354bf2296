"""The build/run contract: facts that ``tvm_kernels`` (which compiles libraries) and this package
(which loads them) must agree on. The only module of ``longformer_tvm`` that ``tvm_kernels``
imports; it imports nothing of the package itself, nor torch, nor the TVM compiler.

* products: their symbols and the argument list every compiled function takes;
* devices: the CPU ISA levels (with the CPU features each needs), the CUDA architectures built by
  default, the dtypes each device's kernels support, the oldest driver per CUDA major version;
* the manifest schema (``manifest.json``: which keys an entry has, which are lists);
* the sources each device's libraries are compiled from, and how their hash is computed;
* the tuning shape;
* the package's version and tree (a checkout, or an installed wheel);
* where the TVM runtime libraries and the CUDA toolkit / runtime are found.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

# ---- products -------------------------------------------------------------------------------

#: The band products: product -> the symbol of its compiled function. Every device's library
#: holds all three (one library per dtype and ISA level or architecture set).
PRODUCTS = {"qk": "band_qk", "pv": "band_pv", "tpv": "band_pv_transposed"}
#: The fused sliding-window attention (forward, and backward from the forward's LSE): in the CPU
#: libraries only (tvm_kernels/cpu/attention.py, attention_grad.py).
FUSED_PRODUCTS = {"attention": "band_attention", "attention_backward": "band_attention_backward"}
#: device -> the products its libraries hold (a manifest entry must name each one's symbol).
DEVICE_PRODUCTS = {"cpu": {**PRODUCTS, **FUSED_PRODUCTS}, "cuda": dict(PRODUCTS)}


def products(device: str) -> dict[str, str]:
    """{product: symbol} that a library for ``device`` holds (the band products for a device not
    in :data:`DEVICE_PRODUCTS`)."""
    return dict(DEVICE_PRODUCTS.get(device, PRODUCTS))


#: Every compiled product takes tensor views (batch, seq_len, heads, last) with a unit last stride
#: and returns nothing; ``out`` is allocated by the caller. ``qk`` also takes ``padding``.
SIGNATURES = {
    "qk": ("q", "k", "out", "left", "right", "dilation", "padding"),
    "pv": ("p", "v", "out", "left", "right", "dilation"),
    "tpv": ("g", "x", "out", "left", "right", "dilation"),
    # q, k, v, out, dout, dq, dk, dv: (B, N, H, D); key_mask: (B, N) uint8, nonzero = excluded,
    # any strides (a stride-0 expanded zero for none); lse and dlse (the LSE's gradient):
    # (B, N, H) in the inputs' dtype
    "attention": ("q", "k", "v", "key_mask", "out", "lse", "left", "right", "dilation", "scale"),
    "attention_backward": ("q", "k", "v", "key_mask", "dout", "out", "lse", "dlse", "dq", "dk",
                           "dv", "left", "right", "dilation", "scale"),
}

# ---- devices --------------------------------------------------------------------------------

#: x86 ISA levels in order of preference, with the /proc/cpuinfo flags each needs.
CPU_ISAS = {
    "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "avx2": ("avx2", "fma"),
    "generic": (),
}
#: dtypes each device's compiled kernels support.
DTYPES = {"cpu": ("float32", "float64"), "cuda": ("float32", "float16", "bfloat16")}
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
#: CUDA architectures ``build --target cuda`` compiles SASS for when none are named.
DEFAULT_CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
#: Oldest Linux driver per CUDA major version (minor-version compatibility: any 13.x toolkit's
#: code and runtime run on the 13.0 driver), and the CUDA version such a driver reports.
MIN_DRIVER = {13: ("580.65.06", 13000), 12: ("525.60.13", 12000)}
CUDART_SONAME = "libcudart.so.13"


def arch_number(arch: str) -> int:
    """``sm_90a`` / ``compute_86`` -> 90 / 86 (0 where there are no digits)."""
    digits = re.sub(r"\D", "", arch)
    return int(digits) if digits else 0


# ---- manifest schema ------------------------------------------------------------------------

MANIFEST_FORMAT = 1
#: Keys every entry has, as strings.
ENTRY_STRINGS = ("file", "device", "dtype", "sha256")
#: Keys an entry may have, each a list of strings.
ENTRY_LISTS = ("cpu_features", "sources", "archs")
#: Keys an entry may have, each a string or null.
ENTRY_OPTIONAL_STRINGS = ("isa", "tvm_version", "tvm_ffi_version", "source_hash", "ptx_arch",
                          "package_version")


def entry_key(entry: dict) -> tuple:
    """What makes two entries the same library slot (a new build replaces the old entry)."""
    return (entry.get("device"), entry.get("dtype"), entry.get("isa"), tuple(entry.get("archs", ())))


# ---- the package, its tree and its version -------------------------------------------------

#: The one definition of the package's version (pyproject.toml reads it from here); recorded in
#: each manifest entry.
__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parent
#: Whether this is an installed wheel rather than a source checkout. A wheel carries the build
#: tree (``tvm_kernels/``, ``build_kernels.py``, ``benchmarks/``) under ``longformer_tvm/_build/``
#: and the shipped libraries under ``longformer_tvm/prebuilt/`` (see setup.py).
INSTALLED = not ((_CHECKOUT / "tvm_kernels").is_dir() and (_CHECKOUT / "build_kernels.py").is_file())
#: The tree holding ``tvm_kernels/`` and ``build_kernels.py``: the checkout, or the wheel's copy.
REPO_DIR = PACKAGE_DIR / "_build" if INSTALLED else _CHECKOUT
KERNEL_SOURCES = REPO_DIR / "tvm_kernels"
BUILD_SCRIPT = REPO_DIR / "build_kernels.py"
#: The shipped libraries, their manifest and the tuning databases.
PREBUILT_DIR = PACKAGE_DIR / "prebuilt" if INSTALLED else REPO_DIR / "prebuilt"
TUNING_DIR = PREBUILT_DIR / "tuning"

# ---- sources and versions -------------------------------------------------------------------
#: The sources each device's libraries are compiled from (relative to the repository); their hash
#: goes into each manifest entry, so an edit to the CPU kernels leaves the CUDA libraries valid.
SOURCES = {
    "cpu": ["tvm_kernels/band.py", "tvm_kernels/cpu/kernels.py", "tvm_kernels/cpu/tpv.py",
            "tvm_kernels/cpu/schedules.py",
            "tvm_kernels/cpu/attention.py", "tvm_kernels/cpu/attention_grad.py",
            "tvm_kernels/cpu/attention_schedules.py", "tvm_kernels/cpu/threads.c"],
    "cuda": ["tvm_kernels/band.py", "tvm_kernels/cuda/kernels.py", "tvm_kernels/cuda/schedules.py"],
}

#: (B, N, H, D, w, dilation): the paper's and the benchmarks' shape, where tuning measures.
TUNING_SHAPE = (1, 4096, 12, 64, 256, 1)

#: Window classes of the CPU libraries' variants: (name, the largest C = left + right + 1 the class
#: serves (None: every larger C), the window w it is tuned at, C = 2w + 1). A product's fixed costs
#: per row (packing, the band's read-off, the edges) weigh on narrow bands, where tuning picks other
#: tiles and register blocks than on wide ones. The bounds sit between the representative windows
#: (C = 33, 129, 513 at w = 16, 64, 256, the windows of the tuning acceptance): w <= 32, w <= 128.
WINDOW_CLASSES = (("narrow", 65, 16), ("medium", 257, 64), ("wide", None, 256))
#: Where each CPU product's call takes ``left`` (``right`` follows it): the dispatch by window reads it.
WINDOW_ARG = {product: args.index("left") for product, args in SIGNATURES.items()}


def window_class(columns: int) -> str:
    """The class (WINDOW_CLASSES) that serves a band of ``columns`` = left + right + 1."""
    for name, most, _ in WINDOW_CLASSES:
        if most is None or columns <= most:
            return name
    raise AssertionError("the last window class has no bound")


def class_shape(name: str) -> tuple[int, int, int, int, int, int]:
    """(B, N, H, D, w, dilation) at which the window class ``name`` is tuned."""
    for cls, _, w in WINDOW_CLASSES:
        if cls == name:
            b, n, h, d, _, dil = TUNING_SHAPE
            return (b, n, h, d, w, dil)
    raise ValueError(f"window class must be one of {[c for c, _, _ in WINDOW_CLASSES]}, got {name!r}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_hash(files: list[str], root: Path = REPO_DIR) -> str | None:
    """sha256 over kernel sources (paths relative to the repository ``root``), None if one is
    absent."""
    h = hashlib.sha256()
    for rel in sorted(files):
        path = root / rel
        if not path.is_file():
            return None
        h.update(rel.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def installed_versions() -> dict[str, str]:
    """The installed apache-tvm and apache-tvm-ffi releases ('' where not installed)."""
    out = {}
    for dist, key in (("apache-tvm", "tvm"), ("apache-tvm-ffi", "tvm_ffi")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = ""
    return out


# ---- the machine ----------------------------------------------------------------------------

def host_cpu_features() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_isa() -> str:
    """The best CPU ISA level of :data:`CPU_ISAS` this machine runs."""
    have = host_cpu_features()
    return next((isa for isa, needs in CPU_ISAS.items() if set(needs) <= have), "generic")


RUNTIME_DIR_ENV = "LONGFORMER_TVM_RUNTIME_DIR"
CUDART_ENV = "LONGFORMER_TVM_CUDART"


def tvm_lib_dir() -> Path | None:
    """Folder of ``libtvm_runtime*.so``: ``$LONGFORMER_TVM_RUNTIME_DIR`` (runtime libraries without
    apache-tvm), else the apache-tvm wheel's ``lib/`` (found without importing the compiler)."""
    env = os.environ.get(RUNTIME_DIR_ENV)
    if env:
        return Path(env).expanduser()
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return lib if lib.is_dir() else None


def cuda_homes() -> list[Path]:
    """CUDA toolkit roots to search, in order: ``$CUDA_HOME``, ``$CUDA_PATH``, /usr/local/cuda."""
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    return [Path(h) for h in homes if h]


def nvidia_wheel_dirs() -> list[Path]:
    """Roots of the ``nvidia-*`` wheels (``nvidia/``), found without importing them."""
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def find_cudart() -> Path | None:
    """Absolute path of libcudart.so.13 -- ``$LONGFORMER_TVM_CUDART``, the nvidia-cuda-runtime
    wheel, then the CUDA toolkit -- or None (then the system loader is asked by name)."""
    env = os.environ.get(CUDART_ENV)
    if env:
        return Path(env).expanduser()
    for base in nvidia_wheel_dirs():
        for sub in ("cu13/lib", "cuda_runtime/lib"):
            if (base / sub / CUDART_SONAME).is_file():
                return base / sub / CUDART_SONAME
    for home in cuda_homes():
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if (home / sub / CUDART_SONAME).is_file():
                return home / sub / CUDART_SONAME
    return None
