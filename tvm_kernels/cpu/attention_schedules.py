"""CPU schedules for the fused attention kernels (:mod:`.attention`, :mod:`.attention_grad`).

As for the band products (:mod:`.schedules`), each schedule takes a :class:`tvm.s_tir.Schedule`
and a ``knobs`` mapping; a knob left ``None`` is sampled from :data:`SPACE` with
``sch.sample_categorical`` (the MetaSchedule tuning space) and every knob is recorded as a block
annotation (``lftvm_knob_<name>``), so a tuned trace replays exactly on the symbolic function.

Knobs of every GEMM (``<gemm>_rows`` x ``<gemm>_cols`` register block; cols counts V-lane panels
or head-dim vectors):

* forward: ``s`` (S = Q K^T, cols = key panels), ``o`` (O = P V, cols = head-dim vectors);
* backward: ``s`` and ``dp`` (S and dP = dO V^T, key panels), ``dq`` (dQ = dS K, head-dim
  vectors).

The tile height (``tm``: tiles of ``V * tm`` query rows) shapes the formulation's buffers and is a
build parameter of :func:`tvm_kernels.cpu.attention.make_attention` (:data:`TILE_TM`). So is the
backward's ``dkv`` register block (dK += dS^T Q and dV += P^T dO: ``dkv_rows`` slab keys x
``dkv_cols`` head-dim vectors, :data:`DKV_BLOCK`), which the formulation spells out because it
adds into the unit's sums in place.
"""

from __future__ import annotations

from tvm import s_tir

from . import schedules
from .schedules import KNOB_PREFIX, _block, _register_block

#: Candidate values per knob. Rows must divide the tile height V * tm.
SPACE = {
    "attention": {"s_rows": [4, 8, 12, 16], "o_rows": [4, 8], "o_cols": [1, 2, 4]},
    "attention_grad": {"s_rows": [4, 8, 12, 16], "dp_rows": [4, 8, 12, 16], "dq_rows": [4, 8],
                       "dq_cols": [1, 2, 4]},
}

#: Hand schedules by vector register file (32: AVX-512, 16: AVX2 / SSE).
HAND = {
    32: {"attention": {"s_rows": 8, "o_rows": 4, "o_cols": 4},
         "attention_grad": {"s_rows": 8, "dp_rows": 8, "dq_rows": 4, "dq_cols": 4}},
    16: {"attention": {"s_rows": 4, "o_rows": 4, "o_cols": 2},
         "attention_grad": {"s_rows": 4, "dp_rows": 4, "dq_rows": 4, "dq_cols": 2}},
}

#: Tile height in vectors (tiles of V * TILE_TM rows), by dtype: the hand structure.
TILE_TM = {"float32": 2, "float64": 4}
#: The tile heights tuning tries (a structural choice: the formulation's buffers follow it).
TILE_TMS = {"float32": [2, 1], "float64": [4, 2]}


#: The backward's dK/dV register block (slab keys, head-dim vectors) by vector register file.
DKV_BLOCK = {32: (4, 4), 16: (4, 2)}


def structures(dtype: str, product: str = "attention", isa: str = "avx512") -> list[dict]:
    """The fused kernels' structural choices, the hand one first: the forward's tile heights
    (``make_attention``'s ``tm``); the backward's one structure (tile height and dK/dV block)."""
    if product == "attention":
        return [{"tm": tm} for tm in TILE_TMS[dtype]]
    rows, cols = DKV_BLOCK[schedules._registers(isa)]
    return [{"tm": TILE_TM[dtype], "dkv_rows": rows, "dkv_cols": cols}]


def hand_knobs(product: str, isa: str) -> dict:
    return dict(HAND[schedules._registers(isa)][product])


def _knob(sch: s_tir.Schedule, product: str, knobs: dict, name: str, block):
    return schedules._knob(sch, product, knobs, name, block, space=SPACE)


def key_gemm(sch, product, knobs, name: str, knob: str, v: int) -> None:
    """A (slab keys, tile rows) x reduction GEMM -- loops (c, ii, k) -- as a rows x tile register
    block: ``rows`` keys by the tile's TT / V vectors of query rows; the keys' entries broadcast,
    the transposed tile's rows loaded as vectors."""
    block = _block(sch, name)
    c, ii, k = sch.get_loops(block)[-3:]
    co, ci = sch.split(c, [None, _knob(sch, product, knobs, f"{knob}_rows", block)])
    iv, il = sch.split(ii, [None, v])
    sch.reorder(co, k, ci, iv, il)
    _register_block(sch, block, None, co, k, rows=ci, cols=iv, lanes=il)


def row_gemm(sch, product, knobs, name: str, knob: str, v: int) -> None:
    """A (rows, packed head dim) x reduction GEMM -- loops (ii, kk, c) -- as a rows x (cols * V)
    register block, the left operand broadcast, the right one's rows loaded as vectors."""
    block = _block(sch, name)
    ii, kk, c = sch.get_loops(block)[-3:]
    ko, kv, kl = sch.split(kk, [None, _knob(sch, product, knobs, f"{knob}_cols", block), v])
    iio, iii = sch.split(ii, [None, _knob(sch, product, knobs, f"{knob}_rows", block)])
    sch.reorder(ko, iio, c, iii, kv, kl)
    _register_block(sch, block, None, iio, c, rows=iii, cols=kv, lanes=kl)


def tile_reduction(sch, name: str) -> None:
    """A reduction over slab keys per tile row (loops c, ii; c reduced): vectorised over rows."""
    block = _block(sch, name)
    sch.vectorize(sch.get_loops(block)[-1])
    init = sch.decompose_reduction(block, sch.get_loops(block)[-2])
    sch.vectorize(sch.get_loops(init)[-1])


def vectorize_last(sch, name: str, v: int) -> None:
    """An elementwise block whose last loop is a multiple of V: vectorised V at a time."""
    block = _block(sch, name)
    _, inner = sch.split(sch.get_loops(block)[-1], [None, v])
    sch.vectorize(inner)


def schedule_attention(sch: s_tir.Schedule, knobs: dict, v: int) -> None:
    """Parallel over work units; the two GEMMs register-blocked, the softmax vectorised over the
    tile's rows."""
    sch.parallel(sch.fuse(*sch.get_loops(_block(sch, "flag"))[:4]))
    for name in ("max_lo", "max_mid", "max_hi", "sum"):
        tile_reduction(sch, name)
    key_gemm(sch, "attention", knobs, "S", "s", v)
    row_gemm(sch, "attention", knobs, "O", "o", v)
    for name in ("exp_lo", "exp", "exp_hi", "max"):
        vectorize_last(sch, name, v)


def schedule_attention_grad(sch: s_tir.Schedule, knobs: dict, v: int) -> None:
    """The formulation's loops are already parallel (the two phases of units, each zeroing its
    own sums); S, dP and dQ register-blocked (dK and dV are, by the formulation), P and dS
    vectorised over the tile's rows."""
    for name in ("S", "dP"):
        key_gemm(sch, "attention_grad", knobs, name, name.lower(), v)
    row_gemm(sch, "attention_grad", knobs, "dQ", "dq", v)
    # rowsum(dO * O): V lanes of partial sums per row (LLVM does not vectorise a float reduction
    # by itself), then their sum
    rowsum = _block(sch, "rowsum")
    _, lanes = sch.split(sch.get_loops(rowsum)[-1], [None, v])
    sch.vectorize(sch.get_loops(sch.rfactor(lanes, 0))[-1])
    for name in ("P_lo", "P", "P_hi"):
        vectorize_last(sch, name, v)
