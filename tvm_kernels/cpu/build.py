"""Compile the band products into one CPU library per (ISA level, dtype) and publish it.

The three products of one dtype live in one library (``band_qk``, ``band_pv``,
``band_pv_transposed``) with the fused attention (``band_attention``,
``band_attention_backward``: :mod:`.attention`, :mod:`.attention_grad`). The products are
scheduled by hand (:mod:`.schedules`), by replaying a tuning trace (:mod:`.tune`), or naive (the paper's formulation, :mod:`tvm_kernels.band`). The library and its
manifest entry are published together (:func:`tvm_kernels.publish.publish_library`). Every
CPU library links :data:`THREADS_SOURCE` in, the launcher that runs its kernels on torch's OpenMP
threads (:mod:`longformer_tvm._threads`): :func:`export_cpu`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import filelock
import tvm
from tvm import s_tir, te

from longformer_tvm._contract import FUSED_PRODUCTS, PRODUCTS, WINDOW_CLASSES

from .. import band, publish
from . import attention, attention_grad, attention_schedules, kernels, schedules, tpv
from .targets import CPU_TARGETS, CpuTarget

logger = logging.getLogger("tvm_kernels")


#: Every CPU product: the band products, then the fused attention (forward, backward).
ALL_PRODUCTS = {**PRODUCTS, **FUSED_PRODUCTS}
#: The C source every CPU library links: its parallel loops' launcher on OpenMP threads.
THREADS_SOURCE = Path(__file__).with_name("threads.c")


def export_cpu(module, path: Path) -> None:
    """Export a compiled CPU module as a library at ``path``, with the launcher linked in (load it
    with :func:`longformer_tvm._threads.install` after ``tvm_ffi.load_module`` to use it)."""
    module.export_library(str(path), addons=[str(THREADS_SOURCE)])


def structures(product: str, dtype: str, isa: str) -> list[dict]:
    """A product's structural choices (formulation parameters) on an ISA level, the hand one first."""
    if product in PRODUCTS:
        return schedules.structures(product, isa)
    return attention_schedules.structures(dtype, product, isa)


def structure_label(structure: dict) -> str:
    return ",".join(f"{k}={structure[k]}" for k in sorted(structure))


def tiled_func(product: str, dtype: str, target: CpuTarget,
               structure: dict | None = None) -> tvm.tirx.PrimFunc:
    """A product's formulation under ``structure`` (default: the hand one), unscheduled. The
    structure is recorded as the function's ``lftvm_structure`` attribute."""
    structure = dict(structure or structures(product, dtype, target.isa)[0])
    lanes = target.lanes(dtype)
    make = {"qk": kernels.make_qk, "pv": kernels.make_pv, "tpv": tpv.make_tpv,
            "attention": attention.make_attention,
            "attention_backward": attention_grad.make_attention_grad}[product]
    func = make(dtype, lanes, **structure)
    return func.with_attr("lftvm_structure", structure_label(structure))


def naive_func(product: str, dtype: str) -> tvm.tirx.PrimFunc:
    if product == "qk":
        args, _ = band.naive_qk(dtype)
    else:
        args, _ = band.naive_pv(dtype, transposed=product == "tpv")
    return te.create_prim_func(args)


def hand_knobs(product: str, isa: str, structure: dict | None = None) -> dict:
    if product in PRODUCTS:
        return schedules.hand_knobs(product, isa, structure)
    return attention_schedules.hand_knobs("attention" if product == "attention" else "attention_grad", isa)


def schedule(sch: s_tir.Schedule, product: str, dtype: str, target: CpuTarget, knobs: dict,
             structure: dict | None = None) -> None:
    """Schedule a product's formulation; a knob missing from ``knobs`` is sampled (the tuning space)."""
    lanes = target.lanes(dtype)
    if product in PRODUCTS:
        schedules.schedule_tiled(sch, product, knobs, lanes, structure)
    elif product == "attention":
        attention_schedules.schedule_attention(sch, knobs, lanes)
    else:
        attention_schedules.schedule_attention_grad(sch, knobs, lanes)


def scheduled_func(product: str, dtype: str, target: CpuTarget, schedule_kind: str = "hand",
                   knobs: dict | None = None, trace=None, structure: dict | None = None,
                   symbol: str | None = None) -> tvm.tirx.PrimFunc:
    """One product, scheduled: ``hand`` (fixed knobs, overridden by ``knobs``), by a MetaSchedule
    ``trace`` (tuned), or ``naive`` (band products only); exported as ``symbol`` (default the
    product's own)."""
    symbol = symbol or ALL_PRODUCTS[product]
    if schedule_kind == "naive" and product in PRODUCTS:
        sch = s_tir.Schedule(naive_func(product, dtype))
        schedules.schedule_naive(sch)
    else:
        sch = s_tir.Schedule(tiled_func(product, dtype, target, structure))
        if trace is not None:
            trace.apply_to_schedule(sch, remove_postproc=True)
        else:
            schedule(sch, product, dtype, target,
                     {**hand_knobs(product, target.isa, structure), **(knobs or {})}, structure)
    return sch.mod["main"].with_attr("global_symbol", symbol)


@dataclasses.dataclass
class Variant:
    """One compiled version of a product: its structure and knobs (replayed from ``trace`` when
    tuned), the window classes it serves and the symbol it is exported as."""

    product: str
    structure: dict
    knobs: dict
    trace: object = None
    classes: list = dataclasses.field(default_factory=list)
    symbol: str = ""

    @property
    def kind(self) -> str:
        return "tuned" if self.trace is not None else "hand"

    def same_code(self, other: "Variant") -> bool:
        return (self.product, self.structure, self.knobs) == (other.product, other.structure, other.knobs)

    def describe(self) -> str:
        return f"{self.kind}{{{structure_label({**self.structure, **self.knobs})}}}"


def plan(dtype: str, isa: str, records: dict | None = None, products=tuple(ALL_PRODUCTS)) -> dict:
    """{product: [Variant]} for a library: per window class (``_contract.WINDOW_CLASSES``) the
    tuned record ``records[(product, class)] = (structure, trace, knobs)`` where there is one, else
    the hand schedule; classes whose variants are the same code share one. The variant serving
    the widest class is exported under the product's own symbol, the others as
    ``<symbol>__<first class served>``."""
    records = records or {}
    out = {}
    for product in products:
        variants: list[Variant] = []
        for cls, _, _ in WINDOW_CLASSES:
            rec = records.get((product, cls))
            if rec is not None:
                structure, trace, knobs = rec
                v = Variant(product, dict(structure), dict(knobs), trace)
            else:
                structure = structures(product, dtype, isa)[0]
                v = Variant(product, structure, hand_knobs(product, isa, structure))
            same = next((u for u in variants if u.same_code(v)), None)
            if same is not None:
                same.classes.append(cls)
            else:
                v.classes.append(cls)
                variants.append(v)
        for v in variants:
            widest = WINDOW_CLASSES[-1][0] in v.classes
            v.symbol = ALL_PRODUCTS[product] if widest else f"{ALL_PRODUCTS[product]}__{v.classes[0]}"
        out[product] = variants
    return out


def dispatch_table(variants: dict) -> dict:
    """The manifest's ``variants``: {product: [{"max_columns", "function", "class", "schedule"}]},
    one row per window class in order (``max_columns`` None on the last); the loader calls the
    first row whose ``max_columns`` is at least the call's ``left + right + 1``."""
    table = {}
    for product, vs in variants.items():
        rows = []
        for cls, most, _ in WINDOW_CLASSES:
            v = next(u for u in vs if cls in u.classes)
            rows.append({"max_columns": most, "function": v.symbol, "class": cls,
                         "schedule": v.describe()})
        table[product] = rows
    return table


def compile_cpu(dtype: str, target: CpuTarget, schedule_kind: str = "hand",
                variants: dict | None = None):
    """Compile every product's variants (:func:`plan`; default: the hand schedules) for one dtype
    and target; ``schedule_kind="naive"`` compiles the paper's formulation of the band products
    instead (one variant each; the fused kernels stay hand-scheduled). Returns the runtime module."""
    variants = variants or plan(dtype, target.isa)
    funcs = {}
    for product, vs in variants.items():
        for v in vs:
            funcs[v.symbol] = scheduled_func(product, dtype, target, schedule_kind, knobs=v.knobs,
                                             trace=v.trace, structure=v.structure, symbol=v.symbol)
    return tvm.compile(tvm.IRModule(funcs), target=target.llvm())


def build_cpu(dtype: str, isa: str, out_dir: Path, schedule_kind: str = "hand",
              records: dict | None = None) -> dict:
    """Build, export and register one CPU library: per product and window class the tuned
    ``records`` (``tune.load_records``) where given, else the hand schedule (or ``naive``).
    Returns its manifest entry, whose ``variants`` is the dispatch table."""
    target = CPU_TARGETS[isa]
    lock = filelock.FileLock(str(out_dir / f".build-cpu-{isa}-{dtype}.lock"))
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = plan(dtype, isa, None if schedule_kind == "naive" else records)
    if schedule_kind == "naive":  # one naive function per band product
        for product in PRODUCTS:
            variants[product] = [dataclasses.replace(variants[product][-1], classes=[
                c for c, _, _ in WINDOW_CLASSES], symbol=PRODUCTS[product])]
    table = dispatch_table(variants)
    if schedule_kind == "naive":
        for product in PRODUCTS:
            for row in table[product]:
                row["schedule"] = "naive"
    with lock:
        module = compile_cpu(dtype, target, schedule_kind, variants)
        rel = Path("cpu") / f"band_{isa}_{dtype}.so"
        entry = {
            **publish.base_entry("cpu", dtype),
            "isa": isa,
            "target": target.llvm(),
            "cpu_features": list(target.features),
            "schedule": schedule_summary(table),
            "variants": table,
        }
        entry["functions"] = {p: rows[-1]["function"] for p, rows in table.items()}
        entry = publish.publish_library(module, out_dir, rel, entry, addons=[THREADS_SOURCE])
    logger.info("built %s (%s): %s", out_dir / rel, isa, entry["schedule"])
    return entry


def schedule_summary(table: dict) -> str:
    """One line per library: ``product[class,...]:kind{structure and knobs}`` for each variant."""
    parts = []
    for product, rows in table.items():
        seen: dict = {}
        for row in rows:
            seen.setdefault((row["function"], row["schedule"]), []).append(row["class"])
        parts += [f"{product}[{','.join(c)}]:{sched}" for (_, sched), c in seen.items()]
    return " ".join(parts)
