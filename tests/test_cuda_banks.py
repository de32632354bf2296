"""Shared-memory bank conflicts of the CUDA kernels' inner loops, from the generated source.

The schedule interleaves each thread's register-block columns (``jj = b*TX + tx``) so that the
threads of a warp read consecutive slab rows, which the one-element row padding spreads over the
banks. This test takes TVM's CUDA source of every shipped library, evaluates the index of every
shared-memory read for the 32 threads of each warp, and counts the worst conflict: the most
distinct 4-byte words one of the 32 banks must serve (threads reading the same word share it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from longformer_tvm import _manifest

emulate = pytest.importorskip("tvm_kernels.cuda.emulate", reason="needs the TVM compiler")

PREBUILT = Path(__file__).resolve().parent.parent / "prebuilt"
ENTRIES = [e for e in _manifest.read_manifest(PREBUILT) if e.device == "cuda"]
KERNELS = {"qk": "band_qk_kernel", "pv": "band_pv_kernel", "tpv": "band_pv_transposed_kernel"}
BANKS, WORD, WARP = 32, 4, 32
ELEMENT = {"float": 4, "half": 2, "nv_bfloat16": 2}

#: Worst conflict degree per (element bytes, product): 1 is conflict-free. Before the columns
#: were interleaved (jj = tx*RJ + b) they were 3, 4, 4 (4-byte) and 2, 2, 2 (2-byte).
EXPECTED = {
    (4, "qk"): 1, (4, "pv"): 2, (4, "tpv"): 2,
    (2, "qk"): 1, (2, "pv"): 2, (2, "tpv"): 2,
}


def _indexed(text: str, name: str):
    """The index expressions of ``name[...]`` in ``text`` (brackets balanced)."""
    for m in re.finditer(re.escape(name) + r"\[", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"[": 1, "]": -1}.get(text[i], 0)
            i += 1
        yield m.start(), text[m.end():i - 1]


def shared_reads(source: str, kernel: str) -> list[tuple[str, int, str]]:
    """(buffer, element bytes, index expression) of every shared-memory read of ``kernel``."""
    m = re.search(r'extern "C" __global__ void [^;{]*\b' + kernel + r"\([^)]*\)\s*\{", source)
    end = source.find('extern "C"', m.end())
    body = source[m.end():end if end > 0 else len(source)]
    out = []
    for ctype, name in re.findall(r"__shared__\s+(?:alignas\(\d+\)\s+)?(\w+)\s+(\w+)\[", body):
        for at, index in _indexed(body, name):
            line_start = body.rfind("\n", 0, at) + 1
            if body[line_start:at].strip():  # not the target of an assignment: a read
                out.append((name, ELEMENT[ctype], index))
    return out


def _compile(index: str):
    expr = index.replace("((int)threadIdx.x)", "tx").replace("((int)threadIdx.y)", "ty")
    expr = re.sub(r"\((?:int64_t|int)\)", "", expr).replace("/", "//")
    names = sorted(set(re.findall(r"\b[A-Za-z_]\w*\b", expr)) - {"tx", "ty"})
    return compile(expr, "<index>", "eval"), names


def worst_conflict(reads, block: tuple[int, int]) -> int:
    """The most distinct words one bank serves for one warp's read, over reads and warps
    (loop variables at 0 and 1: they shift every thread alike)."""
    bx, by = block
    worst = 1
    for _, size, index in reads:
        code, names = _compile(index)
        for value in (0, 1):
            env = dict.fromkeys(names, value)
            for warp in range(bx * by // WARP):
                words: dict[int, set[int]] = {}
                for t in range(warp * WARP, (warp + 1) * WARP):
                    word = eval(code, {}, {**env, "tx": t % bx, "ty": t // bx}) * size // WORD
                    words.setdefault(word % BANKS, set()).add(word)
                worst = max(worst, max(len(w) for w in words.values()))
    return worst


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.dtype)
def test_inner_loop_bank_conflicts(entry):
    source = emulate.library_source(entry.dtype, entry.info["config"])
    got, want = {}, {}
    for product, kernel in KERNELS.items():
        knobs = entry.info["config"]["qk" if product == "qk" else "pv"]["knobs"]
        reads = shared_reads(source, kernel)
        assert reads, f"no shared-memory read found in {kernel}"
        size = reads[0][1]
        got[product] = worst_conflict(reads, (knobs["tx"], knobs["ty"]))
        want[product] = EXPECTED[size, product]
    assert got == want


def test_the_analysis_sees_a_conflict():
    """A warp reading down one column of a 32-wide float buffer: every thread in one bank."""
    reads = [("Xs", 4, "((((int)threadIdx.y) * 512) + (((int)threadIdx.x) * 32))")]
    assert worst_conflict(reads, (16, 16)) == 32
    padded = [("Xs", 4, "((((int)threadIdx.y) * 528) + (((int)threadIdx.x) * 33))")]
    assert worst_conflict(padded, (16, 16)) == 1
