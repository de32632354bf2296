"""The attention layer's softmaxes: transformers' order (autograd, dropout) and in place (inference).

Shapes: ``B`` batch, ``N`` sequence length, ``H`` heads, ``C`` band columns, ``G`` global columns.
Both run in float32, or float64 for float64 input (:func:`softmax_dtype`), as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_dropout(scores: torch.Tensor, dtype: torch.dtype, dropout: float, training: bool,
                    zero_rows: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' order: softmax over the last dimension in :func:`softmax_dtype`, zero the rows
    flagged in ``zero_rows`` (broadcast against ``scores``, or None), cast to ``dtype``, dropout.

    ``scores`` (..., K) is not modified; returns probabilities of the same shape in ``dtype``.
    """
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype(dtype))
    if zero_rows is not None:
        probs = masked_fill(probs, zero_rows, 0.0)
    return F.dropout(probs.to(dtype), p=dropout, training=training)


def softmax_inplace(band: torch.Tensor, cols: torch.Tensor | None, self_col: int,
                    keep: torch.Tensor | None):
    """Softmax over the last dimension of ``cat((cols, band), -1)`` without building it. No autograd.

    ``band`` (B, N, H, C) is overwritten with its own softmax ``p'`` (ATen's kernel writing over its
    input: it reads a row before writing it). Without ``cols`` that is the answer. With ``cols``
    (B, N, H, G) the joint softmax is ``band * scale`` and ``cols`` (overwritten), where
    ``scale = exp(lse_band - lse_all)`` (B, N, H, 1) is returned, not applied: the caller folds it
    into the (B, N, H, D) product. ``lse_band`` comes from the band maximum and the query's own
    column ``self_col``: ``p'[self] = exp(s[self] - max) / Z``. Where that entry is too small to
    be exact, ``Z = 1 / max(p')`` instead (one more pass). ``keep`` (B, N) marks the rows whose
    result is used (others may hold anything finite).

    Returns ``(band, cols, scale)``; ``cols`` and ``scale`` are None without global columns.
    """
    if cols is None:
        torch.ops.aten._softmax.out(band, -1, False, out=band)
        return band, None, None
    # The per-row statistics are (B, N, H, 1): computed in float64, they add no rounding of
    # their own (a float32 log-sum-exp near 10 would carry an absolute error of 1e-6).
    top = band.amax(dim=-1, keepdim=True).double()
    gap = band[..., self_col: self_col + 1].double() - top  # <= 0; finite for the rows we keep
    torch.ops.aten._softmax.out(band, -1, False, out=band)
    used = torch.ones_like(gap, dtype=torch.bool) if keep is None else keep[:, :, None, None].expand_as(gap)
    if bool((used & (gap < -60.0)).any()):
        log_z = band.amax(dim=-1, keepdim=True).double().log_().neg_()
    else:
        log_z = gap - band[..., self_col: self_col + 1].double().log()
    # Rows not used get log Z = 0: any finite value keeps everything below finite.
    lse_band = top + torch.where(used, log_z, torch.zeros((), dtype=log_z.dtype))
    lse_all = torch.logaddexp(lse_band, torch.logsumexp(cols.double(), dim=-1, keepdim=True))
    cols.copy_((cols.double() - lse_all).exp_())
    return band, cols, (lse_band - lse_all).exp_().to(band.dtype)


def masked_fill(t: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """In place when nothing records t for backward (softmax saves its output)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return t.masked_fill(mask, value)
    return t.masked_fill_(mask, value)
