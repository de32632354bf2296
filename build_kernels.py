#!/usr/bin/env python
"""Build, tune, check and compare the longformer-tvm band kernels.

    python build_kernels.py                 # the main job: make sure this machine has working
                                            # kernels (build if needed), self-check, short comparison
    longformer-tvm ...                      # the same commands, from an installed wheel
    python build_kernels.py build [--target cpu] [--isa host|all|avx512,avx2,generic]
                                  [--dtype float32,float64] [--schedule tuned|hand|naive] [--out DIR]
    python build_kernels.py tune --target cpu [--trials N] [--seed S] [--isa host|avx2,avx512]
                                 [--dtype float32,float64] [--products qk,pv,...] [--classes narrow,...]
                                 [--rpc-tracker HOST:PORT --rpc-key KEY]
    python build_kernels.py compare [--quick] [--out benchmarks/out]
    python build_kernels.py selfcheck [--quick] [--emulate-cuda]

In a checkout, libraries go to prebuilt/ (default) with prebuilt/manifest.json and tuning
databases to prebuilt/tuning/. An installed wheel's tree is not rewritten: there ``build`` writes
into this installation's per-user cache folder and ``tune`` into ``<cache>/tuning`` (replay it
with ``build --db``); the package loads libraries from both. ``--schedule tuned`` replays the
MetaSchedule database (``--db``, default the shipped one) where it has a record for the (isa,
dtype, product, window class), else the hand schedule; the library gets one variant per distinct
choice and a dispatch table (manifest ``variants``) that picks one per call by the band's width.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))  # tvm_kernels/ and benchmarks/ beside this file

from longformer_tvm import _contract, _install  # noqa: E402

logger = logging.getLogger("build_kernels")


def default_out() -> Path:
    """Where ``build`` writes: the checkout's prebuilt/, or (installed) this version's cache."""
    return _install.cache_library_dir() if _contract.INSTALLED else _contract.PREBUILT_DIR


def default_tune_db() -> Path:
    """Where ``tune`` writes its database: prebuilt/tuning/, or (installed) ``<cache>/tuning``."""
    return _install.cache_dir() / "tuning" if _contract.INSTALLED else _contract.TUNING_DIR


def default_compare_out() -> Path:
    return Path.cwd() / "longformer-tvm-out" if _contract.INSTALLED else REPO / "benchmarks" / "out"


def progress(items: list, desc: str, label=str):
    """Yield ``items`` under a progress bar that names the step (tqdm where installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield from items
        return
    with tqdm(items, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for item in bar:
            bar.set_postfix_str(label(item))
            yield item


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _isas(spec: str) -> list[str]:
    from longformer_tvm._contract import host_isa
    from tvm_kernels.cpu.targets import CPU_TARGETS

    if spec == "host":
        return [host_isa()]
    if spec == "all":
        return list(CPU_TARGETS)
    isas = _csv(spec)
    unknown = [i for i in isas if i not in CPU_TARGETS]
    if unknown:
        raise SystemExit(f"--isa: unknown {unknown}; choose from host, all, {', '.join(CPU_TARGETS)}")
    return isas


def cmd_build(args) -> int:
    args.out = args.out or str(default_out())
    if args.target == "cuda":
        from tvm_kernels.cuda import build as cuda_build

        return cuda_build.main(args)
    from longformer_tvm._contract import DTYPES
    from tvm_kernels.cpu import build as cpu_build
    from tvm_kernels.cpu import tune

    dtypes = _csv(args.dtype) if args.dtype else list(DTYPES["cpu"])
    bad = [d for d in dtypes if d not in DTYPES["cpu"]]
    if bad:
        raise SystemExit(f"--dtype: the CPU kernels support {DTYPES['cpu']}, got {bad}")
    out = Path(args.out).resolve()
    steps = [(isa, dtype) for isa in _isas(args.isa) for dtype in dtypes]
    for isa, dtype in progress(steps, "build", lambda step: f"cpu {step[0]} {step[1]}"):
        t0 = time.perf_counter()
        records = tune.load_records(isa, dtype, Path(args.db)) if args.schedule == "tuned" else {}
        schedule = "naive" if args.schedule == "naive" else "hand"
        entry = cpu_build.build_cpu(dtype, isa, out, schedule_kind=schedule, records=records)
        logger.info("%-8s %-8s %5.1fs -> %s", isa, dtype, time.perf_counter() - t0, out / entry["file"])
    return 0


def cmd_tune(args) -> int:
    from tvm_kernels.cpu import tune

    if args.target == "cuda":
        from tvm_kernels.cuda import tune as cuda_tune  # MetaSchedule on this machine's GPU

        return cuda_tune.main(args)
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise SystemExit("tune: --rpc-tracker HOST:PORT and --rpc-key KEY go together (the "
                         "tracker, and the key its servers registered under)")
    rpc = (args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None
    for isa in _isas(args.isa):
        for dtype in _csv(args.dtype):
            try:
                tune.tune_cpu(isa, dtype, trials=args.trials, seed=args.seed,
                              db_root=Path(args.db or default_tune_db()),
                              products=_csv(args.products), rpc=rpc,
                              classes=_csv(args.classes), confirm_rounds=args.confirm_rounds)
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
    return 0


def cmd_selfcheck(args) -> int:
    from benchmarks import selfcheck

    return selfcheck.main(args)


def cmd_compare(args) -> int:
    from benchmarks import compare

    return compare.main(args)


def cmd_main(args) -> int:
    """Make sure this machine has kernels that load and agree with the reference, then compare."""
    import longformer_tvm
    from longformer_tvm import backends

    for dtype in ("float32", "float64"):
        try:
            backends.functions("cpu", dtype)
        except backends.KernelNotAvailableError as exc:
            logger.warning("%s", exc)
            args_b = argparse.Namespace(target="cpu", isa="host", dtype=dtype, schedule="tuned",
                                        out=str(default_out()), db=str(_contract.TUNING_DIR))
            cmd_build(args_b)
            backends.clear()
    info = longformer_tvm.backend_info()
    for key, path in info["loaded"].items():
        logger.info("kernels for %s: %s", key, path)
    rc = cmd_selfcheck(argparse.Namespace(quick=True))
    if rc:
        return rc
    return cmd_compare(argparse.Namespace(quick=True, out=str(default_compare_out()), plot=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="compile kernels into prebuilt/ (or --out)")
    b.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--isa", default="host", help="host, all, or a list of avx512,avx2,generic")
    b.add_argument("--arch", default="auto", help="CUDA: auto or sm_80,sm_86,...")
    b.add_argument("--dtype", default="", help="comma list; default: every dtype of the target")
    b.add_argument("--schedule", choices=["tuned", "hand", "naive"], default="tuned")
    b.add_argument("--out", default="", help="default: prebuilt/ in a checkout, the per-user cache "
                   "when installed")
    b.add_argument("--db", default=str(_contract.TUNING_DIR), help="tuning database to replay")
    t = sub.add_parser("tune", help="MetaSchedule over the schedule space; saves prebuilt/tuning/")
    t.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    t.add_argument("--isa", default="host")
    t.add_argument("--dtype", default="float32")
    t.add_argument("--products", default="qk,pv,tpv,attention")
    t.add_argument("--classes", default=",".join(c for c, _, _ in _contract.WINDOW_CLASSES),
                   help="window classes to tune (each at its representative window)")
    t.add_argument("--trials", type=int, default=9, help="candidates per product and class")
    t.add_argument("--confirm-rounds", type=int, default=5, help="interleaved rounds that time the "
                   "hand schedule and the best candidates again before one is chosen (0: none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--db", default="", help="default: prebuilt/tuning/ in a checkout, "
                   "<cache>/tuning when installed")
    t.add_argument("--rpc-tracker", default="", metavar="HOST:PORT",
                   help="measure on the servers of this TVM RPC tracker (docs/TUNING.md)")
    t.add_argument("--rpc-key", default="", metavar="KEY", help="the servers' key at the tracker")
    s = sub.add_parser("selfcheck", help="every library that runs here against the reference")
    s.add_argument("--quick", action="store_true")
    s.add_argument("--emulate-cuda", action="store_true", help="the CUDA libraries' schedules on "
                   "this CPU, under the thread-block emulator (needs the TVM compiler and g++)")
    c = sub.add_parser("compare", help="time schedules and baselines; table + plot")
    c.add_argument("--quick", action="store_true", help="one shape, no plot (used by the main job)")
    c.add_argument("--out", default="", help="default: benchmarks/out/ in a checkout, "
                   "./longformer-tvm-out when installed")
    c.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "compare" and not args.out:
        args.out = str(default_compare_out())
    handlers = {"build": cmd_build, "tune": cmd_tune, "selfcheck": cmd_selfcheck,
                "compare": cmd_compare, None: cmd_main}
    return handlers[args.cmd](args)


if __name__ == "__main__":
    os.environ.setdefault("TVM_LOG_DEBUG", "0")
    sys.exit(main())
