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

from longformer_tvm._contract import PRODUCTS  # noqa: E402
from tvm_kernels.cpu import build, tune  # noqa: E402
from tvm_kernels.cpu import schedules as cpu_sched  # noqa: E402
from tvm_kernels.cpu.targets import CPU_TARGETS  # noqa: E402

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
        replayed = [build.scheduled_func(product, dtype, target, trace=trace) for _ in range(2)]
        sch = s_tir.Schedule(build.tiled_func(product, dtype, target))
        cpu_sched.schedule_tiled(sch, product, knobs, target.lanes(dtype))
        by_hand = sch.mod["main"].with_attr("global_symbol", PRODUCTS[product])
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


def test_records_of_another_formulation_are_skipped(tmp_path):
    """A record tuned on another function (an older cpu/kernels.py) would not replay: build must skip
    it and keep the current records, however fast the stale one claims to be."""
    from tvm.s_tir import meta_schedule as ms

    shipped = TUNING / "cpu-avx512-float32"
    if not shipped.is_dir():
        pytest.skip("no avx512/float32 database shipped")
    db = tmp_path / shipped.name
    db.mkdir()
    for f in shipped.iterdir():
        (db / f.name).write_bytes(f.read_bytes())
    before = tune.best_records(db)
    stale = tvm.IRModule({"main": build.naive_func("pv", "float32").with_attr("global_symbol",
                                                                              "band_pv")})
    database = ms.database.JSONDatabase(str(db / "database_workload.json"),
                                        str(db / "database_tuning_record.json"),
                                        module_equality="structural")
    record = ms.database.TuningRecord(
        s_tir.Schedule(stale).trace, database.commit_workload(stale), [1e-9],
        tvm.target.Target(CPU_TARGETS["avx512"].llvm()))
    database.commit_tuning_record(record)
    after = tune.best_records(db)
    assert set(after) == set(before) and "pv" in after
    assert after["pv"][1] == before["pv"][1]
    tvm.ir.assert_structural_equal(after["pv"][0].as_json(), before["pv"][0].as_json())
