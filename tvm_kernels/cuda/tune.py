"""Tuning the CUDA kernels: MetaSchedule on a local GPU, or offline (build here, time there).

Both end in the same data file, ``prebuilt/tuning/cuda-<arch>-<dtype>.json``::

    {"best": {"qk": {"tiles": {...}, "knobs": {...}, "ms": 0.41}, "pv": {...}},
     "source": "metaschedule" | "offline", "shape": [...], "device": "..."}

which ``build_kernels.py build --target cuda --schedule tuned`` reads (:func:`.build.configs_for`).

* **MetaSchedule** (``python build_kernels.py tune --target cuda [--trials N]``): on a machine with
  a GPU and the TVM compiler. The design space is :mod:`tvm_kernels.cuda.schedules` with its knobs
  (thread grid, unroll) sampled; the product is specialised to ``_contract.TUNING_SHAPE``; the database
  goes to ``prebuilt/tuning/cuda-<arch>-<dtype>/`` and the best decisions into the JSON record.
* **Offline** (tile sizes too; the GPU machine needs only the runtime)::

      python -m tvm_kernels.cuda.tune offline-build --arch sm_90 --dtype float32,float16 --out DIR
      # on the GPU machine (no TVM compiler): time every candidate library in DIR
      python -m benchmarks.cuda_candidates DIR --json timings.json
      python -m tvm_kernels.cuda.tune offline-collect timings.json

  ``offline-build`` compiles one library per candidate of :data:`OFFLINE_SPACE` (a QK and a PV
  configuration each); ``offline-collect`` keeps, per (arch, dtype, kind), the fastest candidate
  that also matched the reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from longformer_tvm._contract import DTYPE_BYTES, DTYPES, PRODUCTS, TUNING_SHAPE

from . import build as cuda_build

logger = logging.getLogger("tvm_kernels")

#: Offline candidates: (qk config, pv config) pairs; tiles are (tm, tj, kd), knobs (ty, tx, unroll).
OFFLINE_SPACE = [
    ({"tiles": (64, 64, 16), "knobs": (16, 16, 4)}, {"tiles": (64, 16, 64), "knobs": (16, 16, 4)}),
    ({"tiles": (64, 64, 32), "knobs": (16, 16, 8)}, {"tiles": (64, 32, 64), "knobs": (16, 16, 8)}),
    ({"tiles": (32, 64, 16), "knobs": (8, 16, 4)}, {"tiles": (32, 16, 64), "knobs": (8, 16, 4)}),
    ({"tiles": (64, 32, 16), "knobs": (16, 8, 4)}, {"tiles": (64, 16, 32), "knobs": (16, 8, 4)}),
    ({"tiles": (128, 64, 16), "knobs": (16, 16, 4)}, {"tiles": (128, 16, 64), "knobs": (16, 16, 4)}),
    ({"tiles": (64, 128, 16), "knobs": (16, 16, 4)}, {"tiles": (64, 32, 128), "knobs": (16, 16, 4)}),
    ({"tiles": (32, 32, 32), "knobs": (8, 8, 8)}, {"tiles": (32, 32, 32), "knobs": (8, 8, 8)}),
    ({"tiles": (64, 64, 8), "knobs": (8, 16, 8)}, {"tiles": (64, 8, 64), "knobs": (8, 16, 8)}),
]


def _config(c: dict) -> dict:
    tm, tj, kd = c["tiles"]
    ty, tx, unroll = c["knobs"]
    return {"tiles": {"tm": tm, "tj": tj, "kd": kd}, "knobs": {"ty": ty, "tx": tx, "unroll": unroll}}


def record_path(arch: str, dtype: str, root: Path | None = None) -> Path:
    return Path(root or cuda_build.TUNING_DIR) / f"cuda-{arch}-{dtype}.json"


def write_record(arch: str, dtype: str, best: dict, source: str, extra: dict | None = None,
                 root: Path | None = None) -> Path:
    path = record_path(arch, dtype, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"best": best, "source": source, "shape": list(TUNING_SHAPE), **(extra or {})}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("tuning record %s: %s", path, {k: v.get("ms") for k, v in best.items()})
    return path


# ---- offline ---------------------------------------------------------------------------------

def offline_build(archs: list[str], dtypes: list[str], out: Path) -> Path:
    """One library per (candidate, dtype, arch) in ``out`` plus ``out/candidates.json``."""
    out.mkdir(parents=True, exist_ok=True)
    listing = []
    for dtype in dtypes:
        for arch in archs:
            for i, (qk, pv) in enumerate(OFFLINE_SPACE):
                configs = {"qk": {**_config(qk), "from": "offline"}, "pv": {**_config(pv), "from": "offline"}}
                rel = f"{arch}/{dtype}/cand{i:02d}.so"
                try:
                    cuda_build.compile_library(dtype, [arch], configs, out / rel)
                except SystemExit as exc:  # a candidate that does not compile is skipped
                    logger.warning("candidate %d (%s %s) failed: %s", i, arch, dtype, str(exc)[-600:])
                    continue
                listing.append({"file": rel, "arch": arch, "dtype": dtype, "candidate": i,
                                "config": {k: {"tiles": v["tiles"], "knobs": v["knobs"]}
                                           for k, v in configs.items()}})
                logger.info("candidate %d %s %s -> %s", i, arch, dtype, out / rel)
    (out / "candidates.json").write_text(json.dumps({"shape": list(TUNING_SHAPE), "candidates": listing},
                                                    indent=2) + "\n", encoding="utf-8")
    return out


def offline_collect(timings_file: Path, root: Path | None = None) -> list[Path]:
    """Best (fastest correct) configuration per (arch, dtype, kind) -> tuning records."""
    data = json.loads(Path(timings_file).read_text(encoding="utf-8"))
    best: dict[tuple[str, str], dict] = {}
    for row in data["rows"]:
        if not row.get("ok") or row.get("ms") is None:
            continue
        kind = "qk" if row["product"] == "qk" else "pv"
        key = (row["arch"], row["dtype"])
        # pv and tpv share one configuration: rank a PV configuration by the sum of both
        ms = row["ms"] if kind == "qk" else sum(
            r["ms"] for r in data["rows"] if r.get("file") == row["file"] and r["product"] in ("pv", "tpv")
            and r.get("ok") and r.get("ms") is not None)
        cur = best.setdefault(key, {}).get(kind)
        if cur is None or ms < cur["ms"]:
            best[key][kind] = {**row["config"][kind], "ms": ms, "candidate": row["candidate"]}
    return [write_record(arch, dtype, rec, "offline", {"device": data.get("device", "")}, root)
            for (arch, dtype), rec in best.items()]


# ---- MetaSchedule ------------------------------------------------------------------------------

def knob_values(trace) -> dict:
    """The sampled knob values of a trace, in sampling order (ty, tx, unroll)."""
    values = []
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical":
            cands = [int(c) for c in inst.attrs[0]]
            values.append(cands[int(trace.decisions[inst])])
    return dict(zip(("ty", "tx", "unroll"), values))


def tune_metaschedule(dtype: str, trials: int, seed: int, products=("qk", "pv", "tpv")) -> Path:
    """MetaSchedule over the thread-mapping knobs on the local GPU (needs the TVM compiler)."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from .. import band
    from . import kernels
    from . import schedules as sched

    arch = cuda_build.detect_archs()[0]
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host="llvm")
    width = DTYPE_BYTES[dtype]  # TILES are by dtype width
    out = cuda_build.TUNING_DIR / f"cuda-{arch}-{dtype}"
    out.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(str(out / "database_workload.json"),
                                        str(out / "database_tuning_record.json"),
                                        module_equality="structural")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(cuda_build.REPO), os.environ.get("PYTHONPATH", "")])
    best = {}
    for product in products:
        kind = "qk" if product == "qk" else "pv"
        tiles = sched.TILES[(kind, width)]
        func = band.specialize(kernels.make(product, dtype, tiles), product, dtype, TUNING_SHAPE,
                               pad=float("-inf")).with_attr("global_symbol", PRODUCTS[product])

        def space(sch: s_tir.Schedule, kind=kind) -> None:
            sched.schedule(sch, kind, {})

        with tempfile.TemporaryDirectory(prefix="lftvm-cuda-tune-") as work:
            ms.tune_tir(tvm.IRModule({"main": func}), target, work, max_trials_global=trials,
                        num_trials_per_iter=min(trials, 8),
                        space=ms.space_generator.ScheduleFn(space, sch_rules=[], postprocs=[],
                                                            mutator_probs={}),
                        strategy="replay-trace", database=database, cost_model="random", seed=seed)
        records = [r for r in database.get_all_tuning_records()
                   if str(r.workload.mod["main"].attrs.get("global_symbol", "")) == PRODUCTS[product]
                   and r.run_secs]
        if not records:
            continue
        rec = min(records, key=lambda r: sum(float(s) for s in r.run_secs) / len(r.run_secs))
        secs = sum(float(s) for s in rec.run_secs) / len(rec.run_secs)
        if kind not in best or (product == "pv"):  # PV and its adjoint share: keep PV's choice
            best[kind] = {"tiles": tiles.as_dict(), "knobs": knob_values(rec.trace), "ms": 1e3 * secs}
        logger.info("best %s %s/%s: %.3f ms %s", product, arch, dtype, 1e3 * secs, knob_values(rec.trace))
    return write_record(arch, dtype, best, "metaschedule", {"device": arch})


def main(args) -> int:
    """``build_kernels.py tune --target cuda``: MetaSchedule on this machine's GPU."""
    for dtype in [d.strip() for d in args.dtype.split(",") if d.strip()]:
        if dtype not in DTYPES["cuda"]:
            raise SystemExit(f"--dtype: the CUDA kernels support {DTYPES['cuda']}, got {dtype}")
        tune_metaschedule(dtype, args.trials, args.seed,
                          products=[p.strip() for p in args.products.split(",") if p.strip()])
    return 0


def _cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("offline-build", help="compile candidate libraries to time elsewhere")
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--dtype", default="float32,float16")
    b.add_argument("--out", required=True)
    c = sub.add_parser("offline-collect", help="timings.json -> prebuilt/tuning/cuda-<arch>-<dtype>.json")
    c.add_argument("timings")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if ns.cmd == "offline-build":
        offline_build(cuda_build.parse_archs(ns.arch), [d for d in ns.dtype.split(",") if d],
                      Path(ns.out).resolve())
    else:
        for path in offline_collect(Path(ns.timings)):
            logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
