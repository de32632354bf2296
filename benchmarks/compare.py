"""``python build_kernels.py compare``: every schedule and every baseline, timed in one run.

For each (N, w) at B=1, H=12, D=64, float32 on the CPU:

* the band products (QK, PV, and the transposed product) with each schedule -- ``naive`` (the
  paper's formulation), ``hand`` and the shipped library (``tuned`` when a tuning database
  exists) -- and transformers' sliding chunks, with useful GFLOP/s, the percentage of torch's
  SGEMM throughput measured in the same run, and the speed-up over sliding chunks;
* the attention core (QK, softmax, PV), forward and forward+backward, for ours, sliding chunks,
  dense SDPA under the band mask and FlexAttention (compiled, where torch has it).

Prints a table, writes CSV and (unless ``--no-plot``) a PNG under ``--out``. ``--quick``: one
shape, shipped library and sliding chunks only (the main job's short comparison).
"""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path

import torch

import longformer_tvm as lt
from longformer_tvm import backends, ops
from longformer_tvm._checks import normalize_band

from . import baselines as bl

logger = logging.getLogger("compare")

SHAPES = [(1024, 64), (4096, 64), (4096, 256), (8192, 256)]
QUICK_SHAPES = [(4096, 256)]
B, H, D = 1, 12, 64


def _schedule_libraries(quick: bool) -> tuple[dict, dict]:
    """({schedule: {product: function}}, {schedule: label}): the shipped library, plus naive and
    hand built now."""
    libs = {"shipped": backends.functions("cpu", "float32")}
    entry = backends.chosen_entries()["cpu/float32"]
    sched = str(entry.info.get("schedule", ""))
    kind = "tuned+hand" if "tuned" in sched and "hand" in sched else ("tuned" if "tuned" in sched else "hand")
    names = {"shipped": f"shipped ({kind}, {entry.info.get('isa')})"}
    if quick or not backends.compiler_available():
        return libs, names
    import tvm
    import tvm_ffi

    from longformer_tvm._contract import PRODUCTS
    from tvm_kernels.cpu import build
    from tvm_kernels.cpu.targets import CPU_TARGETS

    target = CPU_TARGETS[entry.info["isa"]]
    tmp = Path(tempfile.mkdtemp(prefix="lftvm-compare-"))
    for schedule in ("naive", "hand"):
        funcs = {PRODUCTS[p]: build.scheduled_func(p, "float32", target, schedule)
                 for p in ("qk", "pv", "tpv")}
        path = tmp / f"{schedule}.so"
        tvm.compile(tvm.IRModule(funcs), target=target.llvm()).export_library(str(path))
        module = tvm_ffi.load_module(str(path))
        libs[schedule] = {p: module[s] for p, s in PRODUCTS.items()}
        names[schedule] = schedule
    return libs, names


def _call(fn, a, b, band, shape, pad, whole: bool):
    """One product call with a fresh output each time, as the public API (and transformers) do."""
    extra = () if pad is None else (pad,)
    if whole:  # the naive (TE) functions take compact tensors only: one call, all heads
        return lambda: fn(a, b, ops._new_output(shape, a.dtype, a.device), band.left, band.right,
                          band.dilation[0], *extra)
    return lambda: ops.apply_kernel(fn, a, b, band, ops._new_output(shape, a.dtype, a.device), pad)


def run(quick: bool):
    torch.manual_seed(0)
    sgemm = bl.sgemm_gflops()
    logger.info("torch SGEMM: %.1f GFLOP/s", sgemm)
    libs, names = _schedule_libraries(quick)
    rows = []
    for n, w in (QUICK_SHAPES if quick else SHAPES):
        band = normalize_band("compare", w, 1, False, H)
        q, k, v = (torch.randn(B, n, H, D) for _ in range(3))
        p = torch.softmax(torch.randn(B, n, H, band.columns), -1)
        flops = bl.flops_band(B, n, H, D, band.columns)
        base = {"qk": bl.timeit(lambda: bl.hf_qk(q, k, w)), "pv": bl.timeit(lambda: bl.hf_pv(p, v, w))}
        for product in ("qk", "pv"):
            rows.append(dict(kind=product, impl="sliding chunks (transformers)", n=n, w=w,
                             secs=base[product]))
        for key, funcs in libs.items():
            for product, (a, bb, last, pad) in {"qk": (q, k, band.columns, float("-inf")),
                                                "pv": (p, v, D, None), "tpv": (p, q, D, None)}.items():
                secs = bl.timeit(_call(funcs[product], a, bb, band, (B, n, H, last), pad,
                                       key == "naive"))
                rows.append(dict(kind=product, impl=names[key], n=n, w=w, secs=secs,
                                 base=base.get(product, base["pv"])))
        # what a user calls: the public functions, with their input checks and output pool
        for product, call in {
                "qk": lambda: lt.sliding_window_qk(q, k, w, padding_value=float("-inf")),
                "pv": lambda: lt.sliding_window_pv(p, v, w),
                "tpv": lambda: lt.sliding_window_pv_transposed(p, q, w)}.items():
            rows.append(dict(kind=product, impl="ours (public function)", n=n, w=w,
                             secs=bl.timeit(call), base=base.get(product, base["pv"])))
        for label, fn in [("ours", bl.ours_attention), ("sliding chunks (transformers)", bl.hf_attention),
                          ("dense SDPA + band mask", bl.sdpa_attention)] + (
                [("FlexAttention (compiled)", bl.flex_attention)] if not quick and bl.flex_available() else []):
            fwd = bl.timeit(lambda: fn(q, k, v, w))
            rows.append(dict(kind="attention fwd", impl=label, n=n, w=w, secs=fwd))
            if quick or label.startswith("FlexAttention"):  # torch has no Flex backward on CPU
                continue
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            secs = bl.timeit(lambda: fn(qg, kg, vg, w).sum().backward(), warmup=1)
            rows.append(dict(kind="attention fwd+bwd", impl=label, n=n, w=w, secs=secs))
    for r in rows:
        r["flops"] = bl.flops_band(B, r["n"], H, D, 2 * r["w"] + 1) * (2 if "attention" in r["kind"] else 1)
    for kind in {r["kind"] for r in rows if "attention" in r["kind"]}:
        for n, w in {(r["n"], r["w"]) for r in rows}:
            ref = [r for r in rows if r["kind"] == kind and r["n"] == n and r["w"] == w
                   and r["impl"].startswith("sliding")]
            for r in rows:
                if ref and r["kind"] == kind and r["n"] == n and r["w"] == w:
                    r["base"] = ref[0]["secs"]
    for r in rows:
        r["gflops"] = r["flops"] / r["secs"] / 1e9
        r["pct_sgemm"] = 100 * r["gflops"] / sgemm
        r["speedup"] = r.get("base", r["secs"]) / r["secs"]
    return rows, sgemm


def print_table(rows, sgemm) -> None:
    print(f"torch SGEMM in this run: {sgemm:.1f} GFLOP/s (float32, B={B}, H={H}, D={D})")
    print(f"{'op':18s} {'implementation':34s} {'N':>6s} {'w':>4s} {'ms':>9s} {'GFLOP/s':>8s} "
          f"{'%SGEMM':>7s} {'x chunks':>8s}")
    for r in rows:
        print(f"{r['kind']:18s} {r['impl'][:34]:34s} {r['n']:6d} {r['w']:4d} {1e3 * r['secs']:9.2f} "
              f"{r['gflops']:8.1f} {r['pct_sgemm']:6.1f}% {r['speedup']:7.2f}x")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sub = [r for r in rows if r["kind"] == kind]
        labels = sorted({f"N={r['n']},w={r['w']}" for r in sub})
        impls = sorted({r["impl"] for r in sub})
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            ys = [next((1e3 * r["secs"] for r in sub if r["impl"] == impl
                        and f"N={r['n']},w={r['w']}" == lab), 0) for lab in labels]
            ax.bar([x + i * width for x in range(len(labels))], ys, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(kind)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO)
    out = Path(getattr(args, "out", "benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    rows, sgemm = run(bool(getattr(args, "quick", False)))
    print_table(rows, sgemm)
    name = "compare_quick" if getattr(args, "quick", False) else "compare"
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({key for r in rows for key in r}))
        writer.writeheader()
        writer.writerows(rows)
    if getattr(args, "plot", False):
        plot(rows, out / f"{name}.png")
        print(f"plot: {out / (name + '.png')}")
    return 0
