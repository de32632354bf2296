#!/usr/bin/env python
"""The fused attention kernels against the unfused path, compiled FlexAttention and SGEMM.

    python benchmarks/fused_attention.py [--reps 7] [--n 4096,8192] [--w 256,64] [--memory 16384]

Times, at B=1, H=12, D=64, float32, interleaved in one process (each repetition runs every
implementation once; the median per implementation is reported, since other processes share
the cores): the compiled ``band_attention`` (forward) and ``band_attention`` +
``band_attention_backward`` (forward+backward), called straight through
``backends.kernel_for``; the unfused path (``sliding_window_qk`` -> ``torch.softmax`` ->
``sliding_window_pv``, and its autograd backward); compiled FlexAttention (forward only: torch
2.13 has no CPU backward). Useful FLOPs: forward 4*B*N*H*(2w+1)*D, forward+backward three times
that (the six band products of the unfused path). torch SGEMM (4096^3) is timed in the same
interleaved loop. ``--memory N`` also measures the peak resident memory that a forward and a
forward+backward add (VmHWM, reset through /proc/self/clear_refs, in a fresh subprocess each)
against the bytes of the tensors they return (the backward forms delta = rowsum(dO * O) - dlse
itself, per tile; ``dlse`` is zeros here, as when only ``out`` is used).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.memory import reset_peak_rss, status_kib  # noqa: E402

B, H, D = 1, 12, 64


def fused_forward(q, k, v, w, mask, out, lse):
    from longformer_tvm import backends

    backends.kernel_for("attention", q)(q, k, v, mask, out, lse, w, w, 1, D ** -0.5)


def fused_backward(q, k, v, w, mask, out, lse, dout, grads, dlse):
    from longformer_tvm import backends

    backends.kernel_for("attention_backward", q)(q, k, v, mask, dout, out, lse, dlse, *grads, w, w,
                                                 1, D ** -0.5)


def unfused(q, k, v, w):
    import longformer_tvm as lt

    s = lt.sliding_window_qk(q, k, w, padding_value=float("-inf"))
    return lt.sliding_window_pv(torch.softmax(s * D ** -0.5, dim=-1), v, w)


def implementations(n: int, w: int, flex: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, n, H, D, generator=g) for _ in range(4))
    mask = torch.zeros(1, 1, dtype=torch.uint8).expand(B, n)
    out, lse, dlse = torch.empty_like(q), torch.empty(B, n, H), torch.zeros(B, n, H)
    grads = [torch.empty_like(q) for _ in range(3)]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def fused_fb():
        fused_forward(q, k, v, w, mask, out, lse)
        fused_backward(q, k, v, w, mask, out, lse, dout, grads, dlse)

    def unfused_fb():
        unfused(*leaves, w).backward(dout)

    impls = {("fwd", "fused"): lambda: fused_forward(q, k, v, w, mask, out, lse),
             ("fwd", "unfused"): lambda: unfused(q, k, v, w),
             ("fwd+bwd", "fused"): fused_fb, ("fwd+bwd", "unfused"): unfused_fb}
    if flex:
        from benchmarks.baselines import flex_attention

        impls[("fwd", "FlexAttention")] = lambda: flex_attention(q, k, v, w)
    return impls


def _sgemm():
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return lambda: a @ b


def measure(n: int, w: int, reps: int, flex: bool) -> list[dict]:
    impls = implementations(n, w, flex)
    impls[("sgemm", "torch")] = _sgemm()
    times: dict = {key: [] for key in impls}
    for fn in impls.values():  # warm up (compiles FlexAttention, loads the libraries)
        fn()
    for _ in range(reps):
        for key, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    sgemm = 2 * 4096 ** 3 / med[("sgemm", "torch")] / 1e9
    fwd_flops = 4 * B * n * H * (2 * w + 1) * D
    rows = []
    for (what, impl), secs in med.items():
        if what == "sgemm":
            continue
        flops = fwd_flops * (3 if what == "fwd+bwd" else 1)
        gflops = flops / secs / 1e9
        rows.append({"what": what, "impl": impl, "n": n, "w": w, "ms": secs * 1e3,
                     "gflops": gflops, "pct_sgemm": 100 * gflops / sgemm, "sgemm": sgemm,
                     "vs_unfused": med[(what, "unfused")] / secs,
                     "vs_flex": (med[(what, "FlexAttention")] / secs
                                 if (what, "FlexAttention") in med else None)})
    return rows


def memory_point(n: int, w: int, what: str) -> dict:
    """Peak memory a call adds over its inputs and the tensors it returns (run in a subprocess)."""
    q, k, v, dout = (torch.randn(B, n, H, D) for _ in range(4))
    mask = torch.zeros(1, 1, dtype=torch.uint8).expand(B, n)
    fused_forward(q[:, :1], k[:, :1], v[:, :1], w, mask[:, :1], torch.empty_like(q[:, :1]),
                  torch.empty(B, 1, H))  # load the library outside the measurement
    out, lse = torch.empty_like(q), torch.empty(B, n, H)
    grads = [torch.empty_like(q) for _ in range(3)] if what == "fwd+bwd" else []
    returned = [out, lse, *grads]
    for t in returned:
        t.zero_()  # fault the returned tensors in: they are counted as returned, not extra
    dlse = torch.zeros(B, n, H)  # an input, as dout is
    reset_peak_rss()
    before = 1024 * (status_kib("VmHWM") or 0)
    fused_forward(q, k, v, w, mask, out, lse)
    if grads:
        fused_backward(q, k, v, w, mask, out, lse, dout, grads, dlse)
    extra = 1024 * (status_kib("VmHWM") or 0) - before
    size = sum(t.numel() * t.element_size() for t in returned)
    return {"what": what, "n": n, "w": w, "extra_mb": extra / 2 ** 20, "returned_mb": size / 2 ** 20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--n", default="4096,8192")
    parser.add_argument("--w", default="256,64")
    parser.add_argument("--memory", type=int, default=16384, help="N of the memory test (0: skip)")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--_memory_point", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_point:
        n, w, what = args._memory_point
        print(json.dumps(memory_point(int(n), int(w), what)))
        return 0
    torch.set_num_threads(torch.get_num_threads())
    flex = not args.no_flex
    if flex:
        from benchmarks.baselines import flex_available

        flex = flex_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.reps} "
          "interleaved repetitions")
    print(f"{'op':8} {'impl':14} {'N':>6} {'w':>4} {'ms':>9} {'GFLOP/s':>8} {'%SGEMM':>7} "
          f"{'x unfused':>9} {'x Flex':>7}")
    for n in map(int, args.n.split(",")):
        for w in map(int, args.w.split(",")):
            for r in measure(n, w, args.reps, flex):
                flex_ratio = f"{r['vs_flex']:.2f}" if r["vs_flex"] else "-"
                print(f"{r['what']:8} {r['impl']:14} {n:6} {w:4} {r['ms']:9.2f} {r['gflops']:8.1f} "
                      f"{r['pct_sgemm']:6.1f}% {r['vs_unfused']:9.2f} {flex_ratio:>7}"
                      f"   (SGEMM {r['sgemm']:.0f} GFLOP/s)")
    if args.memory:
        for what in ("fwd", "fwd+bwd"):
            proc = subprocess.run([sys.executable, __file__, "--_memory_point", str(args.memory),
                                   "256", what], capture_output=True, text=True, check=True)
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            total = (m["extra_mb"] + m["returned_mb"]) / m["returned_mb"]
            print(f"peak memory, {what} N={m['n']} w={m['w']}: {m['extra_mb']:.1f} MB beyond the "
                  f"{m['returned_mb']:.1f} MB returned ({total:.3f}x the returned tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
