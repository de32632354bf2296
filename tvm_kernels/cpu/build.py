"""Compile the band products into one CPU library per (ISA level, dtype) and publish it.

The three products of one dtype live in one library (``band_qk``, ``band_pv``,
``band_pv_transposed``) with the fused attention (``band_attention``,
``band_attention_backward``: :mod:`.attention`, :mod:`.attention_grad`). The products are
scheduled by hand (:mod:`.schedules`), by replaying a tuning trace (:mod:`.tune`), or naive (the paper's formulation, :mod:`tvm_kernels.band`). The library and its
manifest entry are published together (:func:`tvm_kernels.publish.publish_library`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import filelock
import tvm
from tvm import s_tir, te

from longformer_tvm._contract import FUSED_PRODUCTS, PRODUCTS

from .. import band, publish
from . import attention, attention_grad, attention_schedules, kernels, schedules
from .targets import CPU_TARGETS, CpuTarget

logger = logging.getLogger("tvm_kernels")


def tiled_func(product: str, dtype: str, target: CpuTarget) -> tvm.tirx.PrimFunc:
    lanes = target.lanes(dtype)
    if product == "qk":
        return kernels.make_qk(dtype, lanes)
    if product == "pv":
        return kernels.make_pv(dtype, lanes, schedules.pv_group(target.isa))
    return kernels.make_tpv(dtype, lanes)


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
        schedules.schedule_naive(sch)
    else:
        sch = s_tir.Schedule(tiled_func(product, dtype, target))
        if trace is not None:
            trace.apply_to_schedule(sch, remove_postproc=True)
        else:
            schedules.schedule_tiled(sch, product, {**schedules.hand_knobs(product, target.isa),
                                                    **(knobs or {})}, target.lanes(dtype))
    return sch.mod["main"].with_attr("global_symbol", PRODUCTS[product])


def fused_func(product: str, dtype: str, target: CpuTarget, knobs: dict | None = None,
               trace=None) -> tvm.tirx.PrimFunc:
    """The fused attention forward or backward (``_contract.FUSED_PRODUCTS``), scheduled by hand
    (knobs of :mod:`.attention_schedules`, overridden by ``knobs``) or by a tuning trace."""
    lanes, tm = target.lanes(dtype), attention_schedules.TILE_TM[dtype]
    if product == "attention":
        func, schedule = attention.make_attention(dtype, lanes, tm), attention_schedules.schedule_attention
    else:
        func = attention_grad.make_attention_grad(dtype, lanes, tm)
        schedule = attention_schedules.schedule_attention_grad
    sch = s_tir.Schedule(func)
    if trace is not None:
        trace.apply_to_schedule(sch, remove_postproc=True)
    else:
        name = "attention" if product == "attention" else "attention_grad"
        schedule(sch, {**attention_schedules.hand_knobs(name, target.isa), **(knobs or {})}, lanes)
    return sch.mod["main"].with_attr("global_symbol", FUSED_PRODUCTS[product])


def compile_cpu(dtype: str, target: CpuTarget, schedule: str = "hand", traces: dict | None = None):
    """Compile the three band products and the fused attention (forward, backward) for one dtype
    and target. Returns the runtime module. ``schedule`` applies to the band products; the fused
    kernels are scheduled by hand unless ``traces`` holds one for them (the naive schedule has no
    fused counterpart)."""
    funcs = {}
    for product, symbol in PRODUCTS.items():
        trace = (traces or {}).get(product)
        funcs[symbol] = scheduled_func(product, dtype, target, schedule, trace=trace)
    for product, symbol in FUSED_PRODUCTS.items():
        funcs[symbol] = fused_func(product, dtype, target, trace=(traces or {}).get(product))
    return tvm.compile(tvm.IRModule(funcs), target=target.llvm())


def build_cpu(dtype: str, isa: str, out_dir: Path, schedule: str = "hand",
              traces: dict | None = None, schedule_name: str | None = None) -> dict:
    """Build, export and register one CPU library. Returns its manifest entry."""
    target = CPU_TARGETS[isa]
    lock = filelock.FileLock(str(out_dir / f".build-cpu-{isa}-{dtype}.lock"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock:
        module = compile_cpu(dtype, target, schedule, traces)
        rel = Path("cpu") / f"band_{isa}_{dtype}.so"
        entry = {
            **publish.base_entry("cpu", dtype),
            "isa": isa,
            "target": target.llvm(),
            "cpu_features": list(target.features),
            "schedule": schedule_name or schedule,
        }
        entry = publish.publish_library(module, out_dir, rel, entry)
    logger.info("built %s (%s, %s schedule)", out_dir / rel, isa, entry["schedule"])
    return entry
