"""Test support: a private registry over chosen folders, installed where the ops look for it."""

from __future__ import annotations

from pathlib import Path

from longformer_tvm import backends


def private_registry(monkeypatch, prebuilt: list[Path], compiler: bool = False) -> backends.Registry:
    """A fresh registry (nothing loaded) that reads only ``prebuilt`` (plus the cache named by
    ``$LONGFORMER_TVM_CACHE``) and builds on demand only if ``compiler``; undone after the test."""
    registry = backends.Registry(backends.TABLE, prebuilt_dirs=list(prebuilt), compiler=compiler)
    monkeypatch.setattr(backends, "REGISTRY", registry)
    return registry


def private_registry_code(prebuilt: list[Path], compiler: bool = False) -> str:
    """The same for a child process: Python source to run before its first call."""
    dirs = ", ".join(f"pathlib.Path({str(p)!r})" for p in prebuilt)
    return ("import pathlib; from longformer_tvm import backends; "
            f"backends.REGISTRY = backends.Registry(backends.TABLE, prebuilt_dirs=[{dirs}], "
            f"compiler={compiler!r})\n")
