"""The three band products on the active backend against dense float64 oracles.

Runs on the compiled kernels (the default backend); a missing library is an error, not a skip.
"""

from __future__ import annotations

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import reference
from longformer_tvm._checks import normalize_band

from .oracle import assert_close_to_oracle, dense_pv, dense_qk, dense_tpv

# (batch, seq_len, heads, head_dim, window, dilation, autoregressive)
CASES = [
    (1, 1, 1, 8, 0, 1, False),
    (3, 1, 2, 8, 1, 1, True),
    (1, 7, 2, 5, 1, 1, False),
    (3, 7, 3, 8, 17, 1, False),            # w >= N
    (1, 7, 4, 8, 1, [1, 2, 3, 4], False),   # w * d >= N on some heads
    (1, 333, 3, 24, 17, [1, 2, 3], False),  # N not a multiple of anything
    (3, 333, 2, 16, 17, 2, True),
    (1, 333, 2, 12, 0, 3, False),
    (1, 1024, 2, 64, 256, 1, False),
    (3, 1024, 2, 32, 17, [3, 1], True),
    (1, 1024, 4, 64, 256, [1, 2, 3, 5], True),
    (1, 1024, 3, 7, 1, 1, False),           # odd head size
    (1, 2300, 2, 16, 5, [1, 2], False),     # three QK work units in a residue, the last short
]


def _id(case):
    b, n, h, d, w, dil, ar = case
    return f"B{b}-N{n}-H{h}-D{d}-w{w}-d{dil}{'-ar' if ar else ''}".replace(" ", "")


def _data(case, dtype, seed=0):
    b, n, h, d, w, dil, ar = case
    g = torch.Generator().manual_seed(seed)
    band = normalize_band("test", w, dil, ar, h)
    mk = lambda last: torch.randn(b, n, h, last, generator=g, dtype=torch.float64)  # noqa: E731
    return band, mk(d), mk(d), mk(band.columns)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_qk_matches_dense(case, dtype):
    band, q, k, _ = _data(case, dtype)
    w, dil, ar = case[4], case[5], case[6]
    for pad in (0.0, float("-inf"), -5.5):
        got = lt.sliding_window_qk(q.to(dtype), k.to(dtype), w, dil, ar, padding_value=pad)
        assert got.shape == (q.shape[0], q.shape[1], q.shape[2], band.columns) and got.dtype == dtype
        want = dense_qk(q, k, band, pad)
        plain = reference.band_qk(q.to(dtype), k.to(dtype), band, pad)
        assert_close_to_oracle(got, want, plain, what=f"qk pad={pad}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_pv_matches_dense(case, dtype):
    band, _, v, p = _data(case, dtype)
    w, dil, ar = case[4], case[5], case[6]
    got = lt.sliding_window_pv(p.to(dtype), v.to(dtype), w, dil, ar)
    plain = reference.band_pv(p.to(dtype), v.to(dtype), band)
    assert_close_to_oracle(got, dense_pv(p, v, band), plain, what="pv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_pv_transposed_matches_dense(case, dtype):
    band, _, x, g = _data(case, dtype)
    w, dil, ar = case[4], case[5], case[6]
    got = lt.sliding_window_pv_transposed(g.to(dtype), x.to(dtype), w, dil, ar)
    plain = reference.band_pv_transposed(g.to(dtype), x.to(dtype), band)
    assert_close_to_oracle(got, dense_tpv(g, x, band), plain, what="tpv")


def test_pv_ignores_invalid_diagonals_whatever_they_hold():
    band, _, v, p = _data((2, 50, 2, 8, 9, [1, 3], False), torch.float32)
    _, valid = reference.key_index(50, band)  # (H, N, C)
    poisoned = torch.where(valid.permute(1, 0, 2).unsqueeze(0), p, torch.full_like(p, float("nan")))
    got = lt.sliding_window_pv(poisoned.float(), v.float(), 9, [1, 3])
    assert torch.isfinite(got).all()
    assert_close_to_oracle(got, dense_pv(p, v, band), reference.band_pv(p.float(), v.float(), band))


def test_diagonaled_mm_is_allenai_call():
    band, q, k, p = _data((2, 100, 3, 16, 8, [1, 2, 1], False), torch.float32)
    q, k, p = q.float(), k.float(), p.float()
    d = torch.tensor([1, 2, 1])
    s = lt.diagonaled_mm(q, k, 8, d, False, -10000.0, False)
    torch.testing.assert_close(s, lt.sliding_window_qk(q, k, 8, d, padding_value=-10000.0))
    o = lt.diagonaled_mm(p, k, 8, d, True, 0, False)
    torch.testing.assert_close(o, lt.sliding_window_pv(p, k, 8, d))
    # D == C: the flag decides, so neither call is ambiguous
    x = torch.randn(1, 20, 2, 5)
    assert lt.diagonaled_mm(x, x, 2, 1).shape == (1, 20, 2, 5)
    assert lt.diagonaled_mm(x, x, 2, 1, is_t1_diagonaled=True).shape == (1, 20, 2, 5)


def test_non_contiguous_inputs_are_accepted():
    band, q, k, _ = _data((2, 64, 4, 16, 5, 1, False), torch.float32)
    q, k = q.float(), k.float()
    want = lt.sliding_window_qk(q, k, 5)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)       # (B, N, H, D) view, strided
    assert not qt.is_contiguous()
    torch.testing.assert_close(lt.sliding_window_qk(qt, k, 5), want)
    kk = torch.empty(2, 64, 4, 32)[..., ::2]                   # last stride 2: copied once
    kk.copy_(k)
    torch.testing.assert_close(lt.sliding_window_qk(q, kk, 5), want)
    heads = torch.randn(2, 64, 8, 16)[:, :, 2:6]                # a head slice
    torch.testing.assert_close(lt.sliding_window_qk(heads, k, 5),
                               lt.sliding_window_qk(heads.contiguous(), k, 5))


def _runnable_shipped_cpu_libraries():
    from pathlib import Path

    from longformer_tvm import backends

    prebuilt = Path(__file__).resolve().parent.parent / "prebuilt"
    return [c.entry for dtype in backends.TABLE["cpu"].dtypes for c in backends.candidates("cpu", dtype)
            if c.usable and c.entry.path.resolve().is_relative_to(prebuilt)]


@pytest.mark.parametrize("entry", _runnable_shipped_cpu_libraries(), ids=lambda e: e.path.name)
def test_every_isa_library_that_runs_here_matches_the_reference(entry):
    """The products above run the library the loader picks for this CPU; the others that run
    here (an AVX-512 machine also runs avx2 and generic) are built with other register blocks
    (PV's row group is 4 rows on 16-register ISAs, 8 on AVX-512) and are checked here."""
    from benchmarks.selfcheck import QUICK, check_functions
    from longformer_tvm import backends

    rows = check_functions(backends.open_library(entry), getattr(torch, entry.dtype), "cpu", QUICK)
    bad = [(r["case"], r["product"], r["err"], r["tol"]) for r in rows if not r["ok"]]
    assert len(rows) == 3 * len(QUICK) and not bad, bad
