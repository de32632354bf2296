"""Threads: the first call from many threads loads each library once; kernel calls from several
Python threads at once (each with its own TVM CPU thread pool) give the single-threaded results."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import tvm_ffi

import longformer_tvm as lt
from longformer_tvm import _manifest, reference
from longformer_tvm._checks import normalize_band

from .registry import private_registry
from .test_integrity import runnable_library

THREADS = 8


@pytest.fixture
def fresh_registry(monkeypatch, tmp_path):
    """A registry that has loaded nothing, over private copies of the shipped float32 and float64
    libraries; counts verifications and loads (each made slow, so that threads arriving together
    overlap inside them)."""
    entries = []
    for dtype in ("float32", "float64"):
        source, entry = runnable_library(dtype)
        (tmp_path / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp_path / entry["file"])
        entries.append(entry)
    (tmp_path / "manifest.json").write_text(json.dumps({"libraries": entries}))
    private_registry(monkeypatch, [tmp_path])
    monkeypatch.setenv("LONGFORMER_TVM_CACHE", str(tmp_path / "cache"))
    counts = {"sha256": [], "load": []}
    real_sha, real_load = _manifest.sha256_file, tvm_ffi.load_module

    def slow_sha(path):
        counts["sha256"].append(str(path))
        time.sleep(0.2)
        return real_sha(path)

    def slow_load(path, *args, **kwargs):
        counts["load"].append(str(path))
        time.sleep(0.2)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(_manifest, "sha256_file", slow_sha)
    monkeypatch.setattr(tvm_ffi, "load_module", slow_load)
    return counts


def _inputs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 64 + seed, 3, 8, generator=g, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float32, torch.float64]],
                         ids=["one-dtype", "two-dtypes"])
def test_threads_making_the_first_call_at_once_load_each_library_once(fresh_registry, dtypes):
    barrier = threading.Barrier(THREADS)

    def first_call(i):
        q, k = _inputs(i, dtypes[i % len(dtypes)])
        barrier.wait()
        got = lt.sliding_window_qk(q, k, 5, [1, 2, 3])
        want = reference.band_qk(q.double(), k.double(), normalize_band("t", 5, [1, 2, 3], False, 3))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        return i

    with ThreadPoolExecutor(THREADS) as pool:
        assert sorted(pool.map(first_call, range(THREADS))) == list(range(THREADS))
    loaded = fresh_registry["load"]
    assert len(loaded) == len(set(loaded)) == len(dtypes), loaded
    assert len(fresh_registry["sha256"]) == len(dtypes), fresh_registry["sha256"]
    assert set(lt.backend_info()["loaded"].values()) == set(loaded)


# (product, dtype, B, N, H, D, window, dilation, autoregressive): several libraries, shapes and
# head runs, so calls in flight at once differ in every argument
CASES = [
    ("qk", torch.float32, 2, 300, 4, 16, 17, [1, 2, 2, 5], False),
    ("pv", torch.float32, 1, 513, 3, 24, 8, 1, True),
    ("tpv", torch.float32, 3, 97, 2, 7, 30, [3, 1], False),
    ("qk", torch.float64, 1, 256, 2, 32, 4, 2, True),
    ("pv", torch.float64, 2, 129, 3, 5, 12, [1, 1, 9], False),
    ("tpv", torch.float64, 1, 400, 1, 12, 40, 1, False),
]


def _run_case(case, seed):
    product, dtype, b, n, h, d, w, dil, ar = case
    band = normalize_band("t", w, dil, ar, h)
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(b, n, h, d if product == "qk" else band.columns, generator=g, dtype=dtype)
    second = torch.randn(b, n, h, d, generator=g, dtype=dtype)
    fn = {"qk": lambda: lt.sliding_window_qk(first, second, w, dil, ar, padding_value=-1.0),
          "pv": lambda: lt.sliding_window_pv(first, second, w, dil, ar),
          "tpv": lambda: lt.sliding_window_pv_transposed(first, second, w, dil, ar)}[product]
    return fn()


def test_kernel_calls_from_several_threads_at_once_match_single_threaded_results(fresh_registry):
    expected = [_run_case(case, seed) for seed, case in enumerate(CASES)]
    barrier = threading.Barrier(4)

    def worker(t):
        barrier.wait()
        wrong = []
        for rep in range(20):
            for i in range(len(CASES)):
                j = (i + t + rep) % len(CASES)
                if not torch.equal(_run_case(CASES[j], j), expected[j]):
                    wrong.append((t, rep, CASES[j][:2]))
        return wrong

    with ThreadPoolExecutor(4) as pool:
        wrong = [w for ws in pool.map(worker, range(4)) for w in ws]
    assert not wrong, wrong


def test_autograd_in_several_threads_at_once(fresh_registry):
    def train_step(seed):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 200, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
                   for _ in range(3))
        s = lt.sliding_window_qk(q, k, 6, [1, 3], padding_value=float("-inf"))
        out = lt.sliding_window_pv(torch.softmax(s, -1), v, 6, [1, 3])
        out.square().sum().backward()
        return [t.grad for t in (q, k, v)]

    expected = [train_step(s) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(train_step, range(4)))
    for e, g in zip(expected, got):
        for a, b in zip(e, g):
            assert torch.equal(a, b)
