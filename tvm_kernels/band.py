"""The band products as tensor expressions, in the paper's formulation (pure: shapes in, tensors out).

For query row ``i``, diagonal ``j`` and dilation ``d`` the key row is ``i + (j - left) * d``:

    qk : out[b,i,h,j] = sum_k q[b,i,h,k] * k[b, i+(j-left)*d, h, k]        (pad outside [0, N))
    pv : out[b,i,h,k] = sum_j p[b,i,h,j] * v[b, i+(j-left)*d, h, k]        (invalid j skipped)
    tpv: out[b,m,h,k] = sum_j g[b, m-(j-left)*d, h, j] * x[b, m-(j-left)*d, h, k]

This is the definition the tiled formulation (:mod:`tvm_kernels.tiled`) must agree with, and the
"naive" schedule in ``build_kernels.py compare``: one output element at a time, with the bounds
check inside the reduction, exactly as allenai/longformer compiled it. It vectorises poorly; it
is kept as the baseline the paper started from.
"""

from __future__ import annotations

from tvm import te, tirx


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
