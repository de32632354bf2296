"""The backend table: one registry for every device, one eligibility rule, the house's shape.

The CUDA cases run on any machine: fake manifests and files in a private cache, the CUDA runtime
and ``tvm_ffi.load_module`` replaced, so what is tested is the registry's choice, not a GPU.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
import tvm_ffi

import longformer_tvm as lt
from longformer_tvm import _contract, _install, backends

from .registry import private_registry

REPO = Path(__file__).resolve().parents[1]
SM90 = ("cuda", "float32", "sm_90")


def _cuda_entry(name: str, data: bytes, archs: list[str], ptx: str | None, **changes) -> dict:
    versions = _contract.installed_versions()
    return {"file": f"cuda/{name}", "device": "cuda", "dtype": "float32", "archs": archs,
            "ptx_arch": ptx, "sha256": hashlib.sha256(data).hexdigest(),
            "functions": dict(_contract.PRODUCTS), "tvm_version": versions["tvm"],
            "tvm_ffi_version": versions["tvm_ffi"], **changes}


def _write(folder: Path, files: dict[str, bytes], entries: list[dict]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "libraries": entries}))


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """A private cache and registry; the CUDA runtime is a no-op and loading a file gives a module
    whose functions name the file. Returns (registry, this installation's cache folder, loads)."""
    monkeypatch.setenv("LONGFORMER_TVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LONGFORMER_TVM_RUNTIME_DIR", raising=False)
    cuda = backends.TABLE["cuda"]
    monkeypatch.setattr(cuda, "load_runtime", lambda: None)
    monkeypatch.setattr(cuda, "driver_version", lambda: 0)
    loads: list[str] = []

    def fake_load(path, *args, **kwargs):
        loads.append(str(path))
        return {symbol: f"{Path(path).name}:{symbol}" for symbol in _contract.PRODUCTS.values()}

    monkeypatch.setattr(tvm_ffi, "load_module", fake_load)
    registry = private_registry(monkeypatch, [])
    folder = _install.cache_library_dir()
    folder.mkdir(parents=True)
    return registry, folder, loads


def test_cuda_libraries_in_this_versions_cache_folder_are_found(fake_cuda):
    registry, folder, loads = fake_cuda
    _write(folder, {"cuda/a.so": b"A"}, [_cuda_entry("a.so", b"A", ["sm_90"], "sm_90")])
    (cand,) = backends.candidates("cuda", "float32", "sm_90")
    assert cand.usable and cand.entry.cached and cand.entry.directory == folder
    registry.functions(SM90)
    assert loads == [str(folder / "cuda" / "a.so")]


def test_a_corrupt_cuda_cache_library_is_a_cache_problem_and_the_next_library_serves(fake_cuda, caplog):
    registry, folder, loads = fake_cuda
    # the exact-SASS library ranks first but its file changed; the PTX one serves
    _write(folder, {"cuda/sass.so": b"changed", "cuda/ptx.so": b"P"},
           [_cuda_entry("sass.so", b"original", ["sm_90"], None),
            _cuda_entry("ptx.so", b"P", ["sm_80"], "sm_80")])
    with caplog.at_level(logging.WARNING, logger="longformer_tvm"):
        functions = registry.functions(SM90)
    assert loads == [str(folder / "cuda" / "ptx.so")]
    assert set(functions) == set(_contract.PRODUCTS)
    assert f"{folder / 'cuda' / 'sass.so'}: sha256" in caplog.text
    assert "It is in the kernel cache" in caplog.text and "instead of the corrupt cache" in caplog.text


def test_a_corrupt_cuda_cache_library_alone_is_an_error_that_says_cache(fake_cuda):
    registry, folder, loads = fake_cuda
    _write(folder, {"cuda/a.so": b"changed"}, [_cuda_entry("a.so", b"original", ["sm_90"], "sm_90")])
    with pytest.raises(lt.KernelIntegrityError, match="It is in the kernel cache") as info:
        registry.functions(SM90)
    assert "shipped library" not in str(info.value) and loads == []


def test_a_corrupt_shipped_cuda_library_is_a_broken_installation(fake_cuda, tmp_path, monkeypatch):
    _, folder, loads = fake_cuda
    shipped = tmp_path / "shipped"
    _write(shipped, {"cuda/a.so": b"changed"}, [_cuda_entry("a.so", b"original", ["sm_90"], "sm_90")])
    _write(folder, {"cuda/b.so": b"B"}, [_cuda_entry("b.so", b"B", ["sm_90"], "sm_90")])
    registry = private_registry(monkeypatch, [shipped])
    with pytest.raises(lt.KernelIntegrityError, match="It is a shipped library"):
        registry.functions(SM90)
    assert loads == []


def test_every_reason_is_kept_and_shown_everywhere(fake_cuda):
    registry, folder, _ = fake_cuda
    _write(folder, {}, [_cuda_entry("gone.so", b"X", ["sm_80"], None, tvm_version="0.0.1",
                                    tvm_ffi_version="0.0.2")])
    (cand,) = backends.candidates("cuda", "float32", "sm_90")
    assert len(cand.reasons) == 4, cand.reasons  # tvm-ffi, TVM, the file, the arch
    for text in ("tvm-ffi 0.0.2", "TVM 0.0.1", "file missing", "not sm_90"):
        assert text in cand.reason
    with pytest.raises(lt.KernelNotAvailableError) as info:
        registry.functions(SM90)
    assert all(r in str(info.value) for r in cand.reasons)
    assert "build_kernels.py build --target cuda --arch sm_90 --dtype float32" in str(info.value)
    listed = lt.backend_info()["cuda"]["available"]["cuda/float32"]
    assert [c["reasons"] for c in listed] == [list(cand.reasons[:3])]  # arch is not judged there


def test_clear_forgets_every_device(fake_cuda):
    registry, folder, _ = fake_cuda
    _write(folder, {"cuda/a.so": b"A"}, [_cuda_entry("a.so", b"A", ["sm_90"], "sm_90")])
    registry.functions(SM90)
    assert set(backends.chosen()) == {"cuda/sm_90/float32"}
    backends.clear()
    assert backends.chosen() == {}


def test_an_unsupported_dtype_is_refused_at_once_without_a_build(monkeypatch, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(f"open({str(tmp_path / 'built')!r}, 'w').close()\n")
    monkeypatch.setattr(_install, "BUILD_SCRIPT", script)
    monkeypatch.setenv("LONGFORMER_TVM_CACHE", str(tmp_path / "cache"))
    private_registry(monkeypatch, [], compiler=True)
    x = torch.randn(1, 8, 1, 4, dtype=torch.bfloat16)
    with pytest.raises(lt.KernelNotAvailableError, match=r"dtype=bfloat16.*cast the inputs"):
        lt.sliding_window_qk(x, x, 2)
    assert not (tmp_path / "built").exists()


def test_an_unknown_device_names_the_devices_there_are():
    with pytest.raises(lt.KernelNotAvailableError, match=r"device 'meta'.*\['cpu', 'cuda'\]"):
        backends.REGISTRY.functions(("meta", "float32", ""))


# ---- the shape of the house ----------------------------------------------------------------------
def _imports(path: Path, package: str) -> set[str]:
    """Modules (and names) of ``package`` that the file imports anywhere, lazy imports inside
    functions included. ``from . import x`` names ``x``, not the package."""
    pkg = list(path.relative_to(REPO).with_suffix("").parts)[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module:
                out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == package or m.startswith(package + ".")}


def test_no_import_cycle_inside_the_package():
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "longformer_tvm").glob("*.py")}
    graph = {m: {d for d in _imports(p, "longformer_tvm") if d in files and d != m}
             for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            pytest.fail(f"import cycle: {' -> '.join(trail[trail.index(m):] + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_kernels_take_only_the_contract_from_the_runtime_package():
    for path in [*(REPO / "tvm_kernels").rglob("*.py"), REPO / "build_kernels.py"]:
        if path.name == "build_kernels.py":
            continue  # the CLI's selfcheck and main job use the public API on purpose
        used = _imports(path, "longformer_tvm") - {"longformer_tvm"}
        assert {u.split(".")[1] for u in used} <= {"_contract"}, (path, used)


@pytest.mark.parametrize("folder", ["longformer_tvm", "tvm_kernels"])
def test_no_file_is_over_500_lines(folder):
    long = {str(p.relative_to(REPO)): n for p in (REPO / folder).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
