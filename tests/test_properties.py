"""Property-based tests (hypothesis): random shapes, windows, dilations (int and per head),
autoregressive bands, dtypes and layouts against :mod:`longformer_tvm.reference`, and the adjoint
identities the backward passes rely on.

One fixed, derandomized profile, sized to run in well under a minute on two cores (the compiled
kernels are fast; the reference loops over diagonals). For a longer search::

    LONGFORMER_TVM_PROPERTY_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_properties.py
"""

from __future__ import annotations

import dataclasses
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longformer_tvm as lt
from longformer_tvm import reference
from longformer_tvm._checks import Band, normalize_band

from .oracle import assert_close_to_oracle, dense_attention


def _profile(examples: int) -> settings:
    return settings(max_examples=int(os.environ.get("LONGFORMER_TVM_PROPERTY_EXAMPLES", examples)),
                    derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


LAYOUTS = ("contiguous", "(B,H,N,X) storage", "head slice", "batch broadcast", "scalar broadcast",
           "storage offset")


@dataclasses.dataclass
class Problem:
    b: int
    n: int
    h: int
    d: int
    window: int
    dilation: int | list[int]
    autoregressive: bool
    dtype: torch.dtype
    layout: str
    scale: float
    seed: int

    @property
    def band(self) -> Band:
        return normalize_band("test", self.window, self.dilation, self.autoregressive, self.h)

    def tensor(self, last: int, salt: int) -> torch.Tensor:
        """(B, N, H, last) in this problem's layout, values ~ scale * N(0, 1)."""
        g = torch.Generator().manual_seed(self.seed * 7 + salt)
        b, n, h = self.b, self.n, self.h

        def r(*shape):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * self.scale).to(self.dtype)

        if self.layout == "(B,H,N,X) storage":
            return r(b, h, n, last).transpose(1, 2)
        if self.layout == "head slice":
            return r(b, n, h + 2, last)[:, :, 1:-1]
        if self.layout == "batch broadcast":
            return r(1, n, h, last).expand(b, n, h, last)
        if self.layout == "scalar broadcast":  # every stride 0
            return r(()).expand(b, n, h, last)
        if self.layout == "storage offset":
            return r(1 + b * n * h * last)[1:].view(b, n, h, last)
        return r(b, n, h, last)


@st.composite
def problems(draw, max_n: int = 40) -> Problem:
    h = draw(st.integers(1, 3))
    dilation = draw(st.one_of(st.integers(1, 6), st.lists(st.integers(1, 50), min_size=h, max_size=h)))
    return Problem(b=draw(st.integers(1, 2)), n=draw(st.integers(0, max_n)), h=h,
                   d=draw(st.integers(0, 9)), window=draw(st.integers(0, 12)), dilation=dilation,
                   autoregressive=draw(st.booleans()),
                   dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                   layout=draw(st.sampled_from(LAYOUTS)), scale=10.0 ** draw(st.integers(-3, 3)),
                   seed=draw(st.integers(0, 2**16)))


def assert_within_rounding(got: torch.Tensor, want64: torch.Tensor, abs64: torch.Tensor, terms: int,
                           what: str) -> None:
    """``got`` is off the float64 reference by at most the rounding of a ``terms``-long sum of
    products at got's dtype: ``2 (terms + 1) eps sum|a_i b_i|`` (non-finite entries exactly)."""
    got64 = got.double()
    finite = want64.isfinite()
    assert got.shape == want64.shape, what
    assert torch.equal(got64[~finite], want64[~finite]), f"{what}: non-finite entries differ"
    eps = torch.finfo(got.dtype).eps
    bound = 2 * (terms + 1) * eps * abs64[finite] + torch.finfo(got.dtype).tiny
    err = (got64[finite] - want64[finite]).abs()
    assert (err <= bound).all(), (
        f"{what}: error {err.max().item():.3e} beyond rounding at "
        f"{(err > bound).nonzero().flatten().tolist()[:5]}")


@_profile(1000)
@given(problems(), st.sampled_from([0.0, float("-inf"), -7.25]))
def test_qk_matches_reference(p, pad):
    q, k = p.tensor(p.d, 0), p.tensor(p.d, 1)
    got = lt.sliding_window_qk(q, k, p.window, p.dilation, p.autoregressive, padding_value=pad)
    want = reference.band_qk(q.double(), k.double(), p.band, pad)
    absolute = reference.band_qk(q.double().abs(), k.double().abs(), p.band, 0.0)
    assert_within_rounding(got, want, absolute, p.d, f"qk {p}")


@_profile(1000)
@given(problems())
def test_pv_matches_reference(p):
    probs, v = p.tensor(p.band.columns, 2), p.tensor(p.d, 3)
    got = lt.sliding_window_pv(probs, v, p.window, p.dilation, p.autoregressive)
    want = reference.band_pv(probs.double(), v.double(), p.band)
    absolute = reference.band_pv(probs.double().abs(), v.double().abs(), p.band)
    assert_within_rounding(got, want, absolute, p.band.columns, f"pv {p}")


@_profile(1000)
@given(problems())
def test_pv_transposed_matches_reference(p):
    g, x = p.tensor(p.band.columns, 4), p.tensor(p.d, 5)
    got = lt.sliding_window_pv_transposed(g, x, p.window, p.dilation, p.autoregressive)
    want = reference.band_pv_transposed(g.double(), x.double(), p.band)
    absolute = reference.band_pv_transposed(g.double().abs(), x.double().abs(), p.band)
    assert_within_rounding(got, want, absolute, p.band.columns, f"tpv {p}")


@_profile(400)
@given(problems(max_n=64))
def test_the_products_are_adjoint(p):
    """<qk(q, k), g> = <q, pv(g, k)> = <k, tpv(g, q)>: what the backward passes rely on."""
    p = dataclasses.replace(p, dtype=torch.float64)
    q, k, g = p.tensor(p.d, 6), p.tensor(p.d, 7), p.tensor(p.band.columns, 8)
    args = (p.window, p.dilation, p.autoregressive)
    s = lt.sliding_window_qk(q, k, *args)
    lhs = (s * g).sum()
    via_pv = (q * lt.sliding_window_pv(g, k, *args)).sum()
    via_tpv = (k * lt.sliding_window_pv_transposed(g, q, *args)).sum()
    scale = (s.abs() * g.abs()).sum() + 1e-300
    assert abs(lhs - via_pv) <= 1e-12 * scale and abs(lhs - via_tpv) <= 1e-12 * scale, p


@_profile(300)
@given(problems())
def test_per_head_dilation_is_one_call_per_head(p):
    """A per-head dilation list gives each head the band of its own int dilation."""
    q, k = p.tensor(p.d, 9), p.tensor(p.d, 10)
    dil = p.dilation if isinstance(p.dilation, list) else [p.dilation] * p.h
    together = lt.sliding_window_qk(q, k, p.window, dil, p.autoregressive, padding_value=-1.0)
    for head, d in enumerate(dil):
        alone = lt.sliding_window_qk(q[:, :, head:head + 1], k[:, :, head:head + 1], p.window, d,
                                     p.autoregressive, padding_value=-1.0)
        assert torch.equal(together[:, :, head:head + 1], alone), (p, head)


@_profile(300)
@given(problems(), st.booleans(), st.integers(0, 2**16))
def test_attention_matches_the_dense_softmax(p, masked, seed):
    """sliding_window_attention (the fused kernel's per-window variants where they serve) against
    a dense float64 softmax under the band mask: any N, window, dilation, one-sided band, layout,
    scale and key mask (rows with no key left give 0 and lse -inf)."""
    d = max(p.d, 1)
    q, k, v = p.tensor(d, 11), p.tensor(d, 12), p.tensor(d, 13)
    mask = (torch.rand(p.b, p.n, generator=torch.Generator().manual_seed(seed)) < 0.3
            if masked else None)
    out, lse = lt.sliding_window_attention(q, k, v, p.window, p.dilation, p.autoregressive,
                                           key_mask=mask, return_lse=True)
    want, want_lse = dense_attention(q, k, v, p.band, d ** -0.5, mask)
    plain, plain_lse = dense_attention(q, k, v, p.band, d ** -0.5, mask, dtype=p.dtype)
    assert_close_to_oracle(out, want, plain, what=f"out {p}")
    assert_close_to_oracle(lse, want_lse, plain_lse, what=f"lse {p}")
