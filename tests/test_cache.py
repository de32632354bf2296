"""The per-user cache: its key, building into it (once, under a lock), and repairing it.

One real build per session (``built_cache``: a first call with no shipped library and an empty
cache, through ``Registry._build`` and ``build_kernels.py``, ~30-60 s); the other tests reuse
its library. Processes that race to build run the real lock + atomic-rename code of
``tvm_kernels.cpu.build`` with the compile step replaced by writing that library slowly, or the
real loader with ``build_kernels.py`` replaced by a script that copies it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longformer_tvm as lt
from longformer_tvm import _contract, _install, _manifest, backends, reference
from longformer_tvm._checks import normalize_band

from .registry import private_registry

REPO = Path(__file__).resolve().parents[1]
WORKERS = 4


def _env(cache: Path) -> dict:
    return {**os.environ, "LONGFORMER_TVM_CACHE": str(cache), "PYTHONPATH": str(REPO)}


# Run in a child process: no shipped libraries, the cache of the environment, then one product
# checked against the reference. Prints the library that served it.
FIRST_CALL = """
import json, sys, torch
import longformer_tvm as lt
from longformer_tvm import _install, backends, reference
from longformer_tvm._checks import normalize_band
backends.REGISTRY = backends.Registry(backends.TABLE, prebuilt_dirs=[])
{setup}
g = torch.Generator().manual_seed(0)
q, k = (torch.randn(2, 50, 2, 6, generator=g, dtype=torch.float64) for _ in range(2))
got = lt.sliding_window_qk(q, k, 5, [1, 3])
torch.testing.assert_close(got, reference.band_qk(q, k, normalize_band("t", 5, [1, 3], False, 2)))
print(json.dumps(lt.backend_info()["loaded"]))
"""


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory):
    """A cache filled by one real first-call build; returns (cache root, manifest entry, library)."""
    if not backends.compiler_available():
        pytest.fail("the TVM compiler (apache-tvm) is needed to test building into the cache")
    cache = tmp_path_factory.mktemp("built-cache")
    out = subprocess.run([sys.executable, "-c", FIRST_CALL.format(setup="")], capture_output=True,
                         text=True, env=_env(cache), cwd=REPO, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    loaded = Path(json.loads(out.stdout.splitlines()[-1])["cpu/float64"])
    manifest = json.loads((loaded.parents[1] / "manifest.json").read_text())
    (entry,) = [e for e in manifest["libraries"] if e["dtype"] == "float64"]
    return cache, entry, loaded


def _fresh_registry(monkeypatch, cache: Path, prebuilt: list[Path], compiler: bool) -> backends.Registry:
    monkeypatch.setenv("LONGFORMER_TVM_CACHE", str(cache))
    return private_registry(monkeypatch, prebuilt, compiler)


def _qk64():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 30, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(lt.sliding_window_qk(q, k, 3),
                               reference.band_qk(q, k, normalize_band("t", 3, 1, False, 2)))


# ---- the key -------------------------------------------------------------------------------------
def test_a_first_call_builds_into_this_versions_cache_folder(built_cache):
    cache, entry, lib = built_cache
    versions = _contract.installed_versions()
    folder = lib.parents[1]
    assert folder.parent == cache
    assert folder.name == (f"v{_install.CACHE_LAYOUT}-tvm{versions['tvm']}-ffi{versions['tvm_ffi']}"
                           f"-src{_install.kernel_sources_hash()[:16]}")
    assert lib.name == f"band_{_contract.host_isa()}_float64.so" and entry["isa"] == _contract.host_isa()
    assert entry["sha256"] == _contract.sha256_file(lib)
    assert (entry["tvm_version"], entry["tvm_ffi_version"]) == (versions["tvm"], versions["tvm_ffi"])
    assert not list(folder.rglob("*.tmp")), "a temporary file was left behind"


def test_the_cache_key_changes_with_each_version_and_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGFORMER_TVM_CACHE", str(tmp_path))
    base = {"tvm": "0.27.0", "tvm_ffi": "0.1.14"}
    monkeypatch.setattr(_install, "installed_versions", lambda: dict(base))
    monkeypatch.setattr(_install, "kernel_sources_hash", lambda: "a" * 64)
    first = _install.cache_library_dir()
    keys = {first}
    for change in ({"tvm": "0.28.0"}, {"tvm_ffi": "0.1.15"}):
        monkeypatch.setattr(_install, "installed_versions", lambda c=change: {**base, **c})
        keys.add(_install.cache_library_dir())
    monkeypatch.setattr(_install, "installed_versions", lambda: dict(base))
    monkeypatch.setattr(_install, "kernel_sources_hash", lambda: "b" * 64)
    keys.add(_install.cache_library_dir())
    monkeypatch.setattr(_install, "installed_versions", lambda: {"tvm": "1/../../x", "tvm_ffi": ""})
    odd = _install.cache_library_dir()
    keys.add(odd)
    assert len(keys) == 5 and all(k.parent == tmp_path for k in keys), keys
    assert "/" not in odd.name and ".." != odd.name


def test_the_sources_hash_covers_every_kernel_source(monkeypatch, tmp_path):
    kernels = tmp_path / "tvm_kernels"
    (kernels / "schedules").mkdir(parents=True)
    for rel in ("band.py", "schedules/cpu.py"):
        (kernels / rel).write_text("x = 1\n")
    (tmp_path / "build_kernels.py").write_text("")
    monkeypatch.setattr(_install, "REPO_DIR", tmp_path)
    monkeypatch.setattr(_install, "KERNEL_SOURCES", kernels)
    before = _install.kernel_sources_hash()
    (kernels / "schedules" / "cpu.py").write_text("x = 2\n")
    assert _install.kernel_sources_hash() != before
    monkeypatch.setattr(_install, "KERNEL_SOURCES", tmp_path / "absent")
    assert _install.kernel_sources_hash() is None


def test_the_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LONGFORMER_TVM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _install.cache_dir() == tmp_path / "xdg" / "longformer_tvm"
    monkeypatch.setenv("LONGFORMER_TVM_CACHE", str(tmp_path / "mine"))
    assert _install.cache_dir() == tmp_path / "mine"
    assert _install.cache_library_dir().parent == tmp_path / "mine"
    monkeypatch.delenv("LONGFORMER_TVM_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _install.cache_dir() == tmp_path / "home" / ".cache" / "longformer_tvm"


# ---- repairing a corrupt cache -------------------------------------------------------------------
FAKE_BUILD = """
import json, os, shutil, sys, time
from pathlib import Path
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
time.sleep({sleep})
out = Path(args[args.index("--out") + 1])
src = Path({source!r})
if {repair}:
    for rel in ("cpu/" + {libname!r}, "manifest.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, str(out / rel) + ".part")
        os.replace(str(out / rel) + ".part", out / rel)
"""


def _fake_builder(tmp_path: Path, built_cache, repair: bool = True, sleep: float = 0.0) -> tuple[Path, Path]:
    """A stand-in build_kernels.py that logs its arguments and copies the session's library."""
    _, _, lib = built_cache
    script, log = tmp_path / "fake_build.py", tmp_path / "builds.log"
    script.write_text(FAKE_BUILD.format(log=str(log), sleep=sleep, source=str(lib.parents[1]),
                                        repair=repair, libname=lib.name))
    return script, log


def _builds(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _cache_copy(built_cache, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the built cache; returns (cache root, library path in it)."""
    cache, _, lib = built_cache
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    return mine, mine / lib.relative_to(cache)


def test_a_corrupt_cache_library_is_logged_rebuilt_once_and_loaded(built_cache, tmp_path, monkeypatch,
                                                                    caplog):
    cache, lib = _cache_copy(built_cache, tmp_path)
    lib.write_bytes(lib.read_bytes()[:1000])  # truncated
    _fresh_registry(monkeypatch, cache, [], compiler=True)
    script, log = _fake_builder(tmp_path, built_cache)
    monkeypatch.setattr(_install, "BUILD_SCRIPT", script)
    with caplog.at_level(logging.WARNING, logger="longformer_tvm"):
        _qk64()
    assert f"{lib}: sha256" in caplog.text
    (args,) = _builds(log)
    assert args == ["build", "--target", "cpu", "--isa", _contract.host_isa(), "--dtype", "float64",
                    "--out", str(lib.parents[1])]
    assert lt.backend_info()["loaded"]["cpu/float64"] == str(lib)


def test_a_rebuild_that_stays_corrupt_is_tried_once_then_an_error(built_cache, tmp_path, monkeypatch):
    cache, lib = _cache_copy(built_cache, tmp_path)
    lib.write_bytes(b"\0" * 100)
    _fresh_registry(monkeypatch, cache, [], compiler=True)
    script, log = _fake_builder(tmp_path, built_cache, repair=False)
    monkeypatch.setattr(_install, "BUILD_SCRIPT", script)
    for _ in range(2):
        with pytest.raises(lt.KernelIntegrityError) as info:
            _qk64()
    assert str(lib) in str(info.value) and "kernel cache: delete it" in str(info.value)
    assert len(_builds(log)) == 1


def test_without_the_compiler_a_corrupt_cache_falls_back_to_the_next_library(built_cache, tmp_path,
                                                                             monkeypatch, caplog):
    _, entry, built = built_cache
    cache, lib = _cache_copy(built_cache, tmp_path)
    lib.write_bytes(lib.read_bytes()[:-1])
    shipped = tmp_path / "shipped"  # a shipped library that ranks below the cache's
    (shipped / "cpu").mkdir(parents=True)
    shutil.copyfile(built, shipped / "cpu" / "lower.so")
    (shipped / "manifest.json").write_text(json.dumps(
        {"libraries": [{**entry, "file": "cpu/lower.so", "isa": "unranked"}]}))
    _fresh_registry(monkeypatch, cache, [shipped], compiler=False)
    with caplog.at_level(logging.WARNING, logger="longformer_tvm"):
        _qk64()
    assert lt.backend_info()["loaded"]["cpu/float64"] == str(shipped / "cpu" / "lower.so")
    assert f"{lib}: sha256" in caplog.text and "instead of the corrupt cache" in caplog.text


def test_without_the_compiler_or_another_library_a_corrupt_cache_is_an_error(built_cache, tmp_path,
                                                                              monkeypatch):
    cache, lib = _cache_copy(built_cache, tmp_path)
    lib.write_bytes(b"")
    _fresh_registry(monkeypatch, cache, [], compiler=False)
    with pytest.raises(lt.KernelIntegrityError, match="It is in the kernel cache"):
        _qk64()


def test_a_corrupt_shipped_library_stays_an_error_even_with_a_good_cache(built_cache, tmp_path,
                                                                         monkeypatch):
    """Decision: a shipped file that fails its sha256 is a broken installation, not a cache miss."""
    cache, lib = _cache_copy(built_cache, tmp_path)
    prebuilt = tmp_path / "prebuilt"
    shutil.copytree(lib.parents[1], prebuilt)
    shipped_lib = prebuilt / "cpu" / lib.name
    shipped_lib.write_bytes(shipped_lib.read_bytes()[:-10])
    _fresh_registry(monkeypatch, cache, [prebuilt], compiler=True)
    with pytest.raises(lt.KernelIntegrityError, match="It is a shipped library"):
        _qk64()


def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fresh_registry(monkeypatch, blocker / "cache", [], compiler=True)
    with pytest.raises(lt.KernelNotAvailableError, match="cannot write the kernel cache"):
        _qk64()


# ---- processes racing ----------------------------------------------------------------------------
BARRIER = """
import os, time
from pathlib import Path
def barrier(folder, i, n):
    Path(folder, "ready-%d" % i).touch()
    deadline = time.time() + 300
    while len(list(Path(folder).glob("ready-*"))) < n and time.time() < deadline:
        time.sleep(0.01)
"""

# tvm_kernels.cpu.build.build_cpu with the compile replaced by a module that writes the session's
# library in slow chunks: the build lock, the temporary file, the rename and the manifest update
# are the real ones.
EXPORT_RACE = BARRIER + """
import sys
from pathlib import Path
from tvm_kernels.cpu import build
source, out, i = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

class SlowModule:
    def export_library(self, path, addons=()):
        data = source.read_bytes()
        with open(path, "wb") as f:
            for at in range(0, len(data), len(data) // 8 + 1):
                f.write(data[at:at + len(data) // 8 + 1])
                f.flush()
                time.sleep(0.05)

build.compile_cpu = lambda *args, **kwargs: SlowModule()
barrier(out.parent, i, {n})
entry = build.build_cpu("float64", sys.argv[4], out)
print(entry["sha256"])
"""


def test_four_processes_building_the_same_library_at_once_leave_one_valid_library(built_cache,
                                                                                   tmp_path):
    _, entry, lib = built_cache
    out = tmp_path / "race" / "lib"
    out.parent.mkdir()
    script = tmp_path / "race.py"
    script.write_text(EXPORT_RACE.format(n=WORKERS))
    procs = [subprocess.Popen([sys.executable, str(script), str(lib), str(out), str(i), entry["isa"]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=_env(tmp_path / "unused"))
             for i in range(WORKERS)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    built = out / "cpu" / lib.name
    assert {stdout.split()[-1] for stdout, _ in results} == {_contract.sha256_file(lib)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["device"], e["dtype"], e["isa"]) for e in manifest["libraries"]] == [
        ("cpu", "float64", entry["isa"])]
    assert manifest["libraries"][0]["sha256"] == _contract.sha256_file(built) == _contract.sha256_file(lib)
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock")) == [
        lib.name, "manifest.json"], "temporary files were left behind"
    fresh = backends.Registry(backends.TABLE).open(_manifest.read_manifest(out)[0])
    assert set(fresh) == set(_contract.products("cpu"))


def test_four_processes_whose_first_call_needs_a_build_build_it_once(built_cache, tmp_path):
    script, log = _fake_builder(tmp_path, built_cache, sleep=2.0)
    cache = tmp_path / "cache"
    setup = (BARRIER + "\nbackends.REGISTRY = backends.Registry(backends.TABLE, prebuilt_dirs=[], "
             "compiler=True)\n"
             f"_install.BUILD_SCRIPT = __import__('pathlib').Path({str(script)!r})\n"
             f"barrier({str(tmp_path)!r}, int(sys.argv[1]), {WORKERS})\n")
    code = FIRST_CALL.format(setup=setup)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(cache))
             for i in range(WORKERS)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    assert len(_builds(log)) == 1, _builds(log)
    loaded = {json.loads(stdout.splitlines()[-1])["cpu/float64"] for stdout, _ in results}
    assert len(loaded) == 1 and Path(loaded.pop()).is_relative_to(cache)
