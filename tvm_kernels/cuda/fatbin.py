"""Find the CUDA fatbins inside an exported TVM library and list the machine code they hold.

A TVM library keeps its device code in a serialized blob inside the shared object; the fatbin is
stored there verbatim, so it can be located by its header (magic ``0xBA55ED50``, version, header
size, payload size) and cut out. ``cuobjdump`` (PyPI ``nvidia-cuda-cuobjdump``, or the CUDA
toolkit's) then lists the SASS (``-lelf``) and PTX (``-lptx``) entries. Imports nothing from TVM.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from longformer_tvm._contract import cuda_homes, nvidia_wheel_dirs

FATBIN_MAGIC = 0xBA55ED50
_HEADER = struct.Struct("<IHHQ")  # magic, version, header size, payload size


class CuobjdumpNotFound(RuntimeError):
    """cuobjdump is neither on PATH, in the nvidia-cuda-cuobjdump wheel, nor in CUDA_HOME."""


def extract_fatbins(data: bytes) -> list[bytes]:
    """Every well-formed fatbin in ``data`` (usually exactly one per CUDA library)."""
    magic = struct.pack("<I", FATBIN_MAGIC)
    out, pos = [], 0
    while True:
        i = data.find(magic, pos)
        if i < 0 or i + _HEADER.size > len(data):
            return out
        _, version, header, payload = _HEADER.unpack_from(data, i)
        end = i + header + payload
        if version == 1 and header == 16 and end <= len(data):
            out.append(data[i:end])
            pos = end
        else:
            pos = i + 4


def find_cuobjdump() -> str:
    """Path of cuobjdump: $CUOBJDUMP, PATH, the nvidia-cuda-cuobjdump wheel, then CUDA_HOME."""
    env = os.environ.get("CUOBJDUMP")
    if env and Path(env).is_file():
        return env
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in nvidia_wheel_dirs():
        for cand in sorted(base.glob("cu*/bin/cuobjdump")) + sorted(
                base.glob("cuda_cuobjdump/bin/cuobjdump")):
            if cand.is_file():
                return str(cand)
    for home in cuda_homes():
        if (home / "bin" / "cuobjdump").is_file():
            return str(home / "bin" / "cuobjdump")
    raise CuobjdumpNotFound(
        "cuobjdump not found: install the test extra (pip install -e .[test], which brings "
        "nvidia-cuda-cuobjdump), put the CUDA toolkit's bin/ on PATH, or set CUOBJDUMP=/path")


def list_code(fatbin: bytes, cuobjdump: str | None = None) -> dict[str, list[str]]:
    """{"sass": ["sm_80", ...], "ptx": ["sm_90", ...]} of one fatbin, as cuobjdump lists them."""
    tool = cuobjdump or find_cuobjdump()
    with tempfile.TemporaryDirectory(prefix="lftvm-fatbin-") as tmp:
        path = Path(tmp) / "code.fatbin"
        path.write_bytes(fatbin)
        out = {}
        for kind, flag in (("sass", "-lelf"), ("ptx", "-lptx")):
            proc = subprocess.run([tool, flag, str(path)], capture_output=True, text=True)
            text = proc.stdout + proc.stderr
            if proc.returncode != 0 and "No " not in text:
                raise RuntimeError(f"{tool} {flag} failed ({proc.returncode}): {text.strip()}")
            out[kind] = sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.(?:cubin|ptx)", proc.stdout)))
        return out


def library_code(path: Path, cuobjdump: str | None = None) -> dict[str, list[str]]:
    """SASS and PTX architectures of every fatbin in a library file (merged)."""
    merged: dict[str, set[str]] = {"sass": set(), "ptx": set()}
    fatbins = extract_fatbins(Path(path).read_bytes())
    for fb in fatbins:
        for kind, archs in list_code(fb, cuobjdump).items():
            merged[kind].update(archs)
    return {"fatbins": len(fatbins), **{k: sorted(v) for k, v in merged.items()}}
