"""Longformer self-attention (sliding window + global tokens) on the band products.

Shapes: ``B`` batch, ``N`` sequence length (any N >= 1; nothing is padded), ``E`` embedding size,
``H`` heads, ``D = E / H`` head size, ``w`` one-sided window, ``C`` band columns (``2w + 1``, or
``w + 1`` when autoregressive), ``G`` the largest number of global tokens of any sample.

Who attends to whom, for a sample with padding mask ``pad`` and global mask ``glob`` (both (N,)):

* a local (non-global, non-padding) query ``i`` attends to the keys of its band that are neither
  padding nor global, plus every global key (only those at or before ``i`` when autoregressive). The
  band of head ``h`` holds keys ``i + (j - w) * dilation[h]``, ``j = 0 .. C-1``; for w = 1, N = 5::

      1 1 0 0 0
      1 1 1 0 0
      0 1 1 1 0
      0 0 1 1 1
      0 0 0 1 1

* a global query ``p`` attends to every non-padding key (only keys ``<= p`` when autoregressive),
  through the separate projections ``query_global``, ``key_global`` and ``value_global`` (paper,
  section 3.1); its local-window result is discarded;
* a padding query outputs zeros.

This is transformers' ``LongformerSelfAttention``, computed without padding to a multiple of the
window and without chunking: scores ``qk -> mask -> softmax -> pv`` with the band ops, so memory is
O(N * (C + G)) per head and no (N, N) tensor exists. Masked scores are set to the dtype's lowest
finite value and out-of-sequence band entries to ``-inf``, and the softmax runs in float32 (float64
for float64 input), exactly as transformers does, so the two agree to rounding.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from ._checks import Band, normalize_band

logger = logging.getLogger("longformer_tvm")

__all__ = ["LongformerSelfAttention", "AttentionOutput"]

_NAME = "LongformerSelfAttention"
_PROJECTIONS = ("query", "key", "value", "query_global", "key_global", "value_global")


class AttentionOutput(NamedTuple):
    """What :meth:`LongformerSelfAttention.forward` returns.

    * ``output``: (B, N, E) attention context (before any output projection); zeros at padding.
    * ``attn_probs``: (B, N, H, G + C) or None. Columns ``0 .. G-1`` are the probabilities given to
      the sample's global tokens in ascending position order (columns past the sample's own count
      are 0); columns ``G + j`` are band diagonal ``j`` (key ``i + (j - w) * dilation[h]``). Rows of
      global tokens and of padding are 0 -- a global row's probabilities are in
      ``global_attn_probs``. This is transformers' layout.
    * ``global_attn_probs``: (B, H, G, N) or None (also None when no sample has a global token):
      row ``g`` is the attention of the sample's ``g``-th global token over all keys. Rows past the
      sample's own count are filler (uniform), as in transformers.
    """

    output: torch.Tensor
    attn_probs: torch.Tensor | None = None
    global_attn_probs: torch.Tensor | None = None


class LongformerSelfAttention(nn.Module):
    """Sliding-window self-attention with global tokens, drop-in for transformers' layer.

    Args:
        embed_dim: E, a multiple of ``num_heads``.
        num_heads: H.
        window: one-sided window w >= 0 (transformers' ``attention_window`` is ``2 * w``).
        dilation: int, or one int >= 1 per head (sequence or 1-D integer tensor of length H).
        autoregressive: each query sees only keys at or before it (band C = w + 1; global keys and
            global queries are made causal too).
        dropout: attention-probability dropout, applied in training mode.
        bias: whether the six projections have biases.

    Submodules ``query``, ``key``, ``value`` (local) and ``query_global``, ``key_global``,
    ``value_global`` are (E -> E) linear layers with transformers' names, so state dicts carry over.
    """

    def __init__(self, embed_dim: int, num_heads: int, window: int, dilation=1,
                 autoregressive: bool = False, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self._configure(embed_dim, num_heads, window, dilation, autoregressive, dropout)
        for name in _PROJECTIONS:
            setattr(self, name, nn.Linear(embed_dim, embed_dim, bias=bias))

    @classmethod
    def from_projections(cls, query: nn.Linear, key: nn.Linear, value: nn.Linear,
                         query_global: nn.Linear, key_global: nn.Linear, value_global: nn.Linear, *,
                         num_heads: int, window: int, dilation=1, autoregressive: bool = False,
                         dropout: float = 0.0, **kwargs) -> LongformerSelfAttention:
        """A layer over existing projection modules, shared (not copied): the same Parameters.

        ``kwargs`` go to the subclass's ``_configure`` (e.g. transformers' ``layer_id``).
        """
        mods = dict(query=query, key=key, value=value, query_global=query_global,
                    key_global=key_global, value_global=value_global)
        for name, mod in mods.items():
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{_NAME}.from_projections: {name} must be an nn.Linear, got "
                                f"{type(mod).__name__}")
        embed_dim = query.in_features
        for name, mod in mods.items():
            if (mod.in_features, mod.out_features) != (embed_dim, embed_dim):
                raise ValueError(f"{_NAME}.from_projections: every projection must map E -> E with "
                                 f"E={embed_dim} (query.in_features); {name} maps "
                                 f"{mod.in_features} -> {mod.out_features}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._configure(embed_dim, num_heads, window, dilation, autoregressive, dropout, **kwargs)
        for name, mod in mods.items():
            setattr(self, name, mod)
        return self

    def _configure(self, embed_dim, num_heads, window, dilation, autoregressive, dropout) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{_NAME}: {name} must be a positive int, got {name}={value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"{_NAME}: embed_dim must be a multiple of num_heads, got "
                             f"{embed_dim=}, {num_heads=}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{_NAME}: dropout must be a probability in [0, 1], got {dropout=}")
        band = normalize_band(_NAME, window, dilation, autoregressive, int(num_heads))
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout = float(dropout)
        self.band: Band = band

    @property
    def window(self) -> int:
        return self.band.left

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.band.dilation

    @property
    def autoregressive(self) -> bool:
        return self.band.autoregressive

    def extra_repr(self) -> str:
        dil = self.band.dilation[0] if len(set(self.band.dilation)) == 1 else list(self.band.dilation)
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={self.window}, "
                f"dilation={dil}, autoregressive={self.autoregressive}, dropout={self.dropout}")

    # ---- public entry point ------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                global_attention_mask: torch.Tensor | None = None,
                output_attentions: bool = False) -> AttentionOutput:
        """Attend.

        Args:
            hidden_states: (B, N, E), any N >= 1.
            attention_mask: (B, N), optional; nonzero / True where the token is real, 0 / False
                at padding (transformers' convention).
            global_attention_mask: (B, N), optional; nonzero / True for tokens with global
                attention. Any number per sample, different across the batch. A padding token
                stays padding even if marked global.
            output_attentions: also return the probabilities (see :class:`AttentionOutput`).

        Returns:
            :class:`AttentionOutput` ``(output (B, N, E), attn_probs, global_attn_probs)``.
        """
        self._check_hidden(hidden_states)
        shape = tuple(hidden_states.shape[:2])
        masked = None if attention_mask is None else ~self._as_bool("attention_mask", attention_mask, shape)
        glob = None
        if global_attention_mask is not None:
            glob = self._as_bool("global_attention_mask", global_attention_mask, shape)
            if masked is not None:
                glob = glob & ~masked
        return self.attend(hidden_states, masked, glob, output_attentions)

    def _check_hidden(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_NAME}: hidden_states must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.embed_dim or x.shape[1] < 1:
            raise ValueError(f"{_NAME}: hidden_states must have shape (batch, seq_len >= 1, "
                             f"embed_dim={self.embed_dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{_NAME}: hidden_states must be floating point, got {x.dtype}")

    @staticmethod
    def _as_bool(name: str, mask, shape: tuple[int, int]) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{_NAME}: {name} must be a torch.Tensor of shape (batch, seq_len), got "
                            f"{type(mask).__name__}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"{_NAME}: {name} must have shape (batch, seq_len)={shape}, got "
                             f"{tuple(mask.shape)}")
        return mask if mask.dtype == torch.bool else mask != 0

    # ---- the computation ---------------------------------------------------------------------
    def attend(self, hidden_states: torch.Tensor, is_masked: torch.Tensor | None,
               is_global: torch.Tensor | None, output_attentions: bool = False) -> AttentionOutput:
        """The layer on already-normalised masks: ``is_masked``/``is_global`` (B, N) bool or None.

        ``is_global`` must be False wherever ``is_masked`` is True. (transformers passes exactly
        these as ``is_index_masked`` / ``is_index_global_attn``.)
        """
        x = hidden_states
        bsz, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        band = self.band
        neg = torch.finfo(x.dtype).min

        q = self.query(x)
        q /= math.sqrt(hd)
        q = q.view(bsz, n, heads, hd)
        k = self.key(x).view(bsz, n, heads, hd)
        v = self.value(x).view(bsz, n, heads, hd)

        scores = functional.sliding_window_qk(q, k, band.left, band.dilation, band.autoregressive,
                                              padding_value=float("-inf"))
        if is_masked is not None and not is_masked.any():
            is_masked = None
        if is_global is not None and not is_global.any():
            is_global = None
        removed = _or(is_masked, is_global)  # keys that leave the window: padding and global
        if removed is not None:
            _remove_keys_(scores, removed, band, neg)

        glob, g_scores = None, None
        if is_global is not None:
            glob = GlobalIndex.from_mask(is_global)
            k_glob = glob.gather(k)  # (B, G, H, D): the global tokens' *local* keys
            g_scores = torch.einsum("bnhd,bghd->bnhg", q, k_glob)
            g_scores.masked_fill_(glob.key_mask(n, band.autoregressive).unsqueeze(2), neg)
            del k_glob

        rows_off = None if is_masked is None else is_masked[:, :, None, None]
        band_scale = None
        inplace = self._inplace_ok(x)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: B=%d N=%d H=%d C=%d G=%d padding=%s %s softmax", _NAME, bsz, n, heads,
                         band.columns, 0 if glob is None else glob.count, is_masked is not None,
                         "in-place" if inplace else "autograd")
        if inplace:
            # Inference: normalise the band scores in place; global columns enter as a per-row
            # scale of the band (no concatenated copy, one (B, N, H, C) tensor alive).
            # Padding rows are zeroed in the (B, N, H, D) output below, not in the probabilities.
            keep = None if rows_off is None and is_global is None else ~_or(is_masked, is_global)
            band_p, glob_p, band_scale = _softmax_inplace(scores, g_scores, band.left, keep)
            probs = None
        else:
            # transformers' order: concatenate, float32 softmax, zero padding rows, cast, dropout.
            if g_scores is not None:
                scores = torch.cat((g_scores, scores), dim=-1)
            probs = torch.softmax(scores, dim=-1, dtype=_softmax_dtype(x.dtype))
            if rows_off is not None:
                probs = _masked_fill(probs, rows_off, 0.0)
            probs = F.dropout(probs.to(x.dtype), p=self.dropout, training=self.training)
            g = 0 if glob is None else glob.count
            band_p, glob_p = probs[..., g:], (probs[..., :g] if glob is not None else None)
        del scores, g_scores

        out = functional.sliding_window_pv(band_p, v, band.left, band.dilation, band.autoregressive)
        if band_scale is not None:
            out.mul_(band_scale)
        if glob_p is not None:
            out = out + torch.einsum("bnhg,bghd->bnhd", glob_p, glob.gather(v))
        if inplace and rows_off is not None:
            out.masked_fill_(rows_off, 0.0)
        out = out.reshape(bsz, n, self.embed_dim)

        global_probs = None
        if glob is not None:
            g_out, global_probs = self._global_rows(x, glob, is_masked)
            out.index_put_(glob.nonzero_positions(), g_out[glob.nonzero_slots()])

        if not output_attentions:
            return AttentionOutput(out)
        if probs is None:
            if band_scale is not None:
                band_p = band_p * band_scale
            probs = band_p if glob_p is None else torch.cat((glob_p, band_p), dim=-1)
            if rows_off is not None:
                probs.masked_fill_(rows_off, 0.0)
        if glob is not None:
            probs = probs.masked_fill(is_global[:, :, None, None], 0.0)
        return AttentionOutput(out, probs, global_probs)

    def _inplace_ok(self, x: torch.Tensor) -> bool:
        """No autograd, a softmax dtype equal to x's, and no dropout: scores may be overwritten."""
        return (not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64)
                and not (self.training and self.dropout > 0))

    def _global_rows(self, x: torch.Tensor, glob: GlobalIndex, is_masked: torch.Tensor | None):
        """Outputs (B, G, E) and probabilities (B, H, G, N) of the global queries over all keys.

        With few global queries (H * G <= E / 2) the key and value projections are applied on the
        query side instead of to all N tokens -- ``q . (W x + b) = (W^T q) . x + q . b`` and
        ``sum p (W x + b) = W (sum p x) + b sum p`` -- which skips two (N, E) x (E, E) products.
        """
        bsz, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        neg = torch.finfo(x.dtype).min
        qg = self.query_global(glob.gather(x))
        qg /= math.sqrt(hd)
        qg = qg.view(bsz, glob.count, heads, hd)
        folded = 2 * heads * glob.count <= self.embed_dim and _plain_linear(self.key_global) \
            and _plain_linear(self.value_global)
        if folded:
            w_k = self.key_global.weight.view(heads, hd, self.embed_dim)
            q_x = torch.einsum("bghd,hde->bhge", qg, w_k).reshape(bsz, heads * glob.count, self.embed_dim)
            scores = torch.bmm(q_x, x.transpose(1, 2)).view(bsz, heads, glob.count, n)
            if self.key_global.bias is not None:  # a per-row constant, kept so the bias stays
                # in the graph (DDP expects a gradient for every parameter, here 0 up to rounding)
                q_b = torch.einsum("bghd,hd->bhg", qg, self.key_global.bias.view(heads, hd))
                scores = scores + q_b.unsqueeze(-1)
        else:
            kg = self.key_global(x).view(bsz, n, heads, hd)
            scores = torch.einsum("bghd,bnhd->bhgn", qg, kg)  # (B, H, G, N)
        # Rows past a sample's count first, then padding keys: transformers' order (the filler
        # rows come out uniform over all N).
        scores.masked_fill_(~glob.valid[:, None, :, None], neg)
        if is_masked is not None:
            scores.masked_fill_(is_masked[:, None, None, :], neg)
        if self.band.autoregressive:
            future = torch.arange(n, device=x.device).view(1, 1, n) > glob.index.unsqueeze(-1)
            scores.masked_fill_(future.unsqueeze(1), neg)
        probs = torch.softmax(scores, dim=-1, dtype=_softmax_dtype(x.dtype)).to(x.dtype)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        if folded:
            p_x = torch.bmm(probs.reshape(bsz, heads * glob.count, n), x)
            w_v = self.value_global.weight.view(heads, hd, self.embed_dim)
            out = torch.einsum("bhge,hde->bghd", p_x.view(bsz, heads, glob.count, self.embed_dim), w_v)
            if self.value_global.bias is not None:
                mass = probs.sum(dim=-1).transpose(1, 2).unsqueeze(-1)  # (B, G, H, 1); 1 without dropout
                out = out + mass * self.value_global.bias.view(heads, hd)
        else:
            vg = self.value_global(x).view(bsz, n, heads, hd)
            out = torch.einsum("bhgn,bnhd->bghd", probs, vg)
        return out.reshape(bsz, glob.count, self.embed_dim), probs


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


def _remove_keys_(scores: torch.Tensor, removed: torch.Tensor, band: Band, value: float) -> None:
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
    bsz, n = flags.shape
    cols = band.columns
    per_dil = {}
    for d in sorted(set(band.dilation)):
        padded = F.pad(flags, (band.left * d, band.right * d), value=False)
        per_dil[d] = padded.unfold(1, (cols - 1) * d + 1, 1)[..., ::d]  # (B, N, C)
    if len(per_dil) == 1:
        return next(iter(per_dil.values())).unsqueeze(2)
    return torch.stack([per_dil[d] for d in band.dilation], dim=2)


def _plain_linear(module: nn.Module) -> bool:
    """An unmodified nn.Linear (no subclass, no hooks): its weight alone defines what it computes."""
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def _or(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a | b


def _softmax_inplace(band: torch.Tensor, cols: torch.Tensor | None, self_col: int,
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


def _masked_fill(t: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """In place when nothing records t for backward (softmax saves its output)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return t.masked_fill(mask, value)
    return t.masked_fill_(mask, value)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
