"""Wall time of one tuning job measured locally and over a loopback RPC pool of 1 and 2 servers.

``python benchmarks/rpc_tuning.py [--trials 8] [--product pv] [--class narrow] [--isa generic]``

The same job (one product, one window class, same seed: the same candidates) is tuned three
ways: measured in this process, and on a TVM RPC tracker's pool of one and of two servers on this
machine (each server timing with ``TVM_NUM_THREADS`` = cores / servers). On one machine the
servers share its cores, so a second server adds contention, not measuring capacity: the point
is the RPC path's overhead and that its work splits; a real pool has one server per machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tvm_kernels.cpu import tune  # noqa: E402
from tvm_kernels.rpc import loopback_pool  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--product", default="pv")
    parser.add_argument("--class", dest="cls", default="narrow")
    parser.add_argument("--isa", default="generic")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    job = dict(isa=args.isa, dtype=args.dtype, trials=args.trials, seed=0, products=(args.product,),
               classes=(args.cls,))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tune.tune_cpu(db_root=Path(tmp) / "local", **job)
        rows.append(("local (this process)", time.perf_counter() - t0))
        for servers in (1, 2):
            with loopback_pool(servers, "lftvm-bench", threads=max(1, cores // servers)) as tracker:
                t0 = time.perf_counter()
                tune.tune_cpu(db_root=Path(tmp) / f"rpc{servers}", rpc=(tracker, "lftvm-bench"), **job)
                rows.append((f"RPC, {servers} server{'s' * (servers > 1)}", time.perf_counter() - t0))
    print(f"tuning {args.product}/{args.cls} {args.isa}/{args.dtype}: the hand schedule + "
          f"{args.trials} candidates, {cores} cores on this machine")
    for name, secs in rows:
        print(f"  {name:22s} {secs:7.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
