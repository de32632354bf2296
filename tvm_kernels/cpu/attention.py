"""Fused sliding-window attention, forward (TIR): the band's scores never leave the core's cache.

Semantics are those of ``sliding_window_qk`` -> softmax -> ``sliding_window_pv`` on one run of
heads with equal dilation ``d``: query row ``i`` meets keys ``i + (j - left) * d`` for ``j`` in
``[0, left + right]`` that lie in ``[0, N)`` and have ``key_mask == 0``; ``out = softmax(scale *
q.k) v`` over those keys and ``lse = log sum exp(scale * q.k)``. A row with no such key gets
``out = 0`` and ``lse = -inf``. For ``left = right = 1``, ``d = 1``, N = 5 the band is::

    1 1 0 0 0
    1 1 1 0 0
    0 1 1 1 0
    0 0 1 1 1
    0 0 0 1 1

Formulation (the residue layout and tiles of :mod:`tvm_kernels.cpu.kernels`):

* **Work units.** A unit is a run of consecutive tiles of one (batch, head, residue) -- the
  parallel item. It packs its slab of keys and values once (zero where the key is outside the
  sequence or masked, a select, never a product) with a 0/1 validity flag per packed key:
  ``KR`` and ``VR`` in rows of the padded head dimension (plain row copies).
  The workspace is one unit's slab per thread (TVM places the buffers inside the parallel loop).
* **Per tile** of ``TT`` query rows the scores are kept transposed, ``S^T = KR_slab Q_tile^T``
  (``SC x TT``, ``SC`` = the tile's slab, ``TT + left + right`` rounded up to
  :data:`SLAB_ROUND`), in a small buffer: the GEMM broadcasts key entries against vectors of the
  tile's rows, and the softmax runs along the slab with the tile's rows in the vector lanes (no
  lane reduction). Per row the max and the sum over its band (selects on ``ii <= c <= ii + left
  + right`` and the flag), the exponentials by a vectorised polynomial (:func:`fast_exp`); then
  ``O = P VR_slab``, the output ``O / l`` and ``lse = m + log l``. The scale is applied to the
  transposed Q tile, so ``s - max`` is one subtraction (exactly 0 at the max: a one-key row gives
  ``v`` exactly, as torch does; ``scale * s - max`` could contract to an FMA that does not).
* **Nothing outside a row's band meets it** as a value: S entries outside the band are replaced by
  -inf / 0 (selects), and masked or outside keys are packed as zeros, so an inf or NaN held by a
  masked key, a key outside the sequence or another residue never reaches a row. A non-finite
  ``v`` row of a valid key is multiplied by the zero P entries of the tile's rows whose band does
  not hold it (the dense tile product), so such a value spreads within the tile; callers check
  the result as they do for ``band_pv``.

Signature (``lse`` has the inputs' dtype, so that float64 gradients stay float64-accurate)::

    band_attention(q[B,N,H,D], k[B,N,H,D], v[B,N,H,D], key_mask[B,N] uint8, out[B,N,H,D],
                   lse[B,N,H], left: int64, right: int64, dilation: int64, scale: float64)

q, k, v, out: any strides, unit last stride. key_mask: any strides (stride 0 broadcasts a
``torch.zeros(1, 1, dtype=torch.uint8).expand(B, N)`` for "no mask"); nonzero = excluded. lse:
strides ``(s0, s1, 1)``.
"""

from __future__ import annotations

import math

from tvm import DataType, tirx
from tvm.script import tirx as T

from ..band import ceil_div, rows_in_residue, tiles_per_residue

#: Rows a work unit covers (at least ``left + right``, which the backward's two phases need). The
#: forward's units are longer (each packs its rows plus ``left + right``). The backward's are at
#: least four times ``left + right`` too (:class:`Layout`'s ``overlaps``), so a wide band's unit
#: packs and writes out 1.25x its rows, not 2x; a tile works on one slab of its four buffers (K,
#: V and the dK, dV sums), which stays in a core's L2.
UNIT_ROWS = 512
FORWARD_UNIT_ROWS = 1024
#: A tile's slab of keys is rounded up to a multiple of this (the key rows of a register block).
SLAB_ROUND = 16
#: Packed head dimension: a multiple of this many vectors (the PV microkernel's widest block).
VEC_ROUND = 4
ALIGN = 4

# ---- a vectorisable exp ---------------------------------------------------------------------

#: Per dtype: (lower clamp, polynomial coefficients from degree 0, integer type, mantissa bits,
#: exponent bias). On the reduced argument |f| <= ln2/2: float32 a degree-6 minimax fit of
#: exp(f) (relative error 1.9e-9, fitted by Remez exchange), float64 the Taylor terms to degree 13
#: (remainder 5e-18); both under their dtype's rounding.
_EXP = {
    "float32": (-87.0, (1.0000000005546077, 1.000000036344743, 0.4999999207507781,
                        0.166664200720267, 0.04166822619179477, 0.008374824056731482,
                        0.0013836835604885203), "int32", 23, 127),
    "float64": (-708.0, tuple(1.0 / math.factorial(k) for k in range(14)), "int64", 52, 1023),
}
_LN2_HI, _LN2_LO = 0.693145751953125, 1.42860682030941723212e-6  # ln 2 = hi + lo, hi exact in 16 bits
_LOG2E = 1.4426950408889634


def fast_exp(x, dtype: str):
    """exp(x) for x <= 0 as branch-free arithmetic that LLVM vectorises (TVM's ``T.exp`` is a
    scalar libm call): x = n ln2 + f, exp(f) by Horner, 2^n built in the exponent bits. (The
    rounding trick of adding 1.5 * 2^mantissa does not survive: TVM's LLVM code may reassociate
    and fold it away.) Below the clamp (exp < 2^-125 in float32) it returns the clamp's value,
    ~1e-38 / 1e-308: negligible against a row sum that is at least 1."""
    lo, coefficients, itype, mant, bias = _EXP[dtype]
    c = lambda value: tirx.const(value, dtype)  # noqa: E731
    x = T.max(x, c(lo))
    n = T.floor(x * c(_LOG2E) + c(0.5))
    f = (x - n * c(_LN2_HI)) - n * c(_LN2_LO)
    p = c(coefficients[-1])
    for k in coefficients[-2::-1]:  # Horner: one FMA each
        p = p * f + c(k)
    bits = T.shift_left(T.Cast(itype, n) + tirx.const(bias, itype), tirx.const(mant, itype))
    return p * T.reinterpret(dtype, bits)


def fast_log(x, dtype: str):
    """log(x) for a finite x >= 1 (a row's sum of exponentials), in arithmetic: libm's ``logf``
    is versioned GLIBC_2.27, newer than the wheel's manylinux tag allows. x = 2^e m with m in
    [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series
    (terms to s^13 in float32, s^25 in float64)."""
    _, _, itype, mant, bias = _EXP[dtype]
    c = lambda value: tirx.const(value, dtype)  # noqa: E731
    i = lambda value: tirx.const(value, itype)  # noqa: E731
    bits = T.reinterpret(itype, x)
    e = T.shift_right(bits, i(mant)) - i(bias)
    m = T.reinterpret(dtype, T.bitwise_or(T.bitwise_and(bits, i((1 << mant) - 1)),
                                          i(bias << mant)))
    big = m > c(2 ** 0.5)
    m = T.Select(big, m * c(0.5), m)
    e = T.Select(big, e + i(1), e)
    s = (m - c(1.0)) / (m + c(1.0))
    z = s * s
    p = c(0.0)
    for k in range(7 if dtype == "float32" else 13, 0, -1):  # 1 + z/3 + z^2/5 + ...
        p = p * z + c(1.0 / (2 * k - 1))
    n = T.Cast(dtype, e)
    return n * c(_LN2_HI) + (n * c(_LN2_LO) + c(2.0) * s * p)


# ---- the shared index rules (forward and backward) -----------------------------------------


def packed_width(dim, v):
    return ceil_div(dim, v * VEC_ROUND) * (v * VEC_ROUND)


class Layout:
    """Index rules of the unit/tile layout for tile height ``tt`` (a multiple of ``v``)."""

    def __init__(self, v: int, tm: int, unit_rows: int = UNIT_ROWS, overlaps: int = 1):
        """Units of at least ``unit_rows`` rows and ``overlaps`` times ``left + right`` (the rows
        a unit packs beyond its own, so a unit repeats at most 1/overlaps of its neighbours')."""
        self.v, self.tm, self.tt, self.unit_rows, self.overlaps = v, tm, v * tm, unit_rows, overlaps

    def slab_cols(self, left, right):  # a tile's slab of keys, rounded up to SLAB_ROUND
        return ceil_div(self.tt + left + right, SLAB_ROUND) * SLAB_ROUND

    def tiles(self, N, d):
        return tiles_per_residue(N, d, self.tt)

    def unit_tiles(self, N, d, left, right):  # >= overlaps * (left + right) rows, and >= 1
        want = T.max(ceil_div(T.int64(self.unit_rows), self.tt),
                     ceil_div(self.overlaps * (left + right), self.tt))
        return T.max(T.min(want, self.tiles(N, d)), T.int64(1))

    def units(self, N, d, left, right):
        return ceil_div(self.tiles(N, d), self.unit_tiles(N, d, left, right))

    def unit_keys(self, N, d, left, right):  # a unit's packed slab of keys
        return self.unit_tiles(N, d, left, right) * self.tt + self.slab_cols(left, right)

    def slab_key(self, N, d, left, right, u, blk, c):  # unit u's packed key of tile blk's column c
        return (blk - u * self.unit_tiles(N, d, left, right)) * self.tt + c

    def tile_count(self, N, d, left, right, u):  # tiles of unit u (the last may have fewer)
        ut = self.unit_tiles(N, d, left, right)
        return T.max(T.min(ut, self.tiles(N, d) - u * ut), T.int64(0))

    def tile(self, N, d, left, right, u, t):  # residue tile index of unit u's tile t
        return u * self.unit_tiles(N, d, left, right) + t

    def key_pos(self, N, d, left, right, u, pp):  # residue position of unit u's packed key pp
        return u * self.unit_tiles(N, d, left, right) * self.tt + pp - left

    def query_row(self, N, d, r, blk, ii):  # sequence row of a tile row (clamped; masked by caller)
        return T.min((blk * self.tt + ii) * d + r, N - 1)

    def query_ok(self, N, d, r, blk, ii):
        return (blk * self.tt + ii) * d + r < N

    def full_lo(self, left, right):  # first slab column in the band of every tile row
        return T.min(T.int64(self.tt - 1), self.slab_cols(left, right))

    def full_hi(self, left, right):  # end of those columns
        return T.max(self.full_lo(left, right), T.min(left + right + 1, self.slab_cols(left, right)))

    @staticmethod
    def in_band(left, right, ii, c):  # slab column c of tile row ii is in the row's band
        return tirx.all(c >= ii, c - ii <= left + right)


def key_flag(layout: Layout, M, N, d, r, left, right, b, u, pp, dtype):
    """1 where unit u's packed key pp is inside the sequence and not masked, else 0."""
    pos = layout.key_pos(N, d, left, right, u, pp)
    row = T.max(T.min(pos * d + r, N - 1), T.int64(0))
    inside = tirx.all(pos >= 0, pos < rows_in_residue(N, d, r))
    return T.Select(inside, T.Select(M[b, row] == T.uint8(0), T.cast(1, dtype),
                                                 T.cast(0, dtype)), T.cast(0, dtype))


def key_row(layout: Layout, N, d, r, left, right, u, pp):  # clamped sequence row of a packed key
    return T.max(T.min(layout.key_pos(N, d, left, right, u, pp) * d + r, N - 1), T.int64(0))


def views(handles, dtype, B, N, H, D):
    """The (B, N, H, D) tensor views (strides ``s<tag>0..2``, unit last stride)."""
    out = []
    for handle in handles:
        tag = handle.name.removesuffix("_h")
        strides = tuple(tirx.Var(f"s{tag}{i}", "int64") for i in range(3)) + (T.int64(1),)
        out.append(T.match_buffer(handle, (B, N, H, D), dtype, strides=strides, align=ALIGN,
                                  offset_factor=1))
    return out


def mask_view(handle, B, N):
    strides = (tirx.Var("sm0", "int64"), tirx.Var("sm1", "int64"))
    return T.match_buffer(handle, (B, N), "uint8", strides=strides, offset_factor=1)


def lse_view(handle, dtype, B, N, H):
    """A (B, N, H) view (strides ``s<tag>0, s<tag>1``, unit last stride)."""
    tag = handle.name.removesuffix("_h")
    strides = (tirx.Var(f"s{tag}0", "int64"), tirx.Var(f"s{tag}1", "int64"), T.int64(1))
    return T.match_buffer(handle, (B, N, H), dtype, strides=strides, align=ALIGN, offset_factor=1)


def make_attention(dtype: str, v: int, tm: int = 2, unit_rows: int = FORWARD_UNIT_ROWS):
    """The forward kernel; ``v`` vector lanes, tiles of ``v * tm`` query rows."""
    L = Layout(v, tm, unit_rows)
    tt = L.tt
    zero, one = T.cast(0, dtype), T.cast(1, dtype)
    ninf = tirx.const(float("-inf"), dtype)

    # Macros (expanded where called; names resolve there): one part of the slab columns, with the
    # band test (the edges) or with the key's flag alone (the middle). TVM suffixes the names of
    # later expansions' blocks (exp_1, ...); the schedule finds them by name or prefix.
    @T.macro(hygienic=False)
    def max_part(name, slot, start, extent, count, band):
        with T.sblock(name + "_tile"):
            for c, ii in T.grid(extent, tt):
                with T.sblock(name):
                    vu, vb, vh, vr, vm, vii = T.axis.remap("SSSSRS", [u, b, h, r, c, ii])
                    vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                    with T.init():
                        MXP[vb, vh, vr, vt, slot, vii] = ninf
                    MXP[vb, vh, vr, vt, slot, vii] = T.max(MXP[vb, vh, vr, vt, slot, vii], T.Select(
                        vm < count and (L.in_band(left, right, vii, start + vm) if band else True)
                        and KF[vb, vh, vr, vu, L.slab_key(N, d, left, right, vu, vt, start + vm)]
                        > zero, ST[vb, vh, vr, vt, start + vm, vii], ninf))

    @T.macro(hygienic=False)
    def exp_part(name, start, extent, band):
        for c, ii in T.grid(extent, tt):
            with T.sblock(name):
                vu, vb, vh, vr, vii = T.axis.remap("SSSSS", [u, b, h, r, ii])
                vc = T.axis.spatial(L.slab_cols(left, right), start + c)
                vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                PT[vb, vh, vr, vt, vc, vii] = T.Select(
                    (L.in_band(left, right, vii, vc) if band else True) and KF[
                        vb, vh, vr, vu, L.slab_key(N, d, left, right, vu, vt, vc)] > zero,
                    fast_exp(ST[vb, vh, vr, vt, vc, vii] - MX[vb, vh, vr, vt, vii], dtype), zero)

    @T.prim_func(s_tir=True)
    def band_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle,
                       o_h: T.handle, l_h: T.handle, left: T.int64, right: T.int64,
                       d: T.int64, scale: T.float64):
        T.func_attr({"tirx.noalias": True})
        B, N, H, D = T.int64(), T.int64(), T.int64(), T.int64()
        Q, K, Vt, O = views((q_h, k_h, v_h, o_h), dtype, B, N, H, D)
        M = mask_view(m_h, B, N)
        LS = lse_view(l_h, dtype, B, N, H)
        ushape = (B, H, d, L.units(N, d, left, right), L.unit_keys(N, d, left, right))
        KF = T.sblock_alloc_buffer(ushape, dtype)
        KR = T.sblock_alloc_buffer(ushape + (packed_width(D, v),), dtype)
        VR = T.sblock_alloc_buffer(ushape + (packed_width(D, v),), dtype)
        tshape = (B, H, d, L.tiles(N, d))
        QT = T.sblock_alloc_buffer(tshape + (D, tt), dtype)
        ST = T.sblock_alloc_buffer(tshape + (L.slab_cols(left, right), tt), dtype)
        PT = T.sblock_alloc_buffer(tshape + (L.slab_cols(left, right), tt), dtype)
        MXP = T.sblock_alloc_buffer(tshape + (3, tt), dtype)
        MX = T.sblock_alloc_buffer(tshape + (tt,), dtype)
        SM = T.sblock_alloc_buffer(tshape + (tt,), dtype)
        OA = T.sblock_alloc_buffer(tshape + (tt, packed_width(D, v)), dtype)
        for u, b, h, r in T.grid(L.units(N, d, left, right), B, H, d):
            for pp in range(L.unit_keys(N, d, left, right)):
                with T.sblock("flag"):
                    vu, vb, vh, vr, vp = T.axis.remap("SSSSS", [u, b, h, r, pp])
                    KF[vb, vh, vr, vu, vp] = key_flag(L, M, N, d, vr, left, right, vb, vu, vp, dtype)
            for pp in range(L.unit_keys(N, d, left, right)):
                for k in range(D):
                    with T.sblock("pack"):
                        vu, vb, vh, vr, vp, vk = T.axis.remap("SSSSSS", [u, b, h, r, pp, k])
                        KR[vb, vh, vr, vu, vp, vk] = T.Select(
                            KF[vb, vh, vr, vu, vp] > zero,
                            K[vb, key_row(L, N, d, vr, left, right, vu, vp), vh, vk], zero)
                        VR[vb, vh, vr, vu, vp, vk] = T.Select(
                            KF[vb, vh, vr, vu, vp] > zero,
                            Vt[vb, key_row(L, N, d, vr, left, right, vu, vp), vh, vk], zero)
                for k in range(packed_width(D, v) - D):
                    with T.sblock("pack_pad"):
                        vu, vb, vh, vr, vp = T.axis.remap("SSSSS", [u, b, h, r, pp])
                        vk = T.axis.spatial(packed_width(D, v), D + k)
                        KR[vb, vh, vr, vu, vp, vk] = zero
                        VR[vb, vh, vr, vu, vp, vk] = zero
            for t in range(L.tile_count(N, d, left, right, u)):
                for k, ii in T.grid(D, tt):
                    with T.sblock("q_tile"):
                        vu, vb, vh, vr, vk, vii = T.axis.remap("SSSSSS", [u, b, h, r, k, ii])
                        vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                        QT[vb, vh, vr, vt, vk, vii] = Q[vb, L.query_row(N, d, vr, vt, vii), vh, vk] * T.cast(
                            scale, dtype)
                with T.sblock("S_tile"):
                    for c, ii, k in T.grid(L.slab_cols(left, right), tt, D):
                        with T.sblock("S"):
                            vu, vb, vh, vr, vc, vii, vk = T.axis.remap("SSSSSSR", [u, b, h, r, c, ii, k])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                            with T.init():
                                ST[vb, vh, vr, vt, vc, vii] = zero
                            ST[vb, vh, vr, vt, vc, vii] = ST[vb, vh, vr, vt, vc, vii] + KR[
                                vb, vh, vr, vu, L.slab_key(N, d, left, right, vu, vt, vc), vk
                            ] * QT[vb, vh, vr, vt, vk, vii]
                # the max and the exponentials in three parts: slab columns [full_lo, full_hi)
                # are in the band of every tile row, so there only the key's flag is tested (a
                # scalar); the middle max runs at least once, so its init always does
                max_part("max_lo", 0, 0, L.full_lo(left, right), L.full_lo(left, right), True)
                max_part("max_mid", 1, L.full_lo(left, right),
                         T.max(L.full_hi(left, right) - L.full_lo(left, right), 1),
                         L.full_hi(left, right) - L.full_lo(left, right), False)
                max_part("max_hi", 2, L.full_hi(left, right),
                         L.slab_cols(left, right) - L.full_hi(left, right),
                         L.slab_cols(left, right) - L.full_hi(left, right), True)
                for ii in range(tt):
                    with T.sblock("max"):
                        vu, vb, vh, vr, vii = T.axis.remap("SSSSS", [u, b, h, r, ii])
                        vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                        MX[vb, vh, vr, vt, vii] = T.max(T.max(MXP[vb, vh, vr, vt, 0, vii],
                                                              MXP[vb, vh, vr, vt, 1, vii]),
                                                        MXP[vb, vh, vr, vt, 2, vii])
                exp_part("exp_lo", 0, L.full_lo(left, right), True)
                exp_part("exp", L.full_lo(left, right),
                         L.full_hi(left, right) - L.full_lo(left, right), False)
                exp_part("exp_hi", L.full_hi(left, right),
                         L.slab_cols(left, right) - L.full_hi(left, right), True)
                with T.sblock("sum_tile"):
                    for c, ii in T.grid(L.slab_cols(left, right), tt):
                        with T.sblock("sum"):
                            vu, vb, vh, vr, vc, vii = T.axis.remap("SSSSRS", [u, b, h, r, c, ii])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                            with T.init():
                                SM[vb, vh, vr, vt, vii] = zero
                            SM[vb, vh, vr, vt, vii] = SM[vb, vh, vr, vt, vii] + PT[vb, vh, vr, vt, vc, vii]
                with T.sblock("O_tile"):
                    for ii, kk, c in T.grid(tt, packed_width(D, v), L.slab_cols(left, right)):
                        with T.sblock("O"):
                            vu, vb, vh, vr, vii, vkk, vc = T.axis.remap("SSSSSSR", [u, b, h, r, ii, kk, c])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                            with T.init():
                                OA[vb, vh, vr, vt, vii, vkk] = zero
                            OA[vb, vh, vr, vt, vii, vkk] = OA[vb, vh, vr, vt, vii, vkk] + PT[
                                vb, vh, vr, vt, vc, vii
                            ] * VR[vb, vh, vr, vu, L.slab_key(N, d, left, right, vu, vt, vc), vkk]
                for ii, k in T.grid(tt, D):
                    with T.sblock("out"):
                        vu, vb, vh, vr, vii, vk = T.axis.remap("SSSSSS", [u, b, h, r, ii, k])
                        vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                        T.where(L.query_ok(N, d, r, L.tile(N, d, left, right, u, t), ii))
                        O[vb, L.query_row(N, d, vr, vt, vii), vh, vk] = T.Select(
                            SM[vb, vh, vr, vt, vii] > zero,
                            OA[vb, vh, vr, vt, vii, vk] * (one / SM[vb, vh, vr, vt, vii]), zero)
                for ii in range(tt):
                    with T.sblock("lse"):
                        vu, vb, vh, vr, vii = T.axis.remap("SSSSS", [u, b, h, r, ii])
                        vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, u, t))
                        T.where(L.query_ok(N, d, r, L.tile(N, d, left, right, u, t), ii))
                        LS[vb, L.query_row(N, d, vr, vt, vii), vh] = T.Select(
                            SM[vb, vh, vr, vt, vii] > zero,
                            MX[vb, vh, vr, vt, vii] + fast_log(SM[vb, vh, vr, vt, vii], dtype), ninf)

    return band_attention.with_attr("global_symbol", "band_attention")
