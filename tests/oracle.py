"""Dense float64 oracles: the band products as full (N, N) matrix products under the band mask.

Independent of the per-diagonal loops in :mod:`longformer_tvm.reference`: they share only the
index rule (``key_index``), the "one predicate, two uses" of the band.
"""

from __future__ import annotations

import torch

from longformer_tvm import reference
from longformer_tvm._checks import Band


def dense_qk(q: torch.Tensor, k: torch.Tensor, band: Band, pad: float) -> torch.Tensor:
    q, k = q.double(), k.double()
    scores = torch.einsum("bihd,bjhd->bhij", q, k)  # (B, H, N, N)
    key, valid = reference.key_index(q.shape[1], band, q.device)  # (H, N, C)
    h_idx = torch.arange(q.shape[2]).view(-1, 1, 1)
    i_idx = torch.arange(q.shape[1]).view(1, -1, 1)
    banded = scores[:, h_idx, i_idx, key]  # (B, H, N, C)
    banded = torch.where(valid, banded, torch.full_like(banded, pad))
    return banded.permute(0, 2, 1, 3)


def dense_pv(p: torch.Tensor, v: torch.Tensor, band: Band) -> torch.Tensor:
    return torch.einsum("bhij,bjhd->bihd", reference.to_dense(p.double(), band), v.double())


def dense_tpv(g: torch.Tensor, x: torch.Tensor, band: Band) -> torch.Tensor:
    return torch.einsum("bhij,bihd->bjhd", reference.to_dense(g.double(), band), x.double())


def assert_close_to_oracle(got: torch.Tensor, want64: torch.Tensor, plain: torch.Tensor, *,
                           factor: float = 8.0, what: str = "") -> None:
    """``got`` may be off the float64 oracle by ``factor`` x what plain PyTorch is off at that dtype.

    Non-finite oracle entries (e.g. -inf padding) must be reproduced exactly.
    """
    got, plain = got.double(), plain.double()
    finite = torch.isfinite(want64)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ"
    assert torch.equal(got[~finite], want64[~finite]), f"{what}: non-finite values differ"
    if not finite.any():
        return
    err = (got[finite] - want64[finite]).abs().max().item()
    base = (plain[finite] - want64[finite]).abs().max().item()
    tol = factor * base + 1e-12 * (1 + want64[finite].abs().max().item())
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} (plain torch {base:.3e})"


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band, scale: float,
                    key_mask: torch.Tensor | None = None, dtype=torch.float64):
    """Sliding-window attention as a dense (N, N) softmax under the band mask: (out, lse) in
    ``dtype``. Excluded keys (outside the band or the sequence, or flagged in key_mask (B, N))
    get -inf; a row with none left gives out 0 and lse -inf."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    allowed = reference.band_mask(q.shape[1], band).unsqueeze(0)  # (1, H, N, N)
    if key_mask is not None:
        allowed = allowed & ~key_mask[:, None, None, :]
        v = v.masked_fill(key_mask[:, :, None, None], 0.0)  # never met, not even times 0
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, N)
    empty = ~allowed.any(dim=-1)
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return out, lse.masked_fill(empty.expand_as(lse), float("-inf")).permute(0, 2, 1)
