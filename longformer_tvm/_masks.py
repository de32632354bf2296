"""Which keys and queries the attention layer masks: padding, global tokens and their index.

Shapes: ``B`` batch, ``N`` sequence length, ``H`` heads, ``C`` band columns, ``G`` the largest
number of global tokens of any sample. A padding token is never global (the layer clears it).

A global key leaves every local query's band (it is seen through its own global column instead),
and so does a padding key. For w = 1, N = 5 and key 2 global, the band's remaining entries are::

    1 1 0 0 0
    1 1 0 0 0
    0 1 0 1 0
    0 0 0 1 1
    0 0 0 1 1
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import Band


class GlobalIndex:
    """Positions of the global tokens per sample, packed to (B, G) in ascending order.

    ``index[b, g]``: position of sample b's g-th global token (0 past its count);
    ``valid[b, g]``: g < count of sample b; ``count``: G, the largest count in the batch.
    """

    def __init__(self, index: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor, slots: torch.Tensor) -> None:
        self.index, self.valid = index, valid
        self._rows, self._cols, self._slots = rows, cols, slots
        self.count = index.shape[1]

    @classmethod
    def from_mask(cls, is_global: torch.Tensor) -> GlobalIndex:
        rows, cols = is_global.nonzero(as_tuple=True)  # row-major: ascending position per sample
        counts = is_global.sum(dim=1)
        g = int(counts.max())
        slots = (is_global.cumsum(dim=1) - 1)[rows, cols]
        index = torch.zeros(is_global.shape[0], g, dtype=torch.long, device=is_global.device)
        index[rows, slots] = cols
        valid = torch.arange(g, device=is_global.device) < counts.unsqueeze(1)
        return cls(index, valid, rows, cols, slots)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of t (B, N, ...) at the global positions: (B, G, ...) (slot 0's row past a count)."""
        batch = torch.arange(t.shape[0], device=t.device).unsqueeze(1)
        return t[batch, self.index]

    def key_mask(self, n: int, autoregressive: bool) -> torch.Tensor:
        """(B, N, G) True where query row i must not see global slot g."""
        off = ~self.valid.unsqueeze(1)
        if autoregressive:
            rows = torch.arange(n, device=self.index.device).view(1, n, 1)
            off = off | (self.index.unsqueeze(1) > rows)
        return off.expand(-1, n, -1)

    def nonzero_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows, self._cols

    def nonzero_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows, self._slots


class TokenMasks(NamedTuple):
    """The layer's per-token masks for one call, with every empty mask made None.

    * ``padding``: (B, N) bool, True at padding tokens; None when there is no padding.
    * ``is_global``: (B, N) bool, True at global tokens (never at padding); None when none is.
    * ``glob``: the :class:`GlobalIndex` of ``is_global``; None exactly when ``is_global`` is.
    """

    padding: torch.Tensor | None
    is_global: torch.Tensor | None
    glob: GlobalIndex | None

    @classmethod
    def build(cls, is_masked: torch.Tensor | None, is_global: torch.Tensor | None) -> TokenMasks:
        """From (B, N) bool masks or None; ``is_global`` must be False wherever ``is_masked`` is True."""
        if is_masked is not None and not is_masked.any():
            is_masked = None
        if is_global is not None and not is_global.any():
            is_global = None
        return cls(is_masked, is_global, None if is_global is None else GlobalIndex.from_mask(is_global))

    def removed_keys(self) -> torch.Tensor | None:
        """(B, N) True at the keys that leave the band (padding and global), or None."""
        return _or(self.padding, self.is_global)

    def kept_rows(self) -> torch.Tensor | None:
        """(B, N) True at the queries whose band result is used (neither padding nor global), or None."""
        removed = self.removed_keys()
        return None if removed is None else ~removed

    def padding_rows(self) -> torch.Tensor | None:
        """``padding`` as (B, N, 1, 1), to zero padding rows of a (B, N, H, ...) tensor; or None."""
        return None if self.padding is None else self.padding[:, :, None, None]


def remove_keys_(scores: torch.Tensor, removed: torch.Tensor, band: Band, value: float) -> None:
    """Set ``scores[b, i, h, j] = value`` wherever the band key of (i, j, h) is flagged in removed (B, N).

    A few flagged keys (a handful of global tokens) touch only ``count * C`` entries per head, so
    they are written by index; many (long padding) take one masked pass over the scores.
    """
    bsz, n = removed.shape
    rows, keys = removed.nonzero(as_tuple=True)
    if 16 * keys.numel() > bsz * n:
        scores.masked_fill_(band_key_mask(removed, band), value)
        return
    cols = torch.arange(band.columns, device=scores.device)
    for h0, h1, d in band.head_runs():
        query = keys.unsqueeze(1) - (cols - band.left).unsqueeze(0) * d  # (K, C): rows that see the key
        ok = (query >= 0) & (query < n)
        b_idx = rows.unsqueeze(1).expand_as(query)[ok]
        j_idx = cols.unsqueeze(0).expand_as(query)[ok]
        scores[:, :, h0:h1][b_idx, query[ok], :, j_idx] = value


def band_key_mask(flags: torch.Tensor, band: Band) -> torch.Tensor:
    """Per-key flags (B, N) seen through the band: (B, N, H', C) with ``out[b,i,h,j] = flags[b, key]``.

    ``key = i + (j - left) * dilation[h]``; entries whose key is outside [0, N) are False. H' is 1
    when all heads share a dilation, else H. Built from strided views of the padded flags.
    """
    cols = band.columns
    per_dil = {}
    for d in sorted(set(band.dilation)):
        padded = F.pad(flags, (band.left * d, band.right * d), value=False)
        per_dil[d] = padded.unfold(1, (cols - 1) * d + 1, 1)[..., ::d]  # (B, N, C)
    if len(per_dil) == 1:
        return next(iter(per_dil.values())).unsqueeze(2)
    return torch.stack([per_dil[d] for d in band.dilation], dim=2)


def mask_global_rows_(scores: torch.Tensor, glob: GlobalIndex, padding: torch.Tensor | None,
                      autoregressive: bool, value: float) -> None:
    """The global queries' scores (B, H, G, N), in place: ``value`` where a query sees no key.

    Rows past a sample's count first, then padding keys (``padding`` (B, N) or None), then keys
    after the query when autoregressive: transformers' order (the filler rows come out uniform
    over all N).
    """
    n = scores.shape[-1]
    scores.masked_fill_(~glob.valid[:, None, :, None], value)
    if padding is not None:
        scores.masked_fill_(padding[:, None, None, :], value)
    if autoregressive:
        future = torch.arange(n, device=scores.device).view(1, 1, n) > glob.index.unsqueeze(-1)
        scores.masked_fill_(future.unsqueeze(1), value)


def _or(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a | b
