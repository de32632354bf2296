"""The tiled formulation of the band products (TIR): each tile of rows is a small dense GEMM.

:mod:`tvm_kernels.band` states the products as the paper did, one output element at a time with a
bounds check inside the reduction. That form cannot be vectorised well. Here the same products
are restated so that the inner loops are branch-free dense GEMMs:

* **Residue layout.** With dilation ``d``, query row ``i = m*d + r`` only ever meets keys of the
  same residue ``r``. Rows are grouped by residue, so inside a residue the band is undilated.
* **Tiles.** ``TT`` consecutive rows of a residue (a tile) need keys from one contiguous slab of
  ``TT + left + right`` rows. The tile's product with the slab is a dense GEMM (about
  ``TT / (left + right + 1)`` extra work); the band is read off the tile's diagonals.
* **Packing.** The slab operand is copied once into a zero-padded buffer (``pack``), so reads past
  either end of the sequence are zeros and the reduction needs no bounds check. For QK the keys
  are packed in panels of ``V`` (the vector width) with the head dimension outside, so one vector
  load reads ``V`` consecutive keys. QK and PV pack per work unit (:class:`WorkUnits`: a run of
  tiles of one head), so the GEMM reads the slab while it is in cache; transposed PV packs each
  head's operand before the tiles (per unit it measured 1.1-1.2x faster at w <= 64 but 0.9x at
  w=256 with H > 1, where its sheared reads of G slowed: not adopted).
* **Ranges, not masks.** Where only part of a row is valid (the band's ends, the sequence's ends),
  the loop bounds are computed per row, so every inner loop is a plain copy or a plain fill.
* **Nothing outside the band meets a row,** not even times zero (``0 * inf`` is NaN), so an inf or
  NaN stays in the rows whose band holds it, as in :mod:`longformer_tvm.reference`: QK reads off
  only the band; PV's middle GEMM runs over the columns inside the sequence; both products' edges
  are per-row ranges of the band, not masks (:func:`make_pv`, :func:`.tpv.make_tpv`).
* **PV reads P where it lies.** The sheared copy of P that a slab GEMM needs costs as much
  memory traffic as the GEMM reads (P is the largest operand), and a copy does not overlap the
  arithmetic. PV instead broadcasts P's entries straight from its rows in the GEMM, in groups of
  rows for which every middle slab column is inside the band; only the group's few edge columns
  are per row, and the next group's rows of P are prefetched (:func:`make_pv`).
  Transposed PV, whose P operand runs along diagonals, keeps the copy; its GEMM's blocks of
  ``TPV_ROWS`` rows split like PV's groups, into a middle and per-row edges (:func:`.tpv.make_tpv`).

Every function takes strided tensors (any strides, unit last stride) with symbolic B, N, H, D and
scalar window extents ``left``/``right`` (C = left + right + 1) and dilation ``d``; one compiled
library serves every shape. Sizes, strides and indices are 64-bit. QK writes ``pad`` where the key
falls outside the sequence. Signatures (``V``, ``TM``, PV's group, TPV's row block: build-time)::

    band_qk (q, k, out[B,N,H,C], left, right, d, pad)
    band_pv (p[B,N,H,C], v, out[B,N,H,D], left, right, d)
    band_pv_transposed (g[B,N,H,C], x, out[B,N,H,D], left, right, d)
"""

from __future__ import annotations

from tvm import DataType, tirx
from tvm.script import tirx as T

from ..band import ceil_div, operands, rows_in_residue, tiles_per_residue

#: Slab panels are rounded up to a multiple of this many by default (``make_qk``'s panel_round).
QK_PANEL_ROUND = 2
#: QK's work units hold up to this many rows (:class:`WorkUnits`).
QK_UNIT_ROWS = 1024
#: Packed head dimension is rounded up to a multiple of this many vectors (PV microkernel width).
PV_VEC_ROUND = 4
#: Head-dim vectors per pass of PV's middle GEMM (its register block width); divides PV_VEC_ROUND.
PV_VECS = 2
#: TVM keeps a "global" buffer on the stack (where LLVM can hold it in registers) below this size.
STACK_BUFFER_BYTES = 1024
CACHE_LINE_BYTES = 64
#: Transposed PV's register block height (:func:`.tpv.make_tpv`): 4 x ``vecs`` accumulators.
TPV_ROWS = 4
#: Transposed PV's tile height (rows of output per tile; a multiple of its register block).
TPV_TILE = 64
#: PV's work units hold up to this many rows (more for wide bands; :func:`make_pv`).
PV_UNIT_ROWS = 2048


def pv_block_bytes(dtype: str, v: int, group: int, vecs: int = PV_VECS) -> int:
    """Bytes of PV's register block; it must stay under :data:`STACK_BUFFER_BYTES`."""
    return group * vecs * v * DataType(dtype).bits // 8


def clamp(x, lo, hi):
    return T.max(T.min(x, hi), lo)


def qk_slab_panels(left, right, tt, v, panel_round: int = QK_PANEL_ROUND):
    return ceil_div(tt + left + right, v * panel_round) * panel_round


def packed_width(dim, v):
    return ceil_div(dim, v * PV_VEC_ROUND) * (v * PV_VEC_ROUND)


def block_mid(block, C):  # slab columns, from block - 1, in the band of every row of a block
    return T.max(C - (block - 1), T.int64(0))


def edge_range(block, C, ii, lo=0, hi=None):
    """Row ii's edge in a register block of ``block`` rows: its band ``[ii, ii + C)`` less the
    block's middle ``[block - 1, C)``, i.e. ``[ii, min(block - 1, ii + C))`` and
    ``[max(C, block - 1), ii + C)``, both cut to ``[lo, hi)``: ``block - 1`` columns at most.
    Returns (low start, low length, high start, length)."""
    hi = ii + C if hi is None else hi
    l0, h0 = T.max(ii, lo), T.max(T.max(C, T.int64(block - 1)), lo)
    n_low = T.max(T.min(T.min(T.int64(block - 1), ii + C), hi) - l0, T.int64(0))
    return l0, n_low, h0, n_low + T.max(T.min(ii + C, hi) - h0, T.int64(0))


def edge_col(block, C, ii, e, lo=0, hi=None):  # the column of row ii's edge index e
    l0, n_low, h0, _ = edge_range(block, C, ii, lo, hi)
    return T.if_then_else(e < n_low, l0 + e, h0 + e - n_low)


class WorkUnits:
    """Work units of tiles of ``tt`` rows: a unit is a run of consecutive tiles of one (batch,
    head, residue), the parallel item; it packs its slab and then runs its tiles, so the GEMM
    reads the packed slab while it is in the core's cache, and the workspace is one unit's slab
    per thread. (Packing every head before all GEMMs wrote the slabs to memory and read them
    back: PV 1.08x, QK 1.05-1.55x slower.) A unit holds up to ``rows`` rows or four times the
    band's overlap, and there are at least two per residue, so one head spreads over two cores;
    a unit's overlap with the next is packed by both."""

    def __init__(self, tt: int, rows: int):
        self.tt, self.rows = tt, rows

    def unit_tiles(self, N, d, left, right):
        return T.min(ceil_div(T.max(T.int64(self.rows), 4 * (left + right)), self.tt),
                     ceil_div(tiles_per_residue(N, d, self.tt), 2))

    def units(self, N, d, left, right):  # per (batch, head, residue)
        return ceil_div(tiles_per_residue(N, d, self.tt),
                        T.max(self.unit_tiles(N, d, left, right), 1))

    def tile(self, N, d, left, right, u, t):  # tile t of unit u
        return u * self.unit_tiles(N, d, left, right) + t

    def unit_tile_count(self, N, d, left, right, u):  # the last unit may have fewer
        return T.min(self.unit_tiles(N, d, left, right),
                     tiles_per_residue(N, d, self.tt) - u * self.unit_tiles(N, d, left, right))

    def unit_row(self, N, d, left, right, u, m):  # residue slab row of the unit's packed row m
        return u * self.unit_tiles(N, d, left, right) * self.tt + m


#: Data alignment (bytes) the views are declared with.
ALIGN = 4


def make_qk(dtype: str, v: int, tm: int = 1, panel_round: int = QK_PANEL_ROUND):
    """Banded Q K^T. ``v``: vector lanes (panel width); ``tm``: tile rows in units of v; a tile's
    slab is a multiple of ``panel_round`` panels (the microkernel's width divides it).

    Work units (:class:`WorkUnits`) pack their panels of keys."""
    tt, zero = v * tm, T.cast(0, dtype)
    slab_panels = lambda left, right: qk_slab_panels(left, right, tt, v, panel_round)  # noqa: E731

    U = WorkUnits(tt, QK_UNIT_ROWS)
    unit_tiles, units, unit_tile_count, tile = U.unit_tiles, U.units, U.unit_tile_count, U.tile

    def row(N, d, left, right, u, t, ii):  # residue row of unit u's tile t's row ii
        return tile(N, d, left, right, u, t) * tt + ii

    def unit_panels(N, d, left, right, u):  # the panels unit u packs (its slab)
        return unit_tile_count(N, d, left, right, u) * tm + slab_panels(left, right)

    def first_panel(N, d, left, right, u):  # residue panel of the unit's packed panel 0
        return u * unit_tiles(N, d, left, right) * tm

    def packed_panels(N, d, left, right):  # a unit's packed panels (the last unit's may be fewer)
        return unit_tiles(N, d, left, right) * tm + slab_panels(left, right)

    def tile_panel(N, d, left, right, u, blk):  # unit u's packed panel where tile blk's slab starts
        return (blk - u * unit_tiles(N, d, left, right)) * tm

    def key_of(N, d, left, right, u, p, pi):  # residue key of unit u's packed panel p, lane pi
        return (first_panel(N, d, left, right, u) + p) * v + pi - left

    def key_hi(N, d, r, left):  # packed position p*v + pi holds key p*v + pi - left: keys from
        return left + rows_in_residue(N, d, r)  # position left to this one

    # the unit's panels whose v positions all hold keys: [full_lo, full_hi), unit-relative
    def full_lo(N, d, left, right, u):
        return clamp(ceil_div(left, v) - first_panel(N, d, left, right, u), 0,
                     unit_panels(N, d, left, right, u))

    def full_hi(N, d, r, left, right, u):
        return clamp(key_hi(N, d, r, left) // v - first_panel(N, d, left, right, u),
                     full_lo(N, d, left, right, u), unit_panels(N, d, left, right, u))

    def band_lo(left, C, mrow):  # first valid column of residue row mrow
        return clamp(left - mrow, 0, C)

    def band_hi(N, d, r, left, C, mrow):
        return clamp(rows_in_residue(N, d, r) - mrow + left, band_lo(left, C, mrow), C)

    @T.macro(hygienic=False)
    def pack_part(name, start, extent, masked, key_of):
        # packed position pos = key + left is panel pos // v, lane pos % v: KP[.., p, k, pi]
        # (``key_of`` comes as an argument: a macro's names resolve where it is expanded)
        for p, k, pi in T.grid(extent, D, v):
            with T.sblock(name):
                vu, vb, vh, vr, vk, vpi = T.axis.remap("SSSSSS", [u, b, h, r, k, pi])
                vp = T.axis.spatial(packed_panels(N, d, left, right), start + p)
                if masked:
                    KP[vb, vh, vr, vu, vp, vk, vpi] = T.if_then_else(
                        key_of(N, d, left, right, vu, vp, vpi) >= 0
                        and key_of(N, d, left, right, vu, vp, vpi) < rows_in_residue(N, d, vr),
                        K[vb, clamp(key_of(N, d, left, right, vu, vp, vpi) * d + vr, 0, N - 1),
                          vh, vk], zero)
                else:
                    KP[vb, vh, vr, vu, vp, vk, vpi] = K[
                        vb, key_of(N, d, left, right, vu, vp, vpi) * d + vr, vh, vk]

    @T.prim_func(s_tir=True)
    def band_qk(q_h: T.handle, k_h: T.handle, o_h: T.handle, left: T.int64, right: T.int64,
                d: T.int64, pad: T.float64):
        T.func_attr({"tirx.noalias": True})
        (B, N, H, D, C), (Q, K, O) = operands("qk", dtype, (q_h, k_h, o_h), ALIGN)
        KP = T.sblock_alloc_buffer((B, H, d, units(N, d, left, right),
                                    packed_panels(N, d, left, right), D, v), dtype)
        S = T.sblock_alloc_buffer(
            (B, H, d, tiles_per_residue(N, d, tt), tt, slab_panels(left, right), v), dtype)
        # units outermost, as PV's (the fused parallel loop splits by B, H and d)
        for u, b, h, r in T.grid(units(N, d, left, right), B, H, d):
            # panels entirely inside the sequence are plain gathers; the few others are masked
            pack_part("pack_lo", 0, full_lo(N, d, left, right, u), True, key_of)
            pack_part("pack", full_lo(N, d, left, right, u),
                      full_hi(N, d, r, left, right, u) - full_lo(N, d, left, right, u), False,
                      key_of)
            pack_part("pack_hi", full_hi(N, d, r, left, right, u),
                      unit_panels(N, d, left, right, u) - full_hi(N, d, r, left, right, u), True,
                      key_of)
            for t in range(unit_tile_count(N, d, left, right, u)):
                with T.sblock("S_tile"):  # its own scope, so the GEMM can be scheduled alone
                    for ii, qo, qi, k in T.grid(tt, slab_panels(left, right), v, D):
                        with T.sblock("S"):
                            vu, vb, vh, vr, vii, vqo, vqi, vk = T.axis.remap(
                                "SSSSSSSR", [u, b, h, r, ii, qo, qi, k])
                            vblk = T.axis.spatial(tiles_per_residue(N, d, tt),
                                                  tile(N, d, left, right, u, t))
                            with T.init():
                                S[vb, vh, vr, vblk, vii, vqo, vqi] = zero
                            S[vb, vh, vr, vblk, vii, vqo, vqi] = (
                                S[vb, vh, vr, vblk, vii, vqo, vqi]
                                + Q[vb, T.min((vblk * tt + vii) * d + vr, N - 1), vh, vk]
                                * KP[vb, vh, vr, vu, tile_panel(N, d, left, right, vu, vblk) + vqo,
                                     vk, vqi])
                for ii in range(tt):
                    for j in range(band_lo(left, C, row(N, d, left, right, u, t, ii))):
                        with T.sblock("out_lo"):
                            vb, vh, vr, vii, vj = T.axis.remap("SSSSS", [b, h, r, ii, j])
                            vblk = T.axis.spatial(tiles_per_residue(N, d, tt),
                                                  tile(N, d, left, right, u, t))
                            T.where(row(N, d, left, right, u, t, ii) * d + r < N)
                            O[vb, (vblk * tt + vii) * d + vr, vh, vj] = T.cast(pad, dtype)
                    for j in range(band_hi(N, d, r, left, C, row(N, d, left, right, u, t, ii))
                                   - band_lo(left, C, row(N, d, left, right, u, t, ii))):
                        with T.sblock("out"):
                            vb, vh, vr, vii = T.axis.remap("SSSS", [b, h, r, ii])
                            vblk = T.axis.spatial(tiles_per_residue(N, d, tt),
                                                  tile(N, d, left, right, u, t))
                            vj = T.axis.spatial(
                                C, band_lo(left, C, row(N, d, left, right, u, t, ii)) + j)
                            T.where(row(N, d, left, right, u, t, ii) * d + r < N)
                            O[vb, (vblk * tt + vii) * d + vr, vh, vj] = S[
                                vb, vh, vr, vblk, vii, (vii + vj) // v, (vii + vj) % v]
                    for j in range(C - band_hi(N, d, r, left, C, row(N, d, left, right, u, t, ii))):
                        with T.sblock("out_hi"):
                            vb, vh, vr, vii = T.axis.remap("SSSS", [b, h, r, ii])
                            vblk = T.axis.spatial(tiles_per_residue(N, d, tt),
                                                  tile(N, d, left, right, u, t))
                            vj = T.axis.spatial(
                                C, band_hi(N, d, r, left, C, row(N, d, left, right, u, t, ii)) + j)
                            T.where(row(N, d, left, right, u, t, ii) * d + r < N)
                            O[vb, (vblk * tt + vii) * d + vr, vh, vj] = T.cast(pad, dtype)

    return band_qk.with_attr("global_symbol", "band_qk")


def make_pv(dtype: str, v: int, group: int, vecs: int = PV_VECS):
    """Banded P V, reading P where it lies: no copy of P.

    Tiles of ``TT = 2 * group`` rows; each tile is ``TT / group`` groups of ``group`` rows (the
    register block, ``group`` x ``vecs`` vectors of the head dimension). Relative to its group,
    slab column q (key ``q - left`` from the group's first row) meets row ii through
    ``P[ii, q - ii]``. In the middle columns ``q`` in ``[group - 1, C)`` that entry is inside the
    band for every row of the group, so the GEMM broadcasts it straight from P's row (``acc``).
    Of the ``group - 1`` columns at either end, each row takes the ones in its band, a range per
    row (``acc_edge``). The two partial sums (OM, OE) are added when the tile is written out.

    P is the largest operand and each of its rows is a short stream (one head's row; the head's
    next row lies ``H`` rows on), which the hardware prefetcher picks up late. So the first
    head-dim pass of each group prefetches the next group's rows into L2, one cache line of each
    row per line of its columns, counted from its first (``prefetch``; 1.06x at w=256). The
    prefetch must sit inside the reduction loop, so the head-dim split (``vecs``) is part of the
    formulation here, not of the schedule; and the accumulators stay in registers across it only
    if the register block is a stack buffer, which TVM makes of a "global" buffer under 1024 bytes
    (:func:`pv_block_bytes`).

    Work units (:class:`WorkUnits`, up to :data:`PV_UNIT_ROWS` rows) pack their slab of V.

    A group's slab column holds one key for all its rows, so the middle GEMM runs over the columns
    whose key is inside the sequence, and each row's edge is cut to them too: P's entries at keys
    outside may be NaN (a softmax of a fully masked row), and a mask zeroing P's entry would make
    ``0 * inf`` = NaN of an inf in V. So an inf or NaN stays in the rows whose band holds it.
    """
    if pv_block_bytes(dtype, v, group, vecs) >= STACK_BUFFER_BYTES:
        raise ValueError(f"PV's register block ({group} rows x {vecs} x {v} {dtype}) must be under "
                         f"{STACK_BUFFER_BYTES} bytes to stay in registers")
    tt = 2 * group
    zero = T.cast(0, dtype)
    line = CACHE_LINE_BYTES * 8 // DataType(dtype).bits  # P entries per cache line
    chunk = vecs * v  # head-dim entries per pass

    U = WorkUnits(tt, PV_UNIT_ROWS)
    unit_tiles, units, tile, unit_row = U.unit_tiles, U.units, U.tile, U.unit_row
    unit_tile_count = U.unit_tile_count

    def unit_rows(N, d, left, right):  # a unit's slab; the hi edge reads group - 1 rows past it
        return unit_tiles(N, d, left, right) * tt + left + right + group

    def packed_row(N, d, left, right, u, blk, g, q):  # unit's packed row of a group's slab column
        return (blk - u * unit_tiles(N, d, left, right)) * tt + g * group + q

    def p_row(N, d, r, blk, g, ii):  # P row of a group row; rows past N read row N-1, unused
        return T.min((blk * tt + g * group + ii) * d + r, N - 1)

    # slab column q of group g of tile blk holds key blk * TT + g * group + q - left for all its rows
    def mid_lo(left, C, blk, g):  # the middle columns (from group - 1) whose key is in the sequence
        return clamp(left - (group - 1) - blk * tt - g * group, 0, block_mid(group, C))

    def mid_len(N, d, r, left, C, blk, g):
        return clamp(rows_in_residue(N, d, r) + left - (group - 1) - blk * tt - g * group,
                     mid_lo(left, C, blk, g), block_mid(group, C)) - mid_lo(left, C, blk, g)

    def mid_col(left, C, blk, g, q):  # slab column of the middle GEMM's reduction index q
        return mid_lo(left, C, blk, g) + q + (group - 1)

    def edge_n(N, d, r, left, C, blk, g, ii):  # row ii's edge, cut to the keys in the sequence
        m0 = blk * tt + g * group
        return edge_range(group, C, ii, left - m0, rows_in_residue(N, d, r) + left - m0)[3]

    def edge_q(N, d, r, left, C, blk, g, ii, e):  # slab column of group row ii's edge index e
        m0 = blk * tt + g * group
        return edge_col(group, C, ii, e, left - m0, rows_in_residue(N, d, r) + left - m0)

    @T.prim_func(s_tir=True)
    def band_pv(p_h: T.handle, v_h: T.handle, o_h: T.handle, left: T.int64, right: T.int64,
                d: T.int64):
        T.func_attr({"tirx.noalias": True})
        (B, N, H, D, C), (P, Vt, O) = operands("pv", dtype, (p_h, v_h, o_h), ALIGN)
        VP = T.sblock_alloc_buffer((B, H, d, units(N, d, left, right),
                                    unit_rows(N, d, left, right), packed_width(D, v)), dtype)
        tile_shape = (B, H, d, tiles_per_residue(N, d, tt), tt, packed_width(D, v))
        OM = T.sblock_alloc_buffer(tile_shape, dtype)
        OE = T.sblock_alloc_buffer(tile_shape, dtype)
        # units outermost: the fused parallel loop's index then splits by B, H and d; split by the
        # units' extent, TVM's LowerIntrin took minutes proving the signs of its divisions
        for u, b, h, r in T.grid(units(N, d, left, right), B, H, d):
            # the unit's slab, zero outside the sequence
            for m in range(unit_tile_count(N, d, left, right, u) * tt + left + right + group):
                for k in range(packed_width(D, v)):
                    with T.sblock("pack_zero"):
                        vb, vh, vr, vu, vm, vk = T.axis.remap("SSSSSS", [b, h, r, u, m, k])
                        T.where(unit_row(N, d, left, right, u, m) < left
                                or unit_row(N, d, left, right, u, m)
                                >= left + rows_in_residue(N, d, r) or k >= D)
                        VP[vb, vh, vr, vu, vm, vk] = zero
                for k in range(D):
                    with T.sblock("pack"):
                        vb, vh, vr, vu, vm, vk = T.axis.remap("SSSSSS", [b, h, r, u, m, k])
                        T.where(unit_row(N, d, left, right, u, m) >= left
                                and unit_row(N, d, left, right, u, m)
                                < left + rows_in_residue(N, d, r))
                        VP[vb, vh, vr, vu, vm, vk] = Vt[
                            vb, (unit_row(N, d, left, right, vu, vm) - left) * d + vr, vh, vk]
            for t in range(unit_tile_count(N, d, left, right, u)):
                # a group's GEMM in its own scope (scheduled alone; the group fixes its columns)
                for g in range(T.int64(tt // group)):
                    with T.sblock("acc_tile"):  # the columns whose key is in the sequence
                        for ko, q in T.grid(packed_width(D, v) // chunk,
                                            mid_len(N, d, r, left, C, tile(N, d, left, right, u, t), g)):
                            if ko == 0 and q % line == 0:
                                for ii in range(T.int64(group)):
                                    with T.sblock("prefetch"):  # the next group's rows, into L2
                                        T.reads()
                                        T.writes()
                                        T.evaluate(T.call_llvm_intrin(
                                            "void", "llvm.prefetch.p0",
                                            T.address_of(P[
                                                b, p_row(N, d, r, tile(N, d, left, right, u, t),
                                                         g + 1, ii),
                                                h, q + mid_lo(left, C, tile(N, d, left, right, u, t), g)]),
                                            T.int32(0), T.int32(2), T.int32(1)))
                            for ii, kv, kl in T.grid(T.int64(group), T.int64(vecs), T.int64(v)):
                                with T.sblock("acc"):
                                    vb, vh, vr, vu, vg, vii = T.axis.remap("SSSSSS", [b, h, r, u, g, ii])
                                    vblk = T.axis.spatial(tiles_per_residue(N, d, tt),
                                                          tile(N, d, left, right, u, t))
                                    vk = T.axis.spatial(packed_width(D, v), ko * chunk + kv * v + kl)
                                    vq = T.axis.reduce(block_mid(group, C), q)
                                    with T.init():
                                        OM[vb, vh, vr, vblk, vg * group + vii, vk] = zero
                                    OM[vb, vh, vr, vblk, vg * group + vii, vk] = (
                                        OM[vb, vh, vr, vblk, vg * group + vii, vk]
                                        + P[vb, p_row(N, d, vr, vblk, vg, vii), vh,
                                            mid_col(left, C, vblk, vg, vq) - vii]
                                        * VP[vb, vh, vr, vu, packed_row(
                                            N, d, left, right, vu, vblk, vg,
                                            mid_col(left, C, vblk, vg, vq)), vk])
                # a group row's edge columns, each row its own scope (the range is the row's)
                for g, ii in T.grid(T.int64(tt // group), T.int64(group)):
                    with T.sblock("edge_row"):
                        for e, k in T.grid(edge_n(N, d, r, left, C, tile(N, d, left, right, u, t), g, ii),
                                           packed_width(D, v)):
                            with T.sblock("acc_edge"):
                                vb, vh, vr, vu, vg, vii = T.axis.remap("SSSSSS", [b, h, r, u, g, ii])
                                vblk = T.axis.spatial(tiles_per_residue(N, d, tt),
                                                      tile(N, d, left, right, u, t))
                                ve = T.axis.reduce(T.int64(group - 1), e)
                                vk = T.axis.spatial(packed_width(D, v), k)
                                with T.init():
                                    OE[vb, vh, vr, vblk, vg * group + vii, vk] = zero
                                OE[vb, vh, vr, vblk, vg * group + vii, vk] = (
                                    OE[vb, vh, vr, vblk, vg * group + vii, vk]
                                    + P[vb, p_row(N, d, vr, vblk, vg, vii), vh,
                                        edge_q(N, d, vr, left, C, vblk, vg, vii, ve) - vii]
                                    * VP[vb, vh, vr, vu, packed_row(
                                        N, d, left, right, vu, vblk, vg,
                                        edge_q(N, d, vr, left, C, vblk, vg, vii, ve)), vk])
                for ii, k in T.grid(tt, D):
                    with T.sblock("out"):
                        vb, vh, vr, vii, vk = T.axis.remap("SSSSS", [b, h, r, ii, k])
                        vblk = T.axis.spatial(tiles_per_residue(N, d, tt),
                                              tile(N, d, left, right, u, t))
                        T.where((tile(N, d, left, right, u, t) * tt + ii) * d + r < N)
                        O[vb, (vblk * tt + vii) * d + vr, vh, vk] = (
                            OM[vb, vh, vr, vblk, vii, vk] + OE[vb, vh, vr, vblk, vii, vk])

    return band_pv.with_attr("global_symbol", "band_pv")
