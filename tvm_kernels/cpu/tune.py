"""MetaSchedule driver: tune the CPU schedule knobs at a representative shape, database in/out.

The search space is the schedule of :mod:`tvm_kernels.cpu.schedules` with every knob sampled
(``sch.sample_categorical``), so a tuning record is a trace of those decisions. Tuning runs on the
product specialised to ``_contract.TUNING_SHAPE`` (MetaSchedule must allocate inputs); the winning
trace is replayed on the symbolic function by ``build``, which therefore needs no tuning run and
gives the same schedule every time. The database (MetaSchedule's JSON workload/record files) lives in
``prebuilt/tuning/cpu-<isa>-<dtype>/``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.ir.utils import derived_object

from longformer_tvm._contract import CPU_ISAS, PRODUCTS, TUNING_SHAPE, host_isa

from .. import band
from ..rpc import runner as rpc_runner
from . import schedules
from .build import scheduled_func, tiled_func
from .targets import CPU_TARGETS

logger = logging.getLogger("tvm_kernels")


def db_dir(root: Path, isa: str, dtype: str) -> Path:
    return Path(root) / f"cpu-{isa}-{dtype}"


def _space(product: str, lanes: int):
    def schedule(sch: s_tir.Schedule) -> None:
        schedules.schedule_tiled(sch, product, {}, lanes)

    return ms.space_generator.ScheduleFn(schedule, sch_rules=[], postprocs=[], mutator_probs={})


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
            product = {v: k for k, v in PRODUCTS.items()}[str(func.attrs["global_symbol"])]
            try:
                knobs = schedules.knobs_in(func)
                built = scheduled_func(product, self.dtype, self.target, knobs=knobs)
                # MetaSchedule removes each artifact's folder once it has run
                path = os.path.join(tempfile.mkdtemp(dir=self.workdir), f"candidate_{product}.so")
                tvm.compile(tvm.IRModule({PRODUCTS[product]: built}),
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
    """Times a built candidate the way the package calls it: torch tensors at TUNING_SHAPE."""

    def __init__(self, product: str, dtype: str, repeats: int = 7):
        import torch

        b, n, h, d, w, dil = TUNING_SHAPE
        c = 2 * w + 1
        dt = getattr(torch, dtype)
        g = torch.Generator().manual_seed(0)
        mk = lambda last: torch.randn(b, n, h, last, generator=g).to(dt)  # noqa: E731
        first = mk(d) if product == "qk" else mk(c)
        self.args = (first, mk(d), mk(c if product == "qk" else d), w, w, dil) + (
            (0.0,) if product == "qk" else ())
        self.symbol, self.repeats = PRODUCTS[product], repeats

    def run(self, runner_inputs):
        import time

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


def measurable_here(isa: str) -> bool:
    """Whether this machine can time ``isa``'s code: its own ISA level or one below it (an
    AVX-512 machine runs avx2 and generic code, an AVX2 one generic)."""
    order = list(CPU_ISAS)  # best first
    return order.index(isa) >= order.index(host_isa())


def _runner(product: str, dtype: str, rpc: tuple[str, str] | None):
    if rpc is None:
        return _InProcessRunner(product, dtype)
    _, _, _, _, w, dil = TUNING_SHAPE  # the scalars _workload binds, after the tensors
    scalars = (w, w, dil) + ((0.0,) if product == "qk" else ())
    return rpc_runner(*rpc, PRODUCTS[product], scalars)


def tune_cpu(isa: str, dtype: str, trials: int, seed: int, db_root: Path,
             products=tuple(PRODUCTS), rpc: tuple[str, str] | None = None) -> Path:
    """Tune each product; records accumulate in the database directory, which is returned.

    Candidates are timed in this process, or with ``rpc=(tracker HOST:PORT, key)`` on the servers
    registered under that key (:mod:`tvm_kernels.rpc`), which must be machines of ``isa``. Locally
    an ISA this machine cannot run is refused (ValueError): it cannot be measured.
    """
    if rpc is None and not measurable_here(isa):
        raise ValueError(f"tune: this machine's ISA level is {host_isa()}, so it cannot measure "
                         f"{isa} code; tune {isa} on an {isa} machine, or measure there with "
                         "--rpc-tracker HOST:PORT --rpc-key KEY (docs/TUNING.md)")
    target = CPU_TARGETS[isa]
    out = db_dir(db_root, isa, dtype)
    out.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(str(out / "database_workload.json"),
                                        str(out / "database_tuning_record.json"),
                                        module_equality="structural")
    ncores = os.cpu_count() or 1
    # TVM's thread pool sizes itself from this when first used (its default is half the CPUs)
    os.environ.setdefault("TVM_NUM_THREADS", str(ncores))
    for product in products:
        progress = _Progress(trials, f"tune {isa}/{dtype}/{product}")
        with tempfile.TemporaryDirectory(prefix="lftvm-tune-") as work:
            ms.tune_tir(
                _workload(product, dtype, isa), tvm.target.Target(target.llvm(ncores)), work,
                max_trials_global=trials, num_trials_per_iter=min(trials, 8),
                space=_space(product, target.lanes(dtype)), strategy="replay-trace",
                builder=_SymbolicBuilder(dtype, target, tempfile.mkdtemp(dir=work)),
                runner=_runner(product, dtype, rpc),
                database=database, cost_model="random",
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                   progress],
                seed=seed, num_tuning_cores=ncores)
        progress.close()
        best = best_records(out).get(product)
        if best is not None:
            logger.info("best %s %s/%s: %.3f ms, %s", product, isa, dtype, 1e3 * best[1],
                        knob_values(best[0], product))
    return out


def _workload(product: str, dtype: str, isa: str) -> tvm.IRModule:
    """The module MetaSchedule tunes for a product: the tiled function at TUNING_SHAPE."""
    func = band.specialize(tiled_func(product, dtype, CPU_TARGETS[isa]), product, dtype, TUNING_SHAPE,
                           pad=0.0)
    return tvm.IRModule({"main": func.with_attr("global_symbol", PRODUCTS[product])})


def best_records(path: Path) -> dict:
    """{product: (trace, mean seconds)} of the fastest record per product in a database dir
    (``<root>/cpu-<isa>-<dtype>``).

    Only records of the products' current formulation count: a record tuned on another
    function (an older version of :mod:`tvm_kernels.cpu.kernels`) would not replay, so it is skipped
    with a log line and the product falls back to its hand schedule.
    """
    wl, rec = Path(path) / "database_workload.json", Path(path) / "database_tuning_record.json"
    if not (wl.is_file() and rec.is_file()):
        return {}
    _, isa, dtype = Path(path).name.split("-")
    database = ms.database.JSONDatabase(str(wl), str(rec), allow_missing=False,
                                        module_equality="structural")
    symbol_to_product = {v: k for k, v in PRODUCTS.items()}
    current, stale, best = {}, set(), {}
    for record in database.get_all_tuning_records():
        if not record.run_secs:
            continue
        secs = min(float(s) for s in record.run_secs)  # the least disturbed repeat
        func = record.workload.mod["main"]
        product = symbol_to_product.get(str(func.attrs.get("global_symbol", "")))
        if product is None or secs >= 1e9:
            continue
        if product not in current:
            current[product] = _workload(product, dtype, isa)
        if not tvm_ffi.structural_equal(record.workload.mod, current[product]):
            stale.add(product)
            continue
        if product not in best or secs < best[product][1]:
            best[product] = (record.trace, secs)
    for product in sorted(stale):
        logger.info("%s: skipped the records in %s tuned for another formulation of it%s",
                    product, path, "" if product in best else "; hand schedule")
    return best


def knob_values(trace, product: str) -> dict:
    """The knob values a trace chose, by name: e.g. {"panels": 2, "rows": 8}."""
    names = {tuple(c): n for n, c in schedules.SPACE[product].items()}
    out = {}
    for inst in trace.insts:
        if inst.kind.name != "SampleCategorical" or inst not in trace.decisions:
            continue
        cands = tuple(int(x) for x in inst.attrs[0])
        out[names.get(cands, str(cands))] = cands[int(trace.decisions[inst])]
    return out


def knobs_of(product: str, isa: str, trace=None) -> dict:
    """Knob values of a product's schedule: the trace's if tuned, else the hand schedule's."""
    return knob_values(trace, product) if trace is not None else schedules.hand_knobs(product, isa)


def sample_space(product: str, dtype: str, isa: str, seed: int, count: int) -> list[dict]:
    """The first ``count`` points MetaSchedule's random replay draws with ``seed`` (deterministic)."""
    target = CPU_TARGETS[isa]
    points = []
    for i in range(count):
        sch = s_tir.Schedule(tiled_func(product, dtype, target), seed=seed + i + 1)
        schedules.schedule_tiled(sch, product, {}, target.lanes(dtype))
        points.append(knob_values(sch.trace, product))
    return points


def load_traces(isa: str, dtype: str, db_root: Path) -> dict:
    """{product: trace} from the saved database; empty when there is none for (isa, dtype)."""
    return {p: t for p, (t, _) in best_records(db_dir(db_root, isa, dtype)).items()}

