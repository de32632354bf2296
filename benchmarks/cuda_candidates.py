"""Time offline-tuning candidates on a GPU with the TVM runtime only (no TVM compiler needed).

``python -m benchmarks.cuda_candidates DIR --json timings.json`` where DIR was written by
``python -m tvm_kernels.cuda.tune offline-build``. Each candidate library built for this GPU's
architecture is loaded, checked against the reference on two awkward cases, and timed per
product at the tuning shape (B=1, N=4096, H=12, D=64, w=256). ``python -m tvm_kernels.cuda.tune
offline-collect timings.json`` then writes the tuning records.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from longformer_tvm import backends, ops, reference
from longformer_tvm._checks import normalize_band

from .cuda_bench import cuda_time

logger = logging.getLogger("cuda_candidates")

CHECK_CASES = [(1, 333, 3, 24, 17, 2, False), (2, 200, 2, 70, 40, 1, True)]
SHAPE = (1, 4096, 12, 64, 256, 1)


def _run(fn, product, a, b, band, last):
    out = torch.empty(*a.shape[:3], last, dtype=a.dtype, device=a.device)
    ops.apply_kernel(fn, a, b, band, out, float("-inf") if product == "qk" else None)
    return out


def _inputs(case, dtype, seed=0):
    b, n, h, d, w, dil, ar = case
    band = normalize_band("tune", w, dil, ar, h)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, n, h, d, generator=g), torch.randn(b, n, h, d, generator=g)
    p = torch.randn(b, n, h, band.columns, generator=g)
    return band, x, y, p


def check(functions: dict, dtype: torch.dtype) -> bool:
    for case in CHECK_CASES:
        band, x, y, p = _inputs(case, dtype)
        d = x.shape[3]
        for product in ("qk", "pv", "tpv"):
            a, b = (x, y) if product == "qk" else (p, x)
            ref = {"qk": lambda a, b: reference.band_qk(a, b, band, float("-inf")),
                   "pv": lambda a, b: reference.band_pv(a, b, band),
                   "tpv": lambda a, b: reference.band_pv_transposed(a, b, band)}[product]
            want = ref(a.double(), b.double())
            plain = ref(a.to(dtype), b.to(dtype)).double()
            got = _run(functions[product], product, a.to(dtype).cuda(), b.to(dtype).cuda(), band,
                       band.columns if product == "qk" else d).double().cpu()
            fin = torch.isfinite(want)
            if not torch.equal(torch.isfinite(got), fin):
                return False
            err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
            tol = 8 * ((plain[fin] - want[fin]).abs().max().item() if fin.any() else 0.0) + 1e-6
            if err > tol:
                return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    root = Path(args.dir)
    listing = json.loads((root / "candidates.json").read_text())["candidates"]
    arch = backends.arch(torch.device("cuda"))
    backends.load_runtime("cuda")
    import tvm_ffi

    rows = []
    b, n, h, d, w, dil = SHAPE
    for cand in listing:
        if cand["arch"] != arch:
            continue
        dtype = getattr(torch, cand["dtype"])
        module = tvm_ffi.load_module(str(root / cand["file"]))
        functions = {p: module[s] for p, s in (("qk", "band_qk"), ("pv", "band_pv"),
                                                ("tpv", "band_pv_transposed"))}
        ok = check(functions, dtype)
        band = normalize_band("tune", w, dil, False, h)
        g = torch.Generator(device="cuda").manual_seed(0)
        x, y = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        p = torch.randn(b, n, h, band.columns, device="cuda", dtype=dtype, generator=g)
        for product in ("qk", "pv", "tpv"):
            a, bb = (x, y) if product == "qk" else (p, x)
            last = band.columns if product == "qk" else d
            ms = cuda_time(lambda: _run(functions[product], product, a, bb, band, last), iters=10)
            rows.append({**cand, "product": product, "ms": ms, "ok": ok})
            print(f"{cand['file']:28s} {product:4s} {ms:8.3f} ms  {'ok' if ok else 'MISMATCH'}")
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                          indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
