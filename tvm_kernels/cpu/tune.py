"""MetaSchedule driver: tune each CPU product per window class, database in/out.

The space of a product has two levels. Its *structures* (``build.structures``: tile height, slab
rounding, row group, register block height) are different functions, so each is its own
MetaSchedule workload; within one, the schedule's knobs are sampled (``sch.sample_categorical``),
so a tuning record is a trace of those decisions. Every (product, window class, structure) is
tuned on the function specialised to the class's shape (``_contract.class_shape``: MetaSchedule must
allocate inputs; the workload carries ``lftvm_class`` and ``lftvm_structure`` attributes), and the
fastest record per (product, class) wins. ``build`` replays it on the symbolic function of that
structure, so it needs no tuning run and gives the same schedule every time, and writes the
library's dispatch table (``build.plan``). The database (MetaSchedule's JSON workload/record files)
lives in ``prebuilt/tuning/cpu-<isa>-<dtype>/``.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.ir.utils import derived_object

from longformer_tvm._contract import CPU_ISAS, PRODUCTS, WINDOW_CLASSES, class_shape, host_isa

from .. import band
from ..rpc import runner as rpc_runner
from . import build, schedules
from .build import ALL_PRODUCTS, scheduled_func, tiled_func
from .targets import CPU_TARGETS

logger = logging.getLogger("tvm_kernels")
_PRODUCT_OF = {symbol: product for product, symbol in ALL_PRODUCTS.items()}  # exported symbol -> product


def db_dir(root: Path, isa: str, dtype: str) -> Path:
    return Path(root) / f"cpu-{isa}-{dtype}"


def _space(product: str, dtype: str, target, structure: dict):
    def schedule(sch: s_tir.Schedule) -> None:
        build.schedule(sch, product, dtype, target, {}, structure)

    return ms.space_generator.ScheduleFn(schedule, sch_rules=[], postprocs=[], mutator_probs={})


def parse_structure(label: str) -> dict:
    """The inverse of ``build.structure_label``: "tm=1,panel_round=2" -> {"tm": 1, "panel_round": 2}."""
    return {k: int(v) for k, v in (part.split("=") for part in label.split(",") if part)}


@derived_object
class _SymbolicBuilder(ms.builder.PyBuilder):
    """Builds what will ship: the *symbolic* product with the candidate's knob values.

    MetaSchedule hands over the candidate scheduled at the tuning shape; compiled with constant
    shapes, LLVM would optimise it differently from the library ``build`` makes. The knob values
    are read back from the candidate's annotations and applied to the symbolic function.
    """

    def __init__(self, dtype: str, target, workdir: str):
        self.dtype, self.target, self.workdir = dtype, target, workdir

    def build(self, build_inputs):
        results = []
        for inp in build_inputs:
            func = inp.mod["main"]
            product = _PRODUCT_OF[str(func.attrs["global_symbol"])]
            try:
                knobs = schedules.knobs_in(func)
                structure = parse_structure(str(func.attrs["lftvm_structure"]))
                built = scheduled_func(product, self.dtype, self.target, knobs=knobs,
                                       structure=structure)
                # MetaSchedule removes each artifact's folder once it has run
                path = os.path.join(tempfile.mkdtemp(dir=self.workdir), f"candidate_{product}.so")
                tvm.compile(tvm.IRModule({ALL_PRODUCTS[product]: built}),
                            target=self.target.llvm()).export_library(path)
                results.append(ms.builder.BuilderResult(path, None))
            except Exception as exc:  # a candidate that does not build is a result, not a crash
                results.append(ms.builder.BuilderResult(None, f"{type(exc).__name__}: {exc}"))
        return results


@derived_object
class _Done(ms.runner.PyRunnerFuture):
    def __init__(self, result):
        self.res = result

    def done(self) -> bool:
        return True

    def result(self):
        return self.res


@derived_object
class _InProcessRunner(ms.runner.PyRunner):
    """Times a built candidate the way the package calls it: torch tensors at the class's shape."""

    def __init__(self, product: str, dtype: str, cls: str, repeats: int = 7):
        self.args, self.symbol, self.repeats = call_args(product, dtype, cls), ALL_PRODUCTS[product], repeats

    def run(self, runner_inputs):
        futures = []
        for inp in runner_inputs:
            try:
                fn = tvm_ffi.load_module(inp.artifact_path)[self.symbol]
                fn(*self.args)  # warm up: workspace pool, caches
                secs = []
                for _ in range(self.repeats):
                    t0 = time.perf_counter()
                    fn(*self.args)
                    secs.append(time.perf_counter() - t0)
                futures.append(_Done(ms.runner.RunnerResult(secs, None)))
            except Exception as exc:
                futures.append(_Done(ms.runner.RunnerResult(None, f"{type(exc).__name__}: {exc}")))
        return futures


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """A progress bar over measured candidates (tqdm when installed, log lines otherwise)."""

    def __init__(self, total: int, label: str):
        self.done, self.total, self.label = 0, total, label
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="trial")
        except ImportError:
            self.bar = None

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self.done += len(runner_results)
        if self.bar is not None:
            best = [r.run_secs for r in runner_results if r.run_secs]
            if best:
                self.bar.set_postfix(last_ms=f"{1e3 * min(float(x) for x in best[0]):.2f}")
            self.bar.update(len(runner_results))
        else:
            logger.info("%s: %d/%d trials measured", self.label, self.done, self.total)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _all_cores() -> int:
    """This machine's cores, which the in-process timings use: TVM's thread pool sizes itself from
    TVM_NUM_THREADS when first used (its default is half the CPUs), so it is set before that."""
    ncores = os.cpu_count() or 1
    os.environ.setdefault("TVM_NUM_THREADS", str(ncores))
    return ncores


def measurable_here(isa: str) -> bool:
    """Whether this machine can time ``isa``'s code: its own ISA level or one below it (an
    AVX-512 machine runs avx2 and generic code, an AVX2 one generic)."""
    order = list(CPU_ISAS)  # best first
    return order.index(isa) >= order.index(host_isa())


#: The products MetaSchedule tunes. The fused backward's schedule does not replay as a trace on
#: TVM 0.27 (scheduling its two key GEMMs edits the shared tile loops of the function in place, so
#: the replay on the workload sees other loops: "old_outputs.size() == new_outputs.size()"); it
#: ships its hand schedule.
TUNABLE = ("qk", "pv", "tpv", "attention")


def call_args(product: str, dtype: str, cls: str) -> tuple:
    """A product's call at the window class's shape: torch tensors and scalars, as the package
    passes them (q, k, v ~ N(0, 1); the backward's lse from a plausible range)."""
    import torch

    b, n, h, d, w, dil = class_shape(cls)
    c = 2 * w + 1
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dt)  # noqa: E731
    if product in PRODUCTS:
        first = mk(b, n, h, d) if product == "qk" else mk(b, n, h, c)
        out = mk(b, n, h, c if product == "qk" else d)
        return (first, mk(b, n, h, d), out, w, w, dil) + ((0.0,) if product == "qk" else ())
    mask = torch.zeros(b, n, dtype=torch.uint8)
    scale = d ** -0.5
    if product == "attention":
        return (mk(b, n, h, d), mk(b, n, h, d), mk(b, n, h, d), mask, mk(b, n, h, d),
                mk(b, n, h), w, w, dil, scale)
    lse = torch.full((b, n, h), float(torch.log(torch.tensor(float(c)))) + 1.0).to(dt)
    return (mk(b, n, h, d), mk(b, n, h, d), mk(b, n, h, d), mask, mk(b, n, h, d), mk(b, n, h, d),
            lse, mk(b, n, h), mk(b, n, h, d), mk(b, n, h, d), mk(b, n, h, d), w, w, dil, scale)


def _scalars(product: str, cls: str) -> tuple:
    _, _, _, d, w, dil = class_shape(cls)
    return (w, w, dil) + ((0.0,) if product == "qk" else () if product in PRODUCTS else (d ** -0.5,))


def _runner(product: str, dtype: str, cls: str, rpc: tuple[str, str] | None):
    if rpc is None:
        return _InProcessRunner(product, dtype, cls)
    return rpc_runner(*rpc, ALL_PRODUCTS[product], _scalars(product, cls))


def tune_cpu(isa: str, dtype: str, trials: int, seed: int, db_root: Path,
             products=tuple(PRODUCTS), rpc: tuple[str, str] | None = None,
             classes=tuple(c for c, _, _ in WINDOW_CLASSES), confirm_rounds: int = 5) -> Path:
    """Tune each product per window class, ``trials`` candidates for each (spread over its
    structures) after the hand schedule, then time the hand schedule and the best candidates
    again in ``confirm_rounds`` interleaved rounds (:func:`confirm_cpu`; 0: not); records
    accumulate in the database directory, which is returned.

    Candidates are timed in this process, or with ``rpc=(tracker HOST:PORT, key)`` on the servers
    registered under that key (:mod:`tvm_kernels.rpc`), which must be machines of ``isa``. Locally
    an ISA this machine cannot run is refused (ValueError): it cannot be measured.
    """
    if rpc is None and not measurable_here(isa):
        raise ValueError(f"tune: this machine's ISA level is {host_isa()}, so it cannot measure "
                         f"{isa} code; tune {isa} on an {isa} machine, or measure there with "
                         "--rpc-tracker HOST:PORT --rpc-key KEY (docs/TUNING.md)")
    unknown = [p for p in products if p not in TUNABLE]
    if unknown:
        raise ValueError(f"tune: products must be among {list(TUNABLE)}, got {unknown}")
    names = [c for c, _, _ in WINDOW_CLASSES]
    if [c for c in classes if c not in names]:
        raise ValueError(f"tune: classes must be among {names}, got {[c for c in classes if c not in names]}")
    target = CPU_TARGETS[isa]
    out = db_dir(db_root, isa, dtype)
    out.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(str(out / "database_workload.json"),
                                        str(out / "database_tuning_record.json"),
                                        module_equality="structural")
    ncores = _all_cores()
    llvm = tvm.target.Target(target.llvm(ncores))
    _metaschedule_logging_fix()
    for product in products:
        choices = build.structures(product, dtype, isa)
        for cls in classes:
            with tempfile.TemporaryDirectory(prefix="lftvm-tune-") as work:
                _measure_hand(product, dtype, target, cls, llvm, database,
                              _SymbolicBuilder(dtype, target, work), _runner(product, dtype, cls, rpc))
            progress = _Progress(trials, f"tune {isa}/{dtype}/{product}/{cls}")
            for i, structure in enumerate(choices):
                # every structure gets a share; the first ones get the remainder
                share = trials // len(choices) + (1 if i < trials % len(choices) else 0)
                if share == 0:
                    continue
                with tempfile.TemporaryDirectory(prefix="lftvm-tune-") as work:
                    ms.tune_tir(
                        _workload(product, dtype, isa, cls, structure),
                        llvm, work,
                        max_trials_global=share, num_trials_per_iter=min(share, 8),
                        space=_space(product, dtype, target, structure), strategy="replay-trace",
                        builder=_SymbolicBuilder(dtype, target, tempfile.mkdtemp(dir=work)),
                        runner=_runner(product, dtype, cls, rpc),
                        database=database, cost_model="random",
                        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                           progress],
                        seed=seed, num_tuning_cores=ncores)
            progress.close()
            best = best_records(out).get((product, cls))
            if best is not None:
                logger.info("best %s/%s %s/%s: %.3f ms, %s %s", product, cls, isa, dtype,
                            1e3 * best[2], build.structure_label(best[0]), knob_values(best[1]))
    if confirm_rounds:
        confirm_cpu(isa, dtype, db_root, products, classes, rpc, rounds=confirm_rounds)
    return out


def _metaschedule_logging_fix() -> None:
    """MetaSchedule (TVM 0.27) rebuilds its logging config from the names of the handlers on its
    logger and fails ("'NoneType' object has no attribute 'format'") on an unnamed one, which an
    earlier run leaves there under a capturing handler (pytest's): such handlers are dropped."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(ms_logger.handlers):
        if handler.get_name() is None:
            logger.debug("removing unnamed handler %r from %s", handler, ms_logger.name)
            ms_logger.removeHandler(handler)


def _measure_hand(product: str, dtype: str, target, cls: str, llvm, database, builder, runner) -> None:
    """Measure the hand schedule (hand structure, hand knobs) as the class's first candidate and
    commit it, so the best record is never one the hand schedule beats: tuning can only gain."""
    structure = build.structures(product, dtype, target.isa)[0]
    workload = _workload(product, dtype, target.isa, cls, structure)
    sch = s_tir.Schedule(workload["main"])
    build.schedule(sch, product, dtype, target, build.hand_knobs(product, target.isa, structure),
                   structure)
    built = builder.build([ms.builder.BuilderInput(sch.mod, llvm)])[0]
    if built.error_msg:
        logger.warning("%s/%s: the hand schedule did not build: %s", product, cls, built.error_msg)
        return
    args_info = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
    result = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])[0].result()
    if result.error_msg or not result.run_secs:
        logger.warning("%s/%s: the hand schedule did not run: %s", product, cls, result.error_msg)
        return
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, database.commit_workload(workload), [float(x) for x in result.run_secs], llvm,
        args_info))
    logger.info("hand %s/%s %s/%s: %.3f ms", product, cls, target.isa, dtype,
                1e3 * min(float(x) for x in result.run_secs))


def _specialize_fused(func, shape):
    """Bind the fused kernels' sizes, strides and scalars to ``shape`` (contiguous tensors)."""
    from tvm import tirx

    b, n, h, d, w, dil = shape
    dims = {4: (b, n, h, d), 3: (b, n, h), 2: (b, n)}
    mapping, scalars = {}, []
    for buf in func.params:  # in TVM 0.27 a buffer parameter is its buffer; scalars have no shape
        if not hasattr(buf, "shape"):
            scalars.append(buf)
            continue
        shp = dims[len(buf.shape)]
        strides = [math.prod(shp[i + 1:]) for i in range(len(shp))]
        mapping[buf] = tirx.decl_buffer([tirx.const(x, "int64") for x in shp], buf.dtype, buf.name,
                                        strides=[tirx.const(x, "int64") for x in strides],
                                        elem_offset=tirx.const(0, "int64"),
                                        data_alignment=buf.data_alignment,
                                        offset_factor=buf.offset_factor)
    for param, value in zip(scalars, (w, w, dil)):
        mapping[param] = tirx.const(value, "int64")
    mapping[scalars[3]] = tirx.const(d ** -0.5, "float64")
    return func.specialize(mapping)


def _workload(product: str, dtype: str, isa: str, cls: str = WINDOW_CLASSES[-1][0],
              structure: dict | None = None) -> tvm.IRModule:
    """The module MetaSchedule tunes: a product's formulation at the window class's shape."""
    structure = structure or build.structures(product, dtype, isa)[0]
    func = tiled_func(product, dtype, CPU_TARGETS[isa], structure)
    if product in PRODUCTS:
        func = band.specialize(func, product, dtype, class_shape(cls), pad=0.0)
    else:
        func = _specialize_fused(func, class_shape(cls))
    func = func.with_attr("global_symbol", ALL_PRODUCTS[product]).with_attr("lftvm_class", cls)
    return tvm.IRModule({"main": func})


def _identify(func, dtype: str, isa: str, current: dict):
    """(product, class, structure) of a record's workload if it is a current formulation, else None."""
    product = _PRODUCT_OF.get(str(func.attrs.get("global_symbol", "")))
    cls, label = func.attrs.get("lftvm_class"), func.attrs.get("lftvm_structure")
    if product is None or cls is None or label is None:
        return None
    cls, structure = str(cls), parse_structure(str(label))
    if cls not in [c for c, _, _ in WINDOW_CLASSES] or structure not in build.structures(product, dtype, isa):
        return None
    key = (product, cls, build.structure_label(structure))
    if key not in current:
        current[key] = _workload(product, dtype, isa, cls, structure)
    return (product, cls, structure) if tvm_ffi.structural_equal(func, current[key]["main"]) else None


def ranked_records(path: Path) -> dict:
    """{(product, class): [candidate, ...]} fastest first, from a database dir
    (``<root>/cpu-<isa>-<dtype>``). A candidate is one schedule (structure and knob values) with
    every time measured of it, in every record: its score is their median, so a schedule timed
    again in interleaved rounds (:func:`confirm_cpu`) is judged by those rounds, not by one
    undisturbed moment. Each candidate: dict(structure, knobs, trace, workload, seconds, records).

    Only records of the products' current formulations count: a record tuned on another function
    (an older version of the kernels, or a structure no longer in the space) would not replay, so
    it is skipped with a log line and the product falls back to its hand schedule there.
    """
    wl, rec = Path(path) / "database_workload.json", Path(path) / "database_tuning_record.json"
    if not (wl.is_file() and rec.is_file()):
        return {}
    _, isa, dtype = Path(path).name.split("-")
    database = ms.database.JSONDatabase(str(wl), str(rec), allow_missing=False,
                                        module_equality="structural")
    current, seen, stale, found = {}, {}, set(), {}
    for record in database.get_all_tuning_records():
        secs = [float(x) for x in (record.run_secs or ())]
        if not secs or min(secs) >= 1e9:
            continue
        workload = record.workload
        if workload not in seen:
            seen[workload] = _identify(workload.mod["main"], dtype, isa, current)
        if seen[workload] is None:
            stale.add(str(workload.mod["main"].attrs.get("global_symbol", "?")))
            continue
        product, cls, structure = seen[workload]
        knobs = knob_values(record.trace)
        key = (product, cls, build.structure_label(structure), tuple(sorted(knobs.items())))
        cand = found.setdefault(key, dict(structure=structure, knobs=knobs, trace=record.trace,
                                          workload=workload, samples=[], records=0))
        cand["samples"].extend(secs)
        cand["records"] += 1
    for symbol in sorted(stale):
        logger.info("%s: skipped the records in %s tuned for another formulation of it", symbol, path)
    ranked: dict = {}
    for (product, cls, _, _), cand in found.items():
        cand["seconds"] = statistics.median(cand.pop("samples"))
        ranked.setdefault((product, cls), []).append(cand)
    for cands in ranked.values():
        cands.sort(key=lambda c: c["seconds"])
    return ranked


def best_records(path: Path) -> dict:
    """{(product, class): (structure, trace, seconds)} of the best candidate per product and
    window class (:func:`ranked_records`)."""
    return {key: (c[0]["structure"], c[0]["trace"], c[0]["seconds"])
            for key, c in ranked_records(path).items()}


def confirm_cpu(isa: str, dtype: str, db_root: Path, products, classes, rpc=None, rounds: int = 5,
                top: int = 2) -> None:
    """Time the hand schedule and the ``top`` best candidates of each (product, class) again, in
    ``rounds`` interleaved rounds (each round: one measurement of each, in turn), and commit each
    measurement as a record: the machine's drift then falls on all of them alike, and the median
    decides. Repeated (at most three times) until the best candidate is one so confirmed."""
    target = CPU_TARGETS[isa]
    out = db_dir(db_root, isa, dtype)
    database = ms.database.JSONDatabase(str(out / "database_workload.json"),
                                        str(out / "database_tuning_record.json"),
                                        module_equality="structural")
    llvm = tvm.target.Target(target.llvm(_all_cores()))
    for product in products:
        hand_structure = build.structures(product, dtype, isa)[0]
        hand = (hand_structure, build.hand_knobs(product, isa, hand_structure))
        for cls in classes:
            for _ in range(3):
                cands = ranked_records(out).get((product, cls), [])
                if not cands or cands[0]["records"] > rounds:
                    break
                chosen = [c for c in cands if (c["structure"], c["knobs"]) == hand][:1]
                chosen += [c for c in cands[:top] if c not in chosen]
                runner = _runner(product, dtype, cls, rpc)
                with tempfile.TemporaryDirectory(prefix="lftvm-confirm-") as work:
                    builder = _SymbolicBuilder(dtype, target, work)
                    built = []
                    for c in chosen:
                        sch = s_tir.Schedule(c["workload"].mod["main"])
                        c["trace"].apply_to_schedule(sch, remove_postproc=True)
                        res = builder.build([ms.builder.BuilderInput(sch.mod, llvm)])[0]
                        if res.error_msg:
                            logger.warning("%s/%s: a candidate did not build: %s", product, cls,
                                           res.error_msg)
                        else:
                            info = ms.arg_info.ArgInfo.from_prim_func(c["workload"].mod["main"])
                            built.append((c, res.artifact_path, info))
                    for _ in range(rounds):
                        for c, artifact, info in built:
                            result = runner.run([ms.runner.RunnerInput(artifact, "cpu", info)])[0].result()
                            if result.error_msg or not result.run_secs:
                                logger.warning("%s/%s: a candidate did not run: %s", product, cls,
                                               result.error_msg)
                            else:
                                database.commit_tuning_record(ms.database.TuningRecord(
                                    c["trace"], c["workload"], [float(x) for x in result.run_secs],
                                    llvm, info))
            best = ranked_records(out).get((product, cls))
            if best:
                logger.info("confirmed %s/%s %s/%s: %.3f ms, %s %s", product, cls, isa, dtype,
                            1e3 * best[0]["seconds"], build.structure_label(best[0]["structure"]),
                            best[0]["knobs"])


def knob_values(trace) -> dict:
    """The knob values a trace chose, by name (from its knob annotations): e.g. {"panels": 2, "rows": 8}."""
    sampled = [(inst.outputs[0], [int(x) for x in inst.attrs[0]][int(trace.decisions[inst])])
               for inst in trace.insts
               if inst.kind.name == "SampleCategorical" and inst in trace.decisions]
    out = {}
    for inst in trace.insts:
        if inst.kind.name == "Annotate" and str(inst.attrs[0]).startswith(schedules.KNOB_PREFIX):
            value = inst.inputs[1]
            chosen = [v for rv, v in sampled if rv.same_as(value)]
            out[str(inst.attrs[0])[len(schedules.KNOB_PREFIX):]] = chosen[0] if chosen else int(value)
    return out


def sample_space(product: str, dtype: str, isa: str, seed: int, count: int,
                 structure: dict | None = None) -> list[dict]:
    """The first ``count`` points MetaSchedule's random replay draws with ``seed`` (deterministic)."""
    target = CPU_TARGETS[isa]
    points = []
    for i in range(count):
        sch = s_tir.Schedule(tiled_func(product, dtype, target, structure), seed=seed + i + 1)
        build.schedule(sch, product, dtype, target, {}, structure)
        points.append(knob_values(sch.trace))
    return points


def load_records(isa: str, dtype: str, db_root: Path) -> dict:
    """{(product, class): (structure, trace, knobs)} from the saved database; empty when there is
    none for (isa, dtype)."""
    return {key: (structure, trace, knob_values(trace))
            for key, (structure, trace, _) in best_records(db_dir(db_root, isa, dtype)).items()}
