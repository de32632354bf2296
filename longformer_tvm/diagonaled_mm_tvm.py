"""allenai/longformer's ``longformer.diagonaled_mm_tvm`` on this package's kernels: one import to change.

::

    from longformer.diagonaled_mm_tvm import diagonaled_mm as diagonaled_mm_tvm, mask_invalid_locations
    # becomes
    from longformer_tvm.diagonaled_mm_tvm import diagonaled_mm as diagonaled_mm_tvm, mask_invalid_locations

Both functions take allenai's arguments and give allenai's results, including one quirk of their
kernel that :func:`longformer_tvm.sliding_window_qk` does not have: its reduction adds
``padding`` once per summed index where the key is outside the sequence, so an invalid entry of
the QK product is ``padding * D`` (``D`` = head size), not ``padding``; see :func:`diagonaled_mm`.
Gradients are allenai's too (their backward is the same three band products).

Where allenai's code stops with an assertion or an error, these run: sequences shorter than 16,
``D == C``, non-contiguous inputs, a dilation given as a list, ``window=0`` in
:func:`mask_invalid_locations` (nothing to mask), and every dtype and device this package has
kernels for (allenai ships one float32 CUDA binary and compiles any other on first call).

Band layout (as in allenai's): column ``j`` of a banded (B, N, H, C) tensor is the key
``i + (j - w) * d[h]`` of query row ``i``; ``C = 2w + 1``, or ``w + 1`` when autoregressive.
"""

from __future__ import annotations

import torch

from . import ops, reference
from ._checks import Band, check_banded, check_pair, check_tensor, normalize_band
from .functional import _as_float, _spec

__all__ = ["diagonaled_mm", "mask_invalid_locations"]


def diagonaled_mm(t1: torch.Tensor, t2: torch.Tensor, w: int, d, is_t1_diagonaled: bool = False,
                  padding=0, autoregressive: bool = False) -> torch.Tensor:
    """allenai's ``diagonaled_mm``: banded query x key, or banded probabilities x value.

    Args:
        t1: (B, N, H, D) queries, or (B, N, H, C) band when ``is_t1_diagonaled``.
        t2: (B, N, H, D) keys or values.
        w: window (diagonals on each side; only before the query when ``autoregressive``).
        d: dilation: an int, or one int >= 1 per head (a 1-D integer tensor, as allenai's, or a
            sequence).
        is_t1_diagonaled: False: ``out[b,i,h,j] = <t1[b,i,h,:], t2[b,key,h,:]>``, (B, N, H, C).
            True: ``out[b,i,h,:] = sum_j t1[b,i,h,j] * t2[b,key,h,:]``, (B, N, H, D). The flag
            decides, never the shapes, so ``D == C`` is not ambiguous.
        padding: allenai's kernel sums ``padding`` in place of every term whose key is outside
            [0, N), and this function gives the same sums:

            * QK: an invalid entry is ``padding * D`` (D terms; 0 when D = 0). allenai's model
              passes ``padding=0`` and sets those entries to ``-inf`` with
              :func:`mask_invalid_locations`; for ``padding`` itself as the value, call
              :func:`longformer_tvm.sliding_window_qk` with ``padding_value=padding``.
            * PV: each output row gains ``padding`` times its number of invalid diagonals.

            allenai's kernel takes an integer (its partial sums stay exact in float32 while
            ``|padding * D| < 2**24``); a float is taken here the same way.
        autoregressive: keys at offsets ``-w*d .. 0`` only (C = w + 1).

    Returns:
        (B, N, H, C) when t1 is not banded, else (B, N, H, D).
    """
    op = "diagonaled_mm"
    if not isinstance(is_t1_diagonaled, bool):
        raise TypeError(f"{op}: is_t1_diagonaled must be a bool, got {is_t1_diagonaled!r}")
    pad = _as_float(op, "padding", padding)
    check_pair(op, ("t1", "t2"), t1, t2, last_equal=not is_t1_diagonaled)
    band = normalize_band(op, w, d, autoregressive, t1.shape[2])
    if not is_t1_diagonaled:
        head_size = t1.shape[3]
        return ops.band_qk(t1, t2, *_spec(band), pad * head_size if head_size else 0.0)
    check_banded(op, "t1", t1, band)
    out = ops.band_pv(t1, t2, *_spec(band))
    if pad != 0.0:
        out = out + pad * _invalid_diagonals(t1.shape[1], band, t1.device, out.dtype)
    return out


def _invalid_diagonals(n: int, band: Band, device, dtype) -> torch.Tensor:
    """(1, N, H, 1): how many of row i's diagonals have their key outside [0, N), per head."""
    _, valid = reference.key_index(n, band, device)  # (H, N, C)
    count = band.columns - valid.sum(dim=-1)
    return count.t().to(dtype)[None, :, :, None]


def mask_invalid_locations(input_tensor: torch.Tensor, w: int, d, autoregressive: bool) -> None:
    """allenai's ``mask_invalid_locations``: write ``-inf`` in place where a band's key leaves
    the sequence; returns None, as theirs.

    ``input_tensor`` (B, N, H, C') with any ``C' >= w + 1``: the rule reads the first ``w + 1``
    columns as the diagonals at offsets ``-w*d .. 0`` and (unless ``autoregressive``) the last
    ``w + 1`` columns as offsets ``0 .. w*d``, as allenai's does -- so a (B, N, H, 2w + 1) band
    gets ``-inf`` exactly at its out-of-sequence entries, and other widths (allenai's
    ``sliding_chunks_no_overlap`` scores, C' = 3w) are masked as allenai masks them. For w = 1,
    N = 3, C' = 3 the entries set (x)::

        x . .
        . . .
        . . x

    ``d``: an int, or one int >= 1 per head (a 1-D integer tensor or a sequence).
    """
    op = "mask_invalid_locations"
    check_tensor(op, "input_tensor", input_tensor)
    _, n, heads, width = input_tensor.shape
    band = normalize_band(op, w, d, autoregressive, heads)
    if width < w + 1:
        raise ValueError(f"{op}: input_tensor must have at least w + 1 = {w + 1} columns (the "
                         f"diagonals before the query), got input_tensor.shape={tuple(input_tensor.shape)}")
    if w == 0 or n == 0:
        return None
    device = input_tensor.device
    # any dilation past N gives the same rule (and keeps the products below inside int64)
    dils = [min(x, n) for x in band.dilation]
    dil = torch.tensor(dils, device=device).view(1, -1, 1)
    reach = w * max(dils)  # rows that can see a key outside the sequence, at each end
    cols = torch.arange(width, device=device).view(1, 1, -1)
    top = input_tensor[:, :reach]
    rows = torch.arange(top.shape[1], device=device).view(-1, 1, 1)
    top.masked_fill_(rows < dil * (w - cols), float("-inf"))  # key = i + (j - w) * d < 0
    if not autoregressive:
        bottom = input_tensor[:, max(n - reach, 0):]
        rows_left = torch.arange(bottom.shape[1] - 1, -1, -1, device=device).view(-1, 1, 1)  # N-1-i
        offset = cols - (width - w - 1)  # 0 .. w over the last w + 1 columns
        bottom.masked_fill_(rows_left < dil * offset, float("-inf"))  # key = i + offset * d >= N
    return None
