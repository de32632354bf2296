"""Every compiled library that runs on this machine, against the float64 reference.

``python build_kernels.py selfcheck``: loads each library listed in the manifests (prebuilt/ and
the user cache) whose target runs here, runs every product on a table of awkward cases (N = 1,
lengths that are no multiple of anything, w * d >= N, per-head dilation, autoregressive, -inf
padding) and compares with :mod:`longformer_tvm.reference` in float64. The tolerance is relative
to what the dtype can do: at most 8x the error of the plain-PyTorch products computed in the same
dtype. Prints a table; exits non-zero on any mismatch. Needs only the TVM runtime.

``--emulate-cuda`` runs the CUDA libraries' schedules instead, on this CPU, under the thread-block
emulator (:mod:`tvm_kernels.cuda.emulate`; needs the TVM compiler and g++): every listed CUDA
library's kernels are regenerated from its manifest entry's configuration and checked on
:data:`EMULATED` with strided, canary-guarded buffers and NaN in the invalid diagonals.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from longformer_tvm import backends, ops, reference
from longformer_tvm._checks import Band, normalize_band

logger = logging.getLogger("selfcheck")

#: (B, N, H, D, w, dilation, autoregressive)
CASES = [
    (1, 1, 1, 8, 0, 1, False),
    (2, 37, 3, 16, 4, 1, False),
    (1, 100, 2, 64, 7, 3, True),
    (3, 7, 2, 8, 17, 2, False),
    (1, 333, 4, 24, 17, [1, 2, 3, 1], False),
    (2, 1024, 2, 64, 256, 1, False),
    (1, 1024, 2, 64, 64, [2, 1], True),
    (1, 300, 2, 16, 40, 1, False),            # the medium window class's variants (C = 81)
    (1, 600, 1, 16, 140, [3], False),         # the wide class's (C = 281)
]
#: Small cases of every window class (each may have its own compiled variant: ``variants``).
QUICK = CASES[:5] + CASES[-2:]
#: The product tests' table, sized for the emulator (a CPU thread runs every CUDA thread).
EMULATED = [
    (1, 1, 1, 8, 0, 1, False),                # N = 1
    (3, 7, 3, 8, 17, 1, False),               # w >= N
    (1, 7, 4, 8, 1, [1, 2, 3, 4], False),     # w * d >= N on some heads
    (1, 333, 3, 24, 17, [1, 2, 3], False),    # N past a tile, per-head dilation, C = 35
    (2, 200, 2, 16, 17, 2, True),             # autoregressive
    (1, 300, 2, 64, 100, [1, 3], True),       # several diagonal and head-column chunks
    (1, 200, 3, 7, 1, 1, False),              # odd head size
    (1, 150, 2, 130, 70, 1, False),           # head size above one staging chunk
]
EMULATED_QUICK = EMULATED[:4]


def _inputs(case, dtype, device, seed=0):
    b, n, h, d, w, dil, ar = case
    band = normalize_band("selfcheck", w, dil, ar, h)
    g = torch.Generator().manual_seed(seed)
    mk = lambda last: torch.randn(b, n, h, last, generator=g, dtype=torch.float64)  # noqa: E731
    x, y, p = mk(d), mk(d), mk(band.columns)
    return band, [t.to(device) for t in (x, y, p)]


def _reference(product: str, a, b, band: Band, pad: float):
    if product == "qk":
        return reference.band_qk(a, b, band, pad)
    if product == "pv":
        return reference.band_pv(a, b, band)
    return reference.band_pv_transposed(a, b, band)


_REFERENCES: dict = {}


def _want(case, product, dtype, device, a64, b64, band, pad):
    """(float64 reference, plain torch's error at ``dtype``), computed once per case and dtype."""
    key = (repr(case), product, dtype, str(device))
    if key not in _REFERENCES:
        want = _reference(product, a64, b64, band, pad if pad is not None else 0.0)
        plain = _reference(product, a64.to(dtype), b64.to(dtype), band, pad or 0.0)
        _REFERENCES[key] = (want, (plain.double() - want).abs())
    return _REFERENCES[key]


def _poisoned(p: torch.Tensor, band: Band) -> torch.Tensor:
    """``p`` with NaN in every invalid diagonal (which the products must ignore)."""
    _, valid = reference.key_index(p.shape[1], band, p.device)  # (H, N, C)
    return torch.where(valid.permute(1, 0, 2).unsqueeze(0), p, torch.full_like(p, float("nan")))


def _guarded_call(kernel, a, b, band, out_shape, dtype, pad):
    """Run ``kernel`` on copies of a and b and an output, each strided inside canaries
    (:class:`tvm_kernels.cuda.emulate.Guarded`). Returns (output, problems)."""
    from tvm_kernels.cuda.emulate import EmulationError, Guarded

    ga, gb, go = Guarded(a.shape, dtype, a), Guarded(b.shape, dtype, b), Guarded(out_shape, dtype)
    try:
        ops.apply_kernel(kernel, ga.view, gb.view, band, go.view, pad)
    except EmulationError as exc:
        return go.view, [str(exc)]
    problems = [f"{name} changed in {n} elements" for name, n in
                (("first input", ga.changed()), ("second input", gb.changed()),
                 ("memory around the output", go.changed(outside_only=True))) if n]
    return go.view, problems


def check_functions(functions: dict, dtype: torch.dtype, device: str, cases=CASES,
                    guarded: bool = False) -> list[dict]:
    """Run every product of one library over ``cases``; one result row per (case, product).

    ``guarded``: strided inputs and output inside canaries, NaN in the invalid diagonals of P
    and G; a row also fails (its ``problems`` say why) where an input or the memory around the
    output changed, or the emulator reported the kernel."""
    rows = []
    for case in cases:
        band, (x, y, p) = _inputs(case, dtype, device)
        for product in ("qk", "pv", "tpv"):
            a64, b64 = (x, y) if product == "qk" else (p, x)
            pad = float("-inf") if product == "qk" else None
            want, torch_err = _want(case, product, dtype, device, a64, b64, band, pad)
            a, b = a64.to(dtype), b64.to(dtype)
            problems = []
            t0 = time.perf_counter()
            if guarded:
                a = a if product == "qk" else _poisoned(a, band)
                out, problems = _guarded_call(functions[product], a, b, band, want.shape, dtype, pad)
            else:
                out = torch.empty(want.shape, dtype=dtype, device=device)
                ops.apply_kernel(functions[product], a, b, band, out, pad)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            ms = 1e3 * (time.perf_counter() - t0)
            got = out.double()
            finite = torch.isfinite(want)
            same_inf = torch.equal(torch.isfinite(got), finite) and torch.equal(got[~finite], want[~finite])
            err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
            tol = 8 * (torch_err[finite].max().item() if finite.any() else 0.0) + 1e-12
            if not same_inf:
                problems.append("non-finite entries differ from the reference")
            rows.append({"case": case, "product": product, "err": err, "tol": tol, "ms": ms,
                         "ok": bool(same_inf and err <= tol and not problems), "problems": problems})
    return rows


def usable_entries():
    """(entry, reason) for every listed library; reason is '' when it runs here."""
    out = [(c.entry, c.reason) for dtype in backends.TABLE["cpu"].dtypes
           for c in backends.candidates("cpu", dtype)]
    out.extend(cuda_entries())
    return out


def cuda_entries():
    """CUDA libraries, judged for the architecture of cuda:0 (all skipped without a GPU)."""
    arch = backends.arch(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    out = []
    for dtype in backends.TABLE["cuda"].dtypes:
        for c in backends.candidates("cuda", dtype, arch):
            out.append((c.entry, c.reason or ("" if arch else "no CUDA GPU here")))
    # one library per (dtype): the one the loader would pick (SASS for this arch first)
    chosen, seen = [], set()
    for entry, reason in sorted(out, key=lambda er: (bool(er[1]), arch not in er[0].info.get("archs", ()))):
        if not reason and entry.dtype in seen:
            reason = "another library for this dtype is preferred here"
        if not reason:
            seen.add(entry.dtype)
        chosen.append((entry, reason))
    return chosen


HEADER = f"{'library':44s} {'product':8s} {'cases':>5s} {'max err':>10s} {'tolerance':>10s}  result"


def print_rows(name: str, rows: list[dict]) -> int:
    """One table line per product of ``rows``; returns how many products failed."""
    failures = 0
    for product in ("qk", "pv", "tpv"):
        mine = [r for r in rows if r["product"] == product]
        bad = [r for r in mine if not r["ok"]]
        worst = max(mine, key=lambda r: r["err"] / r["tol"] if r["tol"] else r["err"])
        why = sorted({p for r in bad for p in r.get("problems", [])})
        print(f"{name:44s} {product:8s} {len(mine):5d} {worst['err']:10.2e} {worst['tol']:10.2e}  "
              f"{'ok' if not bad else 'MISMATCH ' + str([r['case'] for r in bad]) + ' ' + '; '.join(why)}")
        failures += bool(bad)
    return failures


def emulated_configs() -> list[tuple[str, str, dict]]:
    """(library name, dtype, configuration) of every listed CUDA library, one per distinct
    (dtype, configuration)."""
    out, seen = [], set()
    for dtype in backends.TABLE["cuda"].dtypes:
        for cand in backends.candidates("cuda", dtype):
            config = cand.entry.info.get("config")
            key = (dtype, repr(sorted((config or {}).items())))
            if config and key not in seen:
                seen.add(key)
                out.append((f"{cand.entry.path.parent.name}/{cand.entry.path.name}", dtype, config))
    return out


def emulate_cuda(args) -> int:
    """``selfcheck --emulate-cuda``: the CUDA libraries' schedules on this CPU (see the module doc)."""
    from tvm_kernels.cuda import emulate

    if emulate.find_gxx() is None:
        print("selfcheck --emulate-cuda: g++ not found (the emulator compiles the kernels with it)")
        return 1
    cases = EMULATED_QUICK if getattr(args, "quick", False) else EMULATED
    failures = 0
    libraries = emulated_configs()
    print("the CUDA libraries' kernels on this CPU, under the thread-block emulator")
    print(HEADER)
    for name, dtype, config in libraries:
        t0 = time.perf_counter()
        library = emulate.EmulatedLibrary(dtype, config)
        rows = check_functions(library.functions, getattr(torch, dtype), "cpu", cases, guarded=True)
        failures += print_rows(name, rows)
        logger.info("%s: emulated in %.1f s", name, time.perf_counter() - t0)
    if not libraries:
        print("no CUDA library is listed in the manifests")
        return 1
    print(f"selfcheck --emulate-cuda: {len(libraries)} CUDA libraries, "
          f"{'all match' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


def main(args) -> int:
    if getattr(args, "emulate_cuda", False):
        return emulate_cuda(args)
    cases = QUICK if getattr(args, "quick", False) else CASES
    failures = checked = 0
    gpu_checked = False
    print(HEADER)
    for entry, reason in usable_entries():
        name = f"{entry.path.parent.name}/{entry.path.name}"
        if reason:
            print(f"{name:44s} skipped: {reason}")
            continue
        try:
            functions = backends.open_library(entry)
        except Exception as exc:  # a library that does not load is a failure, not a crash
            print(f"{name:44s} FAILED to load: {exc}")
            failures += 1
            continue
        rows = check_functions(functions, getattr(torch, entry.dtype), entry.device, cases)
        failures += print_rows(name, rows)
        checked += 1
        gpu_checked = gpu_checked or entry.device == "cuda"
    if gpu_checked:
        from benchmarks import cuda_bench

        print()
        print(f"GPU timings: {torch.cuda.get_device_name()}, B=1 N=4096 H=12 D=64 w=256")
        rows = cuda_bench.run(iters=5 if getattr(args, "quick", False) else 20)
        print(cuda_bench.format_table(rows, cuda_bench.copy_bandwidth()))
    if not checked:
        print("no library runs on this machine: build one with `python build_kernels.py build`")
        return 1
    print(f"selfcheck: {checked} libraries, {'all match' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(type("A", (), {"quick": "--quick" in sys.argv,
                                 "emulate_cuda": "--emulate-cuda" in sys.argv})()))
