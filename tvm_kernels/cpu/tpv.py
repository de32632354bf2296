"""The transposed PV product (TIR): dK = dS^T Q and dV = P^T dO of the unfused backward.

The tiled formulation of :mod:`tvm_kernels.cpu.kernels` (residue layout, tiles, packing, ranges
not masks), for the operand that runs along diagonals: the tile's slab of G is copied sheared.
Signature (``TPV_ROWS`` and ``TPV_TILE`` build-time structures)::

    band_pv_transposed (g[B,N,H,C], x, out[B,N,H,D], left, right, d)
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..band import operands, rows_in_residue, tiles_per_residue
from .kernels import ALIGN, TPV_ROWS, TPV_TILE, block_mid, clamp, edge_col, edge_range, packed_width


def make_tpv(dtype: str, v: int, rows: int = TPV_ROWS, tt: int = TPV_TILE):
    """The adjoint of PV in P: ``out[j] = sum over the rows i whose band holds key j of
    G[i, j - i + left] X[i]``. The reduction runs over the tile's slab of rows.

    Slab row q of tile ``blk`` (residue position ``blk*TT + q - right``) is the query row. The
    sheared operand ``PS[q, ii]`` holds ``G[slab row q, left + right + ii - q]`` (a slab row
    copies from one G row), zero where that is outside the band or the sequence.

    The GEMM runs in blocks of ``rows`` output rows (the register block; the tile height ``tt`` a
    multiple of it). A slab row copies ``tt`` consecutive entries of one G row, and G's rows lie
    ``H * C`` entries apart; so a tall tile (64 rows: a 256-byte run of each fp32 row) reads G in
    longer runs and pays its per-tile costs (the partial slab rows, the workspaces) less often:
    1.04-1.22x over 16 rows, more as w grows (a software prefetch of the next tile's runs gained
    1.04-1.1x at 16 rows and nothing at 64; reading G in place in the GEMM, with no sheared copy,
    measured 0.85x at w=64 and 0.68x at w=256: each reduction step broadcasts from another G row).

    Slab row q is in row ii's band when ``0 <= q - ii < C``: relative to the block, slab rows
    ``[rows - 1, C)`` are in every row's (``acc``), and each row takes its range of the others
    (``acc_edge``). So no zero of PS meets X (times an inf in X it would be a NaN in a row whose
    band never held it) but outside the sequence, where the packed X is zero too.
    """
    if tt % rows:
        raise ValueError(f"transposed PV's tile height {tt} must be a multiple of its block {rows}")
    zero = T.cast(0, dtype)

    def slab(left, right):
        return tt + left + right

    def total_rows(N, d, left, right):
        return tiles_per_residue(N, d, tt) * tt + left + right

    def src_lo(left, right, blk):  # slab rows q whose residue position is >= 0
        return clamp(right - blk * tt, 0, slab(left, right))

    def src_hi(N, d, r, left, right, blk):
        return clamp(rows_in_residue(N, d, r) + right - blk * tt, src_lo(left, right, blk),
                     slab(left, right))

    # slab row q is valid on ii in [q - left - right, q], intersected with [0, tt), when q is in
    # [src_lo, src_hi)
    def inner_lo(left, right, q):
        return clamp(q - left - right, 0, tt)

    def inner_hi(N, d, r, left, right, blk, q):
        ok = T.Cast("int64", q >= src_lo(left, right, blk)) * T.Cast(
            "int64", q < src_hi(N, d, r, left, right, blk))
        return clamp((q + 1) * ok, inner_lo(left, right, q), tt)

    def full_row(N, d, r, left, right, blk, q):  # all tt entries of slab row q valid
        return tirx.all(q >= tt - 1, q <= left + right, q >= src_lo(left, right, blk),
                        q < src_hi(N, d, r, left, right, blk))

    @T.prim_func(s_tir=True)
    def band_tpv(g_h: T.handle, x_h: T.handle, o_h: T.handle, left: T.int64, right: T.int64,
                 d: T.int64):
        T.func_attr({"tirx.noalias": True})
        (B, N, H, D, C), (G, Xt, O) = operands("tpv", dtype, (g_h, x_h, o_h), ALIGN)
        VP = T.sblock_alloc_buffer((B, H, d, total_rows(N, d, left, right), packed_width(D, v)), dtype)
        PS = T.sblock_alloc_buffer(
            (B, H, d, tiles_per_residue(N, d, tt), slab(left, right), tt), dtype)
        tile_shape = (B, H, d, tiles_per_residue(N, d, tt), tt, packed_width(D, v))
        OT = T.sblock_alloc_buffer(tile_shape, dtype)
        OE = T.sblock_alloc_buffer(tile_shape, dtype)
        for b, h, r in T.grid(B, H, d):  # the slab operand, zero outside the sequence
            for m in range(total_rows(N, d, left, right)):
                for k in range(packed_width(D, v)):
                    with T.sblock("pack_zero"):
                        vb, vh, vr, vm, vk = T.axis.remap("SSSSS", [b, h, r, m, k])
                        T.where(m < right or m >= right + rows_in_residue(N, d, r) or k >= D)
                        VP[vb, vh, vr, vm, vk] = zero
                for k in range(D):
                    with T.sblock("pack"):
                        vb, vh, vr, vm, vk = T.axis.remap("SSSSS", [b, h, r, m, k])
                        T.where(m >= right and m < right + rows_in_residue(N, d, r))
                        VP[vb, vh, vr, vm, vk] = Xt[vb, (vm - right) * d + vr, vh, vk]
        for b, h, blk, r in T.grid(B, H, tiles_per_residue(N, d, tt), d):
            # a slab row copies tt consecutive G entries; the first and last tt - 1 slab rows (and
            # rows outside the sequence) are partial: zeros, then a copy of the row's valid range
            for o in range(slab(left, right)):
                for i in range(T.if_then_else(full_row(N, d, r, left, right, blk, o), T.int64(0),
                                              T.int64(tt))):
                    with T.sblock("shear_zero"):
                        vb, vh, vr, vblk, vo, vi = T.axis.remap("SSSSSS", [b, h, r, blk, o, i])
                        PS[vb, vh, vr, vblk, vo, vi] = zero
                for i in range(T.if_then_else(full_row(N, d, r, left, right, blk, o), T.int64(0),
                                              inner_hi(N, d, r, left, right, blk, o)
                                              - inner_lo(left, right, o))):
                    with T.sblock("shear_edge"):
                        vb, vh, vr, vblk, vo = T.axis.remap("SSSSS", [b, h, r, blk, o])
                        vi = T.axis.spatial(tt, inner_lo(left, right, o) + i)
                        PS[vb, vh, vr, vblk, vo, vi] = G[vb, (vblk * tt + vo - right) * d + vr, vh,
                                                         left + right + vi - vo]
            for o, i in T.grid(slab(left, right), T.int64(tt)):
                with T.sblock("shear"):
                    vb, vh, vr, vblk, vo, vi = T.axis.remap("SSSSSS", [b, h, r, blk, o, i])
                    T.where(full_row(N, d, r, left, right, blk, o))
                    PS[vb, vh, vr, vblk, vo, vi] = G[
                        vb, (vblk * tt + vo - right) * d + vr, vh, left + right + vi - vo]
            with T.sblock("acc_tile"):  # its own scope, so the GEMM can be scheduled alone
                for io, q, ii, k in T.grid(T.int64(tt // rows), block_mid(rows, C), T.int64(rows),
                                           packed_width(D, v)):
                    with T.sblock("acc"):  # block row ii meets slab row io * rows + rows - 1 + q
                        vb, vh, vr, vblk, vio, vq, vii, vk = T.axis.remap(
                            "SSSSSRSS", [b, h, r, blk, io, q, ii, k])
                        with T.init():
                            OT[vb, vh, vr, vblk, vio * rows + vii, vk] = zero
                        OT[vb, vh, vr, vblk, vio * rows + vii, vk] = (
                            OT[vb, vh, vr, vblk, vio * rows + vii, vk]
                            + PS[vb, vh, vr, vblk, vio * rows + (rows - 1) + vq, vio * rows + vii]
                            * VP[vb, vh, vr, vblk * tt + vio * rows + (rows - 1) + vq, vk])
            # a block row's edge slab rows, each row its own scope (the range is the row's)
            for io, ii in T.grid(T.int64(tt // rows), T.int64(rows)):
                with T.sblock("edge_row"):
                    for e, k in T.grid(edge_range(rows, C, ii)[3], packed_width(D, v)):
                        with T.sblock("acc_edge"):
                            vb, vh, vr, vblk, vio, vii = T.axis.remap("SSSSSS", [b, h, r, blk, io, ii])
                            ve = T.axis.reduce(T.int64(rows - 1), e)
                            vk = T.axis.spatial(packed_width(D, v), k)
                            with T.init():
                                OE[vb, vh, vr, vblk, vio * rows + vii, vk] = zero
                            OE[vb, vh, vr, vblk, vio * rows + vii, vk] = (
                                OE[vb, vh, vr, vblk, vio * rows + vii, vk]
                                + PS[vb, vh, vr, vblk, vio * rows + edge_col(rows, C, vii, ve),
                                     vio * rows + vii]
                                * VP[vb, vh, vr, vblk * tt + vio * rows + edge_col(rows, C, vii, ve), vk])
            for ii, k in T.grid(tt, D):
                with T.sblock("out"):
                    vb, vh, vr, vblk, vii, vk = T.axis.remap("SSSSSS", [b, h, r, blk, ii, k])
                    T.where((blk * tt + ii) * d + r < N)
                    O[vb, (vblk * tt + vii) * d + vr, vh, vk] = (
                        OT[vb, vh, vr, vblk, vii, vk] + OE[vb, vh, vr, vblk, vii, vk])

    return band_tpv.with_attr("global_symbol", "band_pv_transposed")
