"""The band products in standard tensor operators, for exporters: pad, reshape, matmul, where.

``torch.onnx.export(..., dynamo=True)`` cannot translate an opaque custom op, but it applies
every decomposition in ``torch._decomp.decomposition_table`` to ops it has no ONNX function for.
:func:`register` puts one there for each of ``band_qk``, ``band_pv`` and ``band_tpv`` (ops.py calls
it at import), so an exported graph holds only standard ONNX operators and runs at any sequence
length N: nothing below depends on N's value, and everything static (window, dilation, block size)
is an int of the op's schema. Eager execution and ``torch.compile`` keep the compiled kernels (the
decomposition table is consulted only by callers that ask for it, such as the ONNX exporter).

Shapes: ``B`` batch, ``N`` sequence length, ``H`` heads, ``D`` head size, ``C = left + right + 1``.

The scheme, for one run of heads with dilation ``d`` (runs are concatenated over heads): rows
``i = (m * S + s) * d + r`` are cut into blocks of ``S = max(C - 1, 1)`` rows per residue ``r``
(N padded up to a multiple of ``S * d``), so that a block's keys are one window of
``T = S + C - 1`` consecutive rows of the same residue -- its own block and the first ``C - 1`` rows
of the next, once the keys are shifted by ``left * d``. Then

* QK: ``(S, D) @ (D, T)`` per block, and row ``s`` keeps columns ``s .. s + C - 1``;
* PV: the banded ``(S, C)`` block laid out as ``(S, T)``, ``@ (T, D)``;
* TPV: the same ``(S, T)`` block transposed, ``@ (S, D)``, its ``T`` rows added into two blocks.

Keeping "columns ``s .. s + C - 1`` of row ``s``" is a reshape (the skew): a row-major ``(S, T)``
with ``S`` trailing zeros is an ``(S, T + 1)`` whose first ``C`` columns are those diagonals; the
reverse reshape lays a band out as dense rows. For S = 3, C = 3 (T = 5), the entries kept::

    1 1 1 0 0
    0 1 1 1 0
    0 0 1 1 1

Cost: ``T / C`` (about 2) times the band's multiply-adds, and intermediates of about twice the
band's size: memory linear in N. Results equal the reference up to the order of float additions.
Entries whose key is outside [0, N) are ``padding`` in QK and ignored in PV / TPV, as in the ops.
One difference from the ops: an inf or NaN in ``v`` (PV) or ``x`` (TPV) may make other output rows
of its block NaN (0 * inf in the block product); finite inputs are unaffected.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ._checks import Band

logger = logging.getLogger("longformer_tvm")

__all__ = ["band_qk", "band_pv", "band_tpv", "register"]


# ---- the block layout ----------------------------------------------------------------------
def _block_size(band: Band) -> int:
    return max(band.columns - 1, 1)


def _dilation(d: int, n):
    """The run's dilation, capped at N: the same band (every key off the diagonal is outside the
    sequence) with padding bounded by N instead of d. ``n`` may be symbolic."""
    return torch.sym_min(d, n)


def _valid(n, band: Band, d, device) -> torch.Tensor:
    """(N, 1, C) bool: the key of row i, diagonal j is inside [0, N)."""
    offsets = (torch.arange(band.columns, device=device) - band.left) * d
    key = torch.arange(n, device=device).view(-1, 1) + offsets
    return ((key >= 0) & (key < n)).unsqueeze(1)


def _rows_to_blocks(t: torch.Tensor, front, blocks, s: int, d) -> torch.Tensor:
    """(B, N, H, X) padded with ``front`` zero rows before and to ``blocks * s * d`` rows in all,
    as (B, blocks, H, d, s, X): ``out[b, m, h, r, u] = padded[b, (m * s + u) * d + r, h]``."""
    bsz, n, heads, x = t.shape
    t = F.pad(t, (0, 0, 0, 0, front, blocks * s * d - front - n))
    return t.view(bsz, blocks, s, d, heads, x).permute(0, 1, 4, 3, 2, 5)


def _blocks_to_rows(t: torch.Tensor, start, n) -> torch.Tensor:
    """The inverse of :func:`_rows_to_blocks`: (B, M, H, d, s, X) -> rows ``start .. start + N``."""
    bsz, blocks, heads, d, s, x = t.shape
    t = t.permute(0, 1, 4, 3, 2, 5).reshape(bsz, blocks * s * d, heads, x)
    return t[:, start: start + n]


def _windows(blocks: torch.Tensor, c: int) -> torch.Tensor:
    """(B, M + 1, H, d, S, X) -> (B, M, H, d, T, X): block m followed by the first C - 1 rows of m + 1."""
    if c == 1:
        return blocks[:, :-1]
    return torch.cat((blocks[:, :-1], blocks[:, 1:, :, :, : c - 1]), dim=4)


def _skew(dense: torch.Tensor, c: int) -> torch.Tensor:
    """(..., S, T) -> (..., S, C): ``out[..., s, j] = dense[..., s, s + j]``."""
    s, t = dense.shape[-2:]
    flat = F.pad(dense.reshape(*dense.shape[:-2], s * t), (0, s))
    return flat.view(*dense.shape[:-2], s, t + 1)[..., :c]


def _unskew(banded: torch.Tensor, t: int) -> torch.Tensor:
    """(..., S, C) -> (..., S, T) with ``out[..., s, s + j] = banded[..., s, j]``, zeros elsewhere."""
    s, c = banded.shape[-2:]
    flat = F.pad(banded, (0, t + 1 - c)).reshape(*banded.shape[:-2], s * (t + 1))
    return flat[..., : s * t].view(*banded.shape[:-2], s, t)


def _per_run(fn, band: Band, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(d, *head_slices)`` for each run of heads with equal dilation, concatenated over heads."""
    outs = [fn(d, *(t[:, :, h0:h1] for t in tensors)) for h0, h1, d in band.head_runs()]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _layout(n, band: Band, d: int):
    """(d, S, M): the capped dilation, the block size and the number of query blocks."""
    d = _dilation(d, n)
    s = _block_size(band)
    return d, s, (n + s * d - 1) // (s * d)


# ---- the products --------------------------------------------------------------------------
def band_qk(q: torch.Tensor, k: torch.Tensor, band: Band, padding: float = 0.0) -> torch.Tensor:
    """Banded q @ k^T: (B, N, H, D) x (B, N, H, D) -> (B, N, H, C); ``padding`` where invalid."""
    def run(d, q, k):
        n = q.shape[1]
        d, s, m = _layout(n, band, d)
        qb = _rows_to_blocks(q, 0, m, s, d)                                  # (B, M, H, d, S, D)
        kw = _windows(_rows_to_blocks(k, band.left * d, m + 1, s, d), band.columns)
        scores = _skew(qb @ kw.transpose(-1, -2), band.columns)              # (B, M, H, d, S, C)
        out = _blocks_to_rows(scores, 0, n)
        return torch.where(_valid(n, band, d, q.device), out, torch.full((), padding, dtype=out.dtype))

    return _per_run(run, band, q, k)


def band_pv(p: torch.Tensor, v: torch.Tensor, band: Band) -> torch.Tensor:
    """Banded p @ v: (B, N, H, C) x (B, N, H, D) -> (B, N, H, D); invalid diagonals ignored."""
    def run(d, p, v):
        n = p.shape[1]
        d, s, m = _layout(n, band, d)
        p = torch.where(_valid(n, band, d, p.device), p, torch.zeros((), dtype=p.dtype))
        pd = _unskew(_rows_to_blocks(p, 0, m, s, d), s + band.columns - 1)   # (B, M, H, d, S, T)
        vw = _windows(_rows_to_blocks(v, band.left * d, m + 1, s, d), band.columns)
        return _blocks_to_rows(pd @ vw, 0, n)

    return _per_run(run, band, p, v)


def band_tpv(g: torch.Tensor, x: torch.Tensor, band: Band) -> torch.Tensor:
    """Adjoint of :func:`band_pv` in p: (B, N, H, C) x (B, N, H, D) -> (B, N, H, D)."""
    c = band.columns

    def run(d, g, x):
        n = g.shape[1]
        d, s, m = _layout(n, band, d)
        g = torch.where(_valid(n, band, d, g.device), g, torch.zeros((), dtype=g.dtype))
        gd = _unskew(_rows_to_blocks(g, 0, m, s, d), s + c - 1)              # (B, M, H, d, S, T)
        part = gd.transpose(-1, -2) @ _rows_to_blocks(x, 0, m, s, d)         # (B, M, H, d, T, X)
        # a window's first S rows are block m's keys, the other C - 1 the start of block m + 1's
        out = F.pad(part[..., :s, :], (0, 0, 0, 0, 0, 0, 0, 0, 0, 1))        # (B, M + 1, H, d, S, X)
        if c > 1:
            out = out + F.pad(part[..., s:, :], (0, 0, 0, s - (c - 1), 0, 0, 0, 0, 1, 0))
        return _blocks_to_rows(out, band.left * d, n)

    return _per_run(run, band, g, x)


# ---- the registration ----------------------------------------------------------------------
# Contiguous, as the kernels return them: with symbolic sizes FakeTensor takes a decomposition in
# torch's table over the op's register_fake, so these strides are the ones torch.compile assumes
# (and Inductor checks) once N is dynamic.
def _qk(q, k, left, right, dilation, padding):
    return band_qk(q, k, Band(left, right, tuple(dilation)), padding).contiguous()


def _pv(p, v, left, right, dilation):
    return band_pv(p, v, Band(left, right, tuple(dilation))).contiguous()


def _tpv(g, x, left, right, dilation):
    return band_tpv(g, x, Band(left, right, tuple(dilation))).contiguous()


def register(lib: str) -> None:
    """Add the decompositions of ``lib``'s band_qk, band_pv and band_tpv to torch's table (what
    the ONNX exporter reads). A torch without that table only loses ONNX export."""
    try:
        from torch._decomp import register_decomposition
    except ImportError:  # pragma: no cover - torch moved its private table
        logger.info("torch._decomp.register_decomposition is missing: ONNX export of the band "
                    "products is unavailable with torch %s", torch.__version__)
        return
    ops = getattr(torch.ops, lib)
    for op, fn in ((ops.band_qk, _qk), (ops.band_pv, _pv), (ops.band_tpv, _tpv)):
        register_decomposition(op.default)(fn)
