"""Build the KgTrie and the object index from an ingested KB, save them memory-mappable.

Bounded memory: the KB is read a row group at a time and turned into three int32 id
columns (indices into the sorted distinct strings); strings are tokenised once per
distinct value, not per triple. Objects are gathered in key order into one byte blob.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.kb_index import KbIndex
from models.trie import KgTrie
from models.vocab import CharVocab
from tasks.kb import read_distinct, utf8_table
from tasks.storage import atomic_path, atomic_write_text, read_manifest, reusable, write_manifest
from tasks.vocab import load_vocab

SCHEMA_VERSION = 1


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))


def _ids(kb_file: Path, n_rows: int, values: dict[str, pa.Array]) -> dict[str, np.ndarray]:
    """Per triple, the index of its subject / predicate / disambiguation in the sorted values."""
    pf = pq.ParquetFile(kb_file)
    out = {c: np.empty(n_rows, dtype=np.int32) for c in values}
    pos = 0
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=list(values))
        for c, vals in values.items():
            idx = pc.index_in(t[c], value_set=vals)
            if idx.null_count:
                raise ValueError(f"{kb_file}: a {c} is missing from the distinct table; re-ingest the KB")
            out[c][pos:pos + t.num_rows] = idx.to_numpy()
        pos += t.num_rows
    if pos != n_rows:
        raise ValueError(f"{kb_file}: {pos} rows read, manifest says {n_rows}; re-ingest the KB")
    return out


def _write_objects_by_key(kb_file: Path, key_of: np.ndarray, n_keys: int, out_dir: Path,
                          chunk: int = 1 << 17) -> dict[str, int]:
    """Objects in key order (stable: KB file order within a key): blob + offsets + key CSR.

    The blob is filled chunk by chunk into a memory-mapped .npy, so only the source column
    and one chunk are in memory at a time.
    """
    order = np.argsort(key_of, kind="stable")
    objs = utf8_table(pq.read_table(kb_file, columns=["object"])["object"].combine_chunks())
    lens = np.diff(objs.offsets)[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    del lens
    with atomic_path(out_dir / "obj_data.npy") as tmp:
        blob = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(int(offsets[-1]),))
        src_start = objs.offsets[:-1]
        for a in range(0, len(order), chunk):
            rows = order[a:a + chunk]
            starts, ends = src_start[rows], objs.offsets[rows + 1]
            span = np.repeat(starts - offsets[a:a + len(rows)], ends - starts)  # source - dest shift
            dest = np.arange(offsets[a], offsets[a + len(rows)], dtype=np.int64)
            blob[dest] = objs.data[dest + span]
        blob.flush()
        del blob
    save_array(out_dir / "obj_offsets.npy", offsets)
    key_obj = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(key_of, minlength=n_keys), out=key_obj[1:])
    save_array(out_dir / "key_obj.npy", key_obj)
    return {"obj_data": int(offsets[-1]), "obj_offsets": len(offsets), "key_obj": len(key_obj)}


def build_trie_index(kb_dir: str | Path, vocab_dir: str | Path, out_dir: str | Path,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """kb_dir (ingested) + vocab -> out_dir with trie arrays, object index and manifest."""
    kb_dir, out_dir = Path(kb_dir), Path(out_dir)
    kb_manifest = read_manifest(kb_dir)
    vocab = load_vocab(vocab_dir)
    key = hashlib.sha256(json.dumps([kb_manifest["files"]["kb.parquet"]["sha256"], vocab.sha256,
                                     SCHEMA_VERSION]).encode()).hexdigest()
    if (manifest := reusable(out_dir, inputs_sha256=key)) is not None:
        return manifest
    values = {c: read_distinct(kb_dir, c) for c in ("subject", "predicate", "disambiguation")}
    n_rows = kb_manifest["files"]["kb.parquet"]["rows"]
    ids = _ids(kb_dir / "kb.parquet", n_rows, values)
    log(f"build-trie: {n_rows:,} triples mapped to ids")
    tables = {c: utf8_table(v) for c, v in values.items()}
    trie, key_of = KgTrie.build(vocab, tables["subject"], tables["predicate"], tables["disambiguation"],
                                ids["subject"], ids["predicate"], ids["disambiguation"])
    del ids, tables, values
    log(f"build-trie: {trie.n_keys:,} keys, {len(trie.s_label):,} subject nodes")
    files: dict[str, dict[str, Any]] = {}
    for name, arr in trie.arrays().items():
        save_array(out_dir / f"{name}.npy", arr)
        files[f"{name}.npy"] = {"rows": int(len(arr)), "dtype": str(arr.dtype)}
    log(f"build-trie: trie arrays saved ({trie.nbytes() / 2**20:,.0f} MiB)")
    for name, rows in _write_objects_by_key(kb_dir / "kb.parquet", key_of, trie.n_keys, out_dir).items():
        files[f"{name}.npy"] = {"rows": rows}
    log("build-trie: object index saved")
    del key_of
    entities = trie.entity_count()
    meta = {**trie.meta(), "entities": entities, "triples": int(n_rows)}
    atomic_write_text(out_dir / "trie.json", json.dumps(meta, indent=2))
    files["trie.json"] = {}
    return write_manifest(out_dir, files, schema_version=SCHEMA_VERSION, inputs_sha256=key,
                          vocab_sha256=vocab.sha256, **{k: v for k, v in meta.items() if k != "bytes"},
                          trie_bytes=meta["bytes"])


def load_trie_index(out_dir: str | Path, vocab: CharVocab) -> tuple[KgTrie, KbIndex]:
    """Memory-map a built trie and its object index (only from a complete output)."""
    manifest = read_manifest(out_dir)
    if manifest["vocab_sha256"] != vocab.sha256:
        raise ValueError(f"{out_dir}: built with another vocabulary; rebuild the trie")
    trie = KgTrie.load(out_dir)
    return trie, KbIndex.load(out_dir, trie, vocab)
