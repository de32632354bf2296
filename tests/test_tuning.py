"""Tuning is data: the saved MetaSchedule database replays to the schedule the manifest records.

These tests need the TVM compiler (a dependency of the package) but compile nothing: they replay
traces on the symbolic functions and compare schedules structurally.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

tvm = pytest.importorskip("tvm")

from tvm import s_tir  # noqa: E402

from tvm_kernels import export, tune  # noqa: E402
from tvm_kernels.schedules import cpu as cpu_sched  # noqa: E402
from tvm_kernels.targets import CPU_TARGETS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TUNING = REPO / "prebuilt" / "tuning"
MANIFEST = REPO / "prebuilt" / "manifest.json"


def _databases():
    return sorted(p for p in TUNING.glob("cpu-*-*") if p.is_dir()) if TUNING.is_dir() else []


def test_a_tuning_database_is_shipped():
    assert _databases(), "prebuilt/tuning/ holds no MetaSchedule database"


@pytest.mark.parametrize("db", _databases(), ids=lambda p: p.name)
def test_saved_database_replays_to_the_recorded_schedule(db):
    _, isa, dtype = db.name.split("-")
    target = CPU_TARGETS[isa]
    traces = tune.load_traces(isa, dtype, TUNING)
    assert traces, f"{db}: no usable record"
    entries = [e for e in json.loads(MANIFEST.read_text())["libraries"]
               if e.get("device") == "cpu" and e.get("isa") == isa and e.get("dtype") == dtype]
    assert len(entries) == 1
    for product, trace in traces.items():
        knobs = tune.knob_values(trace, product)
        # the shipped library was built from exactly this record
        assert f"{product}:tuned{knobs}" in entries[0]["schedule"]
        # replaying the record gives the hand schedule with the same knob values, twice
        replayed = [export.scheduled_func(product, dtype, target, trace=trace) for _ in range(2)]
        sch = s_tir.Schedule(export.tiled_func(product, dtype, target))
        cpu_sched.schedule_tiled(sch, product, knobs, target.lanes(dtype))
        by_hand = sch.mod["main"].with_attr("global_symbol", export.PRODUCTS[product])
        tvm.ir.assert_structural_equal(replayed[0], replayed[1])
        tvm.ir.assert_structural_equal(replayed[0], by_hand)


def test_space_sampling_is_deterministic_for_a_seed():
    a = tune.sample_space("qk", "float32", "avx512", seed=7, count=6)
    b = tune.sample_space("qk", "float32", "avx512", seed=7, count=6)
    assert a == b
    space = cpu_sched.SPACE["qk"]
    assert all(p["rows"] in space["rows"] and p["panels"] in space["panels"] for p in a)


def test_untuned_products_record_the_hand_schedule():
    entries = [e for e in json.loads(MANIFEST.read_text())["libraries"] if e.get("device") == "cpu"]
    assert entries
    for e in entries:
        for product in ("qk", "pv", "tpv"):
            assert f"{product}:" in e["schedule"], e["schedule"]
            if f"{product}:hand" in e["schedule"]:
                assert f"{product}:hand{cpu_sched.hand_knobs(product, e['isa'])}" in e["schedule"]
