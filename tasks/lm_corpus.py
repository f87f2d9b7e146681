"""The language-modelling corpus: bytes of text documents, split BY DOCUMENT into train/validation.

Sources (:func:`prepare_corpus`):
* default: the running interpreter's standard-library ``.py`` files (``sysconfig`` stdlib path,
  ``site-packages`` excluded), one document per file;
* a text file: one document per block of ``lines_per_doc`` lines;
* a Parquet file: one document per row of its text ``column``.

A document goes to validation iff sha256(f"{seed}:{doc_key}") falls below ``val_fraction`` — a
pure function of its key (file path, block number or row number), so the split is stable when
other documents are added. The vocabulary is bytes (UTF-8), 256 ids; byte 0 separates documents
(and is dropped from the text). Output directory: ``train.npy`` and ``validation.npy`` (uint8),
then ``manifest.json`` (tasks/storage.py) with the vocabulary, counts and the source.
"""
from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from tasks.storage import atomic_path, read_manifest, reusable, write_manifest

SCHEMA_VERSION = 1
SEPARATOR = 0  # the document boundary byte
VOCAB_SIZE = 256
SPLITS = ("train", "validation")


def stdlib_documents() -> Iterator[tuple[str, str]]:
    """(relative path, text) of every standard-library .py file, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel.split("/") or "dist-packages" in rel.split("/"):
            continue
        try:
            yield rel, p.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8


def text_file_documents(path: Path, lines_per_doc: int = 200) -> Iterator[tuple[str, str]]:
    """(block number, text) of each ``lines_per_doc``-line block of a UTF-8 text file."""
    lines = Path(path).read_text("utf-8").splitlines(keepends=True)
    for i in range(0, len(lines), lines_per_doc):
        yield f"block-{i // lines_per_doc}", "".join(lines[i:i + lines_per_doc])


def parquet_documents(path: Path, column: str = "text") -> Iterator[tuple[str, str]]:
    """(row number, text) of each row of a Parquet file's text column."""
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    if column not in table.column_names:
        raise ValueError(f"{path}: no column {column!r}; columns are {table.column_names}")
    for i, text in enumerate(table.column(column).to_pylist()):
        if text:
            yield f"row-{i}", str(text)


def is_validation(key: str, seed: int, val_fraction: float) -> bool:
    """The seeded hash split: a document's side depends only on (seed, key)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return h / 2 ** 64 < val_fraction


def documents(source: str | None, column: str = "text", lines_per_doc: int = 200) -> Iterator[tuple[str, str]]:
    if source is None or source == "stdlib":
        return stdlib_documents()
    p = Path(source)
    if not p.is_file():
        raise ValueError(f"corpus source {source!r}: not a file (give a .txt/.parquet file or 'stdlib')")
    return parquet_documents(p, column) if p.suffix == ".parquet" else text_file_documents(p, lines_per_doc)


def prepare_corpus(out_dir: str | Path, source: str | None = None, *, val_fraction: float = 0.05,
                   seed: int = 0, column: str = "text", lines_per_doc: int = 200) -> dict:
    """Write the byte corpus of ``source`` to ``out_dir`` (skipped when it is already there);
    return its manifest."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    meta = {"kind": "lm-corpus", "schema_version": SCHEMA_VERSION, "source": source or "stdlib",
            "seed": seed, "val_fraction": val_fraction, "vocab": "bytes", "vocab_size": VOCAB_SIZE}
    if source in (None, "stdlib"):  # another interpreter has another standard library
        meta.update(stdlib=sysconfig.get_paths()["stdlib"], python=platform.python_version())
    else:
        meta.update(column=column, lines_per_doc=lines_per_doc)
    if (done := reusable(out_dir, **meta)) is not None:
        return done
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    for key, text in documents(source, column, lines_per_doc):
        data = text.encode("utf-8").replace(bytes([SEPARATOR]), b"")
        parts["validation" if is_validation(key, seed, val_fraction) else "train"].append(data)
    if not parts["train"] or not parts["validation"]:
        raise ValueError(f"corpus {meta['source']}: {len(parts['train'])} train and "
                         f"{len(parts['validation'])} validation documents; need both (more documents "
                         f"or another val_fraction)")
    files = {}
    for split, docs in parts.items():
        arr = np.frombuffer(bytes([SEPARATOR]).join(docs), dtype=np.uint8)
        with atomic_path(Path(out_dir) / f"{split}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        files[f"{split}.npy"] = {"rows": int(arr.size), "documents": len(docs)}
    return write_manifest(out_dir, files, **meta)


def load_corpus(corpus_dir: str | Path, split: str = "train") -> tuple[np.ndarray, int]:
    """(uint8 token array (memory-mapped), vocab size) of a prepared corpus split."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    manifest = read_manifest(corpus_dir)
    if manifest.get("kind") != "lm-corpus":
        raise ValueError(f"{corpus_dir}: not an LM corpus (manifest kind {manifest.get('kind')!r}); "
                         "prepare it with tasks.lm_corpus.prepare_corpus")
    return np.load(Path(corpus_dir) / f"{split}.npy", mmap_mode="r"), int(manifest["vocab_size"])
