"""Outputs behave like ordinary tensors whether or not they come from the output pool (resize_,
a growing out=, numpy(), share_memory_()), and dilation may be given as numpy integers."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import _pool, reference
from longformer_tvm._checks import normalize_band

# 1 x 1024 x 4 x 513 float32 scores = 8.4 MB: pooled
B, N, H, D, W = 1, 1024, 4, 32, 256


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.setattr(_pool, "POOL", _pool.OutputPool(256 << 20))
    yield
    _pool.POOL.clear()


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, N, H, D, generator=g), torch.randn(B, N, H, D, generator=g)


def _scores(q, k):
    out = lt.sliding_window_qk(q, k, W)
    assert out.nbytes >= _pool.MIN_BYTES  # from the pool
    return out


def test_pooled_output_resizes_like_an_ordinary_tensor(qk):
    q, k = qk
    s = _scores(q, k)
    keep = s.clone()
    s.resize_(3, N, H, 2 * W + 1)  # past its block: moves to new memory, keeps the data
    assert s.shape == (3, N, H, 2 * W + 1)
    torch.testing.assert_close(s[:1], keep, rtol=0, atol=0)
    s.resize_(10)
    s.resize_(1, 2, 3)
    other = _scores(q * 2, k)  # the block s left is never handed out while s lives
    assert other.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()


def test_pooled_output_grows_as_out_argument(qk):
    q, k = qk
    a, b = torch.randn(3, N, H, 2 * W + 1), torch.randn(3, N, H, 2 * W + 1)
    out = _scores(q, k)
    torch.add(a, b, out=out)
    torch.testing.assert_close(out, a + b, rtol=0, atol=0)


@pytest.mark.parametrize("product", ["qk", "pv", "tpv"])
@pytest.mark.parametrize("size", ["small", "pooled"])
def test_every_output_is_resizable(product, size):
    n = N if size == "pooled" else 64
    q = torch.randn(B, n, H, D)
    p, x = torch.randn(B, n, H, 2 * W + 1), torch.randn(B, n, H, 2 * W + 1)  # x: large pv/tpv outputs
    out = {"qk": lambda: lt.sliding_window_qk(q, q, W),
           "pv": lambda: lt.sliding_window_pv(p, x, W),
           "tpv": lambda: lt.sliding_window_pv_transposed(p, x, W)}[product]()
    assert (out.nbytes >= _pool.MIN_BYTES) == (size == "pooled")
    assert out.untyped_storage().resizable()
    out.resize_(out.numel() * 2)


def test_blocks_that_left_the_pool_are_not_handed_out_again(qk):
    q, k = qk
    s = _scores(q, k)
    s.numpy()  # marks the storage unresizable for good
    del s
    gc.collect()
    assert _scores(q, k).untyped_storage().resizable()
    s = _scores(q, k)
    s.share_memory_()  # moved to shared memory, as a DataLoader worker's result is
    del s
    gc.collect()
    assert not _scores(q, k).is_shared()


def test_pooled_output_numpy_view_stays_valid(qk):
    q, k = qk
    s = _scores(q, k)
    view = s.numpy()
    want = view.copy()
    del s
    gc.collect()
    for _ in range(3):  # outputs that would land on the array's memory if it were reused
        _scores(q * 3, k)
    np.testing.assert_array_equal(view, want)


@pytest.mark.parametrize("dilation", [
    np.array([1, 2, 3, 1]), np.array([1, 2, 3, 1], dtype=np.uint8), [np.int64(1), np.int32(2), 3, 1],
    np.int64(2), np.array(2), torch.tensor([1, 2, 3, 1]), torch.tensor(2),
], ids=["ndarray", "ndarray-uint8", "list-of-numpy-ints", "numpy-int", "0-d-ndarray", "tensor",
        "0-d-tensor"])
def test_dilation_accepts_numpy_and_torch_integers(dilation):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 50, 4, 8, generator=g), torch.randn(1, 50, 4, 8, generator=g)
    as_list = [int(d) for d in np.broadcast_to(np.asarray(dilation), (4,))]
    got = lt.sliding_window_qk(q, k, np.int64(3), dilation)
    torch.testing.assert_close(got, lt.sliding_window_qk(q, k, 3, as_list), rtol=0, atol=0)
    band = normalize_band("test", 3, as_list, False, 4)
    torch.testing.assert_close(got.double(), reference.band_qk(q.double(), k.double(), band, 0.0),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lt.diagonaled_mm(q, k, 3, dilation), got, rtol=0, atol=0)


@pytest.mark.parametrize("dilation, error, match", [
    (np.array([1.0, 2.0, 1.0, 1.0]), TypeError, "dilation must hold integers, got a numpy array of dtype float64"),
    (np.array([True, True, True, True]), TypeError, "numpy array of dtype bool"),
    (np.array([[1, 2, 3, 1]]), ValueError, "1-D numpy array of length heads=4"),
    (np.array([1, 2]), ValueError, "one entry per head: got 2 entries for heads=4"),
    (np.array([1, 0, 1, 1]), ValueError, "dilation must be >= 1"),
], ids=["float", "bool", "2-d", "wrong-length", "zero"])
def test_bad_numpy_dilation_is_explained(dilation, error, match):
    q = torch.randn(1, 20, 4, 8)
    with pytest.raises(error, match=match):
        lt.sliding_window_qk(q, q, 3, dilation)
