"""Loading a shared library runs its code: what the loader checks before it does.

Each test works on a private copy of one shipped float64 library (the one this machine would
load) in a temporary prebuilt folder, with an empty cache, no compiler and a fresh registry, and
counts the libraries actually handed to the TVM runtime.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import filelock
import pytest
import torch
import tvm_ffi

import longformer_tvm as lt
from longformer_tvm import _contract, _install, _manifest, backends, reference
from longformer_tvm._checks import normalize_band

from .registry import private_registry, private_registry_code


def runnable_library(dtype: str) -> tuple[Path, dict]:
    """A shipped cpu library of ``dtype`` that runs here, best ISA first, and its manifest entry
    without ``sources``: these tests are about files and manifests, so a library whose sources
    were edited since it was built (stale, which the real loader refuses) serves as well."""
    rank = list(_contract.CPU_ISAS)
    found = []
    for c in backends.candidates("cpu", dtype):
        info = {k: v for k, v in c.entry.info.items() if k not in ("sources", "source_hash")}
        entry = backends.LibraryEntry(c.entry.path, info, c.entry.directory)
        if not c.entry.cached and not backends.REGISTRY.reasons(entry, ("cpu", dtype, "")):
            found.append((rank.index(info["isa"]) if info["isa"] in rank else len(rank), c.entry.path, info))
    assert found, f"no shipped cpu {dtype} library runs here (prebuilt/manifest.json)"
    _, path, info = min(found, key=lambda f: f[0])
    return path, info


class Lab:
    """A temporary prebuilt folder holding one good library, and the registry that reads it."""

    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.prebuilt = root / "prebuilt"
        self.cache = root / "cache"
        source, self.entry = runnable_library("float64")
        self.rel = self.entry["file"]
        self.lib = self.prebuilt / self.rel
        self.lib.parent.mkdir(parents=True)
        shutil.copyfile(source, self.lib)
        self.good = self.lib.read_bytes()
        self.write_manifest([self.entry])
        self.loads: list[str] = []
        real_load = tvm_ffi.load_module

        def counting_load(path, *args, **kwargs):
            self.loads.append(str(path))
            return real_load(path, *args, **kwargs)

        monkeypatch.setattr(tvm_ffi, "load_module", counting_load)
        self.registry = private_registry(monkeypatch, [self.prebuilt])
        monkeypatch.setenv("LONGFORMER_TVM_CACHE", str(self.cache))

    def write_manifest(self, libraries, directory: Path | None = None) -> None:
        directory = directory or self.prebuilt
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "manifest.json").write_text(json.dumps({"format": 1, "libraries": libraries}))

    def entry_for(self, **changes) -> dict:
        return {**self.entry, **changes}


@pytest.fixture
def lab(tmp_path, monkeypatch):
    return Lab(tmp_path, monkeypatch)


def _qk():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 40, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    got = lt.sliding_window_qk(q, k, 4, [1, 2, 3])
    torch.testing.assert_close(got, reference.band_qk(q, k, normalize_band("t", 4, [1, 2, 3], False, 3)))


def test_an_intact_copy_verifies_loads_once_and_computes(lab):
    _qk()
    _qk()
    assert lab.loads == [str(lab.lib)]


TAMPERINGS = {
    "one byte flipped": lambda good: good[:4000] + bytes([good[4000] ^ 0x40]) + good[4001:],
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "bytes appended": lambda good: good + b"\0" * 64,
}


@pytest.mark.parametrize("tamper", list(TAMPERINGS))
def test_a_tampered_shipped_library_is_refused_before_loading(lab, tamper):
    lab.lib.write_bytes(TAMPERINGS[tamper](lab.good))
    with pytest.raises(lt.KernelIntegrityError) as info:
        _qk()
    message = str(info.value)
    assert str(lab.lib) in message and "sha256" in message and lab.entry["sha256"] in message
    assert "reinstall longformer-tvm" in message and "build_kernels.py build" in message
    assert lab.loads == []


@pytest.mark.parametrize("key,text", [("tvm_version", "built with TVM 0.0.1"),
                                      ("tvm_ffi_version", "built with tvm-ffi 0.0.1")])
def test_a_library_of_another_tvm_or_ffi_version_is_refused(lab, key, text):
    lab.write_manifest([lab.entry_for(**{key: "0.0.1"})])
    with pytest.raises(lt.KernelNotAvailableError) as info:
        _qk()
    assert text in str(info.value) and "build_kernels.py build" in str(info.value)
    assert lab.loads == []


def test_a_library_for_another_architecture_is_refused(lab):
    target = {**lab.entry.get("target", {}), "mtriple": "aarch64-linux-gnu"}
    lab.write_manifest([lab.entry_for(target=target, cpu_features=[])])
    with pytest.raises(lt.KernelNotAvailableError, match="built for aarch64-linux-gnu"):
        _qk()
    assert lab.loads == []


def _escape(lab, how: str) -> str:
    """A valid library outside the prebuilt folder, named by the manifest in one of several ways."""
    outside = lab.root / "elsewhere" / "evil.so"
    outside.parent.mkdir()
    outside.write_bytes(lab.good)
    if how == "symlink":
        (lab.prebuilt / "cpu" / "link.so").symlink_to(outside)
        return "cpu/link.so"
    if how == "symlinked folder":
        (lab.prebuilt / "sub").symlink_to(outside.parent)
        return "sub/evil.so"
    return {"parent": "../elsewhere/evil.so", "nested parent": "cpu/../../elsewhere/evil.so",
            "absolute": str(outside), "backslashes": "..\\elsewhere\\evil.so"}[how]


@pytest.mark.parametrize("how", ["parent", "nested parent", "absolute", "backslashes", "symlink",
                                 "symlinked folder"])
def test_a_file_outside_its_manifests_folder_is_refused(lab, how, caplog):
    lab.lib.unlink()
    lab.write_manifest([lab.entry_for(file=_escape(lab, how))])
    with caplog.at_level(logging.WARNING, logger="longformer_tvm"):
        with pytest.raises(lt.KernelNotAvailableError):
            _qk()
    assert lab.loads == []
    assert "must be a relative path inside" in caplog.text


MALFORMED_MANIFESTS = {
    "not json": b"{\"libraries\": [",
    "binary": bytes(range(256)),
    "empty": b"",
    "a list": b"[]",
    "libraries not a list": b'{"libraries": "cpu/x.so"}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "null": b"null",
}


@pytest.mark.parametrize("text", list(MALFORMED_MANIFESTS))
def test_a_malformed_manifest_is_skipped_and_the_next_folder_serves(lab, monkeypatch, text, caplog):
    good = lab.root / "second"
    shutil.copytree(lab.prebuilt, good)
    (lab.prebuilt / "manifest.json").write_bytes(MALFORMED_MANIFESTS[text])
    private_registry(monkeypatch, [lab.prebuilt, good])
    with caplog.at_level(logging.WARNING, logger="longformer_tvm"):
        _qk()
        info = lt.backend_info()
    assert lab.loads == [str(good / lab.rel)]
    assert [c["usable"] for c in info["available"]["cpu/float64"]] == [True]
    assert str(lab.prebuilt / "manifest.json") in caplog.text


def test_a_manifest_that_is_a_folder_is_no_manifest(lab, monkeypatch):
    (lab.prebuilt / "manifest.json").unlink()
    (lab.prebuilt / "manifest.json").mkdir()
    with pytest.raises(lt.KernelNotAvailableError, match="no library for this device"):
        _qk()


DROP = object()
MALFORMED_ENTRIES = {  # a dict is a change to a good entry (DROP removes the key); else the entry
    "a string": "cpu/x.so",
    "null": None,
    "without file": {"file": DROP},
    "file a number": {"file": 7},
    "without sha256": {"sha256": DROP},
    "sha256 not hex": {"sha256": "Z" * 64},
    "functions a list": {"functions": ["band_qk", "band_pv", "band_pv_transposed"]},
    "functions lacking tpv": {"functions": {"qk": "band_qk", "pv": "band_pv"}},
    "cpu functions lacking the fused attention": {"functions": dict(_contract.PRODUCTS)},
    "cpu_features a number": {"cpu_features": 3},
    "cpu_features a string": {"cpu_features": "avx2"},
    "sources outside the repository": {"sources": ["../../etc/passwd"]},
    "isa a list": {"isa": ["avx2"]},
    "variants a list": {"variants": [["qk", "band_qk"]]},
    "variants of an unknown product": {"variants": {"xx": [{"max_columns": None, "function": "band_qk"}]}},
    "variants without a function": {"variants": {"qk": [{"max_columns": None}]}},
    "variants ending bounded": {"variants": {"qk": [{"max_columns": 65, "function": "band_qk"}]}},
    "variants bounds decreasing": {"variants": {"qk": [{"max_columns": 65, "function": "band_qk"},
                                                       {"max_columns": 9, "function": "band_qk"},
                                                       {"max_columns": None, "function": "band_qk"}]}},
    "variants bound a bool": {"variants": {"qk": [{"max_columns": True, "function": "band_qk"},
                                                  {"max_columns": None, "function": "band_qk"}]}},
}


def test_a_cuda_entry_needs_only_the_band_products(tmp_path):
    """Products are per device: the fused attention is required of CPU libraries only."""
    entry = {"file": "cuda/x.so", "device": "cuda", "dtype": "float32", "sha256": "0" * 64,
             "functions": dict(_contract.PRODUCTS)}
    (tmp_path / "manifest.json").write_text(json.dumps({"libraries": [entry, {**entry, "device": "cpu"}]}))
    assert [e.device for e in _manifest.read_manifest(tmp_path)] == ["cuda"]


def test_malformed_entries_are_skipped_one_by_one(lab, caplog):
    bad = [e if not isinstance(e, dict) else
           {k: v for k, v in lab.entry_for(**e).items() if v is not DROP}
           for e in MALFORMED_ENTRIES.values()]
    lab.write_manifest([*bad, lab.entry])
    with caplog.at_level(logging.WARNING, logger="longformer_tvm"):
        _qk()
    assert lab.loads == [str(lab.lib)]
    skipped = [r for r in caplog.records if "ignoring entry" in r.getMessage()]
    assert len(skipped) == len(MALFORMED_ENTRIES), caplog.text


def test_import_and_calls_survive_a_malformed_cache_manifest(tmp_path):
    source, entry = runnable_library("float32")
    shipped = tmp_path / "shipped"
    (shipped / entry["file"]).parent.mkdir(parents=True)
    shutil.copyfile(source, shipped / entry["file"])
    (shipped / "manifest.json").write_text(json.dumps({"libraries": [entry]}))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_bytes(b"[" * 100_000)
    keyed = cache / _install.cache_library_dir().name  # this installation's cache folder
    keyed.mkdir()
    (keyed / "manifest.json").write_text('{"libraries": [{"file": "/etc/passwd"}]}')
    code = (private_registry_code([shipped]) + "import torch, longformer_tvm as lt; lt.backend_info(); "
            "print(lt.sliding_window_qk(torch.ones(1, 4, 1, 2), torch.ones(1, 4, 1, 2), 1).sum().item())")
    env = {**os.environ, "LONGFORMER_TVM_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "20.0"
    assert "ignoring unreadable manifest" in out.stderr and "ignoring entry 0" in out.stderr


def test_a_file_that_matches_its_sha256_but_is_no_library_is_an_error(lab):
    lab.lib.write_bytes(b"#!/bin/sh\necho not a library\n")
    lab.write_manifest([lab.entry_for(sha256=_contract.sha256_file(lab.lib))])
    with pytest.raises(lt.KernelIntegrityError, match="matches its sha256 but did not load"):
        _qk()


def test_a_library_without_the_named_functions_is_an_error(lab):
    lab.write_manifest([lab.entry_for(functions={**_contract.products("cpu"), "tpv": "no_such"})])
    with pytest.raises(lt.KernelIntegrityError, match="lacks a function"):
        _qk()


def test_a_library_without_a_variant_its_dispatch_table_names_is_an_error(lab):
    variants = {**lab.entry.get("variants", {}), "qk": [
        {"max_columns": 9, "function": "band_qk__no_such"}, {"max_columns": None, "function": "band_qk"}]}
    lab.write_manifest([lab.entry_for(variants=variants)])
    with pytest.raises(lt.KernelIntegrityError, match="lacks a function"):
        _qk()


def test_a_reader_racing_a_rebuild_waits_for_the_manifest_and_loads_the_new_file(lab):
    """A writer renames the new file into place, then records its sha256, under the manifest lock
    (tvm_kernels.publish.publish_library); a reader in between must wait, not cry corruption."""
    new = lab.good + b"\0" * 64  # a different, equally loadable file
    lock = filelock.FileLock(str(lab.prebuilt / "manifest.json.lock"))
    errors: list[BaseException] = []

    def first_call():
        try:
            _qk()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with lock:
        tmp = lab.lib.with_suffix(".tmp")
        tmp.write_bytes(new)
        os.replace(tmp, lab.lib)
        reader = threading.Thread(target=first_call)
        reader.start()
        time.sleep(1.0)
        assert reader.is_alive() and not errors, errors
        lab.write_manifest([lab.entry_for(sha256=_contract.sha256_file(lab.lib))])
    reader.join(timeout=60)
    assert not errors, errors
    assert lab.loads == [str(lab.lib)]
