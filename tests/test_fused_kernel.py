"""The compiled fused attention (``band_attention``, ``band_attention_backward``) against a dense
float64 oracle: the band materialised as an (N, N) mask, softmax, matmul, and torch.autograd.

The kernels are called directly (as the custom op will): one call per run of heads with equal
dilation, on strided head slices of strided inputs. A missing library is an error, not a skip.
"""

from __future__ import annotations

import pytest
import torch

from longformer_tvm import backends
from longformer_tvm._checks import normalize_band

from .oracle import assert_close_to_oracle

# (batch, seq_len, heads, head_dim, window, dilation, autoregressive)
CASES = [
    (1, 1, 1, 64, 0, 1, False),
    (3, 1, 2, 33, 1, 1, True),
    (1, 7, 2, 33, 1, 1, False),
    (3, 7, 3, 64, 17, 1, False),             # w >= N
    (1, 7, 4, 33, 1, [1, 2, 3, 4], False),    # w * d >= N on some heads
    (1, 333, 3, 64, 17, [1, 2, 3], False),
    (3, 333, 2, 33, 17, 2, True),
    (1, 333, 2, 64, 0, 3, False),
    (1, 1024, 2, 64, 256, 1, False),
    (3, 1024, 2, 33, 17, [3, 1], True),       # several work units: both backward phases
    (1, 1024, 4, 64, 256, [1, 2, 3, 5], True),
    (1, 1024, 1, 64, 1, 1, False),
    (1, 3000, 1, 16, 1, 1, False),            # six backward work units
    (2, 3000, 1, 16, 300, 1, True),           # units longer than their default (left + right)
    # a wide band over several backward units, the last short, even ones running at once (units
    # of 512 rows raced here: a unit wrote zeros over the keys of the unit after next)
    (1, 4200, 1, 16, 256, 1, False),
]
DTYPES = [torch.float32, torch.float64]


def _id(case):
    b, n, h, d, w, dil, ar = case
    return f"B{b}-N{n}-H{h}-D{d}-w{w}-d{dil}{'-ar' if ar else ''}".replace(" ", "")


def fused(q, k, v, band, mask, dout=None, dlse=None):
    """out, lse (and dq, dk, dv when ``dout`` is given, of out and ``dlse`` . lse) from the
    compiled kernels."""
    bsz, n, heads, _ = q.shape
    key_mask = (torch.zeros(1, 1, dtype=torch.uint8).expand(bsz, n) if mask is None
                else mask.to(torch.uint8))
    scale = q.shape[-1] ** -0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full((bsz, n, heads), float("nan"), dtype=q.dtype)
    grads = [torch.full_like(q, float("nan")) for _ in range(3)]  # every entry must be written
    forward, backward = backends.kernel_for("attention", q), backends.kernel_for("attention_backward", q)
    for h0, h1, d in band.head_runs():
        s = slice(h0, h1)
        forward(q[:, :, s], k[:, :, s], v[:, :, s], key_mask, out[:, :, s], lse[:, :, s],
                band.left, band.right, min(d, n), scale)
    if dout is not None:
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        for h0, h1, d in band.head_runs():
            s = slice(h0, h1)
            backward(q[:, :, s], k[:, :, s], v[:, :, s], key_mask, dout[:, :, s], out[:, :, s],
                     lse[:, :, s], dlse[:, :, s], *(g[:, :, s] for g in grads), band.left,
                     band.right, min(d, n), scale)
    return (out, lse) if dout is None else (out, lse, *grads)


def dense(q, k, v, band, mask):
    """out, lse by the (N, N) band mask; gradients well defined on rows with no valid key."""
    bsz, n, heads, dim = q.shape
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    dil = torch.tensor(band.dilation).view(-1, 1, 1)
    off = j - i
    ok = (off % dil == 0) & (off >= -band.left * dil) & (off <= band.right * dil)  # (H, N, N)
    ok = ok.unsqueeze(0) & (torch.ones(bsz, n, dtype=torch.bool) if mask is None
                            else ~mask).view(bsz, 1, 1, n)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * dim ** -0.5
    m = torch.where(ok, s, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0).detach()
    e = torch.where(ok, torch.exp(torch.where(ok, s, 0) - m), 0)
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(total > 0, total, 1)
    lse = torch.where(total > 0, m + torch.log(torch.where(total > 0, total, 1)), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", p, v), lse.squeeze(-1).transpose(1, 2)


def _strided(shape, g):
    """A non-contiguous head slice with a unit last stride."""
    b, n, h, d = shape
    return torch.randn(b, n, h + 2, d + 3, generator=g, dtype=torch.float64)[:, :, 1:h + 1, :d]


def _data(case, seed=0):
    b, n, h, d, w, dil, ar = case
    g = torch.Generator().manual_seed(seed)
    band = normalize_band("test", w, dil, ar, h)
    q, k, v, dout = (_strided((b, n, h, d), g) for _ in range(4))
    mask = torch.rand(b, n, generator=g) < 0.2
    mask[0, : n // 2] = True  # rows whose whole band is masked, where the band is short
    return band, q, k, v, dout, mask


def _check(case, dtype, mask_on: bool):
    band, q, k, v, dout, mask = _data(case)
    mask = mask if mask_on else None
    # a gradient for the LSE too; on rows with no valid key (lse -inf) the kernel must ignore
    # it, so it is NaN there (and 0 for the oracle, whose lse is constant there)
    dlse = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(1), dtype=q.dtype)
    args = [x.clone().requires_grad_() for x in (q, k, v)]
    want, want_lse = dense(*args, band, mask)
    keyless = torch.isneginf(want_lse).detach()
    torch.autograd.backward([want, want_lse.masked_fill(keyless, 0.0)],
                            [dout, dlse.masked_fill(keyless, 0.0)])
    plain_args = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    plain, plain_lse = dense(*plain_args, band, mask)
    torch.autograd.backward([plain, plain_lse.masked_fill(keyless, 0.0)],
                            [dout.to(dtype), dlse.masked_fill(keyless, 0.0).to(dtype)])
    low = [x.to(dtype) for x in (q, k, v, dout)]
    got = fused(*_restride(low[:3]), band, mask, dout=_restride(low[3:])[0],
                dlse=dlse.masked_fill(keyless, float("nan")).to(dtype))
    names = ("out", "lse", "dq", "dk", "dv")
    wants = (want, want_lse, *(a.grad for a in args))
    plains = (plain, plain_lse, *(a.grad for a in plain_args))
    # dS = P (dP - delta) cancels where a row's probability sits on one key; plain torch cancels
    # exactly there (its delta is the same sum), the kernel's dP is a GEMM: its error is a few
    # roundings of the largest gradient entry, where the oracle's own may be 0
    floor = 8 * torch.finfo(dtype).eps * max(a.grad.abs().max().item() for a in args)
    for name, g, w, p in zip(names, got, wants, plains):
        assert g.dtype == dtype
        finite = torch.isfinite(w)
        if name in ("dq", "dk", "dv") and torch.equal(torch.isfinite(g), finite) and (
                not finite.any() or (g - w)[finite].abs().max().item() <= floor):
            continue
        assert_close_to_oracle(g, w.detach(), p.detach(), what=f"{name} {_id(case)}")
    return want_lse


def _restride(tensors):
    """Copies laid out as strided head slices (unit last stride, like the inputs of the oracle)."""
    out = []
    for t in tensors:
        b, n, h, d = t.shape
        big = torch.zeros(b, n, h + 2, d + 3, dtype=t.dtype)
        big[:, :, 1:h + 1, :d] = t
        out.append(big[:, :, 1:h + 1, :d])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused_attention_matches_dense(case, dtype):
    lse = _check(case, dtype, mask_on=True)
    b, n, _, _, w, dil, _ = case
    if n > 2 * w * max(dil if isinstance(dil, list) else [dil]) + 2:
        assert torch.isinf(lse).any(), "the table should hold rows whose whole band is masked"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[2::3], ids=_id)
def test_fused_attention_without_mask(case, dtype):
    _check(case, dtype, mask_on=False)


def test_nonfinite_values_of_masked_keys_stay_out():
    """inf and NaN in the k and v rows of masked keys reach no row, in either direction."""
    case = (2, 333, 3, 33, 17, [1, 2, 3], False)
    band, q, k, v, dout, mask = _data(case)
    q, k, v, dout = (x.float() for x in (q, k, v, dout))
    clean = fused(q, k, v, band, mask, dout=dout)
    k2, v2 = k.clone(), v.clone()
    k2[mask] = float("inf")
    v2[mask] = float("nan")
    v2[0, :3] = float("inf")  # masked (the first half of batch 0 is)
    dirty = fused(q, k2, v2, band, mask, dout=dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        assert torch.equal(a[torch.isfinite(a)], b[torch.isfinite(b)]), name


def test_a_planted_fault_is_caught():
    """The check above is not vacuous: one wrong output entry fails it."""
    case = (1, 7, 2, 33, 1, 1, False)
    band, q, k, v, dout, mask = _data(case)
    want, _ = dense(q, k, v, band, mask)
    got, _ = fused(*(x.float() for x in (q, k, v)), band, mask)
    got[0, 6, 1, 5] += 1e-3
    with pytest.raises(AssertionError):
        assert_close_to_oracle(got, want, dense(q.float(), k.float(), v.float(), band, mask)[0])
