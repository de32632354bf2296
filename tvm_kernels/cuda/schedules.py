"""CUDA schedules for the thread-block form of the band products (:mod:`tvm_kernels.cuda.kernels`).

The definitions already say what one thread block computes (a tile of one residue) and what it
stages in shared memory; a schedule maps that onto threads:

* the tile loops (b, h, r, tile, chunk) fuse into ``blockIdx.x``;
* a ``TY x TX`` thread grid owns the tile's ``TM x TJ`` (QK) or ``TM x TD`` (PV) outputs; each thread
  accumulates an ``(TM/TY) x (TJ/TX)`` register block. Its columns are interleaved
  (``jj = b*TX + tx``, ``b`` a virtual thread) so that the threads of a warp read consecutive slab
  rows -- the slab buffers are padded by one element per row (``storage_align``), which makes
  QK's reads conflict-free in shared memory and PV's at most 2-way (tests/test_cuda_banks.py
  computes the degrees from the generated source);
* the staging loops (global -> shared) are spread over all ``TY*TX`` threads with the head column
  innermost, so a warp's loads are contiguous in global memory.

Knobs: ``ty``/``tx`` (thread grid) and ``unroll`` (explicit unroll of the reduction step).
A knob set to ``None`` is sampled from :data:`SPACE` with ``sample_categorical``: that is the
MetaSchedule design space, and the decisions are what a tuning record stores. The tile sizes
(:data:`TILES`) are structural -- part of the function -- and are chosen offline
(``build_kernels.py tune --target cuda --offline``).
"""

from __future__ import annotations

from tvm import s_tir

from .kernels import Tiles

#: Tile sizes per product kind and dtype width (bytes); see kernels.Tiles.
TILES = {
    ("qk", 4): Tiles(tm=64, tj=64, kd=16),
    ("qk", 2): Tiles(tm=64, tj=64, kd=32),
    ("pv", 4): Tiles(tm=64, tj=16, kd=64),
    ("pv", 2): Tiles(tm=64, tj=32, kd=64),
}

#: Candidate knob values. The thread grid (TY, TX) must divide (TM, TJ) (QK) or (TM, TD) (PV).
SPACE = {
    "qk": {"ty": [8, 16], "tx": [8, 16], "unroll": [1, 4, 8]},
    "pv": {"ty": [8, 16], "tx": [8, 16], "unroll": [1, 4, 8]},
}

#: The hand schedules: 256 threads, 4x4 outputs each, the reduction step unrolled by 4.
HAND = {
    "qk": {"ty": 16, "tx": 16, "unroll": 4},
    "pv": {"ty": 16, "tx": 16, "unroll": 4},
}


def _knob(sch: s_tir.Schedule, kind: str, knobs: dict, name: str):
    """A knob: its fixed value, or a sampled ExprRV (so a tuning trace replays the decision)."""
    value = knobs.get(name)
    if value is not None:
        return value
    cands = SPACE[kind][name]
    return sch.sample_categorical(candidates=cands, probs=[1.0 / len(cands)] * len(cands))


def _spread(sch: s_tir.Schedule, block, ty, tx) -> None:
    """Staging copy: its two inner loops over the TY x TX threads, head column innermost."""
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops[-2:])
    _, y, x = sch.split(fused, [None, ty, tx])
    sch.bind(y, "threadIdx.y")
    sch.bind(x, "threadIdx.x")


def _register_tile(sch: s_tir.Schedule, block, ty, tx, reduction: bool, unroll=None) -> None:
    """(ii, jj[, k]) -> (b, ty, tx[, k], a): thread (ty, tx) owns rows ty*RM + a and the
    interleaved columns b*TX + tx, b < RJ.

    ``b`` is a virtual thread (``vthread.x``): TVM unrolls it inside each thread and sizes the
    local accumulator per virtual thread, so it still compacts to RM x RJ registers although
    the thread's columns are TX apart (a plain split would give a (RJ-1)*TX+1 wide buffer).
    """
    loops = sch.get_loops(block)
    n = 3 if reduction else 2
    ii, jj = loops[-n], loops[-n + 1]
    y, a = sch.split(ii, [ty, None])
    b, x = sch.split(jj, [None, tx])
    if reduction:
        k = loops[-1]
        ko, ki = sch.split(k, [None, unroll])
        sch.reorder(b, y, x, ko, ki, a)
        sch.unroll(ki)
    else:
        sch.reorder(b, y, x, a)
    sch.unroll(a)
    sch.bind(b, "vthread.x")
    sch.bind(y, "threadIdx.y")
    sch.bind(x, "threadIdx.x")


def _common(sch: s_tir.Schedule, kind: str, knobs: dict, loads, compute: str) -> None:
    ty = _knob(sch, kind, knobs, "ty")
    tx = _knob(sch, kind, knobs, "tx")
    unroll = _knob(sch, kind, knobs, "unroll")
    tile = sch.get_sblock("tile")
    sch.bind(sch.fuse(*sch.get_loops(tile)), "blockIdx.x")
    for name in loads:
        block = sch.get_sblock(name)
        row = int(sch.get(block).writes[0].source.shape[-1])
        _spread(sch, block, ty, tx)
        # one element of padding per row: threads reading down a column spread over the banks
        sch.storage_align(block, 0, axis=0, factor=row, offset=1)
    block = sch.get_sblock(compute)
    _register_tile(sch, block, ty, tx, True, unroll)
    # the accumulator's initialisation goes before the chunk loop, with the same thread mapping
    sch.decompose_reduction(block, sch.get_loops(block)[0])
    _register_tile(sch, sch.get_sblock("out"), ty, tx, False)


def schedule(sch: s_tir.Schedule, kind: str, knobs: dict) -> None:
    """Schedule one product (``kind`` "qk", or "pv" for both PV and its adjoint) in place."""
    if kind == "qk":
        _common(sch, "qk", knobs, ("load_q", "load_k"), "S")
    else:
        _common(sch, "pv", knobs, ("load_a", "load_v"), "acc")
