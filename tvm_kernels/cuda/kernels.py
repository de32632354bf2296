"""The band products in thread-block form (TIR), for GPUs: one block per (b, h, residue, tile).

The same residue/tile idea as :mod:`tvm_kernels.cpu.kernels`, arranged for a GPU:

* **Residues.** With dilation ``d`` the rows ``i = m*d + r`` of one residue ``r`` meet only keys of
  that residue, so inside a residue the band is undilated. Positions ``m`` below are residue
  positions; a residue holds ``rows = ceil((N - r) / d)`` of them.
* **Tiles.** A thread block owns ``TM`` consecutive positions ``m0 .. m0+TM-1`` of one residue and
  a chunk of ``TJ`` diagonals (QK) or of ``TD`` head columns (PV). For diagonals ``j0 .. j0+TJ-1``
  the tile touches the ``TM + TJ - 1`` keys ``m0 + j0 - left + s``, a *slab*: output (ii, jj)
  meets slab row ``s = ii + jj``. The slab is staged in shared memory ``KD`` head columns at a
  time, so shared memory is fixed whatever the window or head size.
* **Guards at staging, not in the loop.** Keys outside the sequence stage as zeros, so the inner
  product loops are branch-free; QK then writes ``pad`` where the key is invalid, PV zeroes the
  probabilities of invalid diagonals (whatever they hold) as it stages them. One exception: in
  PV's last chunk, columns past the last diagonal meet real slab rows, so their products are
  selected away (a select, uniform per column, not a multiplication by zero: 0 * inf is NaN).
* **fp32 accumulation** for every input dtype.

PV (``out[m] = sum_j p[m, j] v[m + j - left]``) and its adjoint
(``out[m] = sum_j g[m - right + j', C-1-j'] x[m - right + j']`` with ``j' = C-1-j``) have the same
shape: ``acc[ii, dd] += A(ii, jj) * Vs[ii + jj, dd]``. PV stages ``A`` as a TM x TJ block of P;
the adjoint stages the G rows of its slab (row-contiguous loads) and reads them sheared.

Every function takes strided tensors (any strides, unit last stride) with symbolic B, N, H, D and
scalar ``left``/``right``/``d`` (and ``pad`` for QK) -- the signature of both devices' kernels
(:func:`tvm_kernels.band.operands`).
The tile sizes are build-time constants (:class:`Tiles`); the mapping onto threads is the
schedule's (:mod:`tvm_kernels.cuda.schedules`). Unscheduled, each function is a valid sequential
program: that is how the definitions are tested without a GPU.
"""

from __future__ import annotations

import dataclasses

from tvm.script import tirx as T

from ..band import ceil_div, operands, rows_in_residue, tiles_per_residue

ACC = "float32"
#: Data alignment (bytes) the views are declared with (the 16-bit dtypes need only 2).
ALIGN = 2


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Structural tile sizes of one product (part of the function, unlike the thread mapping)."""

    tm: int  # residue positions per block
    tj: int  # diagonals per step (QK: per block; PV: per staging step)
    kd: int  # QK: head columns per staging step; PV: head columns per block (TD)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _acc(x, dtype):
    return x if dtype == ACC else T.Cast(ACC, x)


def make_qk(dtype: str, tiles: Tiles):
    """Banded Q K^T. Block (b, h, r, t, jc): rows m0 = t*TM .., diagonals j0 = jc*TJ .."""
    tm, tj, kd = tiles.tm, tiles.tj, tiles.kd
    slab = tm + tj - 1
    zero = T.cast(0, dtype)

    @T.prim_func(s_tir=True)
    def band_qk(q_h: T.handle, k_h: T.handle, o_h: T.handle, left: T.int64, right: T.int64,
                d: T.int64, pad: T.float64):
        T.func_attr({"tirx.noalias": True})
        (B, N, H, D, C), (Q, K, O) = operands("qk", dtype, (q_h, k_h, o_h), ALIGN)
        for b, h, r, t, jc in T.grid(B, H, d, tiles_per_residue(N, d, tm), ceil_div(C, tj)):
            with T.sblock("tile"):
                vb, vh, vr, vt, vjc = T.axis.remap("SSSSS", [b, h, r, t, jc])
                Qs = T.sblock_alloc_buffer((tm, kd), dtype, scope="shared")
                Ks = T.sblock_alloc_buffer((slab, kd), dtype, scope="shared")
                S = T.sblock_alloc_buffer((tm, tj), ACC, scope="local")
                for kc in range(ceil_div(D, kd)):
                    for ii, k in T.grid(tm, kd):
                        with T.sblock("load_q"):
                            vkc, vi, vk = T.axis.remap("SSS", [kc, ii, k])
                            Qs[vi, vk] = T.if_then_else(
                                vt * tm + vi < rows_in_residue(N, d, vr) and vkc * kd + vk < D,
                                Q[vb, (vt * tm + vi) * d + vr, vh, vkc * kd + vk], zero)
                    for s, k in T.grid(slab, kd):
                        with T.sblock("load_k"):
                            vkc, vs, vk = T.axis.remap("SSS", [kc, s, k])
                            Ks[vs, vk] = T.if_then_else(
                                vt * tm + vjc * tj + vs >= left
                                and vt * tm + vjc * tj + vs - left < rows_in_residue(N, d, vr)
                                and vkc * kd + vk < D,
                                K[vb, (vt * tm + vjc * tj + vs - left) * d + vr, vh, vkc * kd + vk],
                                zero)
                    for ii, jj, k in T.grid(tm, tj, kd):
                        with T.sblock("S"):
                            vkc, vi, vj, vk = T.axis.remap("RSSR", [kc, ii, jj, k])
                            with T.init():
                                S[vi, vj] = T.float32(0)
                            S[vi, vj] = S[vi, vj] + _acc(Qs[vi, vk], dtype) * _acc(Ks[vi + vj, vk], dtype)
                for ii, jj in T.grid(tm, tj):
                    with T.sblock("out"):
                        vi, vj = T.axis.remap("SS", [ii, jj])
                        if vt * tm + vi < rows_in_residue(N, d, vr) and vjc * tj + vj < C:
                            O[vb, (vt * tm + vi) * d + vr, vh, vjc * tj + vj] = T.Select(
                                vt * tm + vi + vjc * tj + vj >= left
                                and vt * tm + vi + vjc * tj + vj - left < rows_in_residue(N, d, vr),
                                T.Cast(dtype, S[vi, vj]), T.Cast(dtype, pad))

    return band_qk.with_attr("global_symbol", "band_qk")


def make_pv(dtype: str, tiles: Tiles, transposed: bool = False):
    """Banded P V, or (``transposed``) its adjoint in P. Block (b, h, r, t, dc): TM rows x TD columns.

    PV: ``acc[ii, dd] += Ps[ii, jj] * Vs[ii + jj, dd]`` with Ps the TM x TJ block of P at diagonals
    ``j0 + jj`` (zero where the key is outside the sequence) and Vs the slab of values at
    positions ``m0 + j0 - left + s``.

    Adjoint: with ``j' = C-1-j`` the source row of output m is ``m - right + j'``. Slab row s is
    source position ``m0 + j0' - right + s``; Gs[s, jj] holds its G entry at column
    ``C-1-(j0'+jj)`` (a row-contiguous load), and ``acc[ii, dd] += Gs[ii + jj, jj] * Xs[ii + jj, dd]``.
    """
    tm, tj, td = tiles.tm, tiles.tj, tiles.kd
    slab = tm + tj - 1
    zero = T.cast(0, dtype)
    name = "band_pv_transposed" if transposed else "band_pv"
    a_rows = slab if transposed else tm

    def lead(left, right):
        return right if transposed else left

    @T.prim_func(s_tir=True)
    def band_pv(p_h: T.handle, v_h: T.handle, o_h: T.handle, left: T.int64, right: T.int64,
                d: T.int64):
        T.func_attr({"tirx.noalias": True})
        (B, N, H, D, C), (P, V, O) = operands("pv", dtype, (p_h, v_h, o_h), ALIGN)
        for b, h, r, t, dc in T.grid(B, H, d, tiles_per_residue(N, d, tm), ceil_div(D, td)):
            with T.sblock("tile"):
                vb, vh, vr, vt, vdc = T.axis.remap("SSSSS", [b, h, r, t, dc])
                As = T.sblock_alloc_buffer((a_rows, tj), dtype, scope="shared")
                Vs = T.sblock_alloc_buffer((slab, td), dtype, scope="shared")
                acc = T.sblock_alloc_buffer((tm, td), ACC, scope="local")
                for jc in range(ceil_div(C, tj)):
                    for ai, jj in T.grid(a_rows, tj):
                        with T.sblock("load_a"):
                            vjc, va, vj = T.axis.remap("SSS", [jc, ai, jj])
                            if transposed:
                                # source position vt*tm + jc*tj + va - right, column C-1-(jc*tj+vj)
                                As[va, vj] = T.if_then_else(
                                    vt * tm + vjc * tj + va >= right
                                    and vt * tm + vjc * tj + va - right < rows_in_residue(N, d, vr)
                                    and vjc * tj + vj < C,
                                    P[vb, (vt * tm + vjc * tj + va - right) * d + vr, vh,
                                      C - 1 - (vjc * tj + vj)], zero)
                            else:
                                # row vt*tm + va, diagonal jc*tj + vj, key row + diagonal - left
                                As[va, vj] = T.if_then_else(
                                    vt * tm + va < rows_in_residue(N, d, vr) and vjc * tj + vj < C
                                    and vt * tm + va + vjc * tj + vj >= left
                                    and vt * tm + va + vjc * tj + vj - left < rows_in_residue(N, d, vr),
                                    P[vb, (vt * tm + va) * d + vr, vh, vjc * tj + vj], zero)
                    for s, dd in T.grid(slab, td):
                        with T.sblock("load_v"):
                            vjc, vs, vd = T.axis.remap("SSS", [jc, s, dd])
                            Vs[vs, vd] = T.if_then_else(
                                vt * tm + vjc * tj + vs >= lead(left, right)
                                and vt * tm + vjc * tj + vs - lead(left, right) < rows_in_residue(N, d, vr)
                                and vdc * td + vd < D,
                                V[vb, (vt * tm + vjc * tj + vs - lead(left, right)) * d + vr, vh,
                                  vdc * td + vd], zero)
                    for ii, dd, jj in T.grid(tm, td, tj):
                        with T.sblock("acc"):
                            vjc, vi, vd, vj = T.axis.remap("RSSR", [jc, ii, dd, jj])
                            with T.init():
                                acc[vi, vd] = T.float32(0)
                            # Where TJ does not divide C, the last chunk's columns past C
                            # hold zero weights yet meet real slab rows: select, not multiply
                            # by zero, so that an inf there cannot become NaN (0 * inf).
                            if transposed:
                                acc[vi, vd] = acc[vi, vd] + T.Select(
                                    vjc * tj + vj < C,
                                    _acc(As[vi + vj, vj], dtype) * _acc(Vs[vi + vj, vd], dtype),
                                    T.float32(0))
                            else:
                                acc[vi, vd] = acc[vi, vd] + T.Select(
                                    vjc * tj + vj < C,
                                    _acc(As[vi, vj], dtype) * _acc(Vs[vi + vj, vd], dtype),
                                    T.float32(0))
                for ii, dd in T.grid(tm, td):
                    with T.sblock("out"):
                        vi, vd = T.axis.remap("SS", [ii, dd])
                        if vt * tm + vi < rows_in_residue(N, d, vr) and vdc * td + vd < D:
                            O[vb, (vt * tm + vi) * d + vr, vh, vdc * td + vd] = T.Cast(dtype, acc[vi, vd])

    return band_pv.with_attr("global_symbol", name)


def make(product: str, dtype: str, tiles: Tiles):
    """The definition of ``product`` (qk, pv or tpv: PV's adjoint) at ``tiles``."""
    if product == "qk":
        return make_qk(dtype, tiles)
    return make_pv(dtype, tiles, transposed=product == "tpv")
