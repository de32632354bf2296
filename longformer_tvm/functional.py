"""The public functional API: argument checks, then the custom ops (which carry autograd).

Two spellings of the same products:

* :func:`diagonaled_mm` -- the call of allenai/longformer's ``diagonaled_mm_tvm.diagonaled_mm``
  with this package's padding semantics. (allenai's exact results, padding quirk included, and
  their ``mask_invalid_locations``: :mod:`longformer_tvm.diagonaled_mm_tvm`, the one-import switch.)
* :func:`sliding_window_qk`, :func:`sliding_window_pv`, :func:`sliding_window_pv_transposed` --
  clearer names for the same semantics.

Band layout for ``window=w``: column ``j`` of a banded (B, N, H, C) tensor is the key at offset
``(j - w) * dilation[h]`` from the query row; ``C = 2w + 1``, or ``C = w + 1`` when autoregressive
(keys at offsets ``-w*d .. 0`` only). For w = 1, N = 4, dilation 1 the band of keys per row is::

    row 0:  [pad, k0, k1]        1 1 0 0
    row 1:  [k0,  k1, k2]        1 1 1 0
    row 2:  [k1,  k2, k3]        0 1 1 1
    row 3:  [k2,  k3, pad]       0 0 1 1

Inputs may have any strides with a unit last stride; other layouts are copied once (documented
choice for non-contiguous input). Outputs are new contiguous tensors.
"""

from __future__ import annotations

import math

import torch

from . import _fused, ops
from ._checks import Band, check_banded, check_pair, normalize_band

__all__ = ["diagonaled_mm", "sliding_window_attention", "sliding_window_qk", "sliding_window_pv",
           "sliding_window_pv_transposed"]


def _spec(band: Band) -> tuple[int, int, list[int]]:
    return band.left, band.right, list(band.dilation)


def _as_float(op: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{op}: {name} must fit a float64 (|x| < 1.8e308; use float('inf') "
                         f"for infinity), got an int of {value.bit_length()} bits") from None


def sliding_window_qk(q: torch.Tensor, k: torch.Tensor, window: int, dilation=1,
                      autoregressive: bool = False, padding_value: float = 0.0) -> torch.Tensor:
    """Banded attention scores ``s[b,i,h,j] = <q[b,i,h,:], k[b, i+(j-window)*dilation[h], h, :]>``.

    Args:
        q, k: (B, N, H, D), same dtype and device.
        window: w >= 0 diagonals on each side (any w; w * dilation >= N is fine).
        dilation: int, or one int >= 1 per head (sequence or 1-D integer tensor of length H).
        autoregressive: keep only keys at or before the query (C = w + 1).
        padding_value: value where the key falls outside [0, N) (e.g. ``-inf`` before softmax).

    Returns:
        (B, N, H, C) with C = 2w + 1, or w + 1 when autoregressive.
    """
    op = "sliding_window_qk"
    check_pair(op, ("q", "k"), q, k, last_equal=True)
    band = normalize_band(op, window, dilation, autoregressive, q.shape[2])
    return ops.band_qk(q, k, *_spec(band), _as_float(op, "padding_value", padding_value))


def sliding_window_pv(probs: torch.Tensor, v: torch.Tensor, window: int, dilation=1,
                      autoregressive: bool = False) -> torch.Tensor:
    """Banded probabilities times values: ``o[b,i,h,:] = sum_j probs[b,i,h,j] * v[b,key(i,j),h,:]``.

    Args:
        probs: (B, N, H, C), banded as returned by :func:`sliding_window_qk`; entries whose key
            falls outside [0, N) are ignored, whatever they hold.
        v: (B, N, H, D).

    Returns:
        (B, N, H, D).
    """
    op = "sliding_window_pv"
    check_pair(op, ("probs", "v"), probs, v, last_equal=False)
    band = normalize_band(op, window, dilation, autoregressive, probs.shape[2])
    check_banded(op, "probs", probs, band)
    return ops.band_pv(probs, v, *_spec(band))


def sliding_window_pv_transposed(grad: torch.Tensor, x: torch.Tensor, window: int, dilation=1,
                                 autoregressive: bool = False) -> torch.Tensor:
    """The transposed band product: ``o[b,m,h,:] = sum over (i, j) with key(i,j)=m of grad[b,i,h,j] * x[b,i,h,:]``.

    It is what backward needs (dK = dS^T Q, dV = P^T dO). grad: (B, N, H, C); x: (B, N, H, D).
    Returns (B, N, H, D).
    """
    op = "sliding_window_pv_transposed"
    check_pair(op, ("grad", "x"), grad, x, last_equal=False)
    band = normalize_band(op, window, dilation, autoregressive, grad.shape[2])
    check_banded(op, "grad", grad, band)
    return ops.band_tpv(grad, x, *_spec(band))


def diagonaled_mm(t1: torch.Tensor, t2: torch.Tensor, w: int, d, is_t1_diagonaled: bool = False,
                  padding=0, autoregressive: bool = False) -> torch.Tensor:
    """allenai/longformer's ``diagonaled_mm`` call, with this package's padding semantics.

    * ``is_t1_diagonaled=False``: t1 (B, N, H, D) x t2 (B, N, H, D) -> (B, N, H, C), ``padding``
      where the key falls outside the sequence (:func:`sliding_window_qk`).
    * ``is_t1_diagonaled=True``: t1 (B, N, H, C) x t2 (B, N, H, D) -> (B, N, H, D)
      (:func:`sliding_window_pv`); ``padding`` must be 0. The flag decides, never the shapes, so
      D == C is not ambiguous.

    ``d`` is an int or a length-H integer tensor of per-head dilations. With ``padding=0`` the
    results are allenai's. Otherwise allenai's kernel differs (an invalid QK entry is
    ``padding * D``; PV rows gain ``padding`` per invalid diagonal):
    :func:`longformer_tvm.diagonaled_mm_tvm.diagonaled_mm` reproduces that exactly.
    """
    if not isinstance(is_t1_diagonaled, bool):
        raise TypeError(f"diagonaled_mm: is_t1_diagonaled must be a bool, got {is_t1_diagonaled!r}")
    if is_t1_diagonaled:
        if _as_float("diagonaled_mm", "padding", padding) != 0.0:
            raise ValueError("diagonaled_mm: padding applies to the query x key product only; "
                             f"with is_t1_diagonaled=True it must be 0, got {padding=}")
        return sliding_window_pv(t1, t2, w, d, autoregressive)
    return sliding_window_qk(t1, t2, w, d, autoregressive, padding)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             dilation=1, autoregressive: bool = False, scale: float | None = None,
                             key_mask: torch.Tensor | None = None, return_lse: bool = False):
    """Attention of each query over the keys of its band: ``softmax(scale * q . k) . v``.

    The band is :func:`sliding_window_qk`'s (per-head dilation; keys at or before the query when
    autoregressive). Keys outside the sequence and keys flagged in ``key_mask`` are excluded from
    every row; a row with no key left outputs 0 (and its LSE is -inf). On CPU in float32/float64
    one fused kernel computes it without the (B, N, H, C) scores, forward and backward; elsewhere
    the band products do (see :mod:`longformer_tvm._fused`).

    Args:
        q, k, v: (B, N, H, D), same dtype and device.
        window, dilation, autoregressive: as for :func:`sliding_window_qk`.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        key_mask: (B, N) bool, True = the key is excluded (padding), or None.
        return_lse: also return the log-sum-exp of each row's scaled scores.

    Returns:
        out (B, N, H, D), or ``(out, lse)`` with lse (B, N, H) float32 (float64 for float64
        inputs). Gradients flow to q, k and v from both.
    """
    op = "sliding_window_attention"
    check_pair(op, ("q", "k"), q, k, last_equal=True)
    check_pair(op, ("k", "v"), k, v, last_equal=True)
    band = normalize_band(op, window, dilation, autoregressive, q.shape[2])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3]) if q.shape[3] else 1.0
    scale = _as_float(op, "scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale=}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_mask must be a bool tensor of shape (batch, seq_len) "
                            f"(True = excluded) or None, got {type(key_mask).__name__}"
                            f"{'' if not isinstance(key_mask, torch.Tensor) else f' of dtype {key_mask.dtype}'}")
        if tuple(key_mask.shape) != tuple(q.shape[:2]) or key_mask.device != q.device:
            raise ValueError(f"{op}: key_mask must have shape (batch, seq_len)={tuple(q.shape[:2])} "
                             f"on {q.device}, got shape {tuple(key_mask.shape)} on {key_mask.device}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{op}: return_lse must be a bool, got {return_lse!r}")
    out, lse = _fused.attention(q, k, v, band, scale, key_mask)
    return (out, lse) if return_lse else out
