"""Smoke test of an installed wheel. Run from a folder outside any checkout, with the Python of a
virtual environment where the wheel (not an editable install) is installed:

    cd "$(mktemp -d)" && /path/to/venv/bin/python /path/to/smoke_installed.py

Checks that the package imports without the TVM compiler, that the three products and their
gradients match the float64 reference, served by a shipped library inside the installed tree
(``backend_info()`` says which), and that ``longformer-tvm selfcheck`` passes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import longformer_tvm as lt
from longformer_tvm import _contract, reference
from longformer_tvm._checks import normalize_band


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"smoke test FAILED: {what}")
    print(f"ok: {what}")


def main() -> int:
    package = Path(lt.__file__).resolve().parent
    check("tvm" not in sys.modules, "import longformer_tvm does not import tvm")
    check(_contract.INSTALLED and "site-packages" in package.parts,
          f"the package is an installed wheel ({package})")
    check(not any((Path.cwd() / name).exists() for name in ("tvm_kernels", "prebuilt")),
          f"run outside a checkout ({Path.cwd()})")
    g = torch.Generator().manual_seed(0)
    b, n, h, d, w, dil = 2, 77, 3, 8, 5, [1, 2, 3]
    band = normalize_band("smoke", w, dil, False, h)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
        s = lt.sliding_window_qk(q, k, w, dil)
        p = s.softmax(-1)
        o = lt.sliding_window_pv(p, v, w, dil)
        t = lt.sliding_window_pv_transposed(p, v, w, dil)
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        s64 = reference.band_qk(q64, k64, band)
        p64 = s64.softmax(-1)
        o64 = reference.band_pv(p64, v64, band)
        t64 = reference.band_pv_transposed(p64, v64, band)
        for name, got, want in (("qk", s, s64), ("pv", o, o64), ("tpv", t, t64)):
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        (o.sum() + t.square().sum()).backward()
        (o64.sum() + t64.square().sum()).backward()
        for name, got, want in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol)
        check(True, f"{dtype}: qk, pv, tpv and the gradients of q, k, v match the float64 reference")
    info = lt.backend_info()
    for key in ("cpu/float32", "cpu/float64"):
        lib = Path(info["loaded"][key])
        check(lib.is_relative_to(package / "prebuilt"), f"{key} served by a shipped library: {lib}")
    check("tvm" not in sys.modules, "the calls did not import tvm either")
    cli = shutil.which("longformer-tvm") or str(Path(sys.executable).parent / "longformer-tvm")
    proc = subprocess.run([cli, "selfcheck", "--quick"], capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:])
    check(proc.returncode == 0 and "all match" in proc.stdout,
          f"longformer-tvm selfcheck passes (exit {proc.returncode}){proc.stderr[-2000:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
