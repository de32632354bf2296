"""Per-call overhead of the band products at a tiny shape, where the kernel itself costs little.

    python benchmarks/call_overhead.py [--calls 3000] [--rounds 7]

Times the public functions (``sliding_window_qk``, ``sliding_window_pv``) and, as the baseline
measured in the same run, a torch op of the same inputs (``torch.matmul`` of q and kᵀ), in
interleaved rounds; prints the median microseconds per call and the ratio to the baseline. The
difference between two commits' ratios is the change in what the Python layers around the kernel
cost (argument checks, dispatch to the backend, output allocation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import longformer_tvm as lt


def _per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 32, 2, 8) for _ in range(3))
    w = 2
    probs = lt.sliding_window_qk(q, k, w).softmax(-1)
    kt = k.transpose(1, 3)
    cases = {
        "torch.matmul (baseline)": lambda: torch.matmul(q.transpose(1, 2), kt.transpose(1, 2)),
        "sliding_window_qk": lambda: lt.sliding_window_qk(q, k, w),
        "sliding_window_pv": lambda: lt.sliding_window_pv(probs, v, w),
    }
    for fn in cases.values():  # load the library, warm the caches
        _per_call_us(fn, 50)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(_per_call_us(fn, args.calls))
    base = statistics.median(times["torch.matmul (baseline)"])
    print(f"B=1 N=32 H=2 D=8 w={w} float32, {torch.get_num_threads()} threads; median of "
          f"{args.rounds} interleaved rounds of {args.calls} calls")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {med:8.2f} us/call  {med / base:6.2f}x baseline")


if __name__ == "__main__":
    main()
