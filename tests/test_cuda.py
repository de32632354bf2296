"""The CUDA kernels on a GPU: every product x dtype against the float64 oracle, streams, devices.

Marked ``cuda``; every test skips (visibly) where torch sees no GPU. Tolerances follow the house
rule: the kernel's error against float64 may be a small multiple of plain PyTorch's error at the
same dtype on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import backends, reference
from longformer_tvm._checks import normalize_band

from .oracle import assert_close_to_oracle, dense_pv, dense_qk, dense_tpv

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch, seq_len, heads, head_dim, window, dilation, autoregressive)
CASES = [
    (1, 1, 1, 8, 0, 1, False),
    (3, 7, 3, 8, 17, 1, False),             # w >= N
    (1, 7, 4, 8, 1, [1, 2, 3, 4], False),   # w * d >= N on some heads
    (1, 333, 3, 24, 17, [1, 2, 3], False),  # N not a multiple of anything
    (3, 333, 2, 16, 17, 2, True),
    (1, 1024, 2, 64, 256, 1, False),
    (1, 1024, 4, 64, 256, [1, 2, 3, 5], True),
    (1, 1000, 3, 7, 1, 1, False),           # odd head size
    (2, 517, 2, 130, 70, 1, False),         # head size above one staging chunk
]


def _id(case):
    b, n, h, d, w, dil, ar = case
    return f"B{b}-N{n}-H{h}-D{d}-w{w}-d{dil}{'-ar' if ar else ''}".replace(" ", "")


def _data(case, seed=0):
    b, n, h, d, w, dil, ar = case
    g = torch.Generator().manual_seed(seed)
    band = normalize_band("test", w, dil, ar, h)
    mk = lambda last: torch.randn(b, n, h, last, generator=g, dtype=torch.float64)  # noqa: E731
    return band, mk(d), mk(d), mk(band.columns)


def _factor(dtype):
    return 8.0 if dtype == torch.float32 else 4.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_products_match_oracle(case, dtype):
    band, q, k, p = _data(case)
    w, dil, ar = case[4:]
    dev = torch.device("cuda")
    qd, kd, pd = (t.to(dev, dtype) for t in (q, k, p))
    got = lt.sliding_window_qk(qd, kd, w, dil, ar, padding_value=float("-inf"))
    plain = reference.band_qk(qd, kd, band, float("-inf"))
    assert_close_to_oracle(got.cpu(), dense_qk(qd.cpu(), kd.cpu(), band, float("-inf")), plain.cpu(),
                           factor=_factor(dtype), what="qk")
    got = lt.sliding_window_pv(pd, kd, w, dil, ar)
    plain = reference.band_pv(pd, kd, band)
    assert_close_to_oracle(got.cpu(), dense_pv(pd.cpu(), kd.cpu(), band), plain.cpu(),
                           factor=_factor(dtype), what="pv")
    got = lt.sliding_window_pv_transposed(pd, qd, w, dil, ar)
    plain = reference.band_pv_transposed(pd, qd, band)
    assert_close_to_oracle(got.cpu(), dense_tpv(pd.cpu(), qd.cpu(), band), plain.cpu(),
                           factor=_factor(dtype), what="tpv")


def test_pv_ignores_invalid_diagonals_on_gpu():
    band, _, v, p = _data((1, 50, 2, 16, 30, 1, False))
    key, valid = reference.key_index(50, band)
    p[:, ~valid.permute(1, 0, 2)] = float("nan")
    got = lt.sliding_window_pv(p.float().cuda(), v.float().cuda(), 30)
    assert torch.isfinite(got).all()


def test_runs_on_the_current_non_default_stream():
    band, q, k, _ = _data((2, 2048, 4, 64, 128, 1, False))
    q, k = q.float().cuda(), k.float().cuda()
    want = lt.sliding_window_qk(q, k, 128)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # the inputs are produced on the side stream too, so a launch on the default stream
        # would race with them
        q2, k2 = q * 1.0, k * 1.0
        got = lt.sliding_window_qk(q2, k2, 128)
    stream.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    band, q, k, _ = _data((1, 300, 2, 32, 20, 2, False))
    want = lt.sliding_window_qk(q.float().cuda(0), k.float().cuda(0), 20, 2)
    got = lt.sliding_window_qk(q.float().cuda(1), k.float().cuda(1), 20, 2)
    assert got.device == torch.device("cuda", 1)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast(dtype):
    band, q, k, _ = _data((1, 256, 2, 32, 16, 1, False))
    q, k = q.float().cuda(), k.float().cuda()
    with torch.autocast("cuda", dtype=dtype):
        got = lt.sliding_window_qk(q, k, 16)
    assert got.dtype == dtype
    want = lt.sliding_window_qk(q.to(dtype), k.to(dtype), 16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradients_flow_in_half_precision():
    band, q, k, _ = _data((1, 200, 2, 32, 10, 1, False))
    q = q.half().cuda().requires_grad_()
    k = k.half().cuda().requires_grad_()
    lt.sliding_window_qk(q, k, 10).float().square().sum().backward()
    assert q.grad.dtype == torch.float16 and torch.isfinite(q.grad).all()


def test_float64_on_gpu_is_a_clear_error():
    q = torch.randn(1, 8, 1, 4, dtype=torch.float64, device="cuda")
    with pytest.raises(lt.KernelNotAvailableError, match="float32"):
        lt.sliding_window_qk(q, q, 2)


def test_backend_info_names_the_library():
    lt.sliding_window_qk(torch.randn(1, 8, 1, 4, device="cuda"), torch.randn(1, 8, 1, 4, device="cuda"), 2)
    info = lt.backend_info()["cuda"]
    assert info["gpus"] and any(k.endswith("/float32") for k in info["loaded"])
    arch = backends.arch(torch.device("cuda"))
    assert any(k.startswith(arch) for k in info["loaded"])
