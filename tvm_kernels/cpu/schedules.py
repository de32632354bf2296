"""CPU schedules for the band products: the hand schedules, and the same schedules as a tuning space.

Every schedule function takes a :class:`tvm.s_tir.Schedule` holding one product and a ``knobs``
mapping. A knob is either a fixed value (hand schedule) or ``None``, in which case the function
samples it with ``sch.sample_categorical`` from :data:`SPACE` -- that is the MetaSchedule tuning
space, and the decisions land in the trace that the tuning database stores, so ``build`` replays a
tuned schedule exactly. Knob values do not depend on shapes, so a trace found at one shape applies
to the symbolic function.

Knobs (tiled formulation, see :mod:`tvm_kernels.cpu.kernels`):

* ``rows`` (QK): tile rows per microkernel pass (register block height);
* ``panels`` (QK): key panels of ``V`` lanes per pass (register block width = panels * V);
* ``vecs`` (transposed PV): head-dim vectors per pass of both its GEMMs (register block width =
  vecs * V);
* ``edge_vecs`` (PV): the same for PV's edge GEMM (one row at a time).

PV's middle GEMM has no knob: its register block is the formulation's row group by head-dim
vectors, because the loop that prefetches P's next rows is part of the formulation
(:func:`tvm_kernels.cpu.kernels.make_pv`). The transposed product's register block height is part
of its formulation too: it splits the GEMM into the slab rows in the band of the whole block and
each row's edge (:func:`tvm_kernels.cpu.tpv.make_tpv`).

Those are *structural* choices (:data:`STRUCTURES`): each value is another function (QK's tile
height ``tm`` and slab rounding ``panel_round``, PV's ``group`` and ``vecs``, transposed PV's
``rows`` and tile height ``tt``), so tuning enumerates them, each its own MetaSchedule workload
whose knobs are sampled as above (:mod:`.tune`). The first structure of each list is the hand one.
"""

from __future__ import annotations

import re

from tvm import s_tir

#: Candidate values per knob and product. ``rows`` must divide the tile height TT = V * TM.
SPACE = {
    "qk": {"rows": [4, 8, 16], "panels": [1, 2]},
    "pv": {"edge_vecs": [1, 2, 4]},
    "tpv": {"vecs": [1, 2, 4]},
}

#: The hand schedules, by vector register file: 32 registers (AVX-512) or 16 (AVX2, SSE).
#: Accumulators take rows * panels (QK), group * vecs (PV) or TPV_ROWS * vecs (transposed PV)
#: registers; the rest hold operands.
HAND = {
    32: {"qk": {"rows": 8, "panels": 2}, "pv": {"edge_vecs": 2}, "tpv": {"vecs": 4}},
    16: {"qk": {"rows": 4, "panels": 2}, "pv": {"edge_vecs": 2}, "tpv": {"vecs": 2}},
}

#: Structural choices per product, by vector register file; the first is the hand schedule's.
#: PV: 7 rows x 2 vectors are 14 accumulators, and 896 bytes in fp32 or fp64: under the
#: stack-buffer limit that keeps them in registers (:func:`tvm_kernels.cpu.kernels.pv_block_bytes`);
#: 8 rows (1024 bytes) would not be, and without the prefetch measured no faster than 7. Fewer
#: rows shorten the per-row edges that weigh on narrow bands. QK: a taller tile or a one-panel
#: slab rounding (less of a narrow band's slab computed for nothing). Transposed PV: a 2-row
#: block or a 32-row tile (its 64-row tile reads G in longer runs; :func:`.tpv.make_tpv`).
STRUCTURES = {
    32: {"qk": [{"tm": 1, "panel_round": 2}, {"tm": 2, "panel_round": 2}, {"tm": 1, "panel_round": 1}],
         "pv": [{"group": 7, "vecs": 2}, {"group": 4, "vecs": 2}, {"group": 3, "vecs": 4}],
         "tpv": [{"rows": 4, "tt": 64}, {"rows": 2, "tt": 64}, {"rows": 4, "tt": 32}]},
    16: {"qk": [{"tm": 1, "panel_round": 2}, {"tm": 2, "panel_round": 2}, {"tm": 1, "panel_round": 1}],
         "pv": [{"group": 4, "vecs": 2}, {"group": 6, "vecs": 2}, {"group": 2, "vecs": 4}],
         "tpv": [{"rows": 4, "tt": 64}, {"rows": 2, "tt": 64}, {"rows": 4, "tt": 32}]},
}


def _registers(isa: str) -> int:
    return 32 if isa == "avx512" else 16


def structures(product: str, isa: str) -> list[dict]:
    """The structural choices of a band product on an ISA level, the hand one first."""
    return [dict(s) for s in STRUCTURES[_registers(isa)][product]]


def knob_space(product: str, structure: dict | None) -> dict:
    """The knob candidates of a product under a structure: QK's register block width must divide
    its slab rounding."""
    space = {name: list(c) for name, c in SPACE[product].items()}
    if product == "qk" and structure:
        space["panels"] = [p for p in space["panels"] if structure["panel_round"] % p == 0]
    return space


def hand_knobs(product: str, isa: str, structure: dict | None = None) -> dict:
    """The hand schedule's knob values for a product on an ISA level (under ``structure``: a
    value the structure does not allow becomes its largest allowed one)."""
    knobs = dict(HAND[_registers(isa)][product])
    for name, cands in knob_space(product, structure).items():
        if name in knobs and knobs[name] not in cands:
            knobs[name] = max(cands)
    return knobs


def _blocks(func):
    """Every block of ``func``'s statement tree, depth first."""
    stack = [func.body]
    while stack:
        node = stack.pop()
        if node is None or isinstance(node, (int, float, str)):
            continue
        if hasattr(node, "iter_vars") and hasattr(node, "name_hint"):
            yield node
        for field in ("body", "block", "then_case", "else_case", "init"):
            child = getattr(node, field, None)
            if child is not None:
                stack.append(child)
        stack.extend(getattr(node, "seq", None) or [])


def _block(sch: s_tir.Schedule, base: str):
    """The block named ``base`` or ``base_<n>``: TVM suffixes the blocks of a macro's later
    expansions (the macros of :mod:`.kernels` and :mod:`.attention`)."""
    found = [str(b.name_hint) for b in _blocks(sch.mod["main"])
             if re.fullmatch(re.escape(base) + r"(_\d+)?", str(b.name_hint))]
    if len(found) != 1:
        raise ValueError(f"schedule: expected one block named {base!r}, found {found}")
    return sch.get_sblock(found[0])


KNOB_PREFIX = "lftvm_knob_"


def _knob(sch: s_tir.Schedule, product: str, knobs: dict, name: str, block, space=None):
    """A knob's value (fixed, or sampled from ``space``, default SPACE), also recorded as an
    annotation on ``block`` so a build from the scheduled module knows the knobs it was made with.
    ``knobs`` may carry ``"_space"``: the candidates under the function's structure."""
    value = knobs.get(name)
    if value is None:
        cands = knobs.get("_space", {}).get(name) or (SPACE if space is None else space)[product][name]
        value = sch.sample_categorical(candidates=cands, probs=[1.0 / len(cands)] * len(cands))
    sch.annotate(block, KNOB_PREFIX + name, value)
    return value


def knobs_in(func) -> dict:
    """The knob annotations of a scheduled product: {name: value}."""
    found: dict = {}
    for block in _blocks(func):
        for key, val in block.annotations.items():
            if str(key).startswith(KNOB_PREFIX):
                found[str(key)[len(KNOB_PREFIX):]] = int(val)
    return found


def _register_block(sch: s_tir.Schedule, block, tiles, outer, reduction, rows, cols, lanes,
                    scope: str = "local") -> None:
    """The GEMM microkernel shared by every product: accumulators in registers (a local cache
    written back at ``outer``), rows (if given) and columns unrolled, lanes vectorised, ``tiles``
    (if given) in parallel."""
    acc = sch.cache_write(block, 0, scope)
    sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
    sch.vectorize(lanes)
    sch.unroll(cols)
    if rows is not None:
        sch.unroll(rows)
    sch.vectorize(sch.get_loops(acc)[-1])
    if tiles is not None:
        sch.parallel(tiles)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_qk(sch: s_tir.Schedule, knobs: dict) -> None:
    """Parallel over work units; the S block becomes a rows x (panels*V) register-blocked GEMM."""
    # the unit loops (shared by every block) fused first, as for PV
    pack_blk = _block(sch, "pack")
    units = sch.fuse(*sch.get_loops(pack_blk)[:4])
    sch.parallel(units)
    s_blk = sch.get_sblock("S")
    ii, qo, qi, k = sch.get_loops(s_blk)[-4:]
    qoo, qoi = sch.split(qo, [None, _knob(sch, "qk", knobs, "panels", s_blk)])
    iio, iii = sch.split(ii, [None, _knob(sch, "qk", knobs, "rows", s_blk)])
    sch.reorder(qoo, iio, k, iii, qoi, qi)
    _register_block(sch, s_blk, None, iio, k, rows=iii, cols=qoi, lanes=qi)
    # the band read-off is a unit-stride row copy (LLVM vectorises it); interior panels pack
    # with one vector gather per (panel, k)
    sch.vectorize(sch.get_loops(pack_blk)[-1])


def schedule_pv(sch: s_tir.Schedule, knobs: dict, v: int) -> None:
    """Parallel over work units; the middle GEMM (acc) is a group x vecs register block whose loops
    the formulation already has (its prefetch sits in the reduction loop), with its accumulators
    in a stack buffer; the edge GEMM (acc_edge, a range of columns per row) becomes a
    1 x (edge_vecs*V) register block."""
    # The unit loops (shared by the pack and the GEMMs) are fused first: TVM 0.27's schedule
    # state otherwise edits a later block's loops in place in the function it was given, which
    # MetaSchedule replays traces on.
    units = sch.fuse(*sch.get_loops(sch.get_sblock("pack"))[:4])
    sch.unroll(sch.get_loops(sch.get_sblock("prefetch"))[-1])
    block = sch.get_sblock("acc")
    ko, q, ii, kv, kl = sch.get_loops(block)[-5:]
    # "global": a buffer under 1024 bytes is a stack alloca, which LLVM keeps in registers across
    # the prefetch; a "local" one lives in the workspace, where it cannot
    _register_block(sch, block, units, ko, q, rows=ii, cols=kv, lanes=kl, scope="global")
    edge = sch.get_sblock("acc_edge")
    e, k = sch.get_loops(edge)[-2:]
    ko, kv, kl = sch.split(k, [None, _knob(sch, "pv", knobs, "edge_vecs", edge), v])
    sch.reorder(ko, e, kv, kl)
    _register_block(sch, edge, None, ko, e, rows=None, cols=kv, lanes=kl)


def schedule_tpv(sch: s_tir.Schedule, knobs: dict, v: int) -> None:
    """Parallel over tiles; the middle GEMM (acc) becomes a rows x (vecs*V) register block over
    the formulation's row blocks (``rows``: its structure), and the edge GEMM (acc_edge, a range of slab rows per row)
    a 1 x (vecs*V) one."""
    acc_blk, pack_blk = sch.get_sblock("acc"), sch.get_sblock("pack")
    tiles = sch.fuse(*sch.get_loops(sch.get_sblock("acc_tile")))
    vecs = _knob(sch, "tpv", knobs, "vecs", acc_blk)
    io, q, ii, k = sch.get_loops(acc_blk)[-4:]
    ko, kv, kl = sch.split(k, [None, vecs, v])
    sch.reorder(ko, io, q, ii, kv, kl)
    _register_block(sch, acc_blk, tiles, io, q, rows=ii, cols=kv, lanes=kl)
    edge = sch.get_sblock("acc_edge")
    e, k = sch.get_loops(edge)[-2:]
    ko, kv, kl = sch.split(k, [None, vecs, v])
    sch.reorder(ko, e, kv, kl)
    _register_block(sch, edge, None, ko, e, rows=None, cols=kv, lanes=kl)
    sch.vectorize(sch.get_loops(sch.get_sblock("shear"))[-1])  # full slab rows: one tt-wide copy
    sch.parallel(sch.fuse(*sch.get_loops(pack_blk)[:3]))


def schedule_tiled(sch: s_tir.Schedule, product: str, knobs: dict, v: int,
                   structure: dict | None = None) -> None:
    """``product``: qk, pv or tpv; ``structure``: the function's (limits the sampled knobs)."""
    knobs = {**knobs, "_space": knob_space(product, structure)}
    if product == "qk":
        schedule_qk(sch, knobs)
    elif product == "pv":
        schedule_pv(sch, knobs, v)
    else:
        schedule_tpv(sch, knobs, v)


def schedule_naive(sch: s_tir.Schedule) -> None:
    """The paper's formulation, parallel over rows: the baseline the tiled schedules are compared with."""
    block = sch.get_sblock("band")
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(*loops[:2]))
