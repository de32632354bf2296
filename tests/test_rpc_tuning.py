"""Tuning over a TVM RPC tracker: a tracker and two servers on the loopback interface, started and
stopped here; the database the RPC run writes replays like a local run's with the same seed.

Needs the TVM compiler (the build extra); skipped without it.
"""

from __future__ import annotations

import sys

import pytest

tvm = pytest.importorskip("tvm")
pytest.importorskip("tvm.s_tir.meta_schedule")

from longformer_tvm._contract import REPO_DIR  # noqa: E402

sys.path.insert(0, str(REPO_DIR))
from tvm_kernels.cpu import tune  # noqa: E402
from tvm_kernels.rpc import loopback_pool, parse_tracker  # noqa: E402

KEY = "lftvm-test"
PRODUCT, ISA, DTYPE, TRIALS = "pv", "generic", "float32", 2


@pytest.fixture(scope="module")
def tracker():
    with loopback_pool(2, KEY) as address:  # two servers share this machine's cores
        yield address


def _candidates(db) -> list[dict]:
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(str(db / "database_workload.json"),
                                        str(db / "database_tuning_record.json"), allow_missing=False,
                                        module_equality="structural")
    records = [r for r in database.get_all_tuning_records() if r.run_secs]
    return sorted((str(r.workload.mod["main"].attrs["lftvm_structure"]), sorted(tune.knob_values(r.trace).items()))
                  for r in records)


def test_rpc_database_replays_like_a_local_one(tracker, tmp_path):
    import torch
    import tvm_ffi

    from longformer_tvm import reference
    from longformer_tvm._checks import normalize_band
    from tvm_kernels.cpu import build

    remote = tune.tune_cpu(ISA, DTYPE, TRIALS, seed=3, db_root=tmp_path / "rpc", products=(PRODUCT,),
                           classes=("narrow",), confirm_rounds=0, rpc=(tracker, KEY))
    local = tune.tune_cpu(ISA, DTYPE, TRIALS, seed=3, db_root=tmp_path / "local", products=(PRODUCT,),
                          classes=("narrow",), confirm_rounds=0)
    measured = _candidates(remote)
    assert len(measured) == TRIALS + 1, "the hand schedule and every candidate measured on the servers"
    assert measured == _candidates(local), "same seed, same candidates"

    # the RPC database's best replays onto the symbolic function, and the library it makes is right
    records = tune.load_records(ISA, DTYPE, tmp_path / "rpc")
    assert set(records) == {(PRODUCT, "narrow")}
    entry = build.build_cpu(DTYPE, ISA, tmp_path / "lib", records=records)
    narrow = entry["variants"][PRODUCT][0]
    structure, trace, knobs = records[(PRODUCT, "narrow")]
    assert narrow["class"] == "narrow"
    assert narrow["schedule"] == build.Variant(PRODUCT, structure, knobs, trace).describe()
    fn = tvm_ffi.load_module(str(tmp_path / "lib" / entry["file"]))[narrow["function"]]
    band = normalize_band("t", 5, 1, False, 2)
    p, v = torch.randn(1, 40, 2, band.columns), torch.randn(1, 40, 2, 8)
    out = torch.empty(1, 40, 2, 8)
    fn(p, v, out, 5, 5, 1)
    torch.testing.assert_close(out, reference.band_pv(p, v, band), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["localhost", "host:0", "host:99999", ":9190", "a b:1"])
def test_a_bad_tracker_is_refused_naming_the_option(spec):
    with pytest.raises(ValueError, match=r"--rpc-tracker must be HOST:PORT"):
        parse_tracker(spec)


def test_tuning_an_isa_this_machine_cannot_run_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(tune, "host_isa", lambda: "avx2")
    with pytest.raises(ValueError, match=r"cannot measure avx512 code.*--rpc-tracker"):
        tune.tune_cpu("avx512", "float32", 1, 0, tmp_path)
    assert tune.measurable_here("avx2") and tune.measurable_here("generic")
