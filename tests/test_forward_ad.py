"""Forward-mode AD through the ops (torch.func.jvp, torch.autograd.forward_ad): the tangent of each
bilinear product is two products of the same kind (QK's padding is a constant, so its tangent is
0), checked in float64 against the reference and against central finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import longformer_tvm as lt
from longformer_tvm import reference
from longformer_tvm._checks import normalize_band

# (B, N, H, D, window, dilation, autoregressive)
CASES = [
    (1, 37, 2, 5, 4, [1, 3], False),    # N not a multiple of anything, per-head dilation
    (2, 20, 1, 8, 3, 1, True),          # autoregressive
    (1, 9, 2, 3, 12, 2, False),         # window >= N: most of the band is padding
]
IDS = ["dilated-heads", "autoregressive", "window-over-N"]
PADDING = -1.5


def _ops(w, dil, ar, padding=PADDING):
    return {
        "qk": lambda a, b: lt.sliding_window_qk(a, b, w, dil, ar, padding_value=padding),
        "pv": lambda a, b: lt.sliding_window_pv(a, b, w, dil, ar),
        "tpv": lambda a, b: lt.sliding_window_pv_transposed(a, b, w, dil, ar),
    }


def _reference(product, band):
    return {"qk": lambda a, b: reference.band_qk(a, b, band, 0.0),  # the tangent's padding
            "pv": lambda a, b: reference.band_pv(a, b, band),
            "tpv": lambda a, b: reference.band_pv_transposed(a, b, band)}[product]


def _inputs(product, case, seed):
    b, n, h, d, w, dil, ar = case
    band = normalize_band("test", w, dil, ar, h)
    g = torch.Generator().manual_seed(seed)
    first = d if product == "qk" else band.columns
    make = lambda last: torch.randn(b, n, h, last, generator=g, dtype=torch.float64)  # noqa: E731
    return band, (make(first), make(d)), (make(first), make(d))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("product", ["qk", "pv", "tpv"])
def test_func_jvp_matches_the_bilinear_tangent_and_finite_differences(product, case):
    band, (a, b), (da, db) = _inputs(product, case, 0)
    f = _ops(*case[4:])[product]
    out, tangent = torch.func.jvp(f, (a, b), (da, db))
    ref = _reference(product, band)
    want = ref(da, b) + ref(a, db)
    torch.testing.assert_close(out, f(a, b), rtol=0, atol=0)
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-10)
    assert want.abs().max() > 0  # the test could tell an all-zero tangent apart
    eps = 1e-6  # the product is bilinear: central differences are exact up to rounding
    fd = (f(a + eps * da, b + eps * db) - f(a - eps * da, b - eps * db)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["first", "second", "both"])
@pytest.mark.parametrize("product", ["qk", "pv", "tpv"])
def test_forward_ad_dual_tensors(product, which):
    band, (a, b), (da, db) = _inputs(product, CASES[0], 1)
    f = _ops(*CASES[0][4:])[product]
    ref = _reference(product, band)
    with fwAD.dual_level():
        args = (fwAD.make_dual(a, da) if which in ("first", "both") else a,
                fwAD.make_dual(b, db) if which in ("second", "both") else b)
        primal, tangent = fwAD.unpack_dual(f(*args))
    assert tangent is not None, "forward AD lost the tangent"
    want = {"first": ref(da, b), "second": ref(a, db), "both": ref(da, b) + ref(a, db)}[which]
    torch.testing.assert_close(primal, f(a, b), rtol=0, atol=0)
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-10)


def test_padding_has_zero_tangent_even_when_infinite():
    band, (q, k), (dq, dk) = _inputs("qk", CASES[2], 2)
    f = _ops(*CASES[2][4:], padding=float("-inf"))["qk"]
    _, tangent = torch.func.jvp(f, (q, k), (dq, dk))
    want = reference.band_qk(dq, k, band, 0.0) + reference.band_qk(q, dk, band, 0.0)
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-10)
    outside = torch.isinf(f(q, k))  # the padded entries
    assert outside.any() and (tangent[outside] == 0).all()


def test_second_order_and_backward_through_a_tangent():
    band, (q, k), (dq, dk) = _inputs("qk", CASES[0], 3)
    f = _ops(*CASES[0][4:])["qk"]
    # d/dq (d/dk qk(q, k) . dk) . dq = qk(dq, dk): jvp of jvp
    inner = lambda q_: torch.func.jvp(lambda k_: f(q_, k_), (k,), (dk,))[1]  # noqa: E731
    _, second = torch.func.jvp(inner, (q,), (dq,))
    torch.testing.assert_close(second, reference.band_qk(dq, dk, band, 0.0), rtol=1e-10, atol=1e-10)
    # reverse over forward: the tangent qk(dq, k) is differentiable in k
    k_leaf = k.clone().requires_grad_()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(q, dq), k_leaf)).tangent
        (grad,) = torch.autograd.grad(tangent.square().sum(), k_leaf)
    k_ref = k.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.band_qk(dq, k_ref, band, 0.0).square().sum(), k_ref)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)
