"""Manifests: reading ``manifest.json`` and checking each entry before anything trusts it.

An entry names a library ``file`` (relative, inside the manifest's folder: never ``..``, an
absolute path or a symbolic link that leads out), its ``sha256``, ``device``, ``dtype``,
``functions`` (one symbol per product its device's libraries hold, ``_contract.products``) and
optional lists (``cpu_features``, ``sources``, ``archs``). A malformed entry is skipped with a warning that names the rule it breaks; an
unreadable manifest is skipped as a whole. Nothing here loads a library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path, PurePosixPath

from ._contract import (ENTRY_LISTS, ENTRY_OPTIONAL_STRINGS, ENTRY_STRINGS, REPO_DIR, products,
                        sha256_file)

logger = logging.getLogger("longformer_tvm")


def digest(path: Path) -> str | None:
    """sha256 of ``path``, None if it cannot be read."""
    try:
        return sha256_file(path)
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class LibraryEntry:
    """One manifest entry, resolved to a path inside its manifest's ``directory``."""

    path: Path
    info: dict
    directory: Path | None = None
    cached: bool = False  # from the per-user cache (rebuilt when corrupt), not shipped

    @property
    def device(self) -> str:
        return self.info["device"]

    @property
    def dtype(self) -> str:
        return self.info["dtype"]


_SHA256 = re.compile(r"[0-9a-f]{64}")


def inside(directory: Path, rel) -> Path | None:
    """``directory / rel`` if ``rel`` is a relative path that stays inside ``directory`` (after
    resolving symbolic links), else None."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        return None
    parts = PurePosixPath(rel)
    if parts.is_absolute() or ".." in parts.parts:
        return None
    path = directory / parts
    try:
        path.resolve().relative_to(directory.resolve())
    except (ValueError, OSError, RuntimeError):
        return None
    return path


def _entry_problem(directory: Path, e) -> str:
    """Why the manifest entry ``e`` cannot be used as written ('' if it is well formed)."""
    if not isinstance(e, dict):
        return f"an entry must be an object, got {type(e).__name__}"
    for key in ENTRY_STRINGS:
        if not isinstance(e.get(key), str):
            return f"{key!r} must be a string, got {e.get(key)!r:.80}"
    if inside(directory, e["file"]) is None:
        return f"file={e['file']!r:.200} must be a relative path inside {directory}"
    if not _SHA256.fullmatch(e["sha256"]):
        return f"sha256={e['sha256']!r:.80} is not 64 lowercase hex digits"
    functions, wanted = e.get("functions"), tuple(products(e["device"]))
    if not (isinstance(functions, dict) and set(wanted) <= set(functions)
            and all(isinstance(v, str) for v in functions.values())):
        return (f"functions={functions!r:.160} must map each of {wanted} to a symbol name (a "
                f"{e['device']} library holds them all; rebuild an older one)")
    problem = _variants_problem(e.get("variants"), functions)
    if problem:
        return problem
    for key in ENTRY_LISTS:
        value = e.get(key, [])
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return f"{key}={value!r:.120} must be a list of strings"
    if any(inside(REPO_DIR, src) is None for src in e.get("sources", [])):
        return f"sources={e['sources']!r:.200} must be paths inside the repository"
    for key in ENTRY_OPTIONAL_STRINGS:
        if key in e and not isinstance(e[key], (str, type(None))):
            return f"{key}={e[key]!r:.80} must be a string"
    return ""


def _variants_problem(table, functions: dict) -> str:
    """Why a ``variants`` dispatch table is malformed ('' if absent or well formed): {product:
    [{"max_columns": int, "function": symbol, ...}, ..., {"max_columns": null, ...}]}, bounds
    increasing, the last unbounded, for products the entry has."""
    if table is None:
        return ""
    if not isinstance(table, dict):
        return f"variants={table!r:.80} must map products to dispatch rows"
    for product, rows in table.items():
        if product not in functions:
            return f"variants names product {product!r:.40}, which the entry's functions lack"
        if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
                and all(isinstance(r.get("function"), str) for r in rows)):
            return f"variants[{product!r}] must be a non-empty list of rows naming a 'function'"
        bounds = [r.get("max_columns") for r in rows]
        if bounds[-1] is not None or not all(
                isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bounds[:-1]) or \
                any(a >= b for a, b in zip(bounds[:-2], bounds[1:-1])):
            return (f"variants[{product!r}] max_columns={bounds} must be increasing positive "
                    "integers ending with null (every wider band)")
    return ""


def read_manifest(directory: Path, cached: bool = False) -> list[LibraryEntry]:
    """The well-formed entries of ``directory/manifest.json`` ([] if there is none or it is
    unreadable); each malformed entry is skipped with a warning that says why."""
    path = directory / "manifest.json"
    try:
        if not path.is_file():
            return []
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        logger.warning("ignoring unreadable manifest %s: %s", path, exc)
        return []
    libraries = data.get("libraries") if isinstance(data, dict) else None
    if not isinstance(libraries, list):
        logger.warning("ignoring manifest %s: it must be an object with a list 'libraries'", path)
        return []
    out = []
    for i, e in enumerate(libraries):
        problem = _entry_problem(directory, e)
        if problem:
            logger.warning("ignoring entry %d of %s: %s", i, path, problem)
            continue
        out.append(LibraryEntry(inside(directory, e["file"]), e, directory, cached))
    return out
