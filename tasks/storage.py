"""Atomic files and manifests: the contract every step's output obeys.

A file is written to a temporary name in the same directory, fsynced, then renamed into
place; a directory is complete only when its ``manifest.json`` (written last) exists and
the files it lists have the recorded sizes. Readers call :func:`read_manifest` and trust
nothing else.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


class IncompleteOutput(RuntimeError):
    """A directory without a valid manifest: an interrupted or foreign write."""


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide outputs from other users
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def write_manifest(directory: str | os.PathLike, files: dict[str, dict[str, Any]] | list[str],
                   **meta: Any) -> dict[str, Any]:
    """Write ``manifest.json`` last. ``files`` maps a relative name to extra fields (rows...);
    size and sha256 are computed here so a manifest can never disagree with its files."""
    directory = Path(directory)
    if isinstance(files, list):
        files = {name: {} for name in files}
    entries = {}
    for name, extra in sorted(files.items()):
        p = directory / name
        entries[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p), **extra}
    manifest = {"files": entries, **meta}
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike, verify_hashes: bool = False) -> dict[str, Any]:
    """Return the manifest of a complete directory, or raise :class:`IncompleteOutput`."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise IncompleteOutput(f"{directory}: no {MANIFEST}; the write was interrupted or never "
                               f"happened. Re-run the step that produces it.")
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompleteOutput(f"{mpath}: unreadable manifest ({e}). Delete {directory} and "
                               f"re-run the step.") from e
    for name, entry in manifest.get("files", {}).items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            raise IncompleteOutput(f"{p}: missing or wrong size versus {mpath}. Delete "
                                   f"{directory} and re-run the step.")
        if verify_hashes and sha256_file(p) != entry["sha256"]:
            raise IncompleteOutput(f"{p}: sha256 differs from {mpath}. Delete {directory} and "
                                   f"re-run the step.")
    return manifest


def is_complete(directory: str | os.PathLike, **expect: Any) -> bool:
    """True when ``directory`` has a valid manifest whose fields equal ``expect``."""
    try:
        manifest = read_manifest(directory)
    except IncompleteOutput:
        return False
    return all(manifest.get(k) == v for k, v in expect.items())
