"""The output pool: freed large outputs are reused, live ones never; results stay exact."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import _pool, reference
from longformer_tvm._checks import normalize_band

# 1 x 1024 x 4 x 513 float32 scores = 8.4 MB: just over the pool's threshold
B, N, H, D, W = 1, 1024, 4, 32, 256


@pytest.fixture
def qk():
    torch.manual_seed(0)
    return torch.randn(B, N, H, D), torch.randn(B, N, H, D)


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.setattr(_pool, "POOL", _pool.OutputPool(256 << 20))
    yield
    _pool.POOL.clear()


def test_threshold_covers_this_shape():
    assert B * N * H * (2 * W + 1) * 4 >= _pool.MIN_BYTES


def test_freed_output_is_reused_and_exact(qk):
    q, k = qk
    first = lt.sliding_window_qk(q, k, W)
    ptr = first.data_ptr()
    del first
    gc.collect()
    assert _pool.POOL.idle_bytes > 0
    second = lt.sliding_window_qk(q, k, W)
    assert second.data_ptr() == ptr
    assert _pool.POOL.idle_bytes == 0
    band = normalize_band("test", W, 1, False, H)
    expected = reference.band_qk(q.double(), k.double(), band, 0.0)
    torch.testing.assert_close(second.double(), expected, rtol=1e-5, atol=1e-4)


def test_live_output_and_views_are_never_reused(qk):
    q, k = qk
    first = lt.sliding_window_qk(q, k, W)
    keep = first.clone()
    row = first[0, 5]  # a view keeps the block in use after the tensor itself is gone
    del first
    gc.collect()
    second = lt.sliding_window_qk(q * 2, k, W)
    assert second.data_ptr() != row.data_ptr()
    torch.testing.assert_close(row, keep[0, 5])
    del row, keep
    gc.collect()
    assert _pool.POOL.idle_bytes > 0  # the block came back once the view went


def test_saved_for_backward_is_not_reused(qk):
    q, k = (t.clone().requires_grad_() for t in qk)
    s = lt.sliding_window_qk(q, k, W)
    p = torch.softmax(s, -1)  # softmax saves its output for backward
    saved = p.detach().clone()
    del s
    v = torch.randn(B, N, H, D)
    out = lt.sliding_window_pv(p, v, W)
    for _ in range(3):  # outputs that could land on p's memory if it were wrongly reused
        lt.sliding_window_qk(q.detach(), k.detach(), W)
    torch.testing.assert_close(p.detach(), saved)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_in_place_use_of_output_under_autograd(qk):
    q, k = (t.clone().requires_grad_() for t in qk)
    s = lt.sliding_window_qk(q, k, W)
    s.mul_(0.5)  # an in-place edit of the op's output is legal: it is not a view
    s.sum().backward()
    band = normalize_band("test", W, 1, False, H)
    g = torch.full((B, N, H, 2 * W + 1), 0.5, dtype=torch.float64)
    expected = reference.band_pv(g, k.double(), band)  # invalid diagonals are ignored
    torch.testing.assert_close(q.grad.double(), expected, rtol=1e-5, atol=1e-4)


def test_limit_zero_turns_the_pool_off(qk, monkeypatch):
    monkeypatch.setattr(_pool, "POOL", _pool.OutputPool(0))
    q, k = qk
    out = lt.sliding_window_qk(q, k, W)
    del out
    gc.collect()
    assert _pool.POOL.idle_bytes == 0


def test_env_limit(monkeypatch):
    monkeypatch.setenv("LONGFORMER_TVM_POOL_MB", "3")
    assert _pool.OutputPool().limit_bytes == 3 << 20
    monkeypatch.setenv("LONGFORMER_TVM_POOL_MB", "lots")
    assert _pool.OutputPool().limit_bytes == 1024 << 20  # warned, default kept


def test_idle_memory_respects_the_limit_and_empty_cache(qk, monkeypatch):
    block = -(-B * N * H * (2 * W + 1) * 4 // (2 << 20)) * (2 << 20)
    monkeypatch.setattr(_pool, "POOL", _pool.OutputPool(block))  # room for one idle block
    q, k = qk
    outs = [lt.sliding_window_qk(q, k, W) for _ in range(3)]
    del outs
    gc.collect()
    assert _pool.POOL.idle_bytes == block
    lt.empty_cache()
    assert _pool.POOL.idle_bytes == 0


def test_threads_get_distinct_correct_outputs(qk):
    q, k = qk
    band = normalize_band("test", W, 1, False, H)
    expected = reference.band_qk(q.double(), k.double(), band, 0.0)
    errors = []

    def work(scale):
        for _ in range(3):
            out = lt.sliding_window_qk(q * scale, k, W)
            if not torch.allclose(out.double(), expected * scale, rtol=1e-5, atol=1e-3):
                errors.append(scale)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1.0, 2.0, 3.0, 4.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
