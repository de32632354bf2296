"""``python build_kernels.py compare``: every schedule and every baseline, timed in one run.

For each (N, w) at B=1, H=12, D=64, float32 on the CPU:

* the band products (QK, PV, and the transposed product) with each schedule -- ``naive`` (the
  paper's formulation), ``hand`` and the shipped library (``tuned`` when a tuning database
  exists) -- and transformers' sliding chunks, with useful GFLOP/s, the percentage of torch's
  SGEMM throughput measured in the same run, and the speed-up over sliding chunks;
* the attention core, forward and forward+backward, with the peak memory one call adds: ours
  fused (``sliding_window_attention``), ours unfused (QK, softmax, PV), sliding chunks, dense
  SDPA under the band mask and FlexAttention (compiled, where torch has it; forward only).

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
from longformer_tvm._contract import window_class
from longformer_tvm._registry import Dispatch

from . import baselines as bl

logger = logging.getLogger("compare")

SHAPES = [(1024, 64), (4096, 16), (4096, 64), (4096, 256), (8192, 256)]
QUICK_SHAPES = [(4096, 256)]
B, H, D = 1, 12, 64


def _schedule_libraries(quick: bool) -> tuple[dict, dict]:
    """({schedule: {product: function}}, {schedule: label}): the shipped library, plus naive and
    hand built now."""
    libs = {"shipped": backends.functions("cpu", "float32")}
    entry = backends.chosen_entries()["cpu/float32"]
    sched = str(entry.info.get("schedule", ""))
    kind = "tuned+hand" if "tuned" in sched and "hand" in sched else ("tuned" if "tuned" in sched else "hand")
    names = {"shipped": f"ours (shipped, {kind}, {entry.info.get('isa')})"}
    if quick or not backends.compiler_available():
        return libs, names
    import tvm

    from longformer_tvm._contract import PRODUCTS
    from tvm_kernels.cpu import build
    from tvm_kernels.cpu.targets import CPU_TARGETS

    target = CPU_TARGETS[entry.info["isa"]]
    tmp = Path(tempfile.mkdtemp(prefix="lftvm-compare-"))
    for schedule in ("naive", "hand"):
        funcs = {PRODUCTS[p]: build.scheduled_func(p, "float32", target, schedule)
                 for p in ("qk", "pv", "tpv")}
        path = tmp / f"{schedule}.so"
        module = bl.load_compiled(tvm.compile(tvm.IRModule(funcs), target=target.llvm()), path)
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


class _Progress:
    """Times measurements under a progress bar naming the one running (tqdm where installed)."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc="compare", unit="timing", dynamic_ncols=True)

    def time(self, label: str, fn, **kwargs) -> float:
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        secs = bl.timeit(fn, **kwargs)
        if self.bar is not None:
            self.bar.update()
        return secs

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _attention_impls(quick: bool) -> list:
    fused = "ours fused (one kernel)" if bl.fused_served() else "ours fused (band products)"
    impls = [(fused, bl.ours_fused_attention), ("ours (qk, softmax, pv)", bl.ours_attention),
             ("sliding chunks (transformers)", bl.hf_attention),
             ("dense SDPA + band mask", bl.sdpa_attention)]
    if not quick and bl.flex_available():
        impls.append(("FlexAttention (compiled)", bl.flex_attention))
    return impls


def run(quick: bool):
    torch.manual_seed(0)
    sgemm = bl.sgemm_gflops()
    logger.info("torch SGEMM: %.1f GFLOP/s", sgemm)
    libs, names = _schedule_libraries(quick)
    rows = []
    shapes = QUICK_SHAPES if quick else SHAPES
    attention = _attention_impls(quick)
    backward = [a for a in attention if not quick and not a[0].startswith("FlexAttention")]
    per_shape = 2 + 3 * len(libs) + 3 + len(attention) + len(backward)
    progress = _Progress(per_shape * len(shapes))
    for n, w in shapes:
        at = f"N={n} w={w}"
        band = normalize_band("compare", w, 1, False, H)
        q, k, v = (torch.randn(B, n, H, D) for _ in range(3))
        p = torch.softmax(torch.randn(B, n, H, band.columns), -1)
        flops = bl.flops_band(B, n, H, D, band.columns)
        base = {"qk": progress.time(f"{at} qk sliding chunks", lambda: bl.hf_qk(q, k, w)),
                "pv": progress.time(f"{at} pv sliding chunks", lambda: bl.hf_pv(p, v, w))}
        for product in ("qk", "pv"):
            rows.append(dict(kind=product, impl="sliding chunks (transformers)", n=n, w=w,
                             secs=base[product]))
        for key, funcs in libs.items():
            for product, (a, bb, last, pad) in {"qk": (q, k, band.columns, float("-inf")),
                                                "pv": (p, v, D, None), "tpv": (p, q, D, None)}.items():
                secs = progress.time(f"{at} {product} {names[key]}",
                                     _call(funcs[product], a, bb, band, (B, n, H, last), pad,
                                           key == "naive"))
                rows.append(dict(kind=product, impl=names[key], n=n, w=w, secs=secs,
                                 base=base.get(product, base["pv"]),
                                 variant=variant_used(funcs[product], product, band)
                                 if key == "shipped" else key))
        # what a user calls: the public functions, with their input checks and output pool
        for product, call in {
                "qk": lambda: lt.sliding_window_qk(q, k, w, padding_value=float("-inf")),
                "pv": lambda: lt.sliding_window_pv(p, v, w),
                "tpv": lambda: lt.sliding_window_pv_transposed(p, q, w)}.items():
            rows.append(dict(kind=product, impl="ours (public function)", n=n, w=w,
                             secs=progress.time(f"{at} {product} public function", call),
                             base=base.get(product, base["pv"])))
        for label, fn in attention:
            fwd = progress.time(f"{at} attention fwd {label}", lambda: fn(q, k, v, w))
            rows.append(dict(kind="attention fwd", impl=label, n=n, w=w, secs=fwd,
                             peak_mib=bl.peak_extra_mib(lambda: fn(q, k, v, w))))
            if quick or label.startswith("FlexAttention"):  # torch has no Flex backward on CPU
                continue
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            step = lambda: fn(qg, kg, vg, w).sum().backward()  # noqa: E731
            secs = progress.time(f"{at} attention fwd+bwd {label}", step, warmup=1)
            rows.append(dict(kind="attention fwd+bwd", impl=label, n=n, w=w, secs=secs,
                             peak_mib=bl.peak_extra_mib(step)))
    progress.close()
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


def variant_used(fn, product: str, band) -> str:
    """Which compiled variant a call of ``fn`` at ``band`` runs: its symbol and its schedule (from
    the loaded library's dispatch table), or the one function of a library without variants."""
    if not isinstance(fn, Dispatch):
        return "(one function)"
    symbol, _ = fn.choose(band.left, band.right)
    entry = backends.chosen_entries().get("cpu/float32")
    rows = (entry.info.get("variants") or {}).get(product, []) if entry is not None else []
    sched = next((r["schedule"] for r in rows if r["function"] == symbol), "")
    return f"{symbol} {sched}".strip()


def print_table(rows, sgemm) -> None:
    print(f"torch SGEMM in this run: {sgemm:.1f} GFLOP/s (float32, B={B}, H={H}, D={D})")
    print(f"{'op':18s} {'implementation':34s} {'N':>6s} {'w':>4s} {'ms':>9s} {'GFLOP/s':>8s} "
          f"{'%SGEMM':>7s} {'x chunks':>8s} {'peak MiB':>9s}  variant")
    for r in rows:
        peak = "" if r.get("peak_mib") is None else f"{r['peak_mib']:9.0f}"
        print(f"{r['kind']:18s} {r['impl'][:34]:34s} {r['n']:6d} {r['w']:4d} {1e3 * r['secs']:9.2f} "
              f"{r['gflops']:8.1f} {r['pct_sgemm']:6.1f}% {r['speedup']:7.2f}x {peak:>9s}  "
              f"{r.get('variant', '')}")
    shipped = [r for r in rows if r.get("variant") not in (None, "hand", "naive")]
    hand = {(r["kind"], r["n"], r["w"]): r["secs"] for r in rows if r.get("variant") == "hand"}
    if shipped and hand:
        print("tuned (shipped) against hand, by window class (the variant each call used):")
        for r in shipped:
            h = hand.get((r["kind"], r["n"], r["w"]))
            if h is not None:
                print(f"  {r['kind']:4s} N={r['n']:<5d} w={r['w']:<4d} {h / r['secs']:5.2f}x  "
                      f"[{window_class(2 * r['w'] + 1)}] {r['variant']}")


TITLES = {"qk": "banded Q Kᵀ", "pv": "banded P V", "tpv": "transposed P V (backward)",
          "attention fwd": "attention forward", "attention fwd+bwd": "attention forward + backward"}


def plot(rows, path: Path) -> None:
    """One panel per operation; every implementation has one colour in every panel and each
    panel's legend names its own bars; the label above a bar is its speed-up over sliding chunks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in TITLES if any(r["kind"] == k for r in rows)]
    impls = sorted({r["impl"] for r in rows}, key=lambda i: (not i.startswith("sliding"), i))
    colours = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sub = [r for r in rows if r["kind"] == kind]
        shapes = sorted({(r["n"], r["w"]) for r in sub})
        mine = [i for i in impls if any(r["impl"] == i for r in sub)]
        width = 0.8 / max(len(mine), 1)
        for i, impl in enumerate(mine):
            for x, shape in enumerate(shapes):
                r = next((r for r in sub if r["impl"] == impl and (r["n"], r["w"]) == shape), None)
                if r is None:
                    continue
                bar = ax.bar(x + i * width, 1e3 * r["secs"], width, color=colours[impl],
                             label=impl if x == 0 else None)
                ax.bar_label(bar, [f"{r['speedup']:.1f}x"], fontsize=6, rotation=90, padding=2)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))],
                      [f"N={n}, w={w}" for n, w in shapes], rotation=15, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (log); label: x sliding chunks")
        ax.set_title(f"{TITLES[kind]}\nB={B}, H={H}, D={D}, float32, CPU", fontsize=9)
        ax.margins(y=0.25)
        ax.legend(fontsize=6, loc="upper left")
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
