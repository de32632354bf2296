"""Measuring tuning candidates on machines registered with a TVM RPC tracker.

One machine builds (here: any CPU with the TVM compiler, also for a GPU it lacks), a pool of
machines of the target kind measures, in parallel, through TVM's own engine: MetaSchedule's
``RPCRunner`` asks the tracker for a server under ``key``, uploads the candidate library, times
it there with ``time_evaluator`` and hands the seconds back to the search. Set up a pool::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190                  # one machine
    python -m tvm.exec.rpc_server --tracker TRACKER:9190 --key avx512          # each measurer
    python -m tvm.exec.query_rpc_tracker --host TRACKER --port 9190            # who is there
    python build_kernels.py tune --rpc-tracker TRACKER:9190 --rpc-key avx512 ...

The servers need only the TVM runtime (the pinned apache-tvm); they never see this repository.

The candidates are the package's symbolic functions (``band_qk(q, k, out, left, right, d, pad)``
and the like), which take the window, the dilation and QK's padding as scalars after the tensors;
MetaSchedule allocates only the tensors (at the tuning shape, randomly filled on the server), so
the timing function here appends the scalars.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path

from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

_TRACKER = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]:]+):(?P<port>\d{1,5})$")


def parse_tracker(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ValueError naming the option and the rule otherwise."""
    m = _TRACKER.match(spec.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"--rpc-tracker must be HOST:PORT (e.g. 127.0.0.1:9190), got {spec!r}")
    return m["host"].strip("[]"), int(m["port"])


def time_on_server(symbol: str, scalars: tuple, session, rt_mod, device, evaluator_config,
                   repeated_args) -> list[float]:
    """Runs in MetaSchedule's runner worker: the remote library's ``symbol`` timed on the server
    with the allocated tensors followed by ``scalars`` (seconds per call, every repeat)."""
    del session
    evaluator = rt_mod.time_evaluator(
        symbol, device, number=evaluator_config.number, repeat=evaluator_config.repeat,
        min_repeat_ms=evaluator_config.min_repeat_ms,
        f_preproc="cache_flush_cpu_non_first_arg" if evaluator_config.enable_cpu_cache_flush else "")
    costs = []
    for args in repeated_args:
        device.sync()
        costs.extend(float(c) for c in evaluator(*args, *scalars).results)
    return costs


def runner(tracker: str, key: str, symbol: str, scalars: tuple, servers: int | None = None,
           timeout_s: float = 120.0) -> RPCRunner:
    """An RPCRunner that measures ``symbol`` on up to ``servers`` machines under ``key`` at once
    (default: as many as the tracker lists under that key when asked, at least one)."""
    host, port = parse_tracker(tracker)
    if not key or not key.strip():
        raise ValueError("--rpc-key must name the servers' key (python -m tvm.exec.rpc_server "
                         "--tracker HOST:PORT --key KEY), got an empty key")
    # the runner's workers are fresh interpreters that unpickle time_on_server by reference
    root = str(Path(__file__).resolve().parent.parent)
    paths = os.environ.get("PYTHONPATH", "")
    if root not in paths.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, paths) if p)
    config = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key.strip(),
                       session_priority=1, session_timeout_sec=int(timeout_s))
    workers = servers or max(1, free_servers(host, port, key.strip()))
    return RPCRunner(config, EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100),
                     f_run_evaluator=functools.partial(time_on_server, symbol, tuple(scalars)),
                     max_workers=workers)


def free_servers(host: str, port: int, key: str) -> int:
    """How many servers the tracker lists under ``key`` (0 when it cannot be asked)."""
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except (OSError, RuntimeError):
        return 0
    queue = summary.get("queue_info", {}).get(key, {})
    return int(queue.get("free", 0)) + int(queue.get("pending", 0))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(probe, what: str, timeout: float) -> None:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if probe():
                return
        except Exception:  # noqa: BLE001  (not up yet)
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


@contextlib.contextmanager
def loopback_pool(servers: int, key: str, threads: int = 1, timeout: float = 60.0):
    """A tracker and ``servers`` RPC servers under ``key`` on 127.0.0.1, each server timing with
    ``threads`` threads; yields the tracker's "HOST:PORT" and stops them all on exit. For tests and
    benchmarks: servers on one machine share its cores, so they measure no faster than one."""
    import subprocess
    import sys

    from tvm import rpc

    port = _free_port()
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(port), "--port-end", str(port + 1)], **quiet)]
    try:
        _wait(lambda: rpc.connect_tracker("127.0.0.1", port).summary(), "the tracker", timeout)
        for _ in range(servers):
            sport = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                 "--key", key, "--host", "127.0.0.1", "--port", str(sport),
                 "--port-end", str(sport + 1)], **quiet))
        _wait(lambda: free_servers("127.0.0.1", port, key) == servers, f"{servers} servers", timeout)
        yield f"127.0.0.1:{port}"
    finally:
        for p in procs:
            p.kill()
            p.wait()
