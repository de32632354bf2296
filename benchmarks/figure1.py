"""The paper's Figure 1 on this machine: time and peak memory of the attention core against length.

    python benchmarks/figure1.py [--lengths 512,1024,...,32768] [--window 256] [--out benchmarks/out]

For each sequence length and implementation -- ours fused (``sliding_window_attention``: output
and LSE, no scores), ours unfused (compiled band kernels), transformers' sliding chunks, dense
SDPA under the band mask, and a naive loop (the plain-PyTorch per-diagonal reference) -- one
subprocess computes the attention core forward at B=1, H=12, D=64 and reports its best time and
its peak extra memory (peak RSS minus RSS before the first call) next to the bytes of what it
returns (probabilities and output; output and LSE for the fused op). Points that exceed the
time or memory budget are recorded as such. Writes figure1.csv and figure1.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ["ours fused", "ours", "sliding chunks", "dense SDPA", "naive loop"]
H, D = 12, 64


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _softmax_(s):
    s.sub_(s.amax(-1, keepdim=True)).exp_()
    return s.div_(s.sum(-1, keepdim=True))


def point(method: str, n: int, w: int, repeats: int) -> dict:
    """Runs in its own process: one method at one length."""
    import torch

    sys.path.insert(0, str(REPO))
    import longformer_tvm as lt
    from benchmarks import baselines as bl
    from longformer_tvm import reference
    from longformer_tvm._checks import normalize_band

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, H, D) for _ in range(3))
    band = normalize_band("figure1", w, 1, False, H)

    def ours():
        p = _softmax_(lt.sliding_window_qk(q, k, w, padding_value=float("-inf")))
        return p, lt.sliding_window_pv(p, v, w)

    def fused():
        return lt.sliding_window_attention(q, k, v, w, scale=1.0, return_lse=True)

    def chunks():
        p = torch.softmax(bl.hf_qk(q, k, w), dim=-1)
        return p, bl.hf_pv(p, v, w)

    def dense():
        mask = bl._band_mask(n, w)
        s = torch.einsum("bihd,bjhd->bhij", q, k).masked_fill_(~mask, float("-inf"))
        p = torch.softmax(s, -1)
        del s
        return p, torch.einsum("bhij,bjhd->bihd", p, v)

    def naive():
        p = _softmax_(reference.band_qk(q, k, band, float("-inf")))
        return p, reference.band_pv(p, v, band)

    fn = {"ours fused": fused, "ours": ours, "sliding chunks": chunks, "dense SDPA": dense,
          "naive loop": naive}[method]
    if method.startswith("ours"):
        lt.sliding_window_qk(q[:, :8], k[:, :8], 1)  # load the library before measuring memory
    if method == "dense SDPA":
        bl._band_mask(n, w)
    base = _rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        returned = sum(t.numel() * t.element_size() for t in out)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the best run: the first pays for faulting in fresh pages, and other processes only add time
    return {"method": method, "n": n, "w": w, "secs": min(times),
            "peak_extra": max(peak - base, 0), "returned": returned}


def run_point(method: str, n: int, w: int, timeout: float, mem_limit: int) -> dict:
    dense_bytes = 4 * H * n * n * 3  # scores, probabilities, mask
    if method == "dense SDPA" and dense_bytes > mem_limit:
        return {"method": method, "n": n, "w": w, "status": "out of memory (skipped)"}
    repeats = 1 if method == "naive loop" else (5 if n <= 8192 else 3)
    cmd = [sys.executable, __file__, "--point", method, str(n), str(w), str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "w": w, "status": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"method": method, "n": n, "w": w, "status": f"failed: {proc.stderr.strip()[-200:]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["status"] = "ok"
    return out


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        pts = [r for r in rows if r["method"] == method and r.get("status") == "ok"]
        if not pts:
            continue
        ns = [r["n"] for r in pts]
        ax_t.plot(ns, [1e3 * r["secs"] for r in pts], "o-", label=method)
        ax_m.plot(ns, [r["peak_extra"] / 2 ** 20 for r in pts], "o-", label=method)
    for ax, label in ((ax_t, "time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle("Attention core forward (QK, softmax, PV), B=1, H=12, D=64, this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--point":
        method, n, w, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(point(method, n, w, repeats)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per point")
    ap.add_argument("--mem-limit", type=float, default=16.0, help="GiB for dense attention")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        for method in args.methods.split(","):
            if method == "sliding chunks" and n % (2 * args.window):
                rows.append({"method": method, "n": n, "w": args.window,
                             "status": "needs N multiple of 2w"})
                continue
            r = run_point(method, n, args.window, args.timeout, int(args.mem_limit * 2 ** 30))
            rows.append(r)
            if r.get("status") == "ok":
                print(f"{method:15s} N={n:6d}  {1e3 * r['secs']:10.1f} ms  peak extra "
                      f"{r['peak_extra'] / 2**20:9.1f} MiB  returned {r['returned'] / 2**20:8.1f} MiB  "
                      f"ratio {r['peak_extra'] / r['returned']:.2f}  {1e6 * r['secs'] / n:8.2f} us/token",
                      flush=True)
            else:
                print(f"{method:15s} N={n:6d}  {r['status']}", flush=True)
    keys = ["method", "n", "w", "status", "secs", "peak_extra", "returned"]
    with open(out / "figure1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "figure1.png")
    print(f"wrote {out / 'figure1.csv'} and {out / 'figure1.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
