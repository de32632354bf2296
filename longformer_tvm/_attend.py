"""The attention layer's two computations: in place for inference, transformers' order for autograd.

Shapes: ``B`` batch, ``N`` sequence length, ``E`` embedding size, ``H`` heads, ``D = E / H``,
``C`` band columns, ``G`` the largest number of global tokens of any sample.

Both paths run ``project -> band scores + global columns -> softmax -> band product with V ->
global rows`` through the same helpers and differ only in the softmax:

* :func:`attend_inference` (no autograd, float32/float64, no dropout; :func:`inference_ok`):
  the band scores are normalised in place and the global columns enter as a per-row scale of the
  band, so no concatenated copy exists and one (B, N, H, C) tensor is alive. Padding rows are
  zeroed in the (B, N, H, D) output, not in the probabilities.
* :func:`attend_autograd`: transformers' order -- concatenate, float32 softmax, zero padding rows,
  cast, dropout. Also the path while ``torch.compile`` traces the layer (with or without
  autograd): the in-place softmax writes over a graph input and branches on the data.

``layer`` is the :class:`~longformer_tvm.attention.LongformerSelfAttention` being run: its six
projections, ``band``, ``num_heads``, ``head_dim``, ``embed_dim``, ``dropout`` and ``training``.
Each path returns ``(output (B, N, E), attn_probs, global_attn_probs)`` (the last two None unless
asked for; see ``AttentionOutput``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _fused, functional
from ._checks import Band
from ._masks import GlobalIndex, TokenMasks, compiling, fill_, mask_global_rows_, remove_keys_
from ._softmax import softmax_dropout, softmax_inplace

Result = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def inference_ok(layer: nn.Module, x: torch.Tensor) -> bool:
    """No autograd, a softmax dtype equal to x's, no dropout, and eager (not torch.compile):
    scores may be overwritten."""
    return (not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64)
            and not (layer.training and layer.dropout > 0) and not compiling())


def attend_inference(layer: nn.Module, x: torch.Tensor, masks: TokenMasks,
                     output_attentions: bool) -> Result:
    """The layer on x (B, N, E) with the softmax in place over the band scores. No autograd."""
    band = layer.band
    q, k, v = project_local(layer, x)
    scores, g_scores = local_scores(q, k, band, masks, torch.finfo(x.dtype).min)
    band_p, glob_p, band_scale = softmax_inplace(scores, g_scores, band.left, masks.kept_rows())
    out = mix_values(band_p, glob_p, v, band, masks.glob, band_scale)
    rows_off = masks.padding_rows()
    if rows_off is not None:
        out.masked_fill_(rows_off, 0.0)
    out, global_probs = with_global_rows(layer, x, out, masks)
    if not output_attentions:
        return out, None, None
    if band_scale is not None:
        band_p = band_p * band_scale
    probs = band_p if glob_p is None else torch.cat((glob_p, band_p), dim=-1)
    if rows_off is not None:
        probs.masked_fill_(rows_off, 0.0)
    return out, hide_global_rows(probs, masks), global_probs


def attend_autograd(layer: nn.Module, x: torch.Tensor, masks: TokenMasks,
                    output_attentions: bool) -> Result:
    """The layer on x (B, N, E) in transformers' order: concatenated scores, softmax, dropout."""
    band = layer.band
    q, k, v = project_local(layer, x)
    scores, g_scores = local_scores(q, k, band, masks, torch.finfo(x.dtype).min)
    if g_scores is not None:
        scores = torch.cat((g_scores, scores), dim=-1)  # (B, N, H, G + C)
    probs = softmax_dropout(scores, x.dtype, layer.dropout, layer.training, masks.padding_rows())
    del scores, g_scores
    g = 0 if masks.glob is None else masks.glob.count
    band_p, glob_p = probs[..., g:], (probs[..., :g] if masks.glob is not None else None)
    out = mix_values(band_p, glob_p, v, band, masks.glob)
    out, global_probs = with_global_rows(layer, x, out, masks)
    if not output_attentions:
        return out, None, None
    return out, hide_global_rows(probs, masks), global_probs


def fused_ok(layer: nn.Module, x: torch.Tensor, output_attentions: bool) -> bool:
    """No probabilities asked for, no dropout in training, and a fused kernel for x's device and
    dtype (:mod:`longformer_tvm._fused`)."""
    return (not output_attentions and not (layer.training and layer.dropout > 0)
            and _fused.served(x.device.type, x.dtype))


def attend_fused(layer: nn.Module, x: torch.Tensor, masks: TokenMasks,
                 output_attentions: bool) -> Result:
    """The layer on x (B, N, E) with one fused kernel for the band (no (B, N, H, C) tensor).

    Padding and global keys leave the band (the kernel's key mask); the global columns are a
    second softmax over the sample's global keys, merged with the band's by their log-sum-exps.
    """
    band = layer.band
    q, k, v = project_local(layer, x)
    out, lse = _fused.attention(q, k, v, band, 1.0, masks.removed_keys())
    glob = masks.glob
    if glob is not None:
        g_scores = global_scores(q, k, glob, band, torch.finfo(x.dtype).min).to(lse.dtype)
        g_lse = torch.logsumexp(g_scores, dim=-1)  # finite: unseen slots hold the lowest value
        g_out = torch.einsum("bnhg,bghd->bnhd", torch.exp(g_scores - g_lse.unsqueeze(-1)).to(x.dtype),
                             glob.gather(v))
        total = torch.logaddexp(lse, g_lse)
        out = (torch.exp(lse - total).unsqueeze(-1).to(x.dtype) * out
               + torch.exp(g_lse - total).unsqueeze(-1).to(x.dtype) * g_out)
    rows_off = masks.padding_rows()
    if rows_off is not None:
        out = out.masked_fill(rows_off, 0.0)
    out, _ = with_global_rows(layer, x, out, masks)
    return out, None, None


# ---- steps both paths take ---------------------------------------------------------------------
def project_local(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The local projections of x (B, N, E): q (scaled by 1 / sqrt(D)), k, v, each (B, N, H, D)."""
    bsz, n, _ = x.shape
    heads, hd = layer.num_heads, layer.head_dim
    q = layer.query(x)
    q /= math.sqrt(hd)
    q = q.view(bsz, n, heads, hd)
    k = layer.key(x).view(bsz, n, heads, hd)
    v = layer.value(x).view(bsz, n, heads, hd)
    return q, k, v


def local_scores(q: torch.Tensor, k: torch.Tensor, band: Band, masks: TokenMasks,
                 neg: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The local queries' scores: band (B, N, H, C) and global columns (B, N, H, G) or None.

    Out-of-sequence band entries are ``-inf``; keys that leave the band (padding and global) and
    global slots a query must not see (past its sample's count; after it when autoregressive)
    are ``neg``, the dtype's lowest finite value. q, k: (B, N, H, D).
    """
    scores = functional.sliding_window_qk(q, k, band.left, band.dilation, band.autoregressive,
                                          padding_value=float("-inf"))
    removed = masks.removed_keys()
    if removed is not None:
        remove_keys_(scores, removed, band, neg)
    if masks.glob is None:
        return scores, None
    return scores, global_scores(q, k, masks.glob, band, neg)


def global_scores(q: torch.Tensor, k: torch.Tensor, glob: GlobalIndex, band: Band,
                  neg: float) -> torch.Tensor:
    """The local queries' scores (B, N, H, G) against the global tokens' *local* keys; ``neg``
    at the global slots a query must not see (past its sample's count; after it when
    autoregressive)."""
    g_scores = torch.einsum("bnhd,bghd->bnhg", q, glob.gather(k))
    return fill_(g_scores, glob.key_mask(q.shape[1], band.autoregressive).unsqueeze(2), neg)


def mix_values(band_p: torch.Tensor, glob_p: torch.Tensor | None, v: torch.Tensor, band: Band,
               glob: GlobalIndex | None, band_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The local queries' context (B, N, H, D) from v (B, N, H, D).

    Band probabilities (B, N, H, C) times v's band, times ``band_scale`` (B, N, H, 1) when given,
    plus the global columns' probabilities (B, N, H, G) times the global tokens' values.
    """
    out = functional.sliding_window_pv(band_p, v, band.left, band.dilation, band.autoregressive)
    if band_scale is not None:
        out.mul_(band_scale)
    if glob_p is not None:
        out = out + torch.einsum("bnhg,bghd->bnhd", glob_p, glob.gather(v))
    return out


def with_global_rows(layer: nn.Module, x: torch.Tensor, out: torch.Tensor,
                     masks: TokenMasks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out`` (B, N, H, D) as (B, N, E) with the global tokens' rows computed by
    :func:`global_rows`; returned with their probabilities (B, H, G, N), or None without globals."""
    bsz, n, _ = x.shape
    out = out.reshape(bsz, n, layer.embed_dim)
    glob = masks.glob
    if glob is None:
        return out, None
    g_out, global_probs = global_rows(layer, x, glob, masks.padding)
    return glob.put_rows_(out, g_out), global_probs


def hide_global_rows(probs: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """``attn_probs`` (B, N, H, G + C) with the global tokens' rows zeroed (a copy when any is):
    those rows' probabilities are in ``global_attn_probs``."""
    if masks.glob is None:
        return probs
    return probs.masked_fill(masks.is_global[:, :, None, None], 0.0)


# ---- the global queries ------------------------------------------------------------------------
def global_rows(layer: nn.Module, x: torch.Tensor, glob: GlobalIndex,
                padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (B, G, E) and probabilities (B, H, G, N) of the global queries over all keys.

    With few global queries (H * G <= E / 2) the key and value projections are applied on the
    query side instead of to all N tokens -- ``q . (W x + b) = (W^T q) . x + q . b`` and
    ``sum p (W x + b) = W (sum p x) + b sum p`` -- which skips two (N, E) x (E, E) products.
    ``padding``: (B, N) bool or None.
    """
    bsz, n, _ = x.shape
    heads, hd = layer.num_heads, layer.head_dim
    qg = layer.query_global(glob.gather(x))
    qg /= math.sqrt(hd)
    qg = qg.view(bsz, glob.count, heads, hd)
    folded = 2 * heads * glob.count <= layer.embed_dim and _plain_linear(layer.key_global) \
        and _plain_linear(layer.value_global)
    if folded:
        scores = _folded_key_scores(layer, qg, x)
    else:
        kg = layer.key_global(x).view(bsz, n, heads, hd)
        scores = torch.einsum("bghd,bnhd->bhgn", qg, kg)  # (B, H, G, N)
    scores = mask_global_rows_(scores, glob, padding, layer.band.autoregressive, torch.finfo(x.dtype).min)
    probs = softmax_dropout(scores, x.dtype, layer.dropout, layer.training)
    if folded:
        out = _folded_value_context(layer, probs, x)
    else:
        vg = layer.value_global(x).view(bsz, n, heads, hd)
        out = torch.einsum("bhgn,bnhd->bghd", probs, vg)
    return out.reshape(bsz, glob.count, layer.embed_dim), probs


def _folded_key_scores(layer: nn.Module, qg: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scores (B, H, G, N) of qg (B, G, H, D) against ``key_global(x)``, without projecting x."""
    bsz, g, heads, hd = qg.shape
    n, e = x.shape[1], layer.embed_dim
    w_k = layer.key_global.weight.view(heads, hd, e)
    q_x = torch.einsum("bghd,hde->bhge", qg, w_k).reshape(bsz, heads * g, e)
    scores = torch.bmm(q_x, x.transpose(1, 2)).view(bsz, heads, g, n)
    if layer.key_global.bias is not None:  # a per-row constant, kept so the bias stays
        # in the graph (DDP expects a gradient for every parameter, here 0 up to rounding)
        q_b = torch.einsum("bghd,hd->bhg", qg, layer.key_global.bias.view(heads, hd))
        scores = scores + q_b.unsqueeze(-1)
    return scores


def _folded_value_context(layer: nn.Module, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Context (B, G, H, D) of probs (B, H, G, N) over ``value_global(x)``, without projecting x."""
    bsz, heads, g, n = probs.shape
    hd, e = layer.head_dim, layer.embed_dim
    p_x = torch.bmm(probs.reshape(bsz, heads * g, n), x)
    w_v = layer.value_global.weight.view(heads, hd, e)
    out = torch.einsum("bhge,hde->bghd", p_x.view(bsz, heads, g, e), w_v)
    if layer.value_global.bias is not None:
        mass = probs.sum(dim=-1).transpose(1, 2).unsqueeze(-1)  # (B, G, H, 1); 1 without dropout
        out = out + mass * layer.value_global.bias.view(heads, hd)
    return out


def _plain_linear(module: nn.Module) -> bool:
    """An unmodified nn.Linear (no subclass, no hooks): its weight alone defines what it computes."""
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
