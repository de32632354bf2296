"""Which threads the CPU kernels run on (longformer_tvm._threads): torch's OpenMP team by default,
TVM's own pool when asked or when a library lacks the launcher; the results are the same
bit for bit, and they match the float64 reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from longformer_tvm import _install, _threads, backends, ops
from longformer_tvm._checks import normalize_band

REPO = Path(__file__).resolve().parent.parent

# Runs torch's OpenMP team first (a matmul), counts the process's threads, then calls every kind
# of CPU kernel (band products, fused forward and backward) and counts again: a second pool shows
# as new threads. Prints one JSON line: threads before/after, the pools, results as lists.
PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    import longformer_tvm as lt
    from longformer_tvm import reference
    from longformer_tvm._checks import normalize_band

    threads = int(sys.argv[1])
    torch.set_num_threads(threads)
    torch.mm(torch.randn(256, 256), torch.randn(256, 256))
    before = len(os.listdir("/proc/self/task"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 700, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    s = lt.sliding_window_qk(q, k, 20, [1, 2, 3], padding_value=-1.0)
    pv = lt.sliding_window_pv(s, v, 20, [1, 2, 3])
    att = lt.sliding_window_attention(q, k, v, 20, [1, 2, 3])
    att.sum().backward()
    after = len(os.listdir("/proc/self/task"))
    band = normalize_band("t", 20, [1, 2, 3], False, 3)
    s0 = reference.band_qk(q.detach(), k.detach(), band, -1.0)
    want = reference.band_pv(s0, v.detach(), band)
    info = lt.backend_info()
    print(json.dumps({"before": before, "after": after,
                      "pools": list(info["cpu"]["thread_pools"].values()),
                      "errors": info["errors"],
                      "pv_error": (pv.detach() - want).abs().max().item(),
                      "results": [t.detach().flatten()[::97].tolist()
                                  for t in (s, pv, att, q.grad, k.grad, v.grad)]}))
""")


def _probe(threads: int, **env) -> dict:
    full = {k: v for k, v in os.environ.items()
            if k not in (_install.THREAD_POOL_ENV, _install.THREADS_ENV)}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, str(threads)], env=full, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kernels_run_on_torchs_threads_and_match_tvms_pool():
    torch_pool = _probe(2)
    assert all(p.startswith("torch (") for p in torch_pool["pools"]), torch_pool["pools"]
    # no second pool: the kernels ran on the team torch's matmul had started
    assert torch_pool["after"] == torch_pool["before"], torch_pool
    tvm_pool = _probe(2, LONGFORMER_TVM_THREAD_POOL="tvm")
    assert all(p.startswith("tvm (") for p in tvm_pool["pools"]), tvm_pool["pools"]
    assert tvm_pool["after"] > tvm_pool["before"], tvm_pool  # TVM's worker joined
    assert torch_pool["results"] == tvm_pool["results"]  # same code, other threads
    assert torch_pool["pv_error"] < 1e-9 and tvm_pool["pv_error"] < 1e-9


@pytest.mark.slow
def test_one_torch_thread_gives_the_same_results():
    assert _probe(1)["results"] == _probe(2)["results"]


@pytest.mark.slow
def test_user_set_tvm_num_threads_keeps_tvms_pool_and_bad_setting_warns():
    assert all(p.startswith("tvm (") for p in _probe(2, TVM_NUM_THREADS="2")["pools"])
    bad = _probe(2, LONGFORMER_TVM_THREAD_POOL="openmp")
    assert all(p.startswith("torch (") for p in bad["pools"]), bad["pools"]  # the default
    assert any("LONGFORMER_TVM_THREAD_POOL='openmp'" in e for e in bad["errors"]), bad["errors"]


def test_thread_pool_setting_is_checked(monkeypatch):
    monkeypatch.setenv(_install.THREAD_POOL_ENV, " TVM ")
    assert _install.thread_pool() == "tvm"
    monkeypatch.setenv(_install.THREAD_POOL_ENV, "gomp")
    with pytest.raises(ValueError, match="LONGFORMER_TVM_THREAD_POOL='gomp'.*'torch'.*'tvm'"):
        _install.thread_pool()
    monkeypatch.delenv(_install.THREAD_POOL_ENV)
    assert _install.thread_pool() is None


def _qk_library(with_launcher: bool) -> tuple[Path, object]:
    import tvm
    import tvm_ffi

    from tvm_kernels.cpu import build
    from tvm_kernels.cpu.targets import CPU_TARGETS

    backends.load_runtime("cpu")
    target = CPU_TARGETS["generic"]
    module = tvm.compile(tvm.IRModule({"band_qk": build.scheduled_func("qk", "float32", target)}),
                         target=target.llvm())
    path = Path(tempfile.mkdtemp(prefix="lftvm-threads-")) / "qk.so"
    if with_launcher:
        build.export_cpu(module, path)
    else:
        module.export_library(str(path))
    return path, tvm_ffi.load_module(str(path))["band_qk"]


@pytest.mark.skipif(_threads.openmp_runtime() is None, reason="torch's runtime is not OpenMP")
def test_install_needs_the_launcher_and_changes_no_result(monkeypatch):
    monkeypatch.delenv(_install.THREAD_POOL_ENV, raising=False)
    band = normalize_band("t", 9, [1, 4], False, 2)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 301, 2, 24, generator=g), torch.randn(2, 301, 2, 24, generator=g)
    old_path, old = _qk_library(with_launcher=False)
    assert _threads.install(old_path) == "tvm (the library has no OpenMP launcher: rebuild it)"
    new_path, new = _qk_library(with_launcher=True)
    before = ops.apply_kernel(new, q, k, band, torch.empty(2, 301, 2, band.columns), -1.0)
    assert _threads.install(new_path).startswith("torch (")
    assert _threads.install(new_path).startswith("torch (")  # a second install changes nothing
    after = ops.apply_kernel(new, q, k, band, torch.empty(2, 301, 2, band.columns), -1.0)
    assert torch.equal(before, after)
    assert torch.equal(after, ops.apply_kernel(old, q, k, band, torch.empty_like(after), -1.0))
    assert _threads.pools()[str(new_path)].startswith("torch (")


def test_a_failing_install_leaves_the_library_on_tvms_pool(monkeypatch, caplog, tmp_path):
    def broken(path):
        raise OSError("planted")

    monkeypatch.setattr(_threads, "_install_in", broken)
    assert _threads.install(tmp_path / "x.so") == "tvm (OSError: planted)"
    assert "could not put" in caplog.text
