"""Atomic files and manifests: the contract every step's output obeys.

A file is written to a temporary name in the same directory, fsynced, then renamed into
place; a directory is complete only when its ``manifest.json`` (written last) exists and
the files it lists have the recorded sizes. Readers call :func:`read_manifest` and trust
nothing else.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


class IncompleteOutput(RuntimeError):
    """A directory without a valid manifest: an interrupted or foreign write."""


# Temporary files are named ``.{final name}.{host}-{pid}.{random}.tmp``: a write killed before
# its rename leaves one behind; the next write of the same file, and the next manifest written
# in that directory, remove the ones whose process (on this host) is gone. A manifest never
# lists one, and :func:`read_manifest` refuses a manifest that does.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
_TMP_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def is_tmp_name(name: str) -> bool:
    """True for a temporary name made by :func:`atomic_path` (never a finished output)."""
    return name.startswith(".") and name.endswith(".tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_tmp(directory: str | os.PathLike, name: str | None = None) -> list[str]:
    """Remove temporary files left in ``directory`` (for ``name`` only, if given) by killed
    writers of this host.

    Only names made by :func:`atomic_path` whose process no longer exists are removed: a live
    writer's file, and files of other hosts (shared storage), are left alone.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for p in Path(directory).glob(f".{glob.escape(name)}.*.tmp" if name else ".*.tmp"):
            m = _TMP_RE.match(p.name)
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p.name)
    return removed


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
    sweep_stale_tmp(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
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
        if is_tmp_name(Path(name).name):
            raise ValueError(f"{directory / name}: a temporary file cannot be listed in a manifest")
        p = directory / name
        entries[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p), **extra}
    manifest = {"files": entries, **meta}
    write_json_atomic(directory / MANIFEST, manifest)
    sweep_stale_tmp(directory)
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
                               f"re-run the step.") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        raise IncompleteOutput(f"{mpath}: not a manifest (no files with bytes and sha256). Delete "
                               f"{directory} and re-run the step.")
    for name, entry in files.items():
        p = directory / name
        if is_tmp_name(p.name):
            raise IncompleteOutput(f"{mpath}: lists the temporary file {name}. Delete {directory} and "
                                   f"re-run the step.")
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            raise IncompleteOutput(f"{p}: missing or wrong size versus {mpath}. Delete "
                                   f"{directory} and re-run the step.")
        if verify_hashes and sha256_file(p) != entry["sha256"]:
            raise IncompleteOutput(f"{p}: sha256 differs from {mpath}. Delete {directory} and "
                                   f"re-run the step.")
    return manifest


def reusable(directory: str | os.PathLike, **expect: Any) -> dict[str, Any] | None:
    """A step's cache check: the manifest of ``directory`` when it is complete and its fields
    equal ``expect`` (the same inputs); otherwise None, after removing a stale manifest so that
    the directory reads as incomplete until the step has rewritten it."""
    try:
        manifest = read_manifest(directory)
        if all(manifest.get(k) == v for k, v in expect.items()):
            return manifest
    except IncompleteOutput:
        pass
    (Path(directory) / MANIFEST).unlink(missing_ok=True)
    return None
