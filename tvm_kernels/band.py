"""The band products: the paper's definition (TE), and what the CPU and CUDA kernels share (TIR).

For query row ``i``, diagonal ``j`` and dilation ``d`` the key row is ``i + (j - left) * d``:

    qk : out[b,i,h,j] = sum_k q[b,i,h,k] * k[b, i+(j-left)*d, h, k]        (pad outside [0, N))
    pv : out[b,i,h,k] = sum_j p[b,i,h,j] * v[b, i+(j-left)*d, h, k]        (invalid j skipped)
    tpv: out[b,m,h,k] = sum_j g[b, m-(j-left)*d, h, j] * x[b, m-(j-left)*d, h, k]

:func:`naive_qk` and :func:`naive_pv` state them as the paper did: one output element at a time,
with the bounds check inside the reduction, exactly as allenai/longformer compiled it. They are
the definition the tiled kernels (:mod:`tvm_kernels.cpu.kernels`, :mod:`tvm_kernels.cuda.kernels`)
must agree with, and the "naive" schedule in ``build_kernels.py compare``; they vectorise poorly
and are kept as the baseline the paper started from.

Both devices' kernels group rows by dilation residue (``rows_in_residue``, ``tiles_per_residue``)
and take one signature (:func:`operands`): tensor views (B, N, H, last) with any strides and a
unit last stride, symbolic sizes, 64-bit throughout (see ``longformer_tvm._contract.SIGNATURES``).
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

# ---- the paper's formulation (TE) -----------------------------------------------------------


def _symbols(dtype: str):
    names = ("B", "N", "H", "D", "C")
    B, N, H, D, C = (te.var(n, "int64") for n in names)
    left, right, d = (te.var(n, "int64") for n in ("left", "right", "d"))
    return B, N, H, D, C, left, right, d


def _valid(pos, n):
    return tirx.all(pos >= 0, pos < n)


def _clamp(pos, n):
    return te.max(te.min(pos, n - 1), 0)


def naive_qk(dtype: str):
    """Returns ([q, k, out, left, right, d, pad], out) for te.create_prim_func."""
    B, N, H, D, C, left, right, d = _symbols(dtype)
    pad = te.var("pad", "float64")
    q = te.placeholder((B, N, H, D), dtype, "q")
    k = te.placeholder((B, N, H, D), dtype, "k")
    red = te.reduce_axis((0, D), "kk")

    def body(b, i, h, j):
        pos = i + (j - left) * d
        return te.sum(tirx.if_then_else(_valid(pos, N), q[b, i, h, red] * k[b, _clamp(pos, N), h, red],
                                        tirx.const(0, dtype)), axis=red)

    s = te.compute((B, N, H, C), body, name="band")
    out = te.compute((B, N, H, C), lambda b, i, h, j: tirx.if_then_else(
        _valid(i + (j - left) * d, N), s[b, i, h, j], pad.astype(dtype)), name="out")
    return [q, k, out, left, right, d, pad], out


def naive_pv(dtype: str, transposed: bool = False):
    """Returns ([p, v, out, left, right, d], out); ``transposed`` gives the adjoint in p."""
    B, N, H, D, C, left, right, d = _symbols(dtype)
    p = te.placeholder((B, N, H, C), dtype, "p")
    v = te.placeholder((B, N, H, D), dtype, "v")
    j = te.reduce_axis((0, C), "j")

    def body(b, i, h, k):
        if transposed:
            src = i - (j - left) * d
            term = p[b, _clamp(src, N), h, j] * v[b, _clamp(src, N), h, k]
        else:
            src = i + (j - left) * d
            term = p[b, i, h, j] * v[b, _clamp(src, N), h, k]
        return te.sum(tirx.if_then_else(_valid(src, N), term, tirx.const(0, dtype)), axis=j)

    out = te.compute((B, N, H, D), body, name="band")
    return [p, v, out, left, right, d], out


# ---- shared by the tiled kernels (TIR) ------------------------------------------------------


def ceil_div(a, b):
    return (a + b - 1) // b


def rows_in_residue(n, d, r):
    """Rows i < n with i % d == r: the positions of residue r."""
    return T.max(n - r + d - 1, 0) // d


def tiles_per_residue(n, d, tt):
    """Tiles of ``tt`` residue positions that cover the longest residue."""
    return ceil_div(ceil_div(n, d), tt)


def _strided(handle, shape, dtype, strides, align):
    return T.match_buffer(handle, shape, dtype, strides=strides, align=align, offset_factor=1)


def _last_dims(product: str, D, C) -> tuple:
    """The last dimension of each tensor a product takes: (first, second, out)."""
    return (D, D, C) if product == "qk" else (C, D, D)


def operands(product: str, dtype: str, handles, align: int):
    """The signature every kernel of ``product`` opens with, for use inside its ``T.prim_func``:
    the symbolic sizes and the three tensor views, any strides with a unit last stride::

        (B, N, H, D, C), (Q, K, O) = band.operands("qk", dtype, (q_h, k_h, o_h), align=4)

    qk takes (B, N, H, D), (B, N, H, D) -> (B, N, H, C); pv and tpv (B, N, H, C), (B, N, H, D)
    -> (B, N, H, D). The strides of handle ``x_h`` are named ``sx0, sx1, sx2``. ``align``: the
    views' data alignment in bytes.
    """
    B, N, H, D, C = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
    views = []
    for handle, last in zip(handles, _last_dims(product, D, C)):
        tag = handle.name.removesuffix("_h")
        strides = tuple(tirx.Var(f"s{tag}{i}", "int64") for i in range(3)) + (T.int64(1),)
        views.append(_strided(handle, (B, N, H, last), dtype, strides, align))
    return (B, N, H, D, C), tuple(views)


def specialize(func: tirx.PrimFunc, product: str, dtype: str, shape, pad: float) -> tirx.PrimFunc:
    """Bind a kernel's symbolic sizes, strides and scalar arguments to ``shape`` =
    (B, N, H, D, w, dilation), contiguous tensors, ``left = right = w`` (QK's padding: ``pad``):
    the function MetaSchedule tunes (it must allocate the inputs)."""
    b, n, h, d, w, dil = shape
    params = list(func.params)
    mapping = {}
    for param, last in zip(params[:3], _last_dims(product, d, 2 * w + 1)):
        shp = (b, n, h, last)  # in TVM 0.27 a buffer parameter is its buffer
        strides = [tirx.const(shp[1] * shp[2] * shp[3], "int64"), tirx.const(shp[2] * shp[3], "int64"),
                   tirx.const(shp[3], "int64"), tirx.const(1, "int64")]
        mapping[param] = tirx.decl_buffer([tirx.const(x, "int64") for x in shp], dtype, param.name,
                                          strides=strides, elem_offset=tirx.const(0, "int64"),
                                          data_alignment=param.data_alignment,
                                          offset_factor=param.offset_factor)
    for param, value in zip(params[3:6], (w, w, dil)):
        mapping[param] = tirx.const(value, "int64")
    if len(params) > 6:  # qk's padding value
        mapping[params[6]] = tirx.const(pad, "float64")
    return func.specialize(mapping)
