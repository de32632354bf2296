"""Compile the band products into one shared library per (target, dtype) and record it in a manifest.

The three products of one dtype live in one library (``band_qk``, ``band_pv``,
``band_pv_transposed``). A library is written to a temporary name in its folder, then renamed into
place and recorded in the manifest in one step under the manifest's file lock
(:func:`publish_library`), so concurrent builds leave one valid library and one valid manifest, and
a reader holding that lock always sees a file and an entry that agree (``longformer_tvm._loader``
looks again under the lock when they do not).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from pathlib import Path

import filelock
import tvm
from tvm import s_tir, te

from longformer_tvm._loader import installed_versions, sha256_file, source_hash

from . import band, tiled
from .schedules import cpu as cpu_sched
from .targets import CPU_TARGETS, CpuTarget

logger = logging.getLogger("tvm_kernels")

PRODUCTS = {"qk": "band_qk", "pv": "band_pv", "tpv": "band_pv_transposed"}
SCHEDULES = ("hand", "tuned", "naive")
#: The sources a CPU library is compiled from (their hash goes into the manifest).
CPU_SOURCES = ["tvm_kernels/band.py", "tvm_kernels/tiled.py", "tvm_kernels/schedules/cpu.py"]


def tiled_func(product: str, dtype: str, target: CpuTarget) -> tvm.tirx.PrimFunc:
    lanes = target.lanes(dtype)
    if product == "qk":
        return tiled.make_qk(dtype, lanes)
    if product == "pv":
        return tiled.make_pv(dtype, lanes, cpu_sched.pv_group(target.isa))
    return tiled.make_tpv(dtype, lanes)


def naive_func(product: str, dtype: str) -> tvm.tirx.PrimFunc:
    if product == "qk":
        args, _ = band.naive_qk(dtype)
    else:
        args, _ = band.naive_pv(dtype, transposed=product == "tpv")
    return te.create_prim_func(args)


def scheduled_func(product: str, dtype: str, target: CpuTarget, schedule: str = "hand",
                   knobs: dict | None = None, trace=None) -> tvm.tirx.PrimFunc:
    """One product, scheduled: ``hand`` (fixed knobs), ``tuned`` (a MetaSchedule trace) or ``naive``."""
    if schedule == "naive":
        sch = s_tir.Schedule(naive_func(product, dtype))
        cpu_sched.schedule_naive(sch)
    else:
        sch = s_tir.Schedule(tiled_func(product, dtype, target))
        if trace is not None:
            trace.apply_to_schedule(sch, remove_postproc=True)
        else:
            cpu_sched.schedule_tiled(sch, product, {**cpu_sched.hand_knobs(product, target.isa),
                                                    **(knobs or {})}, target.lanes(dtype))
    return sch.mod["main"].with_attr("global_symbol", PRODUCTS[product])


def compile_cpu(dtype: str, target: CpuTarget, schedule: str = "hand", traces: dict | None = None):
    """Compile all three products for one dtype and target. Returns the runtime module."""
    funcs = {}
    for product, symbol in PRODUCTS.items():
        trace = (traces or {}).get(product)
        funcs[symbol] = scheduled_func(product, dtype, target, schedule, trace=trace)
    return tvm.compile(tvm.IRModule(funcs), target=target.llvm())


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry_key(e: dict) -> tuple:
    return (e.get("device"), e.get("dtype"), e.get("isa"), tuple(e.get("archs", ())))


def _manifest_lock(out_dir: Path) -> filelock.FileLock:
    """The lock that guards ``out_dir/manifest.json`` and the files it names."""
    return filelock.FileLock(str(out_dir / "manifest.json") + ".lock")


def _update_manifest_locked(out_dir: Path, entry: dict) -> None:
    manifest = out_dir / "manifest.json"
    data = {"format": 1, "libraries": []}
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            logger.warning("rewriting unreadable manifest %s", manifest)
    if not isinstance(data, dict) or not isinstance(data.get("libraries"), list):
        logger.warning("rewriting malformed manifest %s", manifest)
        data = {"format": 1, "libraries": []}
    libs = [e for e in data["libraries"] if isinstance(e, dict) and _entry_key(e) != _entry_key(entry)]
    libs.append(entry)
    libs.sort(key=lambda e: (str(e.get("device", "")), str(e.get("dtype", "")), str(e.get("isa", ""))))
    data["libraries"] = libs
    _atomic_write_text(manifest, json.dumps(data, indent=2, sort_keys=True) + "\n")


def update_manifest(out_dir: Path, entry: dict) -> None:
    """Insert or replace ``entry`` (same device, dtype, isa/archs) in ``out_dir/manifest.json``."""
    with _manifest_lock(out_dir):
        _update_manifest_locked(out_dir, entry)


def _export_temporary(module, path: Path) -> Path:
    """export_library to a new temporary name beside ``path``, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".so.tmp")
    os.close(fd)
    try:
        module.export_library(tmp)
        os.chmod(tmp, 0o755)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def export_library(module, path: Path) -> None:
    """export_library to a temporary name in the same directory, then rename into place."""
    tmp = _export_temporary(module, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_library(module, out_dir: Path, rel: Path, entry: dict) -> dict:
    """Export ``module`` to ``out_dir/rel`` and record ``entry`` (plus the file's sha256) in the
    manifest: the rename and the manifest update happen together under the manifest's lock."""
    tmp = _export_temporary(module, out_dir / rel)
    try:
        entry = {**entry, "file": rel.as_posix(), "sha256": sha256_file(tmp)}
        with _manifest_lock(out_dir):
            os.replace(tmp, out_dir / rel)
            _update_manifest_locked(out_dir, entry)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return entry


def build_cpu(dtype: str, isa: str, out_dir: Path, schedule: str = "hand",
              traces: dict | None = None, schedule_name: str | None = None) -> dict:
    """Build, export and register one CPU library. Returns its manifest entry."""
    target = CPU_TARGETS[isa]
    lock = filelock.FileLock(str(out_dir / f".build-cpu-{isa}-{dtype}.lock"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock:
        module = compile_cpu(dtype, target, schedule, traces)
        rel = Path("cpu") / f"band_{isa}_{dtype}.so"
        versions = installed_versions()
        entry = {
            "device": "cpu",
            "isa": isa,
            "target": target.llvm(),
            "cpu_features": list(target.features),
            "dtype": dtype,
            "functions": dict(PRODUCTS),
            "tvm_version": versions["tvm"],
            "tvm_ffi_version": versions["tvm_ffi"],
            "sources": CPU_SOURCES,
            "source_hash": source_hash(CPU_SOURCES),
            "schedule": schedule_name or schedule,
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        entry = publish_library(module, out_dir, rel, entry)
    logger.info("built %s (%s, %s schedule)", out_dir / rel, isa, entry["schedule"])
    return entry
