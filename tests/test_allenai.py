"""``longformer_tvm.diagonaled_mm_tvm`` against allenai/longformer's semantics.

The references below transcribe allenai's definitions in float64, independently of the package:
their TVM kernel's reduction term by term (``padding`` summed in place of each term whose key is
outside the sequence) and their ``mask_invalid_locations`` construction (per-diagonal row masks of
the first ``w * max(d)`` rows, flipped for the end of the sequence).
"""

from __future__ import annotations

import re

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm.diagonaled_mm_tvm import diagonaled_mm, mask_invalid_locations

from .oracle import assert_close_to_oracle


# ---- allenai's semantics, transcribed ------------------------------------------------------
def _dilations(d, heads: int) -> list[int]:
    return [d] * heads if isinstance(d, int) else [int(x) for x in d]


def allenai_diagonaled_mm(t1, t2, w, d, is_t1_diagonaled=False, padding=0, autoregressive=False,
                          dtype=torch.float64):
    """Their compute rule: ``out = sum over the reduced index of (t1 * t2 at the key, or padding
    where the key i + (j - w) * d[h] is outside [0, N))``; reduced index = D for QK, C for PV."""
    t1, t2 = t1.to(dtype), t2.to(dtype)
    _, n, h, _ = t1.shape
    c = w + (0 if autoregressive else w) + 1
    dil = torch.tensor(_dilations(d, h)).view(1, h, 1)
    key = torch.arange(n).view(n, 1, 1) + (torch.arange(c).view(1, 1, c) - w) * dil  # (N, H, C)
    valid = ((key >= 0) & (key < n)).unsqueeze(-1)
    at_key = t2[:, key.clamp(0, n - 1), torch.arange(h).view(1, h, 1)]  # (B, N, H, C, X)
    pad = torch.tensor(float(padding), dtype=dtype)
    if is_t1_diagonaled:
        return torch.where(valid, t1.unsqueeze(-1) * at_key, pad).sum(dim=3)
    return torch.where(valid, t1.unsqueeze(3) * at_key, pad).sum(dim=-1)


def allenai_mask_invalid_locations(x, w, d, autoregressive):
    """Their construction on a copy: diagonal c (offset (c - w) * d) of the first w + 1 columns is
    masked in its first d * (w - c) rows; the end uses that mask flipped in rows and columns on
    the last w + 1 columns of the last rows."""
    x = x.clone()
    dils = _dilations(d, x.shape[2])
    reach, n = w * max(dils), x.shape[1]
    mask = torch.zeros(reach, len(dils), w + 1, dtype=torch.bool)
    for h, dh in enumerate(dils):
        for c in range(w + 1):
            mask[: dh * (w - c), h, c] = True
    begin = x[:, :reach, :, : w + 1]
    begin.masked_fill_(mask[:n].expand(begin.shape), float("-inf"))
    if not autoregressive:
        end = x[:, -reach:, :, -(w + 1):]
        end.masked_fill_(mask.flip(0, 2)[-n:].expand(end.shape), float("-inf"))
    return x


# ---- cases ---------------------------------------------------------------------------------
# (batch, seq_len, heads, head_dim, w, d, autoregressive); a tuple d is a per-head int32 tensor
CASES = [
    (2, 20, 2, 16, 3, 1, False),
    (1, 37, 3, 8, 4, (1, 2, 3), False),
    (2, 10, 2, 4, 6, 2, False),         # w * d >= N
    (1, 25, 2, 5, 3, (2, 1), True),
    (1, 9, 1, 3, 2, 1, True),
    (1, 16, 2, 5, 2, 1, False),         # D == C: allenai's kernel refuses, the flag decides here
    (1, 5, 2, 4, 1, 1, False),          # N < 16: allenai's asserts, runs here
]


def _id(case) -> str:
    b, n, h, dh, w, d, ar = case
    return f"B{b}-N{n}-H{h}-D{dh}-w{w}-d{d}{'-ar' if ar else ''}".replace(" ", "")


def _dil(d):
    return d if isinstance(d, int) else torch.tensor(d, dtype=torch.int32)


def _data(case, seed=0, dtype=torch.float32):
    b, n, h, dh, w, d, ar = case
    g = torch.Generator().manual_seed(seed)
    c = w + (0 if ar else w) + 1
    mk = lambda last: torch.randn(b, n, h, last, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(dh), mk(dh), mk(c)


@pytest.mark.parametrize("padding", [0, -10000, 7])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_qk_is_allenai_including_padding_times_head_size(case, padding):
    q, k, _ = _data(case)
    w, d, ar = case[4], _dil(case[5]), case[6]
    got = diagonaled_mm(q, k, w, d, False, padding, ar)
    want = allenai_diagonaled_mm(q, k, w, d, False, padding, ar)
    plain = allenai_diagonaled_mm(q, k, w, d, False, padding, ar, dtype=torch.float32)
    assert_close_to_oracle(got, want, plain, what=f"qk padding={padding}")
    # the quirk itself: an out-of-sequence entry is padding * D, exactly
    invalid = allenai_diagonaled_mm(torch.zeros_like(q), k, w, d, False, 1, ar) != 0
    assert invalid.any()
    assert torch.equal(got[invalid], torch.full_like(got[invalid], padding * q.shape[3]))


@pytest.mark.parametrize("padding", [0, -3])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_pv_is_allenai(case, padding):
    _, v, p = _data(case)
    w, d, ar = case[4], _dil(case[5]), case[6]
    got = diagonaled_mm(p, v, w, d, True, padding, ar)
    want = allenai_diagonaled_mm(p, v, w, d, True, padding, ar)
    plain = allenai_diagonaled_mm(p, v, w, d, True, padding, ar, dtype=torch.float32)
    assert_close_to_oracle(got, want, plain, what=f"pv padding={padding}")


WIDTHS = [  # (N, H, w, d, autoregressive, columns): allenai's callers' shapes
    (20, 2, 3, 1, False, 7),
    (20, 3, 2, (1, 2, 4), False, 5),
    (6, 2, 4, 2, False, 9),           # w * d > N: both ends in every row
    (12, 2, 3, 1, False, 9),          # sliding_chunks_no_overlap scores: 3w columns
    (15, 2, 3, (3, 1), True, 4),
    (15, 1, 2, 1, True, 5),           # autoregressive: only the first w + 1 columns are read
]


@pytest.mark.parametrize("n,h,w,d,ar,cols", WIDTHS, ids=lambda v: str(v).replace(" ", ""))
def test_mask_invalid_locations_is_allenai(n, h, w, d, ar, cols):
    x = torch.randn(2, n, h, cols, generator=torch.Generator().manual_seed(n))
    want = allenai_mask_invalid_locations(x, w, _dil(d), ar)
    assert mask_invalid_locations(x, w, _dil(d), ar) is None  # in place, as allenai's
    assert torch.equal(x, want)


def test_mask_invalid_locations_writes_through_a_view():
    """allenai's sliding_chunks masks a transposed view of its scores."""
    base = torch.randn(2, 3, 20, 7)  # (B, H, N, C)
    view = base.transpose(1, 2)
    want = allenai_mask_invalid_locations(view, 3, 1, False)
    mask_invalid_locations(view, 3, 1, False)
    assert torch.equal(base.transpose(1, 2), want)


@pytest.mark.parametrize("d", [1, (1, 3)], ids=str)
def test_allenai_attention_recipe(d):
    """longformer.py's tvm path, call for call, against the same recipe on the references:
    scores with padding 0, -inf at invalid locations, the -10000 key-padding mask through a
    D = 1 product, softmax, then the banded product with the values."""
    torch.manual_seed(0)
    b, n, h, dh, w = 2, 30, 2, 8, 4
    q, k, v = (torch.randn(b, n, h, dh) for _ in range(3))
    key_padding = torch.zeros(b, n, dtype=torch.bool)
    key_padding[1, 24:] = True
    float_mask = key_padding[:, :, None, None].float().masked_fill(key_padding[:, :, None, None], -10000.0)
    float_mask = float_mask.repeat(1, 1, h, 1)
    dil = q.new_full((h,), d, dtype=torch.int) if isinstance(d, int) else torch.tensor(d, dtype=torch.int)

    def recipe(mm, mask_, q, k, v, ones, float_mask):
        attn = mm(q, k, w, dil, False, 0, False)
        mask_(attn, w, dil, False)
        attn = attn + mm(ones, float_mask, w, dil, False, 0, False)
        probs = torch.softmax(attn, dim=-1)
        return mm(probs, v, w, dil, True, 0, False)

    def reference_mask_(x, *args):
        x.copy_(allenai_mask_invalid_locations(x, *args))

    ones = torch.ones_like(float_mask)
    got = recipe(diagonaled_mm, mask_invalid_locations, q, k, v, ones, float_mask)
    want = recipe(allenai_diagonaled_mm, reference_mask_, *(t.double() for t in (q, k, v, ones, float_mask)))
    plain = recipe(lambda *a: allenai_diagonaled_mm(*a, dtype=torch.float32), reference_mask_,
                   q, k, v, ones, float_mask)
    assert_close_to_oracle(got, want, plain, what="attention")


@pytest.mark.parametrize("is_t1_diagonaled", [False, True])
def test_gradients_are_allenai(is_t1_diagonaled):
    """allenai's backward is the exact gradient of its forward (the padding term is a constant)."""
    case = (1, 11, 2, 3, 2, (1, 2), False)
    q, k, p = (t.requires_grad_() for t in _data(case, dtype=torch.float64))
    t1 = p if is_t1_diagonaled else q
    w, d = case[4], _dil(case[5])
    out = diagonaled_mm(t1, k, w, d, is_t1_diagonaled, -5, False)
    ref = allenai_diagonaled_mm(t1, k, w, d, is_t1_diagonaled, -5, False)
    torch.testing.assert_close(out, ref)
    weight = torch.randn_like(out)
    got = torch.autograd.grad((out * weight).sum(), (t1, k))
    want = torch.autograd.grad((ref * weight).sum(), (t1, k))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_functional_diagonaled_mm_is_allenai_at_zero_padding_only():
    q, k, p = _data(CASES[0])
    w = CASES[0][4]
    torch.testing.assert_close(lt.diagonaled_mm(q, k, w, 1, False, 0), diagonaled_mm(q, k, w, 1, False, 0))
    torch.testing.assert_close(lt.diagonaled_mm(p, k, w, 1, True, 0), diagonaled_mm(p, k, w, 1, True, 0))
    clean = lt.diagonaled_mm(q, k, w, 1, False, -10000)  # padding as the value
    quirk = diagonaled_mm(q, k, w, 1, False, -10000)     # padding * D, as allenai's kernel
    assert clean.min().item() == -10000 and quirk.min().item() == -10000 * q.shape[3]


def test_mask_invalid_locations_window_0_is_a_no_op():
    """allenai's raises here (it slices all rows for an empty mask); nothing is out of the band."""
    x = torch.randn(1, 5, 2, 1)
    y = x.clone()
    mask_invalid_locations(y, 0, 1, False)
    assert torch.equal(x, y)


@pytest.mark.parametrize("call,exc,text", [
    (lambda x: mask_invalid_locations(x[..., :2], 3, 1, False), ValueError, "at least w + 1"),
    (lambda x: mask_invalid_locations(x, 3, torch.tensor([1, 2, 3]), False), ValueError,
     "one entry per head"),
    (lambda x: mask_invalid_locations(x, 3, 0, False), ValueError, "dilation must be >= 1"),
    (lambda x: diagonaled_mm(x, x, 3, 1, 1), TypeError, "is_t1_diagonaled must be a bool"),
    (lambda x: diagonaled_mm(x, x, 3, 1, True), ValueError, "C=7 columns"),
], ids=["narrow", "heads", "dilation0", "flag", "banded-shape"])
def test_errors_name_the_function_and_the_rule(call, exc, text):
    x = torch.randn(1, 20, 2, 6)
    with pytest.raises(exc, match=re.escape(text)):
        call(x)
