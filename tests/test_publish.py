"""Publishing a CUDA library: it reaches its final name only together with its manifest entry.

A reader that holds the manifest's lock (as the runtime's registry does when a file and its entry
disagree) must never see a new library that the manifest does not list yet, nor one that failed
its check. The CUDA toolchain is faked -- the worker's compile writes a few bytes, nvcc and
cuobjdump are not run -- so what is tested is the real temporary file, check, rename and manifest
update of ``build_cuda``. No GPU, nvcc or TVM compiler is needed.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from pathlib import Path

import filelock
import pytest

from longformer_tvm import _contract
from tvm_kernels.cuda import build as cuda_build
from tvm_kernels.cuda import fatbin

ARCHS = ["sm_80", "sm_90"]
LIBRARY = Path("cuda") / "band_float16_sm80-90.so"


@pytest.fixture
def compiled(monkeypatch):
    """Fake toolchain; the returned event is set once the 'worker' has written its library."""
    done = threading.Event()

    def compile_library(dtype, archs, configs, out):  # what the worker process does
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"a CUDA library for " + dtype.encode())
        done.set()
        return {"nvcc_seconds": [0.0]}

    config = {"tiles": {"tm": 64, "tj": 32, "kd": 64}, "knobs": {"ty": 16, "tx": 16, "unroll": 4},
              "from": "hand"}
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: "nvcc")
    monkeypatch.setattr(cuda_build, "nvcc_version", lambda nvcc: "13.0")
    monkeypatch.setattr(cuda_build, "configs_for", lambda *_: {"qk": dict(config), "pv": dict(config)})
    monkeypatch.setattr(cuda_build, "compile_library", compile_library)
    monkeypatch.setattr(fatbin, "library_code",
                        lambda path, *_: {"fatbins": 1, "sass": list(ARCHS), "ptx": ARCHS[-1:]})
    return done


def _files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and not p.name.endswith(".lock"))


def test_cuda_library_appears_at_its_name_only_with_its_manifest_entry(compiled, tmp_path):
    out = tmp_path / "prebuilt"
    out.mkdir()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with filelock.FileLock(str(out / "manifest.json") + ".lock"):  # a reader holds the manifest
            build = pool.submit(cuda_build.build_cuda, "float16", ARCHS, out)
            while not compiled.wait(0.1):
                if build.done():
                    build.result()  # raises the build's error
                    pytest.fail("the build finished without compiling")
            with pytest.raises(concurrent.futures.TimeoutError):
                build.result(timeout=0.5)  # the build waits for the lock ...
            assert not (out / LIBRARY).exists(), (
                "the library reached its final name while the manifest lock was held: a reader "
                "would see a file that the manifest does not list")
        (entry,) = build.result(timeout=60)  # ... and publishes once it has it
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["libraries"] == [entry]
    assert entry["file"] == LIBRARY.as_posix()
    assert entry["sha256"] == _contract.sha256_file(out / LIBRARY)
    assert entry["sources"] == _contract.SOURCES["cuda"]
    assert (entry["archs"], entry["ptx_arch"]) == (ARCHS, ARCHS[-1])
    assert _files(out) == [LIBRARY.as_posix(), "manifest.json"], "temporary files were left behind"


def test_cuda_library_that_fails_its_check_is_never_published(compiled, tmp_path, monkeypatch):
    out = tmp_path / "prebuilt"
    monkeypatch.setattr(fatbin, "library_code",
                        lambda path, *_: {"fatbins": 1, "sass": ARCHS[:1], "ptx": ARCHS[:1]})
    with pytest.raises(SystemExit, match="expected SASS"):
        cuda_build.build_cuda("float16", ARCHS, out)
    assert compiled.is_set()
    assert _files(out) == [], "a library that failed its check was left in the prebuilt folder"
