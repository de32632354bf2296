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

Under ``torch.compile`` (:func:`compiling`) the masks take paths without data-dependent shapes or
branches, so that Dynamo traces them in one graph: an empty mask stays a mask of False, keys leave
the band in one masked pass, and the global index is built by scatter and its rows placed by
gather, not from ``nonzero``. The number of global tokens ``G`` is a size and is read from the
data: the only graph break, and only when ``is_global`` is given. Eager runs as before; the
results are equal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import Band


def compiling() -> bool:
    """Whether torch.compile is tracing this call (then the paths must be functional and static)."""
    return torch.compiler.is_compiling()


class GlobalIndex:
    """Positions of the global tokens per sample, packed to (B, G) in ascending order.

    ``index[b, g]``: position of sample b's g-th global token (0 past its count);
    ``valid[b, g]``: g < count of sample b; ``count``: G, the largest count in the batch.
    ``mask``: the (B, N) bool mask it was built from.
    """

    def __init__(self, index: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
                 nonzero: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        self.index, self.valid, self.mask = index, valid, mask
        self._nonzero = nonzero  # (rows, cols, slots) of the global tokens; None when compiling
        self.count = index.shape[1]

    @classmethod
    def from_mask(cls, is_global: torch.Tensor, count: int | None = None) -> GlobalIndex:
        """The index of is_global (B, N) bool; ``count`` is G when the caller has read it."""
        counts = is_global.sum(dim=1)
        g = int(counts.max()) if count is None else count
        valid = torch.arange(g, device=is_global.device) < counts.unsqueeze(1)
        if compiling():
            return cls(_scatter_index(is_global, g), valid, is_global, None)
        rows, cols = is_global.nonzero(as_tuple=True)  # row-major: ascending position per sample
        slots = (is_global.cumsum(dim=1) - 1)[rows, cols]
        index = torch.zeros(is_global.shape[0], g, dtype=torch.long, device=is_global.device)
        index[rows, slots] = cols
        return cls(index, valid, is_global, (rows, cols, slots))

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

    def put_rows_(self, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``out`` (B, N, ...) with each global token's row replaced by its slot's row of
        ``rows`` (B, G, ...): in place, or out of place while compiling. Returns the result."""
        if self._nonzero is None:  # every position gathers its slot's row; where() keeps the globals'
            slot = (self.mask.cumsum(dim=1) - 1).clamp_(min=0)  # (B, N)
            slot = slot.view(*slot.shape, *(1,) * (rows.dim() - 2)).expand(-1, -1, *rows.shape[2:])
            keep = self.mask.view(*self.mask.shape, *(1,) * (out.dim() - 2))
            return torch.where(keep, rows.gather(1, slot), out)
        b_idx, cols, slots = self._nonzero
        return out.index_put_((b_idx, cols), rows[b_idx, slots])


def _scatter_index(is_global: torch.Tensor, g: int) -> torch.Tensor:
    """:attr:`GlobalIndex.index` (B, G) without ``nonzero``: every position is scattered to its
    slot, those of non-global tokens to a spare column G, which is then dropped."""
    bsz, n = is_global.shape
    slot = torch.where(is_global, is_global.cumsum(dim=1) - 1, g)
    positions = torch.arange(n, device=is_global.device).expand(bsz, n)
    index = torch.zeros(bsz, g + 1, dtype=torch.long, device=is_global.device)
    return index.scatter_(1, slot, positions)[:, :g]


class TokenMasks(NamedTuple):
    """The layer's per-token masks for one call, with every empty mask made None.

    * ``padding``: (B, N) bool, True at padding tokens; None when there is no padding (while
      compiling: None only when no mask was given).
    * ``is_global``: (B, N) bool, True at global tokens (never at padding); None when none is.
    * ``glob``: the :class:`GlobalIndex` of ``is_global``; None exactly when ``is_global`` is.
    """

    padding: torch.Tensor | None
    is_global: torch.Tensor | None
    glob: GlobalIndex | None

    @classmethod
    def build(cls, is_masked: torch.Tensor | None, is_global: torch.Tensor | None,
              global_count: int | None = None) -> TokenMasks:
        """From (B, N) bool masks or None; ``is_global`` must be False wherever ``is_masked`` is True.
        ``global_count``: G (the largest per-sample count of ``is_global``) when the caller has read it.

        While compiling, a padding mask stays even when it is all False (masking nothing costs a
        pass, a data-dependent branch would cost a graph break), and G is the only value read from
        the data (a graph break, unless the caller has done it).
        """
        if compiling():
            if is_global is not None and global_count is None:
                global_count = int(is_global.sum(dim=1).max())
            if not global_count:
                return cls(is_masked, None, None)
            return cls(is_masked, is_global, GlobalIndex.from_mask(is_global, global_count))
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
    they are written by index; many (long padding) take one masked pass over the scores, as does
    every call while compiling (the count is data).
    """
    bsz, n = removed.shape
    if compiling():
        scores.masked_fill_(band_key_mask(removed, band), value)
        return
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
    if flags.shape[1] == 0:  # an empty sequence: no window to unfold
        heads = 1 if len(set(band.dilation)) == 1 else len(band.dilation)
        return flags.new_zeros(flags.shape[0], 0, heads, cols)
    per_dil = {}
    for d in sorted(set(band.dilation)):
        padded = F.pad(flags, (band.left * d, band.right * d), value=False)
        per_dil[d] = padded.unfold(1, (cols - 1) * d + 1, 1)[..., ::d]  # (B, N, C)
    if len(per_dil) == 1:
        return next(iter(per_dil.values())).unsqueeze(2)
    return torch.stack([per_dil[d] for d in band.dilation], dim=2)


def mask_global_rows_(scores: torch.Tensor, glob: GlobalIndex, padding: torch.Tensor | None,
                      autoregressive: bool, value: float) -> torch.Tensor:
    """The global queries' scores (B, H, G, N) with ``value`` where a query sees no key; in place
    (out of place while compiling, see :func:`fill_`). Returns the result.

    Rows past a sample's count first, then padding keys (``padding`` (B, N) or None), then keys
    after the query when autoregressive: transformers' order (the filler rows come out uniform
    over all N).
    """
    n = scores.shape[-1]
    scores = fill_(scores, ~glob.valid[:, None, :, None], value)
    if padding is not None:
        scores = fill_(scores, padding[:, None, None, :], value)
    if autoregressive:
        future = torch.arange(n, device=scores.device).view(1, 1, n) > glob.index.unsqueeze(-1)
        scores = fill_(scores, future.unsqueeze(1), value)
    return scores


def fill_(t: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``t.masked_fill_(mask, value)``; out of place while compiling, where functionalising an
    in-place write into an einsum or bmm result (a permuted view) fails ("Cannot view a tensor
    with shape ...")."""
    return t.masked_fill(mask, value) if compiling() else t.masked_fill_(mask, value)


def _or(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a | b
