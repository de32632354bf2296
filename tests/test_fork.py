"""fork() after the first kernel call: a child (a bare os.fork(), a DataLoader worker with the fork
start method) computes the products instead of waiting forever for TVM pool workers that stayed in
the parent. Each case runs in a fresh interpreter with a deadline, so a hang fails the test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

DEADLINE_S = 120

# The parent's first call runs on two threads (torch's OpenMP team, or TVM's pool under
# LONGFORMER_TVM_THREAD_POOL=tvm); the child, whose kernels fall back to TVM's pool, must then give
# the reference products.
COMMON = textwrap.dedent("""
    import os, sys, time
    import torch
    import longformer_tvm as lt
    from longformer_tvm import reference
    from longformer_tvm._checks import normalize_band

    torch.manual_seed(0)
    B, N, H, D, W, DIL = 1, 1000, 2, 32, 40, [1, 3]
    BAND = normalize_band("test", W, DIL, False, H)
    q, k = torch.randn(B, N, H, D, dtype=torch.float64), torch.randn(B, N, H, D, dtype=torch.float64)

    def products(q, k):
        s = lt.sliding_window_qk(q, k, W, DIL, padding_value=-1.0)
        return s, lt.sliding_window_pv(s, k, W, DIL), lt.sliding_window_pv_transposed(s, q, W, DIL)

    def matches(got, q, k):
        s = reference.band_qk(q, k, BAND, -1.0)
        want = (s, reference.band_pv(s, k, BAND), reference.band_pv_transposed(s, q, BAND))
        return all(torch.allclose(g, w, rtol=1e-9, atol=1e-9) for g, w in zip(got, want))

    assert matches(products(q, k), q, k)  # the first use, in the parent
    PARENT_THREADS = os.environ["TVM_NUM_THREADS"]
""")

# The parent's wait for a forked child: its exit code; a child that hangs is killed and fails the run.
WAIT_FOR_CHILD = textwrap.dedent("""
    import os, sys, time

    def wait_for(pid):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        sys.exit("the forked child hung in its first kernel call")
""")

BARE_FORK = COMMON + WAIT_FOR_CHILD + textwrap.dedent("""
    q2 = q * 2  # (here: a large elementwise op in the child would use torch's pool)
    pid = os.fork()
    if pid == 0:
        got = products(q2, k)
        # torch's own OpenMP pool hangs in a forked child (as TVM's did) unless it runs one thread
        torch.set_num_threads(1)
        ok = matches(got, q2, k)
        print("child TVM_NUM_THREADS", os.environ["TVM_NUM_THREADS"], flush=True)
        os._exit(0 if ok else 3)
    code = wait_for(pid)
    assert code == 0, f"child failed: {code}"
    assert matches(products(q, k * 3), q, k * 3)  # the parent is unaffected
    assert os.environ["TVM_NUM_THREADS"] == PARENT_THREADS
    print("ok")
""")

DATALOADER = COMMON + textwrap.dedent("""
    from torch.utils.data import DataLoader, Dataset

    class Products(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            qi, ki = q * (i + 1), k
            return i, matches(products(qi, ki), qi, ki), os.environ["TVM_NUM_THREADS"]

    loader = DataLoader(Products(), batch_size=None, num_workers=2, multiprocessing_context="fork",
                        timeout=60)
    got = list(loader)  # a hung worker raises after the timeout
    assert sorted(i for i, _, _ in got) == [0, 1, 2, 3]
    assert all(ok for _, ok, _ in got), got
    print("worker TVM_NUM_THREADS", sorted({n for _, _, n in got}))
    assert matches(products(q, k), q, k)
    print("ok")
""")


# fork() after torch's OpenMP team ran but before any kernel: the child loads the libraries itself,
# and its kernels must not use that team (GNU OpenMP's would wait for threads left in the parent)
FORK_BEFORE_FIRST_CALL = WAIT_FOR_CHILD + textwrap.dedent("""
    import torch
    import longformer_tvm as lt
    from longformer_tvm import reference
    from longformer_tvm._checks import normalize_band

    torch.mm(torch.randn(512, 512), torch.randn(512, 512))  # torch's team of two starts
    pid = os.fork()
    if pid == 0:
        band = normalize_band("test", 40, [1, 3], False, 2)
        q, k = (torch.randn(1, 1000, 2, 32, dtype=torch.float64) for _ in range(2))
        got = lt.sliding_window_qk(q, k, 40, [1, 3], padding_value=-1.0)
        torch.set_num_threads(1)  # the reference's torch ops would hang here on two threads
        ok = torch.allclose(got, reference.band_qk(q, k, band, -1.0), rtol=1e-9, atol=1e-9)
        pools = lt.backend_info()["cpu"]["thread_pools"]
        ok = ok and all(p.startswith("tvm (") for p in pools.values())
        os._exit(0 if ok else 3)
    code = wait_for(pid)
    assert code == 0, f"child failed: {code}"
    print("ok")
""")


def _run(code: str, env_threads: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if env_threads is not None:
        env["TVM_NUM_THREADS"] = env_threads
    setup = "" if env_threads is not None else "import torch; torch.set_num_threads(2)\n"
    try:
        proc = subprocess.run([sys.executable, "-c", setup + code], capture_output=True, text=True,
                              env=env, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung (killed after {DEADLINE_S} s); stdout: {exc.stdout!r}")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-3000:]
    return proc.stdout


# TVM_NUM_THREADS=2 set by the user: kept in the child, whose kernels run on a new pool there;
# unset: it follows torch.get_num_threads() (2 in the parent here, and in the bare child; 1 in a
# DataLoader worker, where torch runs one thread)
@pytest.mark.parametrize("env_threads", ["2", None], ids=["TVM_NUM_THREADS=2", "threads-from-torch"])
def test_child_of_fork_after_first_call_computes_the_products(env_threads):
    out = _run(BARE_FORK, env_threads)
    assert "child TVM_NUM_THREADS 2" in out


@pytest.mark.parametrize("env_threads", ["2", None], ids=["TVM_NUM_THREADS=2", "threads-from-torch"])
def test_dataloader_fork_workers_call_the_ops(env_threads):
    out = _run(DATALOADER, env_threads)
    assert f"worker TVM_NUM_THREADS ['{env_threads or 1}']" in out


def test_forked_thread_is_guarded_only_in_a_child(monkeypatch):
    from longformer_tvm import _install

    state = _install.ForkedThreadPool()
    kernel = object()
    assert state.guard(kernel) is kernel  # no fork: the kernel itself, no per-call cost
    state.runtime_loaded = True
    state.after_fork_in_child()  # as in a child of this thread
    monkeypatch.setenv("TVM_NUM_THREADS", "4")
    assert state.guard(kernel) is not kernel
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # TVM runs single-threaded kernels inline
    assert state.guard(kernel) is kernel


def test_child_of_fork_before_any_kernel_keeps_off_the_parents_openmp_team():
    _run(FORK_BEFORE_FIRST_CALL, None)
