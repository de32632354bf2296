"""Environment settings: a bad value never breaks ``import longformer_tvm``; it gives a warning or
an error that names the variable and what it accepts, and backend_info() reports it instead of
raising. Each case runs in a fresh interpreter, since some are read at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

VARIABLES = ("LONGFORMER_TVM_LOG_LEVEL", "LONGFORMER_TVM_BACKEND", "LONGFORMER_TVM_POOL_MB",
             "TVM_NUM_THREADS")

# imports the package, reports what a tool would see, then calls each product once
PROBE = """
import json, logging, os, torch
import longformer_tvm as lt
from longformer_tvm import _pool
report = {"level": logging.getLogger("longformer_tvm").level, "pool_limit": _pool.POOL.limit_bytes}
try:
    info = lt.backend_info()
    report.update(mode=info["mode"], errors=info.get("errors"))
except Exception as exc:
    report.update(mode=f"backend_info() raised {type(exc).__name__}: {exc}", errors=None)
q = torch.randn(1, 64, 2, 8)
try:
    s = lt.sliding_window_qk(q, q, 3)
    lt.sliding_window_pv(s, q, 3)
    report["call"] = "ok"
except Exception as exc:
    report["call"] = f"{type(exc).__name__}: {exc}"
report["threads_after"] = os.environ.get("TVM_NUM_THREADS")
report["torch_threads"] = torch.get_num_threads()
print("REPORT " + json.dumps(report))
"""


def _probe(**settings) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(settings)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"import or probe failed:\n{proc.stderr[-3000:]}"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT ")), proc.stderr


def test_defaults_report_no_errors():
    report, stderr = _probe()
    assert report["mode"] == "auto" and report["errors"] == [] and report["call"] == "ok"
    assert report["threads_after"] == str(report["torch_threads"])  # follows torch
    assert not any(v in stderr for v in VARIABLES)


@pytest.mark.parametrize("value, level", [("debug", 10), (" Error ", 40), ("15", 15)])
def test_log_level_names_any_case_or_a_number(value, level):
    report, _ = _probe(LONGFORMER_TVM_LOG_LEVEL=value)
    assert report["level"] == level and report["errors"] == []


def test_bad_log_level_warns_and_import_works():
    report, stderr = _probe(LONGFORMER_TVM_LOG_LEVEL="verbose")
    assert "LONGFORMER_TVM_LOG_LEVEL='verbose'" in stderr and "DEBUG, INFO, WARNING" in stderr
    assert report["level"] == 0 and report["call"] == "ok"  # the level is left as it was
    assert any("LONGFORMER_TVM_LOG_LEVEL" in e for e in report["errors"])


def test_bad_backend_is_reported_by_backend_info_and_raised_by_the_ops():
    report, stderr = _probe(LONGFORMER_TVM_BACKEND="tvm")
    assert "LONGFORMER_TVM_BACKEND='tvm'" in stderr  # warned at import
    assert report["mode"] == "invalid"
    (error,) = report["errors"]
    assert "LONGFORMER_TVM_BACKEND='tvm'" in error and "'auto'" in error and "'reference'" in error
    assert report["call"].startswith("ValueError: LONGFORMER_TVM_BACKEND='tvm'")


def test_backend_reference_any_case():
    report, _ = _probe(LONGFORMER_TVM_BACKEND=" Reference ")
    assert report["mode"] == "reference" and report["errors"] == [] and report["call"] == "ok"


@pytest.mark.parametrize("value", ["lots", "-3", "1.5", "1e3"])
def test_bad_pool_size_warns_and_keeps_the_default(value):
    report, stderr = _probe(LONGFORMER_TVM_POOL_MB=value)
    assert f"LONGFORMER_TVM_POOL_MB={value!r}" in stderr and "whole number of MiB >= 0" in stderr
    assert report["pool_limit"] == 1024 << 20 and report["call"] == "ok"
    assert any("LONGFORMER_TVM_POOL_MB" in e for e in report["errors"])


def test_pool_size_zero_turns_the_pool_off():
    report, _ = _probe(LONGFORMER_TVM_POOL_MB="0")
    assert report["pool_limit"] == 0 and report["errors"] == []


@pytest.mark.parametrize("value", ["many", "0", "-2"])
def test_bad_tvm_num_threads_warns_and_follows_torch(value):
    report, stderr = _probe(TVM_NUM_THREADS=value)
    # reported before the runtime loads, replaced (with a warning naming it) when it does
    assert any(f"TVM_NUM_THREADS={value!r}" in e and ">= 1" in e for e in report["errors"])
    assert f"TVM_NUM_THREADS={value!r}" in stderr
    assert report["call"] == "ok" and report["threads_after"] == str(report["torch_threads"])


def test_user_tvm_num_threads_is_kept():
    report, _ = _probe(TVM_NUM_THREADS="1")
    assert report["errors"] == [] and report["threads_after"] == "1" and report["call"] == "ok"
