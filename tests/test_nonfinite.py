"""An inf or NaN costs no second pass: the kernels' result is the reference's, as it comes.

The CPU kernels once multiplied operand entries outside a row's band by zero, so an inf or NaN
there made a NaN in a row whose band never held it; the ops then recomputed every such product
with the plain-PyTorch reference, 100x slower. Now nothing outside the band meets a row's
arithmetic (:mod:`tvm_kernels.cpu.kernels`), so these tests make the reference products raise
inside the ops (``kernels_only``) and compare what the kernels return with the float64 reference
(kept here before the patch) at the inputs that used to fall back: fully masked rows of P (all
NaN, out-of-sequence columns included), inf and NaN only at keys outside the sequence, an inf in
v or x, NaN in G; with dilation > 1 and autoregressive bands, one tile and many.
"""

from __future__ import annotations

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import reference
from longformer_tvm._checks import normalize_band

from .test_hostile import assert_matches

NAN, INF = float("nan"), float("inf")

#: The reference products, for the oracle: the fixture below replaces the module's attributes.
REF = {"qk": reference.band_qk, "pv": reference.band_pv, "tpv": reference.band_pv_transposed}
CALL = {"pv": lt.sliding_window_pv, "tpv": lt.sliding_window_pv_transposed}

# (N, H, D, w, dilation, autoregressive)
SHAPES = [
    (37, 3, 5, 3, [1, 2, 5], False),    # dilation per head; N not a multiple of any tile
    (64, 2, 8, 6, 1, True),             # autoregressive
    (9, 1, 3, 12, 1, False),            # w >= N: every row has keys outside the sequence
    (333, 2, 16, 17, [1, 3], True),     # dilation and autoregressive, several tiles and units
    (300, 2, 64, 40, 2, False),         # a wide band, two residues
]


def _id(shape):
    n, h, d, w, dil, ar = shape
    return f"N{n}-H{h}-D{d}-w{w}-d{dil}{'-ar' if ar else ''}".replace(" ", "")


@pytest.fixture(autouse=True)
def kernels_only(monkeypatch):
    """The reference products raise when the ops call them: a result must come from the kernels."""
    for name in ("band_qk", "band_pv", "band_pv_transposed"):
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"reference.{_name} ran: the kernels' result was recomputed "
                                 "(the slow path)")
        monkeypatch.setattr(reference, name, refuse)


def _operands(n, h, d, band, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, n, h, band.columns, generator=g, dtype=torch.float64),
            torch.randn(2, n, h, d, generator=g, dtype=torch.float64))


def _outside(n, band) -> torch.Tensor:
    """(1, N, H, C): True where the key of a banded entry is outside the sequence."""
    _, valid = reference.key_index(n, band)
    return ~valid.permute(1, 0, 2).unsqueeze(0)


def _poison(case: str, a: torch.Tensor, b: torch.Tensor, band) -> None:
    n = a.shape[1]
    if case == "nan rows":  # fully masked rows: a softmax of -inf everywhere, or their gradient
        a[1, [0, 1, n // 2, n - 1]] = NAN
    elif case == "nan outside":
        a[_outside(n, band).expand_as(a)] = NAN
    elif case == "inf outside":
        outside = _outside(n, band).expand_as(a)
        a[outside] = INF
        a[1][outside[1]] = -INF
    elif case == "inf in b":  # a diverging value in v (pv) or x (tpv)
        b[1, n // 2, :, b.shape[3] // 2] = INF
        b[0, 0, 0, 0] = -INF
        b[0, n - 1, -1, -1] = INF
    elif case == "nan in b":
        b[1, [0, n // 3, n - 1], :, 0] = NAN
    elif case == "scattered":  # a few of each anywhere, in and out of the band
        g = torch.Generator().manual_seed(1)
        a[torch.rand(a.shape, generator=g) < 0.01] = NAN
        b[torch.rand(b.shape, generator=g) < 0.003] = INF
    else:
        raise ValueError(case)


CASES = ["nan rows", "nan outside", "inf outside", "inf in b", "nan in b", "scattered"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("product", ["pv", "tpv"])
def test_kernels_keep_nonfinite_to_the_rows_whose_band_holds_it(product, case, shape, dtype):
    n, h, d, w, dil, ar = shape
    band = normalize_band("test", w, dil, ar, h)
    a, b = _operands(n, h, d, band, dtype)
    _poison(case, a, b, band)
    want = REF[product](a, b, band)
    if case in ("nan outside", "inf outside"):
        assert torch.isfinite(want).all()  # keys outside the sequence are not in the band
    got = CALL[product](a.to(dtype), b.to(dtype), w, dil, ar)
    assert_matches(got, want, f"{product} {case}")


def _attention_reference(q, k, v, band, masked):
    """The attention core and the backward of ``out.sum()``, stated with the reference products
    in float64, as the ops define their backward (:mod:`longformer_tvm.ops`)."""
    s = REF["qk"](q, k, band, -INF)
    s[:, masked] = -INF
    p = torch.softmax(s, -1)
    out = REF["pv"](p, v, band)
    grad = torch.ones_like(out)
    dp = REF["qk"](grad, v, band, 0.0)
    dv = REF["tpv"](p, grad, band)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax's backward
    ds[:, masked] = 0  # index_fill's backward
    return out, REF["pv"](ds, k, band), REF["tpv"](ds, q, band), dv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=_id)
@pytest.mark.parametrize("case", ["masked rows", "inf in v"])
def test_attention_forward_and_backward_match_the_reference(case, shape, dtype):
    """QK with -inf padding, softmax, PV and the backward of the sum: fully masked rows make NaN
    rows of P (and of its gradient), out-of-sequence columns included; an inf in v makes NaN rows
    of the scores' gradient. Every product of the backward runs on the kernels."""
    n, h, d, w, dil, ar = shape
    band = normalize_band("test", w, dil, ar, h)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    masked = torch.tensor([0, n // 2, n - 1] if case == "masked rows" else [], dtype=torch.long)
    if case == "inf in v":
        v[0, n // 2, 0, 0] = INF
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    s = lt.sliding_window_qk(leaves[0], leaves[1], w, dil, ar, padding_value=-INF)
    s = s.index_fill(1, masked, -INF)
    out = lt.sliding_window_pv(torch.softmax(s, -1), leaves[2], w, dil, ar)
    out.sum().backward()
    want = _attention_reference(q, k, v, band, masked)
    assert not want[0].isfinite().all()
    for what, got, ref in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)), want):
        assert_matches(got.detach(), ref, f"{case}: {what}")


def test_nonfinite_results_do_not_call_the_reference(monkeypatch):
    """Counted, not timed: NaN rows in P, an inf in v, NaN rows in G and a training step with
    both leave every product to the kernels."""
    calls = []

    def counted(name, fn):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return call

    for name, product in (("band_qk", "qk"), ("band_pv", "pv"), ("band_pv_transposed", "tpv")):
        monkeypatch.setattr(reference, name, counted(name, REF[product]))
    n, h, d, w = 200, 2, 16, 9
    band = normalize_band("test", w, 1, False, h)
    p, v = (t.float() for t in _operands(n, h, d, band, torch.float32))
    p_nan, v_inf = p.clone(), v.clone()
    p_nan[0, [0, 100]] = NAN
    v_inf[0, 50, 1, 3] = INF
    results = [lt.sliding_window_pv(p_nan, v, w), lt.sliding_window_pv(p, v_inf, w),
               lt.sliding_window_pv_transposed(p_nan, v, w),
               lt.sliding_window_pv_transposed(p, v_inf, w)]
    q, k, v_inf = (t.clone().requires_grad_() for t in (v, v.flip(1), v_inf))
    s = lt.sliding_window_qk(q, k, w, padding_value=-INF).index_fill(1, torch.tensor([7]), -INF)
    out = lt.sliding_window_pv(torch.softmax(s, -1), v_inf, w)
    out.sum().backward()
    results += [out, v_inf.grad]
    assert all(not r.isfinite().all() for r in results)
    assert calls == [], f"the ops fell back to the reference products: {calls}"
