"""The band products in plain PyTorch: the definition, the test oracle and the fallback backend.

Shapes: ``B`` batch, ``N`` sequence length, ``H`` heads, ``D`` head size, ``C = left + right + 1``
diagonals. For query row ``i`` and diagonal ``j`` of head ``h`` the key row is

    key(i, j, h) = i + (j - left) * dilation[h]        valid while 0 <= key < N

For ``left = right = 1`` and dilation 1, ``N = 5`` the band (rows i, columns key) is::

    1 1 0 0 0
    1 1 1 0 0
    0 1 1 1 0
    0 0 1 1 1
    0 0 0 1 1

Three products use it:

* ``band_qk(q, k)``: ``out[b,i,h,j] = <q[b,i,h,:], k[b,key(i,j,h),h,:]>`` (``padding`` where invalid),
  shape (B, N, H, C).
* ``band_pv(p, v)``: ``out[b,i,h,:] = sum_j p[b,i,h,j] * v[b,key(i,j,h),h,:]`` over valid j,
  shape (B, N, H, D).
* ``band_pv_transposed(g, x)``: the adjoint of ``band_pv`` in its first argument:
  ``out[b,m,h,:] = sum_{i,j: key(i,j,h)=m} g[b,i,h,j] * x[b,i,h,:]``, shape (B, N, H, D).

Each is computed one diagonal at a time, so memory stays linear in N. :func:`band_mask` and
:func:`to_dense` materialise the same band as dense (N, N) matrices for testing.
"""

from __future__ import annotations

import torch

from ._checks import Band

__all__ = ["key_index", "band_mask", "to_dense", "band_qk", "band_pv", "band_pv_transposed"]


def key_index(n: int, band: Band, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The band's one index rule: ``(key, valid)``, both (H, N, C); ``key`` is clamped into [0, N)."""
    d = torch.tensor(band.dilation, dtype=torch.long, device=device).view(-1, 1, 1)
    i = torch.arange(n, device=device).view(1, -1, 1)
    j = torch.arange(band.columns, device=device).view(1, 1, -1)
    key = i + (j - band.left) * d
    valid = (key >= 0) & (key < n)
    return key.clamp(0, max(n - 1, 0)), valid


def band_mask(n: int, band: Band, device=None) -> torch.Tensor:
    """Dense boolean (H, N, N) mask: ``mask[h, i, m]`` is True where key m is in row i's band."""
    key, valid = key_index(n, band, device)
    mask = torch.zeros(len(band.dilation), n, n, dtype=torch.bool, device=device)
    h, i, j = valid.nonzero(as_tuple=True)
    mask[h, i, key[h, i, j]] = True
    return mask


def to_dense(banded: torch.Tensor, band: Band, fill: float = 0.0) -> torch.Tensor:
    """Scatter a banded (B, N, H, C) tensor into dense (B, H, N, N) rows; off-band entries = fill."""
    b, n, h, c = banded.shape
    key, valid = key_index(n, band, banded.device)
    dense = torch.full((b, h, n, n), fill, dtype=banded.dtype, device=banded.device)
    hh, ii, jj = valid.nonzero(as_tuple=True)
    dense[:, hh, ii, key[hh, ii, jj]] = banded[:, ii, hh, jj]
    return dense


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[b, rows[h, i], h, :]`` for rows (H, N): returns (B, N, H, X)."""
    heads = torch.arange(x.shape[2], device=x.device).view(1, -1)
    return x[:, rows.t(), heads]


def band_qk(q: torch.Tensor, k: torch.Tensor, band: Band, padding: float = 0.0) -> torch.Tensor:
    """Banded q @ k^T: (B, N, H, D) x (B, N, H, D) -> (B, N, H, C)."""
    b, n, h, _ = q.shape
    out = torch.empty(b, n, h, band.columns, dtype=q.dtype, device=q.device)
    key, valid = key_index(n, band, q.device)
    for j in range(band.columns):
        s = (q * _gather_rows(k, key[:, :, j])).sum(-1)
        out[..., j] = torch.where(valid[:, :, j].t(), s, torch.full_like(s, padding))
    return out


def band_pv(p: torch.Tensor, v: torch.Tensor, band: Band) -> torch.Tensor:
    """Banded p @ v: (B, N, H, C) x (B, N, H, D) -> (B, N, H, D); invalid diagonals are ignored."""
    b, n, h, _ = p.shape
    out = torch.zeros(b, n, h, v.shape[3], dtype=torch.result_type(p, v), device=p.device)
    key, valid = key_index(n, band, p.device)
    for j in range(band.columns):
        ok = valid[:, :, j].t().unsqueeze(-1)  # (N, H, 1)
        term = p[..., j : j + 1] * _gather_rows(v, key[:, :, j])
        out += torch.where(ok, term, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def band_pv_transposed(g: torch.Tensor, x: torch.Tensor, band: Band) -> torch.Tensor:
    """Adjoint of :func:`band_pv` in p: (B, N, H, C) x (B, N, H, D) -> (B, N, H, D).

    Row m collects ``g[i, j] * x[i]`` from every query row i whose diagonal j lands on key m, i.e.
    ``i = m - (j - left) * dilation`` -- the same rule with the offset negated.
    """
    b, n, h, _ = g.shape
    out = torch.zeros(b, n, h, x.shape[3], dtype=torch.result_type(g, x), device=g.device)
    d = torch.tensor(band.dilation, dtype=torch.long, device=g.device).view(-1, 1)
    m = torch.arange(n, device=g.device).view(1, -1)
    heads = torch.arange(h, device=g.device)
    for j in range(band.columns):
        src = m - (j - band.left) * d  # (H, N)
        ok = ((src >= 0) & (src < n)).t().unsqueeze(-1)
        src = src.clamp(0, max(n - 1, 0))
        gj = g[:, src.t(), heads.view(1, -1), j].unsqueeze(-1)  # (B, N, H, 1)
        term = gj * _gather_rows(x, src)
        out += torch.where(ok, term, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
