"""The band products as ``torch.library`` custom ops over the compiled kernels.

Each op is one opaque node for ``torch.compile`` (with a fake implementation for shapes) and has
its backward registered in terms of the other two, as in the paper: the products are closed under
differentiation.

    qk(q, k)   -> s      ds: dq = pv(ds, k),        dk = tpv(ds, q)
    pv(p, v)   -> o      do: dp = qk(do, v, pad=0), dv = tpv(p, do)
    tpv(g, x)  -> o      do: dg = qk(x, do, pad=0), dx = pv(g, do)

Forward mode (``torch.func.jvp``) is registered too: each product is bilinear, so its tangent is
two products of the same kind (see ``_register_forward_ad``).

Outputs are allocated here and passed to the kernels, which never allocate them. Per-head
dilation runs one kernel call per maximal run of heads with equal dilation, on strided views.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.autograd.forward_ad as fwAD

from . import _decompose, _pool, backends, reference
from ._checks import Band

_LIB = "longformer_tvm"
logger = logging.getLogger("longformer_tvm")


def _band(left: int, right: int, dilation: list[int]) -> Band:
    return Band(left=left, right=right, dilation=tuple(dilation))


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides with a unit last stride; other layouts are copied once.

    A last dimension of size 0 or 1 never steps, so its stride is set to 1 without a copy: torch
    leaves it 0 in expanded tensors (the gradient of ``out.sum()``) even where ``contiguous()``
    sees nothing to do. Storage offsets of any alignment and stride-0 (broadcast) outer dimensions
    are passed as they are.
    """
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] <= 1:
        return t.as_strided(t.shape, (*t.stride()[:-1], 1), t.storage_offset())
    return t.contiguous()


#: A QK or transposed-PV kernel call packs its slab operand (about the size of its head slice of k
#: or v) into a workspace; calls cover at most this fraction of the output's bytes (or
#: WORKSPACE_MIN bytes), so the extra memory of a product stays a few percent of what it returns.
#: (PV packs per work unit, one unit's slab per thread; the split costs it nothing measurable.)
WORKSPACE_FRACTION = 1 / 32
WORKSPACE_MIN = 8 << 20


def _heads_per_call(b: torch.Tensor, out: torch.Tensor) -> int:
    per_head = b.shape[0] * b.shape[1] * b.shape[3] * b.element_size()
    budget = max(WORKSPACE_MIN, out.numel() * out.element_size() * WORKSPACE_FRACTION)
    return max(1, int(budget // max(per_head, 1)))


def apply_kernel(kernel, a: torch.Tensor, b: torch.Tensor, band: Band, out: torch.Tensor,
                 padding: float | None) -> torch.Tensor:
    """Call a compiled product into ``out`` on strided head slices: one call per run of heads
    with equal dilation, split further so the kernel's workspace stays small."""
    n = a.shape[1]
    a, b = _prepare(a), _prepare(b)
    # the CPU kernels pack into a workspace; the CUDA ones stage in shared memory and need no split
    step = _heads_per_call(b, out) if out.device.type == "cpu" else max(out.shape[2], 1)
    for h0, h1, d in band.head_runs():
        d = min(d, n)  # beyond N every off-centre key is outside the sequence: same band
        for s0 in range(h0, h1, step):
            s1 = min(s0 + step, h1)
            views = (a[:, :, s0:s1], b[:, :, s0:s1], out[:, :, s0:s1])
            if padding is None:
                kernel(*views, band.left, band.right, d)
            else:
                kernel(*views, band.left, band.right, d, padding)
    return out


def _new_output(shape, dtype, device) -> torch.Tensor:
    """An uninitialised output: large CPU outputs on the output pool's huge-page blocks, reused
    where an earlier output gave one back (:mod:`longformer_tvm._pool`), else ``torch.empty``.

    A large output on fresh memory is faulted in (and zeroed by the OS) on every call: in 4 KiB
    pages that costs about as much as the QK kernel itself (20 of 45 ms for a 100 MB band at
    N=4096); 2 MiB pages cut that to about 10 ms, and reused memory to nothing.
    """
    if torch.device(device).type == "cpu":
        pooled = _pool.POOL.empty(shape, dtype)
        if pooled is not None:
            return pooled
    return torch.empty(shape, dtype=dtype, device=device)


def _run(product: str, a: torch.Tensor, b: torch.Tensor, band: Band, out_last: int,
         padding: float | None) -> torch.Tensor:
    bsz, n, heads, _ = a.shape
    out = _new_output((bsz, n, heads, out_last), a.dtype, a.device)
    if out.numel() == 0:
        return out
    kernel = backends.kernel_for(product, a)
    if kernel is not None:
        # final as it comes, inf and NaN included: the CPU kernels let no entry outside a row's
        # band (or outside the sequence) meet that row, not even times zero, so an inf or NaN
        # stays where the reference has it (tvm_kernels/cpu/kernels.py, "Nothing outside the
        # band meets a row")
        return apply_kernel(kernel, a, b, band, out, padding)
    # the reference backend (explicit, see backends.backend_info)
    fn = {"qk": reference.band_qk, "pv": reference.band_pv, "tpv": reference.band_pv_transposed}
    args = (a, b, band) if padding is None else (a, b, band, padding)
    out.copy_(fn[product](*args))
    return out


@torch.library.custom_op(f"{_LIB}::band_qk", mutates_args=())
def band_qk(q: torch.Tensor, k: torch.Tensor, left: int, right: int, dilation: list[int],
            padding: float) -> torch.Tensor:
    band = _band(left, right, dilation)
    return _run("qk", q, k, band, band.columns, padding)


@torch.library.custom_op(f"{_LIB}::band_pv", mutates_args=())
def band_pv(p: torch.Tensor, v: torch.Tensor, left: int, right: int,
            dilation: list[int]) -> torch.Tensor:
    return _run("pv", p, v, _band(left, right, dilation), v.shape[3], None)


@torch.library.custom_op(f"{_LIB}::band_tpv", mutates_args=())
def band_tpv(g: torch.Tensor, x: torch.Tensor, left: int, right: int,
             dilation: list[int]) -> torch.Tensor:
    return _run("tpv", g, x, _band(left, right, dilation), x.shape[3], None)


@band_qk.register_fake
def _(q, k, left, right, dilation, padding):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], left + right + 1)


@band_pv.register_fake
def _(p, v, left, right, dilation):
    return v.new_empty(v.shape)


@band_tpv.register_fake
def _(g, x, left, right, dilation):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    a, b, left, right, dilation = inputs[:5]
    ctx.save_for_backward(a, b)
    ctx.band = (left, right, dilation)


def _qk_backward(ctx, grad):
    q, k = ctx.saved_tensors
    left, right, dil = ctx.band
    dq = band_pv(grad, k, left, right, dil) if ctx.needs_input_grad[0] else None
    dk = band_tpv(grad, q, left, right, dil) if ctx.needs_input_grad[1] else None
    return dq, dk, None, None, None, None


def _pv_backward(ctx, grad):
    p, v = ctx.saved_tensors
    left, right, dil = ctx.band
    dp = band_qk(grad, v, left, right, dil, 0.0) if ctx.needs_input_grad[0] else None
    dv = band_tpv(p, grad, left, right, dil) if ctx.needs_input_grad[1] else None
    return dp, dv, None, None, None


def _tpv_backward(ctx, grad):
    g, x = ctx.saved_tensors
    left, right, dil = ctx.band
    dg = band_qk(x, grad, left, right, dil, 0.0) if ctx.needs_input_grad[0] else None
    dx = band_pv(g, grad, left, right, dil) if ctx.needs_input_grad[1] else None
    return dg, dx, None, None, None


band_qk.register_autograd(_qk_backward, setup_context=_setup)
band_pv.register_autograd(_pv_backward, setup_context=_setup)
band_tpv.register_autograd(_tpv_backward, setup_context=_setup)


# Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp). register_autograd covers reverse
# mode only: the autograd kernel it generates runs an input that carries a tangent like any other
# and returns an output without one, which jvp reads as a zero tangent. So each op's autograd
# kernel is that generated one behind a wrapper that adds the tangent. The products are bilinear,
#
#     d qk(q, k)  = qk(dq, k, pad=0) + qk(q, dk, pad=0)   (the padding is a constant: tangent 0)
#     d pv(p, v)  = pv(dp, v) + pv(p, dv)
#     d tpv(g, x) = tpv(dg, x) + tpv(g, dx)
#
# with a missing tangent's term left out. The terms are the ops themselves, so they run the
# kernels and carry both modes further (jvp of jvp, backward through a tangent).
def _with_tangent(op, reverse, zero_padding: bool):
    def kernel(keyset, a, b, *rest):
        (a, da), (b, db) = fwAD.unpack_dual(a), fwAD.unpack_dual(b)
        out = reverse(keyset, a, b, *rest)
        if da is None and db is None:
            return out
        spec = (*rest[:-1], 0.0) if zero_padding else rest
        terms = [op(da, b, *spec)] if da is not None else []
        terms += [op(a, db, *spec)] if db is not None else []
        return fwAD.make_dual(out, terms[0] if len(terms) == 1 else terms[0] + terms[1])

    return kernel


def _register_forward_ad(lib: torch.library.Library) -> None:
    try:  # the autograd kernel that register_autograd installs (torch >= 2.4)
        from torch._library.autograd import make_autograd_impl
    except ImportError:
        logger.warning("this torch lacks torch._library.autograd.make_autograd_impl: forward-mode "
                       "AD (torch.func.jvp) through the band products gives no tangent")
        return
    with warnings.catch_warnings():  # it replaces register_autograd's kernel, on purpose
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for name, op, zero_padding in (("band_qk", band_qk, True), ("band_pv", band_pv, False),
                                       ("band_tpv", band_tpv, False)):
            reverse = make_autograd_impl(getattr(torch.ops.longformer_tvm, name).default, op)
            lib.impl(name, _with_tangent(op, reverse, zero_padding), "Autograd", with_keyset=True)


_FORWARD_AD = torch.library.Library(_LIB, "IMPL")
_register_forward_ad(_FORWARD_AD)

# Exporters (torch.onnx.export with dynamo=True) see each op as standard operators, at any N.
_decompose.register(_LIB)


# Autocast: under torch.autocast("cuda") the products run in the autocast dtype (the half-precision
# CUDA kernels accumulate in float32); float64 inputs are left as they are, like torch's own ops.
def _autocast_cuda(op):
    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype("cuda")
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a.dtype != torch.float64 and a.device.type == "cuda" else a for a in args)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)):
            return op(*args)

    return kernel


_AUTOCAST = torch.library.Library(_LIB, "IMPL")
for _name in ("band_qk", "band_pv", "band_tpv"):
    _AUTOCAST.impl(_name, _autocast_cuda(getattr(torch.ops.longformer_tvm, _name).default),
                   "AutocastCUDA", with_keyset=True)
