"""The CUDA libraries' kernels on the CPU: TVM's own CUDA source under a thread-block emulator.

No GPU is needed. For one library (dtype + the configurations :func:`.build.configs_for` gives,
hand or tuned) :class:`EmulatedLibrary`

1. schedules the three products with the functions the build uses (:func:`.build.scheduled_funcs`)
   and lowers them through ``tvm.compile``'s own pipeline up to the host / device split;
2. generates the kernels' CUDA C source with ``target.build.cuda`` (no nvcc), replaces TVM's
   preamble with ``emulate.h`` (thread and block indices, ``half`` / ``nv_bfloat16`` storage with
   round-to-nearest-even, ``__shared__`` arrays in a per-block arena between canaries, each CUDA
   thread a fiber that runs until its next ``__syncthreads()``) and compiles it with g++ into a
   tvm-ffi library whose functions carry the kernels' names; compiled libraries are cached by a
   hash of their source (:func:`cache_dir`), so reruns take seconds;
3. builds the host side with TVM's LLVM host code (``tirx.disable_assert``, so it takes CPU
   tensors) and imports that library into it: the host computes every kernel argument and the
   launch extents and finds the kernel by name among its imports, exactly as it finds the
   CUDA module's on a GPU.

``functions`` then has the compiled library's calling convention (:data:`_contract.SIGNATURES`),
on CPU tensors. A kernel that reaches ``__syncthreads()`` in some threads and not others, or
writes outside its shared buffers, raises :class:`EmulationError` (a ``RuntimeError``); stray
global writes and changed inputs are the caller's to find, with :class:`Guarded` buffers.
``mutate`` edits the CUDA source before it is compiled (the fault-injection tests use it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from longformer_tvm._contract import PRODUCTS

logger = logging.getLogger("tvm_kernels")

HEADER = Path(__file__).with_name("emulate.h")
#: Thread orders within a phase (between two barriers).
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
#: Bytes of canary before, between and after the shared buffers of a block.
GAP = 64
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-w", "-fno-strict-aliasing",
            "-fvisibility=hidden"]
CACHE_ENV = "LONGFORMER_TVM_EMULATOR_CACHE"
_BYTES = {"half": 2, "nv_bfloat16": 2, "float": 4, "double": 8, "int": 4, "int64_t": 8,
          "signed char": 1, "char": 1, "bool": 1}


class EmulationError(RuntimeError):
    """The emulator caught a kernel misbehaving, or could not build it."""


def _register_error() -> None:
    """Let errors the emulated kernels raise through tvm-ffi arrive as :class:`EmulationError`."""
    import tvm_ffi

    try:
        tvm_ffi.register_error("EmulationError", EmulationError)
    except ValueError:  # registered already
        pass


def find_gxx() -> str | None:
    """The C++ compiler the emulator needs (``$CXX``, else g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir() -> Path:
    """Where compiled emulator libraries live: ``$LONGFORMER_TVM_EMULATOR_CACHE``, else the
    per-user cache (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longformer_tvm" / "cuda-emulator"


def clear_cache() -> None:
    """Forget every compiled emulator library and every lowered module."""
    shutil.rmtree(cache_dir(), ignore_errors=True)
    _lowered.cache_clear()


# ---- lowering: the build's own schedules, tvm.compile's own pipeline ------------------------

def lower(dtype: str, configs: dict, arch: str = "sm_80"):
    """(host IRModule, device IRModule, target) of the three products as the CUDA build schedules
    them, lowered as ``tvm.compile`` lowers them, split into host and device."""
    import tvm

    from .build import scheduled_funcs

    tbuild = importlib.import_module("tvm.tirx.build")  # tvm.tirx.build is also a function
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    mod = tvm.tirx.transform.BindTarget(target)(tvm.IRModule(scheduled_funcs(dtype, configs)))
    pipeline, finalize_host, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
        host, devices = tbuild.split_host_device_mods(pipeline(mod))
        host = finalize_host()(host)
    (device,) = [finalize_device()(m) for m in devices.values()]
    return host, device, target


@functools.lru_cache(maxsize=8)
def _lowered(dtype: str, configs_json: str):
    """:func:`lower`, once per (dtype, configuration): variants of a library share it."""
    return lower(dtype, json.loads(configs_json))


def cuda_source(device, target) -> str:
    """The CUDA C source TVM generates for ``device`` (``target.build.cuda``; nvcc is not run)."""
    import tvm

    return str(tvm.get_global_func("target.build.cuda")(device, target).inspect_source())


def library_source(dtype: str, configs: dict) -> str:
    """The CUDA source of one library's three kernels (lowered once per configuration)."""
    _, device, target = _lowered(dtype, json.dumps(configs, sort_keys=True))
    return cuda_source(device, target)


def launch_tags(device) -> dict[str, list[str]]:
    """{kernel: the launch extents the host passes after its arguments, in order}."""
    return {gv.name_hint: [str(t) for t in f.attrs["tirx.kernel_launch_params"]]
            for gv, f in device.functions.items()}


# ---- the emulator's C++ source ----------------------------------------------------------------

@dataclasses.dataclass
class Kernel:
    """One ``__global__`` function of the CUDA source."""

    name: str
    params: list[tuple[str, str]]  # (C type, name)
    tags: list[str]  # launch extents after the arguments (blockIdx.x, threadIdx.x, ...)
    shared: list[tuple[str, str, int, int]] = dataclasses.field(default_factory=list)
    # (C type, name, element count, byte offset in the arena)
    arena: int = 0


_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(([^)]*)\)\s*\{')
_SHARED = re.compile(r"__shared__\s+(?:alignas\((\d+)\)\s+)?([A-Za-z_][\w ]*?)\s+(\w+)\[(\d+)\];")


def _params(text: str) -> list[tuple[str, str]]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        words = part.replace("__restrict__", " ").replace("*", " * ").split()
        out.append((" ".join(words[:-1]).replace(" *", "*"), words[-1]))
    return out


def emulation_source(source: str, tags: dict[str, list[str]]) -> tuple[str, list[Kernel]]:
    """TVM's CUDA ``source`` as C++ for the emulator: preamble replaced, shared arrays placed in
    the arena, and one tvm-ffi function per kernel that runs the launch it receives."""
    start = source.find('extern "C"')
    if start < 0:
        raise EmulationError("no extern \"C\" kernel in the generated CUDA source")
    body = source[start:]
    if "extern __shared__" in body or "__shfl" in body or "atomic" in body:
        raise EmulationError("the kernels use dynamic shared memory, warp shuffles or atomics, "
                             "which the emulator does not model")
    matches = list(_SIGNATURE.finditer(body))
    kernels = [Kernel(m.group(1), _params(m.group(2)), tags[m.group(1)]) for m in matches]
    pieces, pos = [], 0
    for m, kernel, nxt in zip(matches, kernels, [*matches[1:], None]):
        end = nxt.start() if nxt else len(body)
        offset = GAP

        def place(s, kernel=kernel):
            nonlocal offset
            align, ctype, name, count = int(s.group(1) or 16), s.group(2), s.group(3), int(s.group(4))
            if ctype not in _BYTES:
                raise EmulationError(f"{kernel.name}: shared array {name} of unknown type {ctype!r}")
            offset = -(-offset // max(align, 16)) * max(align, 16)
            kernel.shared.append((ctype, name, count, offset))
            line = f"{ctype}* {name} = ({ctype}*)(emu_shared + {offset});"
            offset += count * _BYTES[ctype] + GAP
            return line

        pieces.append(body[pos:m.end()])
        pieces.append(_SHARED.sub(place, body[m.end():end]))
        kernel.arena = -(-offset // 64) * 64
        pos = end
    out = [HEADER.read_text(encoding="utf-8"), '#include <mutex>', '#include <tvm/ffi/c_api.h>',
           "".join(pieces) + "\n", _EXPORTS]
    out += [_wrapper(k) for k in kernels]
    return "\n".join(out), kernels


_EXPORTS = r"""
static std::mutex emu_lock;  // one launch at a time: the scheduler's state is global
static int emu_order = 0;
static uint64_t emu_seed = 0;
#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

EMU_EXPORT int __tvm_ffi___tvm_set_device(void*, const TVMFFIAny*, int32_t, TVMFFIAny* r) {
  return 0;  // one device: the CPU
}
EMU_EXPORT int __tvm_ffi_emu_configure(void*, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  emu_order = (int)a[0].v_int64;
  emu_seed = (uint64_t)a[1].v_int64;
  return 0;
}
static inline double emu_float(const TVMFFIAny& a) {
  return a.type_index == kTVMFFIFloat ? a.v_float64 : (double)a.v_int64;
}
"""


def _wrapper(k: Kernel) -> str:
    args = []
    for i, (ctype, _) in enumerate(k.params):
        if ctype.endswith("*"):
            args.append(f"({ctype})emu_a[{i}].v_ptr")
        elif ctype in ("float", "double"):
            args.append(f"({ctype})emu_float(emu_a[{i}])")
        else:
            args.append(f"({ctype})emu_a[{i}].v_int64")
    dims = {"blockIdx": "grid", "threadIdx": "block"}
    launch = []
    for i, tag in enumerate(k.tags):
        kind, _, axis = tag.partition(".")
        if kind not in dims:
            raise EmulationError(f"{k.name}: launch parameter {tag!r} is not emulated")
        launch.append(f"  {dims[kind]}.{axis} = (unsigned)a[{len(k.params) + i}].v_int64;")
    regions = ", ".join(f'{{"{name}", {off}, {count * _BYTES[ctype]}}}'
                        for ctype, name, count, off in k.shared) or '{"", 0, 0}'
    nparams = len(k.params) + len(k.tags)
    return f"""
static const TVMFFIAny* emu_a_{k.name};
static void emu_body_{k.name}() {{
  const TVMFFIAny* emu_a = emu_a_{k.name};
  {k.name}({", ".join(args)});
}}
EMU_EXPORT int __tvm_ffi_{k.name}(void*, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {{
  if (n != {nparams}) {{
    TVMFFIErrorSetRaisedFromCStr("RuntimeError", "{k.name}: expected {nparams} arguments");
    return -1;
  }}
  static const emu_region regions[] = {{{regions}}};
  emu_dim3 grid{{1, 1, 1}}, block{{1, 1, 1}};
{chr(10).join(launch)}
  std::lock_guard<std::mutex> hold(emu_lock);
  emu_a_{k.name} = a;
  char err[512];
  if (emu_launch("{k.name}", emu_body_{k.name}, grid, block, regions, {len(k.shared)},
                 {k.arena}, emu_order, emu_seed, err, sizeof err)) {{
    TVMFFIErrorSetRaisedFromCStr("EmulationError", err);
    return -1;
  }}
  return 0;
}}
"""


# ---- compiling, with a cache keyed by the source -----------------------------------------------

def _ffi_paths() -> tuple[Path, Path]:
    import tvm_ffi

    root = Path(tvm_ffi.__file__).resolve().parent
    return root / "include", root / "lib"


def compile_source(cpp: str) -> Path:
    """The emulator library for ``cpp``: from the cache when it holds one with this source,
    compiler and flags, else compiled with g++ and written there (write, then rename)."""
    gxx = find_gxx()
    if gxx is None:
        raise EmulationError("g++ not found: the CUDA emulator compiles the kernels' source with a "
                             "C++ compiler (install g++, or set CXX)")
    include, lib = _ffi_paths()
    version = subprocess.run([gxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([cpp, version, " ".join(CXXFLAGS), str(include)]).encode())
    path = cache_dir() / f"emu-{key.hexdigest()[:24]}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lftvm-emu-") as tmp:
        src, out = Path(tmp) / "kernels.cc", Path(tmp) / "kernels.so"
        src.write_text(cpp, encoding="utf-8")
        cmd = [gxx, *CXXFLAGS, f"-I{include}", str(src), "-o", str(out), f"-L{lib}", "-ltvm_ffi",
               f"-Wl,-rpath,{lib}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EmulationError(f"g++ failed ({proc.returncode}) on the emulated kernels:\n"
                                 f"{proc.stderr[-4000:]}")
        fd, tmp_final = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(out, tmp_final)
        os.replace(tmp_final, path)
    logger.info("compiled emulated kernels %s", path)
    return path


# ---- one library -----------------------------------------------------------------------------

class EmulatedLibrary:
    """The three products of one CUDA library (``dtype``, ``configs`` as
    :func:`.build.configs_for` returns them) running under the emulator on CPU tensors.

    ``functions[product]`` takes the compiled library's arguments. ``mutate(source)`` may edit
    the CUDA source first. :meth:`configure` picks the thread order (and the shuffle's seed).
    """

    def __init__(self, dtype: str, configs: dict, mutate: Callable[[str], str] | None = None,
                 order: str = "forward", seed: int = 0):
        import tvm
        import tvm_ffi

        tbuild = importlib.import_module("tvm.tirx.build")
        _register_error()
        self.dtype, self.configs = dtype, configs
        host, device, target = _lowered(dtype, json.dumps(configs, sort_keys=True))
        self.source = cuda_source(device, target)
        if mutate is not None:
            self.source = mutate(self.source)
        cpp, self.kernels = emulation_source(self.source, launch_tags(device))
        self.path = compile_source(cpp)
        self._device = tvm_ffi.load_module(str(self.path))
        with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
            self._host = tbuild.codegen_build(host, target.host)
        self._host.import_module(self._device)
        self.functions = {product: self._host[symbol] for product, symbol in PRODUCTS.items()}
        self.configure(order, seed)

    def configure(self, order: str = "forward", seed: int = 0) -> None:
        """Run each phase's threads in ``order`` (see :data:`ORDERS`)."""
        if order not in ORDERS:
            raise ValueError(f"order={order!r}: choose one of {list(ORDERS)}")
        self._device["emu_configure"](ORDERS[order], seed)
        self.order = order


# ---- global memory: canaries around every buffer ----------------------------------------------

#: 0xFFA5 in every 16-bit unit: a NaN in float32, float16 and bfloat16 alike.
SENTINEL = {2: -91, 4: -5898331}  # as int16 / int32
BORDER = 64  # elements of canary before and after each buffer


class Guarded:
    """A (B, N, H, X) tensor laid out strided inside a bigger buffer of sentinels: one spare head
    and three spare columns per row (so its strides are not a contiguous tensor's), and
    :data:`BORDER` elements before and after. ``values`` fill :attr:`view` (None: an output,
    sentinel throughout, so every element the kernel leaves unwritten stays NaN).
    :meth:`changed` counts the elements that now differ, bit for bit, from the state after
    construction: anywhere (for an input) or outside the view (for an output)."""

    def __init__(self, shape, dtype, values=None):
        import torch

        b, n, h, x = shape
        width = torch.empty(0, dtype=dtype).element_size()
        self._ints = {2: torch.int16, 4: torch.int32}[width]
        size = b * n * (h + 1) * (x + 3) + 2 * BORDER
        self._flat = torch.full((size,), SENTINEL[width], dtype=self._ints).view(dtype)
        inside = torch.zeros(size, dtype=torch.bool)

        def window(flat):
            return flat[BORDER:size - BORDER].view(b, n, h + 1, x + 3)[:, :, 1:, 2:2 + x]

        self.view = window(self._flat)
        window(inside).fill_(True)
        self._outside = ~inside
        if values is not None:
            self.view.copy_(values)
        self._before = self._flat.view(self._ints).clone()

    def changed(self, outside_only: bool = False) -> int:
        diff = self._flat.view(self._ints) != self._before
        if outside_only:
            diff &= self._outside
        return int(diff.sum())
