"""What an inf or NaN costs: the band products with finite, NaN-row and inf operands, one run.

    python benchmarks/nonfinite.py [--n 4096] [--w 256] [--rounds 5]

At B=1, H=12, D=64, float32 on the CPU, times the public functions in interleaved rounds (each
round calls every case once; the median per case is printed with its ratio to the finite case):

* ``pv``: P a softmax of random scores against v; **NaN rows**: 32 fully masked rows of P (all
  NaN, as a softmax of an all ``-inf`` row leaves them, out-of-sequence columns included);
  **inf in v**: one entry of v is inf.
* ``tpv`` (the transposed product, PV's backward in v): the same with G = P and x in place of v.
* ``fwd+bwd``: the attention core (QK with ``-inf`` padding, a fill of masked rows, softmax, PV)
  and the backward of ``out.sum()``; **NaN rows**: 32 query rows whose scores are all ``-inf``
  (fully masked; the other cases fill no row); **inf in v**: one entry of v is inf.

Results stay NaN or inf where the reference's do; only the time is measured. With ``--rounds``
below 3 a slow path (seconds per call) still finishes quickly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import longformer_tvm as lt

B, H, D = 1, 12, 64
NAN_ROWS = 32


def _secs(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cases(n: int, w: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, H, D, generator=g) for _ in range(3))
    p = torch.softmax(lt.sliding_window_qk(q, k, w, padding_value=float("-inf")), -1)
    rows = torch.linspace(0, n - 1, NAN_ROWS).long()
    p_nan = p.clone()
    p_nan[:, rows] = float("nan")
    v_inf = v.clone()
    v_inf[0, n // 2, 0, 0] = float("inf")

    none = torch.tensor([], dtype=torch.long)

    def attention(qq, kk, vv, masked_rows=none):  # every case fills its masked rows (maybe none)
        qq, kk, vv = (t.clone().requires_grad_() for t in (qq, kk, vv))
        s = lt.sliding_window_qk(qq, kk, w, padding_value=float("-inf"))
        s = s.index_fill(1, masked_rows, float("-inf"))
        lt.sliding_window_pv(torch.softmax(s, -1), vv, w).sum().backward()

    return {
        "pv": {"finite": lambda: lt.sliding_window_pv(p, v, w),
               "NaN rows": lambda: lt.sliding_window_pv(p_nan, v, w),
               "inf in v": lambda: lt.sliding_window_pv(p, v_inf, w)},
        "tpv": {"finite": lambda: lt.sliding_window_pv_transposed(p, q, w),
                "NaN rows": lambda: lt.sliding_window_pv_transposed(p_nan, q, w),
                "inf in v": lambda: lt.sliding_window_pv_transposed(p, v_inf, w)},
        "fwd+bwd": {"finite": lambda: attention(q, k, v),
                    "NaN rows": lambda: attention(q, k, v, rows),
                    "inf in v": lambda: attention(q, k, v_inf)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--w", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    cases = _cases(args.n, args.w)
    for group in cases.values():  # load the libraries, warm the caches and the output pool
        for fn in group.values():
            fn()
    times = {(op, case): [] for op, group in cases.items() for case in group}
    for _ in range(args.rounds):
        for op, group in cases.items():
            for case, fn in group.items():
                times[op, case].append(_secs(fn))
    print(f"B={B} N={args.n} H={H} D={D} w={args.w} float32, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} interleaved rounds")
    for op, group in cases.items():
        finite = statistics.median(times[op, "finite"])
        for case in group:
            med = statistics.median(times[op, case])
            print(f"{op:8s} {case:9s} {1e3 * med:10.1f} ms  {med / finite:7.2f}x finite")


if __name__ == "__main__":
    main()
