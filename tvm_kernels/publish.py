"""The one way a library gets into a prebuilt folder, for every device.

A library is written to a temporary name beside its final one (:func:`export_temporary`, or a
worker process writing to :func:`temporary_beside`), then renamed into place and recorded in
``manifest.json`` in one step under the manifest's file lock (:func:`publish_file`). So concurrent
builds leave one valid library and one valid manifest, and a reader holding that lock always sees
a file and an entry that agree (the runtime's registry looks again under the lock when they do
not). Every entry starts from :func:`base_entry`: the fields all devices share.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from pathlib import Path

import filelock

from longformer_tvm._contract import (MANIFEST_FORMAT, SOURCES, __version__, entry_key,
                                      installed_versions, products, sha256_file, source_hash)

logger = logging.getLogger("tvm_kernels")


def base_entry(device: str, dtype: str) -> dict:
    """The manifest fields every library has, whatever its device (``file`` and ``sha256`` are
    added by :func:`publish_file`)."""
    versions = installed_versions()
    return {
        "device": device,
        "dtype": dtype,
        "functions": products(device),
        "tvm_version": versions["tvm"],
        "tvm_ffi_version": versions["tvm_ffi"],
        "package_version": __version__,
        "sources": list(SOURCES[device]),
        "source_hash": source_hash(SOURCES[device]),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---- the library file ---------------------------------------------------------------------


def temporary_beside(path: Path) -> Path:
    """A new, empty temporary file in ``path``'s folder (so a rename onto ``path`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".so.tmp")
    os.close(fd)
    return Path(tmp)


def write_library(module, path: Path, addons=()) -> None:
    """``module.export_library(path)`` (linking the C sources ``addons`` in too), readable by all
    and flushed to disk."""
    module.export_library(str(path), addons=[str(a) for a in addons])
    os.chmod(path, 0o755)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def export_temporary(module, path: Path, addons=()) -> Path:
    """Export ``module`` (and ``addons``) to a new temporary name beside ``path``; returns it."""
    tmp = temporary_beside(path)
    try:
        write_library(module, tmp, addons)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


# ---- the manifest -------------------------------------------------------------------------


def manifest_lock(out_dir: Path) -> filelock.FileLock:
    """The lock that guards ``out_dir/manifest.json`` and the files it names."""
    return filelock.FileLock(str(out_dir / "manifest.json") + ".lock")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _update_manifest_locked(out_dir: Path, entry: dict) -> None:
    """Insert or replace ``entry`` (same :func:`entry_key`); the caller holds the manifest lock."""
    manifest = out_dir / "manifest.json"
    data = {"format": MANIFEST_FORMAT, "libraries": []}
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            logger.warning("rewriting unreadable manifest %s", manifest)
    if not isinstance(data, dict) or not isinstance(data.get("libraries"), list):
        logger.warning("rewriting malformed manifest %s", manifest)
        data = {"format": MANIFEST_FORMAT, "libraries": []}
    libs = [e for e in data["libraries"] if isinstance(e, dict) and entry_key(e) != entry_key(entry)]
    libs.append(entry)
    libs.sort(key=lambda e: (str(e.get("device", "")), str(e.get("dtype", "")), str(e.get("isa", ""))))
    data["libraries"] = libs
    _atomic_write_text(manifest, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- publishing ---------------------------------------------------------------------------


def publish_file(tmp: Path, out_dir: Path, rel: Path, entry: dict) -> dict:
    """Move the finished library ``tmp`` (beside ``out_dir/rel``) to ``out_dir/rel`` and record
    ``entry`` with its file name and sha256, both under the manifest's lock. Returns the entry;
    ``tmp`` is gone either way."""
    try:
        entry = {**entry, "file": rel.as_posix(), "sha256": sha256_file(tmp)}
        with manifest_lock(out_dir):
            os.replace(tmp, out_dir / rel)
            _update_manifest_locked(out_dir, entry)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return entry


def publish_library(module, out_dir: Path, rel: Path, entry: dict, addons=()) -> dict:
    """Export ``module`` (and the C sources ``addons``) and publish it as ``out_dir/rel`` with
    ``entry`` (:func:`publish_file`)."""
    return publish_file(export_temporary(module, out_dir / rel, addons), out_dir, rel, entry)
