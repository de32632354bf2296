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
import numbers
from typing import NamedTuple

import torch
from torch import nn

from ._attend import attend_autograd, attend_fused, attend_inference, fused_ok, inference_ok
from ._checks import Band, normalize_band
from ._masks import TokenMasks, compiling

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
        these as ``is_index_masked`` / ``is_index_global_attn``.) Where a fused kernel serves the
        input's device and dtype and no probabilities are asked for (nor dropout in training),
        one kernel computes the band (:func:`~longformer_tvm._attend.attend_fused`). Otherwise,
        without autograd and dropout the softmax runs in place
        (:func:`~longformer_tvm._attend.attend_inference`), else -- and always under
        ``torch.compile`` -- in transformers' order (:func:`~longformer_tvm._attend.attend_autograd`);
        all give the same numbers up to rounding.
        """
        count = None
        if compiling() and is_global is not None:
            # G, the largest number of global tokens of a sample, is a size read from the data:
            # under torch.compile the one graph break (read here, not deeper, it splits fewer frames)
            count = int(is_global.sum(dim=1).max())
        masks = TokenMasks.build(is_masked, is_global, count)
        fused = fused_ok(self, hidden_states, output_attentions)
        inference = inference_ok(self, hidden_states)
        path = attend_fused if fused else attend_inference if inference else attend_autograd
        # Dynamo cannot trace a Logger call (a graph break), so nothing is logged while compiling.
        if not compiling() and logger.isEnabledFor(logging.DEBUG):
            bsz, n, _ = hidden_states.shape
            logger.debug("%s: B=%d N=%d H=%d C=%d G=%d padding=%s %s", _NAME, bsz, n,
                         self.num_heads, self.band.columns, 0 if masks.glob is None else masks.glob.count,
                         masks.padding is not None, path.__name__)
        return AttentionOutput(*path(self, hidden_states, masks, output_attentions))
