"""sliding_window_attention: the fused op against a dense float64 softmax, forward and backward.

Every case runs the op as it is served here (the fused CPU kernel where the library has it) and
through the band products (``composite``, what CUDA and the reference backend run), each held to
:func:`tests.oracle.dense_attention` at the tolerance of plain float32 PyTorch.
"""

from __future__ import annotations

import math

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import _fused, reference
from longformer_tvm._checks import normalize_band

from .oracle import assert_close_to_oracle, dense_attention

# (B, N, H, D, window, dilation, autoregressive, masked): the table of the product tests
CASES = [
    (1, 1, 2, 8, 0, 1, False, False),
    (1, 1, 2, 8, 3, 1, False, False),
    (3, 7, 2, 8, 1, 1, False, True),
    (1, 7, 2, 5, 17, 1, False, False),        # w >= N
    (1, 7, 2, 8, 2, (1, 3), False, True),     # per-head dilation, w*d >= N
    (1, 333, 3, 16, 17, 1, False, True),
    (3, 333, 2, 33, 17, (3, 1), True, True),  # odd D, one-sided, dilation
    (1, 333, 2, 16, 1, 3, True, False),
    (1, 1024, 2, 64, 256, 1, False, True),
    (1, 1024, 4, 64, 256, (1, 2, 1, 3), False, False),
    (1, 1024, 2, 64, 256, 1, True, True),
    (1, 1024, 2, 32, 0, 1, False, False),
]


def _id(case) -> str:
    b, n, h, d, w, dil, ar, masked = case
    return f"B{b}-N{n}-H{h}-D{d}-w{w}-d{dil}{'-ar' if ar else ''}{'-mask' if masked else ''}".replace(" ", "")


def _inputs(case, dtype=torch.float32, seed=0):
    b, n, h, d, w, dil, ar, masked = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=dtype) for _ in range(3))
    mask = None
    if masked:
        mask = torch.rand(b, n, generator=g) < 0.3
        mask[0, : min(n, 2 * w + 2)] = True  # fully masked rows at the start of sample 0
    return q, k, v, mask


def _paths():
    return {"served": lambda *a: _fused.attention(*a),
            "composite": lambda q, k, v, band, scale, mask: _fused.composite(q, k, v, mask, band, scale)}


@pytest.mark.parametrize("path", ["served", "composite"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_dense_float64(case, path):
    q, k, v, mask = _inputs(case)
    band = normalize_band("test", case[4], case[5], case[6], case[2])
    scale = 1 / math.sqrt(case[3])
    out, lse = _paths()[path](q, k, v, band, scale, mask)
    want, want_lse = dense_attention(q, k, v, band, scale, mask)
    plain, plain_lse = dense_attention(q, k, v, band, scale, mask, dtype=torch.float32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close_to_oracle(out, want, plain, what="out")
    assert_close_to_oracle(lse, want_lse, plain_lse, what="lse")


@pytest.mark.parametrize("path", ["served", "composite"])
@pytest.mark.parametrize("case", CASES[2:9], ids=_id)
def test_backward_matches_dense_float64(case, path):
    q, k, v, mask = _inputs(case)
    band = normalize_band("test", case[4], case[5], case[6], case[2])
    scale = 0.3
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g)
    dlse = torch.randn(q.shape[:3], generator=g)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, s = fn(*leaves)
        finite = torch.isfinite(s.detach())
        torch.autograd.backward((o, s.masked_fill(~finite, 0.0)), (dout.to(dtype), dlse.to(dtype)))
        return [t.grad for t in leaves]

    got = grads(lambda *t: _paths()[path](*t, band, scale, mask), torch.float32)
    want = grads(lambda *t: dense_attention(*t, band, scale, mask), torch.float64)
    plain = grads(lambda *t: dense_attention(*t, band, scale, mask, dtype=torch.float32), torch.float32)
    for name, a, b, c in zip("qkv", got, want, plain):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        assert_close_to_oracle(a, b, c, what=f"d{name}")


@pytest.mark.parametrize("case", [CASES[2], CASES[4], (1, 9, 2, 3, 2, (2, 1), True, True)], ids=_id)
def test_gradcheck_float64_through_out_and_lse(case):
    q, k, v, mask = _inputs(case, dtype=torch.float64)
    if mask is not None:
        mask[:, :1] = False  # keep every row with a key (no -inf LSE) for finite differences
    band = normalize_band("test", case[4], case[5], case[6], case[2])
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def fn(q, k, v):
        out, lse = lt.sliding_window_attention(q, k, v, case[4], case[5], case[6], key_mask=mask,
                                               return_lse=True)
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)
    del band


def test_rows_without_keys_give_zero_and_no_nan_gradient():
    q, k, v = (torch.randn(1, 6, 1, 4, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, :4] = True  # rows 0 and 1 (window 1) see only masked keys
    out, lse = lt.sliding_window_attention(q, k, v, 1, key_mask=mask, return_lse=True)
    assert torch.equal(out[0, :2], torch.zeros(2, 1, 4))
    assert torch.isneginf(lse[0, :2]).all() and torch.isfinite(lse[0, 3:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, :2], torch.zeros(2, 1, 4))


def test_inf_in_an_excluded_value_row_stays_out():
    q, k, v = (torch.randn(1, 64, 2, 8) for _ in range(3))
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 40] = True
    v[0, 40] = float("inf")  # masked: no row may see it
    out = lt.sliding_window_attention(q, k, v, 4, key_mask=mask)
    assert torch.isfinite(out).all()
    want, _ = dense_attention(q, k, v, normalize_band("t", 4, 1, False, 2), 1 / math.sqrt(8), mask)
    assert torch.allclose(out.double(), want, atol=1e-5)


def test_opcheck():
    q, k, v, mask = _inputs((2, 37, 2, 8, 5, (1, 2), False, True))
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.longformer_tvm.band_attention.default,
                          (q, k, v, mask, 5, 5, [1, 2], 0.25))


def test_compiles_fullgraph_with_autograd():
    q, k, v, mask = _inputs((1, 64, 2, 16, 8, 1, False, True))
    fn = torch.compile(lambda q, k, v: lt.sliding_window_attention(q, k, v, 8, key_mask=mask),
                       fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.sum().backward()
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    want = lt.sliding_window_attention(*eager, 8, key_mask=mask)
    want.sum().backward()
    assert torch.allclose(out, want, atol=1e-6)
    for a, b in zip(leaves, eager):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"key_mask": torch.zeros(1, 8)}, TypeError, r"key_mask must be a bool tensor"),
    ({"key_mask": torch.zeros(1, 9, dtype=torch.bool)}, ValueError, r"key_mask must have shape"),
    ({"scale": float("nan")}, ValueError, r"scale must be finite"),
    ({"scale": "x"}, TypeError, r"scale must be a number"),
    ({"return_lse": 1}, TypeError, r"return_lse must be a bool"),
    ({"window": -1}, ValueError, r"window"),
])
def test_bad_arguments_name_the_rule(kwargs, err, match):
    q = torch.randn(1, 8, 2, 4)
    args = {"window": 2, **kwargs}
    with pytest.raises(err, match=match):
        lt.sliding_window_attention(q, q, q, **args)


def test_v_of_another_head_size_is_refused():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"k and v must have the same last dimension"):
        lt.sliding_window_attention(q, q, torch.randn(1, 8, 2, 5), 2)


def test_forward_mode_ad_gives_the_tangent():
    q, k, v, mask = _inputs((1, 40, 2, 8, 3, (1, 2), False, True), dtype=torch.float64)
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))

    def fn(q, k, v):
        return lt.sliding_window_attention(q, k, v, 3, (1, 2), key_mask=mask)

    _, got = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))
    band = normalize_band("t", 3, (1, 2), False, 2)
    _, want = torch.func.jvp(lambda q, k, v: dense_attention(q, k, v, band, 1 / math.sqrt(8), mask)[0],
                             (q, k, v), (tq, tk, tv))
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("where", ["k", "v"])
def test_inf_in_a_valid_key_row_reaches_only_the_rows_that_see_it(where):
    """Only rows whose band holds the key may turn non-finite (all of them for v: p > 0 times
    inf); every other row equals the result without the inf."""
    q, k, v, _ = _inputs((1, 200, 2, 16, 5, (1, 3), False, False))
    band = normalize_band("t", 5, (1, 3), False, 2)
    clean, _ = dense_attention(q, k, v, band, 0.25)
    {"k": k, "v": v}[where][0, 100, 1, 0] = float("inf")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = lt.sliding_window_attention(*leaves, 5, (1, 3))
    sees = torch.zeros(1, 200, 2, dtype=torch.bool)
    sees[0, :, 1] = reference.band_mask(200, band)[1, :, 100]
    bad = ~torch.isfinite(out).all(dim=-1)
    assert not (bad & ~sees).any(), "a row that does not see the key turned non-finite"
    if where == "v":
        assert torch.equal(bad, sees)
    else:  # a score of +inf (q[..., 0] > 0) makes the row NaN, -inf drops the key
        plus = sees & (q[..., 0] > 0)
        assert torch.equal(bad, plus)
    assert torch.allclose(out.double()[~sees], clean[~sees], atol=1e-5)
    out.masked_fill(~torch.isfinite(out), 0.0).sum().backward()  # gradients computed, no crash
