"""Sliding-window attention as one custom op: softmax(scale * q.k over the band) . v, with its LSE.

    attention(q, k, v, key_mask) -> out (B, N, H, D), lse (B, N, H)
    backward: dq, dk, dv from dout and dlse, recomputing the probabilities from the LSE

Where the device's library holds the fused kernels (``band_attention`` and
``band_attention_backward``, CPU: ``tvm_kernels/cpu/attention*.py``) no (B, N, H, C) tensor
exists, forward or backward. Elsewhere (CUDA today, LONGFORMER_TVM_BACKEND=reference, a library
without them) the op runs the same definition through the band products
(:func:`composite`): band scores, masked softmax, band PV -- the (N, C) scores exist there, and
the backward recomputes them.

The op is opaque to ``torch.compile`` (a fake implementation gives the shapes) and carries
reverse-mode autograd (q, k, v, through ``out`` and ``lse``). The LSE is float32 (float64 for
float64 inputs); a row with no valid key gives out 0 and lse -inf. Keys outside the sequence and
keys flagged in ``key_mask`` (B, N) bool are excluded from every row.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from . import backends, ops
from ._checks import Band
from ._masks import band_key_mask

_LIB = "longformer_tvm"
#: The compiled functions' symbols (tvm_kernels/cpu/attention.py).
FORWARD, BACKWARD = "attention", "attention_backward"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel(product: str, t: torch.Tensor):
    """The compiled fused function for t's device and dtype, or None (use the composite)."""
    if t.device.type != "cpu":
        return None
    try:
        return backends.kernel_for(product, t)
    except KeyError:  # a library built before the fused kernels existed
        return None


@torch.compiler.assume_constant_result
def served(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the fused kernels serve this device type and dtype (else the composite would)."""
    if device_type != "cpu" or dtype not in (torch.float32, torch.float64):
        return False
    try:
        return _kernel(FORWARD, torch.empty(0, dtype=dtype)) is not None
    except Exception:  # no library at all: the unfused path explains that at its own call
        return False


# ---- the definition through the band products ----------------------------------------------
def composite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
              band: Band, scale: float, differentiable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's definition in band products: (out, lse). ``differentiable=False`` (the op's own
    forward, where nothing records autograd) works in place on the scores: two passes fewer."""
    left, right, dil = band.left, band.right, list(band.dilation)
    if key_mask is not None:
        # an excluded key's value never meets a row, not even times its zero probability
        v = v.masked_fill(key_mask[:, :, None, None], 0.0)
    scores = ops.band_qk(q * scale, k, left, right, dil, float("-inf")).to(lse_dtype(q.dtype))
    if not differentiable:
        if key_mask is not None:
            scores.masked_fill_(band_key_mask(key_mask, band), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf where a row has no valid key
        probs = scores.sub_(lse.masked_fill(torch.isneginf(lse), 0.0)).exp_()
        out = ops.band_pv(probs.to(q.dtype), v, left, right, dil)
        return out, lse.squeeze(-1)
    if key_mask is not None:
        scores = scores.masked_fill(band_key_mask(key_mask, band), float("-inf"))
    # a row with no valid key (all -inf) is given 0 scores for the LSE, so no -inf - -inf (NaN)
    # appears forward or backward; its probabilities are exp(-inf) = 0 and its LSE -inf
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    probs = torch.exp(scores - lse)
    out = ops.band_pv(probs.to(q.dtype), v, left, right, dil)
    return out, lse.masked_fill(empty, float("-inf")).squeeze(-1)


def composite_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_mask: torch.Tensor | None, lse: torch.Tensor, delta: torch.Tensor,
                       band: Band, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in band products, the probabilities recomputed from the LSE (the fused
    kernel's formulas): P = exp(scale * S - lse), dS = P * (dO . V - delta),
    dq = scale * dS K, dk = scale * dS^T Q, dv = P^T dO."""
    left, right, dil = band.left, band.right, list(band.dilation)
    probs = ops.band_qk(q * scale, k, left, right, dil, float("-inf")).to(lse.dtype)
    if key_mask is not None:
        probs.masked_fill_(band_key_mask(key_mask, band), float("-inf"))
    probs.sub_(lse.masked_fill(torch.isneginf(lse), 0.0).unsqueeze(-1)).exp_()
    ds = ops.band_qk(dout, v, left, right, dil, 0.0).to(lse.dtype)
    ds.sub_(delta.unsqueeze(-1)).mul_(probs)
    ds = ds.to(q.dtype)
    dq = ops.band_pv(ds, k, left, right, dil) * scale
    dk = ops.band_tpv(ds, q, left, right, dil) * scale
    dv = ops.band_tpv(probs.to(q.dtype), dout, left, right, dil)
    return dq, dk, dv


def _finite(t: torch.Tensor) -> bool:
    """Whether a fused kernel's result holds no inf or NaN (one sum; a finite sum proves it).

    The fused kernels multiply a tile's probabilities by the whole V slab (and their adjoints
    likewise), so an inf or NaN in the v row of a *valid* key can also reach rows of its tile
    whose band does not hold it (0 * inf); excluded keys never can (they are packed as zeros).
    An inf or NaN score (from q or k) would pass the kernel's max and polynomial exp as a
    finite number, so q and k are checked before the kernel, its results after; where one is not
    finite the op computes with the band products, which keep such values to the rows whose
    band holds them. numpy sums on this thread: torch's sum would wake
    its OpenMP workers, which then spin against the next TVM kernel.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(t.detach().numpy().sum()))


def _mask_arg(key_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The kernels' key mask: (B, N) uint8, 1 = excluded (a broadcast zero where none is given:
    the kernels take any strides)."""
    if key_mask is None:
        return torch.zeros(1, 1, dtype=torch.uint8, device=q.device).expand(q.shape[:2])
    return key_mask.to(torch.uint8)


def _per_run(kernel, band: Band, n: int, tensors: tuple, scale: float) -> None:
    """``kernel(*tensors, left, right, d, scale)`` once per run of heads with equal dilation,
    on each (B, N, H, ...) tensor's heads of the run (the (B, N) key mask whole)."""
    for h0, h1, d in band.head_runs():
        heads = slice(h0, h1)
        # beyond N every off-centre key is outside the sequence: the same band as d = N
        kernel(*(t if t.dim() == 2 else t[:, :, heads] for t in tensors), band.left, band.right,
               min(d, n), scale)


# ---- the ops -------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::band_attention", mutates_args=())
def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                   left: int, right: int, dilation: list[int],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    band = ops._band(left, right, dilation)
    kernel = _kernel(FORWARD, q)
    # an inf or NaN score would pass the kernel's max and polynomial exp as a finite number
    if kernel is None or q.numel() == 0 or not (_finite(q) and _finite(k)):
        out, lse = composite(q, k, v, key_mask, band, scale, differentiable=False)
        return out.contiguous(), lse.contiguous()
    q, k, v = ops._prepare(q), ops._prepare(k), ops._prepare(v)
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
    _per_run(kernel, band, q.shape[1], (q, k, v, _mask_arg(key_mask, q), out, lse), scale)
    if not _finite(out):
        out, lse = composite(q, k, v, key_mask, band, scale, differentiable=False)
    return out.contiguous(), lse.contiguous()


@band_attention.register_fake
def _(q, k, v, key_mask, left, right, dilation, scale):
    return v.new_empty(v.shape), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op(f"{_LIB}::band_attention_backward", mutates_args=())
def band_attention_backward(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                            out: torch.Tensor, lse: torch.Tensor, left: int, right: int,
                            dilation: list[int], scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    band = ops._band(left, right, dilation)
    kernel = _kernel(BACKWARD, q)
    if kernel is None or q.numel() == 0 or not (_finite(q) and _finite(k)):
        return composite_backward(dout, q, k, v, key_mask, lse, _delta(dout, out, dlse, lse), band,
                                  scale)
    q, k, v, dout, out = (ops._prepare(t) for t in (q, k, v, dout, out))
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    # the kernel forms delta = rowsum(dO * O) - dlse itself, from the rows it reads
    _per_run(kernel, band, q.shape[1], (q, k, v, _mask_arg(key_mask, q), dout, out, lse,
                                        dlse.to(lse.dtype).contiguous(), dq, dk, dv), scale)
    if not (_finite(dq) and _finite(dk) and _finite(dv)):
        return composite_backward(dout, q, k, v, key_mask, lse, _delta(dout, out, dlse, lse), band,
                                  scale)
    return dq, dk, dv


def _delta(dout, out, dlse, lse) -> torch.Tensor:
    """D_i = rowsum(dO * O) - dlse_i (the LSE's gradient enters the backward as a shift of D), 0
    on rows with no valid key; a batched dot product: no (B, N, H, D) temporary."""
    delta = torch.einsum("bnhd,bnhd->bnh", dout.to(lse.dtype), out.to(lse.dtype)) - dlse.to(lse.dtype)
    return delta.masked_fill(torch.isneginf(lse), 0.0).contiguous()


@band_attention_backward.register_fake
def _(dout, dlse, q, k, v, key_mask, out, lse, left, right, dilation, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, key_mask, left, right, dilation, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, out, lse)
    ctx.spec = (left, right, dilation, scale)


def _backward(ctx, dout, dlse):
    q, k, v, key_mask, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = band_attention_backward(dout, dlse, q, k, v, key_mask, out, lse, *ctx.spec)
    return dq, dk, dv, None, None, None, None, None


band_attention.register_autograd(_backward, setup_context=_setup)


# Forward-mode AD (torch.func.jvp, forward_ad): where a tangent comes in, the op runs as its
# composite, whose band products and softmax carry tangents (ops._register_forward_ad) -- and
# reverse mode through them too. Without this, register_autograd's kernel would drop the tangent.
def _register_forward_ad(lib: torch.library.Library) -> None:
    try:
        from torch._library.autograd import make_autograd_impl
    except ImportError:
        return  # ops logs the same limitation once
    reverse = make_autograd_impl(torch.ops.longformer_tvm.band_attention.default, band_attention)

    def kernel(keyset, q, k, v, key_mask, left, right, dilation, scale):
        if all(fwAD.unpack_dual(t).tangent is None for t in (q, k, v)):
            return reverse(keyset, q, k, v, key_mask, left, right, dilation, scale)
        return composite(q, k, v, key_mask, ops._band(left, right, dilation), scale)

    with warnings.catch_warnings():  # it replaces register_autograd's kernel, on purpose
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        lib.impl("band_attention", kernel, "Autograd", with_keyset=True)


_FORWARD_AD = torch.library.Library(_LIB, "IMPL")
_register_forward_ad(_FORWARD_AD)


# Exporters (torch.onnx.export with dynamo=True) see the op as its band-product form, whose
# products decompose into standard operators in turn (_decompose.py): standard ONNX at any N.
# Contiguous, as the op returns them (see _decompose.py on why strides matter there).
def _decomposed(q, k, v, key_mask, left, right, dilation, scale):
    out, lse = composite(q, k, v, key_mask, ops._band(left, right, dilation), scale)
    return out.contiguous(), lse.contiguous()


try:
    from torch._decomp import register_decomposition
except ImportError:  # pragma: no cover - torch moved its private table: no ONNX export of the op
    pass
else:
    register_decomposition(torch.ops.longformer_tvm.band_attention.default)(_decomposed)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band, scale: float,
              key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of checked arguments (see functional.sliding_window_attention)."""
    return band_attention(q, k, v, key_mask, band.left, band.right, list(band.dilation), float(scale))
