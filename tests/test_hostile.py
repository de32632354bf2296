"""Odd and hostile input against :mod:`longformer_tvm.reference` in float64.

The CPU kernels read packed, zero-padded copies of their operands and reduce over dense slabs of
keys, so a value outside a row's band still meets that row's arithmetic (``0 * inf`` is NaN).
These tests put inf and NaN where the kernels might look, and feed empty, broadcast, offset,
aliased and (opt-in) huge tensors.

Shapes whose element count passes 2**31 need about 11 GB and a minute or two, so they are opt-in::

    LONGFORMER_TVM_BIG_TESTS=1 .venv/bin/python -m pytest tests/test_hostile.py -m slow -v
"""

from __future__ import annotations

import os

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import reference
from longformer_tvm._checks import normalize_band

from .oracle import dense_pv, dense_qk, dense_tpv

NAN, INF = float("nan"), float("inf")

OPS = {  # product: (functional call, reference, banded first operand)
    "qk": (lambda a, b, w, d, ar, pad: lt.sliding_window_qk(a, b, w, d, ar, padding_value=pad),
           lambda a, b, band, pad: reference.band_qk(a, b, band, pad), False),
    "pv": (lambda a, b, w, d, ar, pad: lt.sliding_window_pv(a, b, w, d, ar),
           lambda a, b, band, pad: reference.band_pv(a, b, band), True),
    "tpv": (lambda a, b, w, d, ar, pad: lt.sliding_window_pv_transposed(a, b, w, d, ar),
            lambda a, b, band, pad: reference.band_pv_transposed(a, b, band), True),
}


def assert_matches(got: torch.Tensor, want64: torch.Tensor, what: str = "") -> None:
    """Same NaN and same signed-inf positions as the float64 reference; finite entries close."""
    got64 = got.double()
    assert got.shape == want64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    nan_got, nan_want = got64.isnan(), want64.isnan()
    assert torch.equal(nan_got, nan_want), (
        f"{what}: NaN at {nan_got.nonzero().tolist()[:8]}, reference at {nan_want.nonzero().tolist()[:8]}")
    for sign in (INF, -INF):
        assert torch.equal(got64 == sign, want64 == sign), f"{what}: {sign} entries differ"
    finite = want64.isfinite()
    tol = 1e-4 if got.dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got64[finite], want64[finite], rtol=tol, atol=tol, msg=what)


def _operands(product, b, n, h, d, band, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = band.columns if OPS[product][2] else d
    return (torch.randn(b, n, h, first, generator=g, dtype=dtype),
            torch.randn(b, n, h, d, generator=g, dtype=dtype))


def _call(product, a, b, w, dil, ar, pad=0.0):
    fn, ref, _ = OPS[product]
    band = normalize_band("test", w, dil, ar, a.shape[2])
    return fn(a, b, w, dil, ar, pad), ref(a.double(), b.double(), band, pad)


# ---- inf and NaN --------------------------------------------------------------------------------
# (N, H, D, w, dilation, autoregressive): one tile and many; dilation splits rows into residues
NONFINITE_SHAPES = [(37, 3, 5, 3, [1, 2, 5], False), (64, 2, 8, 6, 1, True), (9, 1, 3, 12, 1, False)]


def _poison_rows(t: torch.Tensor, where: str, value: float) -> None:
    n = t.shape[1]
    rows = {"first": [0], "middle": [n // 2], "last": [n - 1], "scattered": [1, n // 3, n - 2]}[where]
    t[1, rows, :, t.shape[3] // 2] = value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", NONFINITE_SHAPES, ids=lambda s: "N{}-H{}-D{}-w{}-d{}{}".format(
    *s[:5], "-ar" if s[5] else "").replace(" ", ""))
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["first", "middle", "last", "scattered"])
@pytest.mark.parametrize("operand", ["a", "b"])
@pytest.mark.parametrize("product", list(OPS))
def test_nonfinite_rows_propagate_as_in_reference(product, operand, where, value, shape, dtype):
    n, h, d, w, dil, ar = shape
    band = normalize_band("test", w, dil, ar, h)
    a, b = _operands(product, 2, n, h, d, band, dtype)
    _poison_rows(a if operand == "a" else b, where, value)
    got, want = _call(product, a, b, w, dil, ar, pad=-INF if product == "qk" else 0.0)
    assert_matches(got, want, f"{product} {operand}[{where}]={value}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("product", ["pv", "tpv"])
def test_nonfinite_in_invalid_diagonals_is_ignored(product, value, dtype):
    """Banded entries whose key falls outside the sequence are not part of the product."""
    n, h, d, w, dil = 29, 3, 4, 5, [1, 3, 7]
    band = normalize_band("test", w, dil, False, h)
    a, b = _operands(product, 2, n, h, d, band, dtype)
    _, valid = reference.key_index(n, band)  # (H, N, C)
    a[:, ~valid.permute(1, 0, 2)] = value
    got, want = _call(product, a, b, w, dil, False)
    assert torch.isfinite(want).all()
    assert_matches(got, want, f"{product} invalid diagonals = {value}")


@pytest.mark.parametrize("pad", [NAN, INF, -INF, 1e300], ids=["nan", "inf", "-inf", "1e300"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_padding_value_is_written_as_given(pad, dtype):
    a, b = _operands("qk", 2, 17, 2, 4, normalize_band("test", 4, 1, False, 2), dtype)
    got, want = _call("qk", a, b, 4, [1, 3], False, pad)
    assert_matches(got, want.to(dtype).double(), f"padding_value={pad}")


SOFTMAX_CASES = [  # (N, w, dilation, autoregressive)
    (1, 4, 1, False), (7, 30, 1, False), (50, 5, [1, 9], False), (50, 5, [1, 60], True),
    (333, 17, [2, 3], True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,w,dil,ar", SOFTMAX_CASES)
def test_minus_inf_padding_then_softmax_has_no_nan(n, w, dil, ar, dtype):
    """Every row has its own key (diagonal ``w``), so -inf padding never empties a softmax row."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 2, 8, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    s = lt.sliding_window_qk(q, k, w, dil, ar, padding_value=-INF)
    probs = torch.softmax(s, dim=-1)
    assert not probs.isnan().any()
    out = lt.sliding_window_pv(probs, v, w, dil, ar)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---- empty and degenerate shapes ---------------------------------------------------------------
EMPTY_SHAPES = [(0, 9, 2, 4), (2, 0, 2, 4), (2, 9, 0, 4), (2, 9, 2, 0), (0, 0, 0, 0), (1, 1, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "B{}-N{}-H{}-D{}".format(*s))
@pytest.mark.parametrize("product", list(OPS))
def test_empty_shapes_forward_and_backward(product, shape, dtype):
    b, n, h, d = shape
    w, ar = 2, product == "pv"
    dil = [1] * h  # per-head dilation with H = 0 is an empty list
    band = normalize_band("test", w, dil, ar, h)
    a, bb = _operands(product, b, n, h, d, band, dtype)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    got, want = _call(product, a, bb, w, dil, ar, pad=-1.5)
    assert_matches(got.detach(), want, f"{product} {shape}")
    got.sum().backward()
    assert a.grad.shape == a.shape and bb.grad.shape == bb.shape
    assert torch.isfinite(a.grad).all() and torch.isfinite(bb.grad).all()


# ---- layouts: broadcast, offsets, aliasing -------------------------------------------------------
def _layouts(dtype):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    b, n, h, d, c = 2, 30, 3, 7, 7  # d == c, so one tensor can be both operands
    shared = r(b, n, h, d + 2)
    return {  # name: (a, b) for every product (a is (B,N,H,C) or (B,N,H,D), both 7 wide)
        "batch-and-head-broadcast b": (r(b, n, h, c), r(1, n, 1, d).expand(b, n, h, d)),
        "sequence-broadcast a": (r(b, 1, h, c).expand(b, n, h, c), r(b, n, h, d)),
        "row-vector a (strides 0,0,0,1)": (r(c).expand(b, n, h, c), r(b, n, h, d)),
        "scalar b (all strides 0)": (r(b, n, h, c), r(()).expand(b, n, h, d)),
        "misaligned storage offset": (r(1 + b * n * h * c)[1:].view(b, n, h, c),
                                      r(3 + b * n * h * d)[3:].view(b, n, h, d)),
        "head slice and sequence slice": (r(b, n, h + 2, c)[:, :, 1:-1], r(b, n + 5, h, d)[:, 5:]),
        "(B,H,N,D) storage": (r(b, h, n, c).transpose(1, 2), r(h, b, n, d).permute(1, 2, 0, 3)),
        "a is b": (lambda t: (t, t))(r(b, n, h, d)),
        "overlapping views of one buffer": (shared[..., :d], shared[..., 2:]),
        "rows overlapping in memory (stride 1 along N)": (
            r(b * h * c + n).as_strided((b, n, h, c), (h * c, 1, c, 1)),
            r(b * h * d + n).as_strided((b, n, h, d), (h * d, 1, d, 1))),
        "last stride 2 (copied)": (r(b, n, h, 2 * c)[..., ::2], r(b, n, h, d)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", list(_layouts(torch.float32)))
@pytest.mark.parametrize("product", list(OPS))
def test_views_and_aliases_match_reference(product, layout, dtype):
    a, b = _layouts(dtype)[layout]
    before = (a.clone(), b.clone())
    got, want = _call(product, a, b, 3, [1, 2, 4], False, pad=-2.0)
    assert_matches(got, want, f"{product} {layout}")
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]), "an input was written"
    assert got.is_contiguous()


def test_expanded_inputs_get_summed_gradients():
    k0 = torch.randn(1, 20, 1, 4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 20, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k0: lt.sliding_window_qk(q, k0.expand(2, 20, 3, 4), 2, [1, 2, 3]), (q, k0))


# ---- arguments beyond int64 / unusual tensors ----------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,text", [
    ({"window": 2**62}, ValueError, "window"),
    ({"window": 1, "dilation": 2**63}, ValueError, "dilation"),
    ({"window": 1, "dilation": [1, 2**64]}, ValueError, "dilation"),
], ids=["window-2**62", "dilation-2**63", "per-head-dilation-2**64"])
def test_out_of_range_band_is_a_clear_error(kwargs, exc, text):
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(exc, match=text):
        lt.sliding_window_qk(q, q, **kwargs)


def test_dilation_beyond_the_sequence_is_the_same_band():
    q, k = torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4)
    torch.testing.assert_close(lt.sliding_window_qk(q, k, 2, 2**62), lt.sliding_window_qk(q, k, 2, 9))


def test_sparse_input_is_a_type_error():
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(TypeError, match="strided"):
        lt.sliding_window_qk(q.to_sparse(), q, 1)


# ---- element counts past 2**31 (opt-in) ---------------------------------------------------------
BIG = pytest.mark.skipif(not os.environ.get("LONGFORMER_TVM_BIG_TESTS"),
                         reason="needs ~9 GB and about a minute: set LONGFORMER_TVM_BIG_TESTS=1")


ORACLES = {"qk": lambda a, b, band: dense_qk(a, b, band, -INF), "pv": dense_pv, "tpv": dense_tpv}


def _check_rows(got, a, b, product, w, blocks):
    """Compare blocks of rows of a huge result with the dense float64 oracle computed on a slice
    around each block: the slice holds every key of the block's rows, so its ends never reach them
    (where they are the sequence's ends, they are the same ends)."""
    n = a.shape[1]
    band = normalize_band("test", w, 1, False, a.shape[2])
    for r0, r1 in blocks:
        lo, hi = max(0, r0 - w), min(n, r1 + w)
        want = ORACLES[product](a[:, lo:hi], b[:, lo:hi], band)
        assert_matches(got[:, r0:r1], want[:, r0 - lo:r1 - lo], f"{product} rows {r0}:{r1}")


def _sample_blocks(n, flat_row_limit):
    """The first, middle and last rows, the rows around the one whose flat index passes 2**31,
    and some random single rows."""
    g = torch.Generator().manual_seed(0)
    blocks = [(0, 64), (n // 2, n // 2 + 64), (flat_row_limit - 32, flat_row_limit + 32), (n - 64, n)]
    blocks += [(r, r + 1) for r in torch.randint(0, n, (8,), generator=g).tolist()]
    return blocks


@pytest.mark.slow
@BIG
def test_big_banded_tensor_past_2_pow_31_elements():
    """qk writes, and pv/tpv read, a (1, 2**20, 1, 2049) band: 2**31 + 2**20 floats (8.6 GB)."""
    n, w, d = 2**20, 1024, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 1, d, generator=g) for _ in range(3))
    s = lt.sliding_window_qk(q, k, w, padding_value=-INF)
    assert s.numel() > 2**31
    rows = _sample_blocks(n, 2**31 // (2 * w + 1))
    _check_rows(s, q, k, "qk", w, rows)
    torch.nan_to_num_(s, neginf=0.0).mul_(1e-2)
    o = lt.sliding_window_pv(s, v, w)
    _check_rows(o, s, v, "pv", w, rows)
    t = lt.sliding_window_pv_transposed(s, q, w)
    _check_rows(t, s, q, "tpv", w, rows)


@pytest.mark.slow
@BIG
def test_big_dense_tensor_past_2_pow_31_elements():
    """pv/tpv write, and qk reads, (1, N, 4, 256) tensors of 2**31 + 2**13 floats; q is k."""
    n, h, w, d = 2**21 + 8, 4, 2, 256
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, n, h, d, generator=g)
    assert x.numel() > 2**31
    rows = _sample_blocks(n, 2**31 // (h * d))
    s = lt.sliding_window_qk(x, x, w, padding_value=-INF)
    _check_rows(s, x, x, "qk", w, rows)
    del s, x
    p = torch.randn(1, n, h, 2 * w + 1, generator=g)
    small = torch.randn(1, 1, 1, d, generator=g).expand(1, n, h, d)
    for product in ("pv", "tpv"):  # a broadcast (stride 0) operand: only the output is huge
        out = OPS[product][0](p, small, w, 1, False, 0.0)
        assert out.numel() > 2**31
        _check_rows(out, p, small, product, w, rows)
        del out
