"""Fused sliding-window attention, backward (TIR), in the FlashAttention-2 manner.

Inputs are the forward's (q, k, v, key_mask), ``dout``, the forward's ``out`` and ``lse``, and
``dlse``, the LSE's own gradient (zeros when only ``out`` is used); outputs dq, dk, dv. Per tile
the kernel forms ``delta = rowsum(dout * out) - dlse`` from the tile's rows of both (0 on a
row with lse = -inf, whose P is 0 and whose dlse may hold anything). Per tile of ``TT`` query rows (the layout of
:mod:`.attention`: residues, work units, slabs), with the tile's slab keys ``c``::

    S^T  = K_slab (scale Q_tile)^T              (slab x TT, kept transposed as in the forward)
    P^T  = [c in row's band and valid] exp(S^T - lse)
    dP^T = V_slab dO_tile^T
    dS^T = P^T * (dP^T - delta)
    dQ_tile  = scale dS K_slab                  (written once: a query row lies in one tile)
    dK_slab += scale dS^T Q_tile,  dV_slab += P^T dO_tile   (in place, register block by block)

No (N, C) tensor exists: S, P, dP, dS live per tile in a small buffer. **Parallel without
atomics**: a work unit (a run of tiles of one batch, head and residue) accumulates dK and dV of
its keys -- its rows plus ``left`` keys before and ``right`` after -- in its own buffer, and
writes a key row into dk, dv as soon as no later tile's slab holds it (after each tile the rows
before the next tile's slab; after the last, the rest of its band), while it is in cache.
Units cover at least ``left + right`` rows (:meth:`.attention.Layout.unit_tiles`), so the keys
of units ``u`` and ``u + 2`` never overlap: the even units run in parallel first, then the odd
ones, and no two concurrent units write the same key row. (The packed buffer is longer: past
the last tile's band, by the slab's rounding and a tile height. Those rows hold no sum and are
keys of unit ``u + 2``: writing them raced with it.) The even units write
their rows of dk and dv, the odd ones add where an even unit wrote the key and write elsewhere,
so the outputs need no zeroing first. Accumulation is in the dtype (float32 for float32).

Signature (``lse`` as the forward returned it, in the inputs' dtype)::

    band_attention_backward(q, k, v, key_mask[B,N] uint8, dout, out, lse[B,N,H], dlse[B,N,H],
                            dq, dk, dv, left: int64, right: int64, dilation: int64,
                            scale: float64)

(B, N, H, D) tensors with any strides and a unit last stride; lse and dlse strides (s0, s1, 1),
in the inputs' dtype; key_mask as for the forward.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..band import ceil_div, rows_in_residue
from .attention import (SLAB_ROUND, UNIT_ROWS, VEC_ROUND, Layout, fast_exp, key_flag, key_row,
                        lse_view, mask_view, packed_width, views)


def make_attention_grad(dtype: str, v: int, tm: int = 2, unit_rows: int = UNIT_ROWS,
                        dkv_rows: int = 4, dkv_cols: int = 4):
    """The backward kernel; ``v`` vector lanes, tiles of ``v * tm`` query rows; dK and dV add
    into the unit's sums in register blocks of ``dkv_rows`` slab keys x ``dkv_cols`` head-dim
    vectors (they divide the slab's rounding and the packed head dimension)."""
    if SLAB_ROUND % dkv_rows or VEC_ROUND % dkv_cols:
        raise ValueError(f"dK/dV register block {dkv_rows} x {dkv_cols}: rows must divide "
                         f"{SLAB_ROUND}, columns {VEC_ROUND}")
    L = Layout(v, tm, unit_rows, overlaps=4)  # a wide band's units pack and write out 1.25x, not 2x
    tt = L.tt
    zero = T.cast(0, dtype)

    def per_phase(N, d, left, right, ph):  # units of one parity
        return ceil_div(L.units(N, d, left, right) - ph, 2)

    def items(B, N, H, d, left, right, ph):  # parallel items of a phase: (unit, b, h, r)
        return per_phase(N, d, left, right, ph) * B * H * d

    def ub(B, H, d, f):
        return f // (H * d) % B

    def uh(H, d, f):
        return f // d % H

    def uu(B, H, d, f, ph):
        return 2 * (f // (B * H * d)) + ph

    def inside(N, d, r, left, right, u, pp):  # unit u's packed key pp lies in the sequence
        pos = L.key_pos(N, d, left, right, u, pp)
        return tirx.all(pos >= 0, pos < rows_in_residue(N, d, r))

    def shared(B, N, H, d, left, right, f, ph, pp):  # an even unit's slab holds this key too
        u = uu(B, H, d, f, ph)
        rows = L.unit_tiles(N, d, left, right) * tt
        pos = L.key_pos(N, d, left, right, u, pp)
        return tirx.any(pos < u * rows + right, tirx.all(
            pos >= (u + 1) * rows - left, u + 1 < L.units(N, d, left, right)))

    @T.macro(hygienic=False)
    def key_gemm(name, out, rows, cols):  # out[c, ii] = sum_k rows[slab key c, k] cols[k, ii]
        with T.sblock(name + "_tile"):
            for c, ii, k in T.grid(L.slab_cols(left, right), tt, D):
                with T.sblock(name):
                    vph, vf, vc, vii, vk = T.axis.remap("SSSSR", [ph, f, c, ii, k])
                    vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, uu(B, H, d, f, ph), t))
                    with T.init():
                        out[vph, vf, vt, vc, vii] = zero
                    out[vph, vf, vt, vc, vii] = out[vph, vf, vt, vc, vii] + rows[
                        vph, vf, L.slab_key(N, d, left, right, uu(B, H, d, vf, vph), vt, vc),
                        vk] * cols[vph, vf, vt, vk, vii]

    @T.macro(hygienic=False)
    def slab_gemm(name, acc, left_t, rows, dkv_rows, dkv_cols):
        # acc[slab key of c, kk] += sum_ii left_t[c, ii] rows[ii, kk], in register blocks of
        # dkv_rows slab keys x dkv_cols head-dim vectors loaded from acc and stored back: the
        # sum needs no buffer of its own and no second pass. The blocks are the formulation's
        # (TVM's schedule primitives refuse a block that updates a buffer in place).
        for ko, co in T.grid(packed_width(D, v) // (dkv_cols * v), L.slab_cols(left, right) // dkv_rows):
            with T.sblock(name + "_block"):
                R = T.sblock_alloc_buffer((dkv_rows, dkv_cols * v), dtype, scope="local")
                for ci, kv in T.grid(T.int64(dkv_rows), T.int64(dkv_cols)):
                    for kl in T.vectorized(T.int64(v)):
                        with T.sblock(name + "_load"):
                            vph, vf, vco, vko, vci, vkv, vkl = T.axis.remap(
                                "SSSSSSS", [ph, f, co, ko, ci, kv, kl])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, uu(B, H, d, f, ph), t))
                            R[vci, vkv * v + vkl] = acc[vph, vf, L.slab_key(
                                N, d, left, right, uu(B, H, d, vf, vph), vt, vco * dkv_rows + vci),
                                vko * dkv_cols * v + vkv * v + vkl]
                for ii in range(tt):
                    for ci, kv in T.grid(T.int64(dkv_rows), T.int64(dkv_cols)):
                        for kl in T.vectorized(T.int64(v)):
                            with T.sblock(name):
                                vph, vf, vco, vko, vii, vci, vkv, vkl = T.axis.remap(
                                    "SSSSSSSS", [ph, f, co, ko, ii, ci, kv, kl])
                                vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, uu(B, H, d, f, ph), t))
                                R[vci, vkv * v + vkl] = R[vci, vkv * v + vkl] + left_t[
                                    vph, vf, vt, vco * dkv_rows + vci, vii] * rows[
                                    vph, vf, vt, vii, vko * dkv_cols * v + vkv * v + vkl]
                for ci, kv in T.grid(T.int64(dkv_rows), T.int64(dkv_cols)):
                    for kl in T.vectorized(T.int64(v)):
                        with T.sblock(name + "_store"):
                            vph, vf, vco, vko, vci, vkv, vkl = T.axis.remap(
                                "SSSSSSS", [ph, f, co, ko, ci, kv, kl])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, uu(B, H, d, f, ph), t))
                            acc[vph, vf, L.slab_key(
                                N, d, left, right, uu(B, H, d, vf, vph), vt, vco * dkv_rows + vci),
                                vko * dkv_cols * v + vkv * v + vkl] = R[vci, vkv * v + vkl]

    @T.macro(hygienic=False)
    def p_part(name, start, extent, band):  # P over part of the slab (see attention.exp_part),
        # and dS = P (dP - delta) from it while it is in a register
        for c, ii in T.grid(extent, tt):
            with T.sblock(name):
                vph, vf, vii = T.axis.remap("SSS", [ph, f, ii])
                vc = T.axis.spatial(L.slab_cols(left, right), start + c)
                vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right, uu(B, H, d, f, ph), t))
                # the same expression twice (CSE computes it once): a block that read back
                # what it wrote would not be schedulable
                PT[vph, vf, vt, vc, vii] = T.Select(
                    (L.in_band(left, right, vii, vc) if band else True) and KF[vph, vf, L.slab_key(
                        N, d, left, right, uu(B, H, d, vf, vph), vt, vc)] > zero,
                    fast_exp(ST[vph, vf, vt, vc, vii] - LT[vph, vf, vt, vii], dtype), zero)
                DST[vph, vf, vt, vc, vii] = T.Select(
                    (L.in_band(left, right, vii, vc) if band else True) and KF[vph, vf, L.slab_key(
                        N, d, left, right, uu(B, H, d, vf, vph), vt, vc)] > zero,
                    fast_exp(ST[vph, vf, vt, vc, vii] - LT[vph, vf, vt, vii], dtype), zero) * (
                    DPT[vph, vf, vt, vc, vii] - DL[vph, vf, vt, vii])

    @T.macro(hygienic=False)
    def write_out(start, count, inside, shared):  # the unit's slab rows [start, start + count), now final
        # even units write their rows; odd units add where an even unit's slab wrote
        # too, else write (so dk and dv need no zeroing)
        for p, k in T.grid(count, D):
            with T.sblock("dkv_set"):
                vph, vf, vk = T.axis.remap("SSS", [ph, f, k])
                vp = T.axis.spatial(L.unit_keys(N, d, left, right), start + p)
                T.where(inside(N, d, f % d, left, right, uu(B, H, d, f, ph), start + p) and (
                    ph == 0 or not shared(B, N, H, d, left, right, f, ph, start + p)))
                DK[ub(B, H, d, vf), key_row(L, N, d, vf % d, left, right, uu(B, H, d, vf, vph),
                                            vp), uh(H, d, vf), vk] = DKA[vph, vf, vp, vk] * T.cast(
                    scale, dtype)
                DV[ub(B, H, d, vf), key_row(L, N, d, vf % d, left, right, uu(B, H, d, vf, vph),
                                            vp), uh(H, d, vf), vk] = DVA[vph, vf, vp, vk]
        for p, k in T.grid(count, D):
            with T.sblock("dkv_add"):
                vph, vf, vk = T.axis.remap("SSS", [ph, f, k])
                vp = T.axis.spatial(L.unit_keys(N, d, left, right), start + p)
                T.where(inside(N, d, f % d, left, right, uu(B, H, d, f, ph), start + p) and (
                    ph == 1 and shared(B, N, H, d, left, right, f, ph, start + p)))
                DK[ub(B, H, d, vf), key_row(L, N, d, vf % d, left, right, uu(B, H, d, vf, vph),
                                            vp), uh(H, d, vf), vk] = DK[
                    ub(B, H, d, vf), key_row(L, N, d, vf % d, left, right,
                                             uu(B, H, d, vf, vph), vp), uh(H, d, vf), vk
                ] + DKA[vph, vf, vp, vk] * T.cast(
                    scale, dtype)
                DV[ub(B, H, d, vf), key_row(L, N, d, vf % d, left, right, uu(B, H, d, vf, vph),
                                            vp), uh(H, d, vf), vk] = DV[
                    ub(B, H, d, vf), key_row(L, N, d, vf % d, left, right,
                                             uu(B, H, d, vf, vph), vp), uh(H, d, vf), vk
                ] + DVA[vph, vf, vp, vk]

    @T.prim_func(s_tir=True)
    def band_attention_backward(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle,
                                do_h: T.handle, o_h: T.handle, l_h: T.handle, dl_h: T.handle,
                                dq_h: T.handle, dk_h: T.handle, dv_h: T.handle, left: T.int64,
                                right: T.int64, d: T.int64, scale: T.float64):
        T.func_attr({"tirx.noalias": True})
        B, N, H, D = T.int64(), T.int64(), T.int64(), T.int64()
        Q, K, Vt, DO, O, DQ, DK, DV = views((q_h, k_h, v_h, do_h, o_h, dq_h, dk_h, dv_h), dtype,
                                            B, N, H, D)
        M = mask_view(m_h, B, N)
        LS = lse_view(l_h, dtype, B, N, H)
        DLV = lse_view(dl_h, dtype, B, N, H)
        KF = T.sblock_alloc_buffer((2, L.units(N, d, left, right) * B * H * d,
                                    L.unit_keys(N, d, left, right)), dtype)
        KR = T.sblock_alloc_buffer((2, L.units(N, d, left, right) * B * H * d,
                                     L.unit_keys(N, d, left, right), packed_width(D, v)), dtype)
        VR = T.sblock_alloc_buffer((2, L.units(N, d, left, right) * B * H * d,
                                     L.unit_keys(N, d, left, right), packed_width(D, v)), dtype)
        DKA = T.sblock_alloc_buffer((2, L.units(N, d, left, right) * B * H * d,
                                     L.unit_keys(N, d, left, right), packed_width(D, v)), dtype)
        DVA = T.sblock_alloc_buffer((2, L.units(N, d, left, right) * B * H * d,
                                     L.unit_keys(N, d, left, right), packed_width(D, v)), dtype)
        tshape = (2, L.units(N, d, left, right) * B * H * d, L.tiles(N, d))
        QT = T.sblock_alloc_buffer(tshape + (D, tt), dtype)
        DOT = T.sblock_alloc_buffer(tshape + (D, tt), dtype)
        QR = T.sblock_alloc_buffer(tshape + (tt, packed_width(D, v)), dtype)
        DOR = T.sblock_alloc_buffer(tshape + (tt, packed_width(D, v)), dtype)
        OR = T.sblock_alloc_buffer(tshape + (tt, packed_width(D, v)), dtype)
        LT = T.sblock_alloc_buffer(tshape + (tt,), dtype)
        DL = T.sblock_alloc_buffer(tshape + (tt,), dtype)
        RS = T.sblock_alloc_buffer(tshape + (tt,), dtype)
        ST = T.sblock_alloc_buffer(tshape + (L.slab_cols(left, right), tt), dtype)
        PT = T.sblock_alloc_buffer(tshape + (L.slab_cols(left, right), tt), dtype)
        DPT = T.sblock_alloc_buffer(tshape + (L.slab_cols(left, right), tt), dtype)
        DST = T.sblock_alloc_buffer(tshape + (L.slab_cols(left, right), tt), dtype)
        DQA = T.sblock_alloc_buffer(tshape + (tt, packed_width(D, v)), dtype)
        for ph in range(2):
            for f in T.parallel(items(B, N, H, d, left, right, ph)):
                for pp in range(L.unit_keys(N, d, left, right)):
                    with T.sblock("flag"):
                        vph, vf, vp = T.axis.remap("SSS", [ph, f, pp])
                        KF[vph, vf, vp] = key_flag(L, M, N, d, vf % d, left, right, ub(B, H, d, vf),
                                                   uu(B, H, d, vf, vph), vp, dtype)
                    for k in range(packed_width(D, v)):
                        with T.sblock("zero_acc"):
                            vph, vf, vp, vk = T.axis.remap("SSSS", [ph, f, pp, k])
                            DKA[vph, vf, vp, vk] = zero
                            DVA[vph, vf, vp, vk] = zero
                    for k in range(D):  # copies with no per-element index work: LLVM vectorises them
                        with T.sblock("pack"):
                            vph, vf, vp, vk = T.axis.remap("SSSS", [ph, f, pp, k])
                            KR[vph, vf, vp, vk] = T.Select(KF[vph, vf, vp] > zero, K[
                                ub(B, H, d, vf), key_row(L, N, d, vf % d, left, right,
                                                         uu(B, H, d, vf, vph), vp), uh(H, d, vf), vk],
                                zero)
                            VR[vph, vf, vp, vk] = T.Select(KF[vph, vf, vp] > zero, Vt[
                                ub(B, H, d, vf), key_row(L, N, d, vf % d, left, right,
                                                         uu(B, H, d, vf, vph), vp), uh(H, d, vf), vk],
                                zero)
                    for k in range(packed_width(D, v) - D):
                        with T.sblock("pack_pad"):
                            vph, vf, vp = T.axis.remap("SSS", [ph, f, pp])
                            vk = T.axis.spatial(packed_width(D, v), D + k)
                            KR[vph, vf, vp, vk] = zero
                            VR[vph, vf, vp, vk] = zero
                for t in range(L.tile_count(N, d, left, right, uu(B, H, d, f, ph))):
                    for ii, k in T.grid(tt, D):
                        with T.sblock("rows"):
                            vph, vf, vii, vk = T.axis.remap("SSSS", [ph, f, ii, k])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right,
                                                                      uu(B, H, d, f, ph), t))
                            QR[vph, vf, vt, vii, vk] = T.Select(L.query_ok(N, d, vf % d, vt, vii), Q[
                                ub(B, H, d, vf), L.query_row(N, d, vf % d, vt, vii), uh(H, d, vf),
                                vk], zero)
                            DOR[vph, vf, vt, vii, vk] = T.Select(L.query_ok(N, d, vf % d, vt, vii), DO[
                                ub(B, H, d, vf), L.query_row(N, d, vf % d, vt, vii), uh(H, d, vf),
                                vk], zero)
                            OR[vph, vf, vt, vii, vk] = T.Select(L.query_ok(N, d, vf % d, vt, vii), O[
                                ub(B, H, d, vf), L.query_row(N, d, vf % d, vt, vii), uh(H, d, vf),
                                vk], zero)
                    for ii, k in T.grid(tt, packed_width(D, v) - D):
                        with T.sblock("rows_pad"):
                            vph, vf, vii = T.axis.remap("SSS", [ph, f, ii])
                            vk = T.axis.spatial(packed_width(D, v), D + k)
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right,
                                                                      uu(B, H, d, f, ph), t))
                            QR[vph, vf, vt, vii, vk] = zero
                            DOR[vph, vf, vt, vii, vk] = zero
                            OR[vph, vf, vt, vii, vk] = zero
                    for k, ii in T.grid(D, tt):
                        with T.sblock("cols"):
                            vph, vf, vk, vii = T.axis.remap("SSSS", [ph, f, k, ii])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right,
                                                                      uu(B, H, d, f, ph), t))
                            QT[vph, vf, vt, vk, vii] = QR[vph, vf, vt, vii, vk] * T.cast(scale, dtype)
                            DOT[vph, vf, vt, vk, vii] = DOR[vph, vf, vt, vii, vk]
                    with T.sblock("rowsum_tile"):  # its own scope, so it can be scheduled
                        for ii, k in T.grid(tt, packed_width(D, v)):  # rowsum(dO * O), zero-padded
                            with T.sblock("rowsum"):
                                vph, vf, vii, vk = T.axis.remap("SSSR", [ph, f, ii, k])
                                vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right,
                                                                          uu(B, H, d, f, ph), t))
                                with T.init():
                                    RS[vph, vf, vt, vii] = zero
                                RS[vph, vf, vt, vii] = RS[vph, vf, vt, vii] + DOR[
                                    vph, vf, vt, vii, vk] * OR[vph, vf, vt, vii, vk]
                    for ii in range(tt):
                        with T.sblock("lse"):
                            vph, vf, vii = T.axis.remap("SSS", [ph, f, ii])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right,
                                                                      uu(B, H, d, f, ph), t))
                            LT[vph, vf, vt, vii] = LS[ub(B, H, d, vf), L.query_row(
                                N, d, vf % d, vt, vii), uh(H, d, vf)]
                            # delta = rowsum(dO * O) - dlse; 0 on a row with no valid key (lse
                            # -inf, P = 0), where dlse may be anything
                            DL[vph, vf, vt, vii] = T.Select(LS[ub(B, H, d, vf), L.query_row(
                                N, d, vf % d, vt, vii), uh(H, d, vf)] > tirx.const(float("-inf"), dtype),
                                RS[vph, vf, vt, vii] - DLV[ub(B, H, d, vf), L.query_row(
                                    N, d, vf % d, vt, vii), uh(H, d, vf)], zero)
                    key_gemm("S", ST, KR, QT)  # S^T = K_slab (scale Q)^T
                    key_gemm("dP", DPT, VR, DOT)  # dP^T = V_slab dO^T
                    # as in the forward: the middle slab columns test only the key's flag
                    p_part("P_lo", 0, L.full_lo(left, right), True)
                    p_part("P", L.full_lo(left, right),
                           L.full_hi(left, right) - L.full_lo(left, right), False)
                    p_part("P_hi", L.full_hi(left, right),
                           L.slab_cols(left, right) - L.full_hi(left, right), True)
                    with T.sblock("dQ_tile"):
                        for ii, kk, c in T.grid(tt, packed_width(D, v), L.slab_cols(left, right)):
                            with T.sblock("dQ"):
                                vph, vf, vii, vkk, vc = T.axis.remap("SSSSR", [ph, f, ii, kk, c])
                                vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right,
                                                                          uu(B, H, d, f, ph), t))
                                with T.init():
                                    DQA[vph, vf, vt, vii, vkk] = zero
                                DQA[vph, vf, vt, vii, vkk] = DQA[vph, vf, vt, vii, vkk] + DST[
                                    vph, vf, vt, vc, vii] * KR[vph, vf, L.slab_key(
                                        N, d, left, right, uu(B, H, d, vf, vph), vt, vc), vkk]
                    for ii, k in T.grid(tt, D):
                        with T.sblock("dq_out"):
                            vph, vf, vii, vk = T.axis.remap("SSSS", [ph, f, ii, k])
                            vt = T.axis.spatial(L.tiles(N, d), L.tile(N, d, left, right,
                                                                      uu(B, H, d, f, ph), t))
                            T.where(L.query_ok(N, d, f % d, L.tile(N, d, left, right,
                                                                    uu(B, H, d, f, ph), t), ii))
                            DQ[ub(B, H, d, vf), L.query_row(N, d, vf % d, vt, vii), uh(H, d, vf),
                               vk] = DQA[vph, vf, vt, vii, vk] * T.cast(scale, dtype)
                    slab_gemm("dK", DKA, DST, QR, dkv_rows, dkv_cols)  # the unit's dK += this tile's dS^T Q
                    slab_gemm("dV", DVA, PT, DOR, dkv_rows, dkv_cols)  # and dV += P^T dO
                    # no later tile's slab holds the rows before the next tile's: out they go
                    # while they are in cache; after the unit's last tile, the rest of that
                    # tile's band. Not the packed rows past it (the slab's rounding and the
                    # buffer's last tile height): they hold no sum, and they are keys of unit
                    # u + 2, which runs in the same phase.
                    write_out(t * tt, T.if_then_else(
                        t + 1 == L.tile_count(N, d, left, right, uu(B, H, d, f, ph)),
                        tt + left + right, T.int64(tt)), inside, shared)

    return band_attention_backward.with_attr("global_symbol", "band_attention_backward")
