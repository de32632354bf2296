"""Tuned against hand, per window class: ``python benchmarks/tuning.py [--reps 10] [--n 4096] [--isa avx2]``.

For each window class's representative window (``_contract.WINDOW_CLASSES``: w = 16, 64, 256) at
B=1, H=12, D=64, float32: the shipped library (its dispatch table picks the variant tuning chose
for the class) against the hand schedules compiled now from the same sources, for QK, PV,
transposed PV and the fused attention forward, beside torch's SGEMM rate. Every round times each
of them once (best of a few calls) in turn, and the table reports the median over rounds: the
machine's drift falls on all alike. Needs the TVM compiler (for the hand library).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import baselines as bl  # noqa: E402
from longformer_tvm import backends, ops  # noqa: E402
from longformer_tvm._checks import normalize_band  # noqa: E402
from longformer_tvm._contract import WINDOW_CLASSES  # noqa: E402
from longformer_tvm._registry import Dispatch  # noqa: E402

B, H, D = 1, 12, 64
PRODUCTS = ("qk", "pv", "tpv", "attention")


def hand_library(isa: str) -> dict:
    """{product: function} of the hand schedules for ``isa``, float32, compiled now."""
    from tvm_kernels.cpu import build
    from tvm_kernels.cpu.targets import CPU_TARGETS

    path = Path(tempfile.mkdtemp(prefix="lftvm-hand-")) / "hand.so"
    module = bl.load_compiled(build.compile_cpu("float32", CPU_TARGETS[isa]), path)
    return {p: module[s] for p, s in build.ALL_PRODUCTS.items()}


def _best(fn, calls: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _calls(funcs: dict, n: int, w: int) -> dict:
    band = normalize_band("tuning", w, 1, False, H)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, H, D, generator=g) for _ in range(3))
    p = torch.softmax(torch.randn(B, n, H, band.columns, generator=g), -1)
    out_c, out_d = torch.empty(B, n, H, band.columns), torch.empty(B, n, H, D)
    lse, mask = torch.empty(B, n, H), torch.zeros(1, 1, dtype=torch.uint8).expand(B, n)
    return {
        "qk": lambda: ops.apply_kernel(funcs["qk"], q, k, band, out_c, float("-inf")),
        "pv": lambda: ops.apply_kernel(funcs["pv"], p, v, band, out_d, None),
        "tpv": lambda: ops.apply_kernel(funcs["tpv"], p, q, band, out_d, None),
        "attention": lambda: funcs["attention"](q, k, v, mask, out_d, lse, w, w, 1, D ** -0.5),
    }


def shipped_library(isa: str | None) -> tuple[dict, object]:
    """({product: function}, manifest entry) of the shipped float32 library for ``isa`` (default:
    the one this machine loads); an ISA below this machine's runs here too."""
    if isa is None:
        return backends.functions("cpu", "float32"), backends.chosen_entries()["cpu/float32"]
    for c in backends.candidates("cpu", "float32"):
        if c.entry.info.get("isa") == isa and not c.entry.cached:
            if not c.usable:
                raise SystemExit(f"--isa {isa}: the shipped library does not run here: {c.reason}")
            return backends.REGISTRY.open(c.entry), c.entry
    raise SystemExit(f"--isa {isa}: no shipped float32 library for it in the manifest")


def variant(fn, product: str, w: int, entry) -> str:
    """The variant a call at window ``w`` runs, and whether it is the hand schedule's code (then
    the two columns time the same code: their ratio is the run's noise)."""
    from tvm_kernels.cpu import build

    if not isinstance(fn, Dispatch):
        return "(one function)"
    symbol, _ = fn.choose(w, w)
    isa = entry.info["isa"]
    row = next(r for r in entry.info["variants"][product] if r["function"] == symbol)
    structure = build.structures(product, "float32", isa)[0]
    hand = build.Variant(product, structure, build.hand_knobs(product, isa, structure)).describe()
    same = row["schedule"].removeprefix("tuned") == hand.removeprefix("hand")
    return f"{symbol} {row['schedule']}{'  (the hand code)' if same else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--isa", default=None, help="the shipped library of this ISA level "
                        "(default: the one this machine loads)")
    args = parser.parse_args(argv)
    shipped, entry = shipped_library(args.isa)
    hand = hand_library(entry.info["isa"])
    windows = [w for _, _, w in WINDOW_CLASSES]
    calls = {(w, lib): _calls(funcs, args.n, w) for w in windows
             for lib, funcs in (("tuned", shipped), ("hand", hand))}
    times: dict = {}
    sgemm = []
    for rep in range(args.reps):
        sgemm.append(bl.sgemm_gflops())
        for w in windows:
            for product in PRODUCTS:
                # which goes first alternates: the first of a pair may run on a colder cache
                for lib in (("tuned", "hand") if rep % 2 == 0 else ("hand", "tuned")):
                    times.setdefault((w, product, lib), []).append(_best(calls[(w, lib)][product]))
    rate = statistics.median(sgemm)
    print(f"{entry.path.name} ({entry.info['isa']}), N={args.n}, B={B}, H={H}, D={D}, float32; "
          f"medians of {args.reps} interleaved rounds (order alternating); torch SGEMM {rate:.1f} GFLOP/s "
          f"(rounds {min(sgemm):.0f}-{max(sgemm):.0f})")
    print(f"{'product':10s} {'w':>4s} {'hand ms':>8s} {'tuned ms':>9s} {'tuned/hand':>10s} "
          f"{'hand %SGEMM':>11s} {'tuned %SGEMM':>12s}  variant")
    for w in windows:
        for product in PRODUCTS:
            flops = bl.flops_band(B, args.n, H, D, 2 * w + 1) * (2 if product == "attention" else 1)
            th, tt = (statistics.median(times[(w, product, lib)]) for lib in ("hand", "tuned"))
            print(f"{product:10s} {w:4d} {1e3 * th:8.2f} {1e3 * tt:9.2f} {th / tt:9.2f}x "
                  f"{100 * flops / th / 1e9 / rate:10.1f}% {100 * flops / tt / 1e9 / rate:11.1f}%  "
                  f"{variant(shipped[product], product, w, entry)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
