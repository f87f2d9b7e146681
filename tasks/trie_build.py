"""Build the KgTrie, the object index and the key strings from an ingested KB, save them
memory-mappable.

Bounded memory: the KB is read a row group at a time and turned into three int32 id
columns (indices into the sorted distinct strings); strings are tokenised once per
distinct value, not per triple. Objects are gathered in (key, string variant) order into
one byte blob.

Key strings (models/kb_index.py): the distinct S / P / M strings are saved beside the trie
(``str_*``) with, per key, its string variants (``key_var``, ``var_s/p/m``, ``var_obj``), so
answers carry the KB's real characters whatever the vocabulary. Keys that several string
triples tokenise to (characters outside the vocabulary) are counted in the manifest
(``colliding_keys``, ``collision_examples``) and logged as a warning; their answer is the
variant first in the KB file, with its own objects.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.kb_index import STRING_ARRAYS, STRING_COLUMNS, KbIndex
from models.trie import KgTrie
from models.vocab import CharVocab
from tasks.kb import read_distinct, utf8_table
from tasks.kgclue_data import join_subject
from tasks.storage import atomic_path, atomic_write_text, read_manifest, reusable, write_manifest
from tasks.vocab import load_vocab

SCHEMA_VERSION = 2  # 2: key strings table (str_*, key_var, var_*)
N_COLLISION_EXAMPLES = 5
logger = logging.getLogger(__name__)


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


def key_variants(key_of: np.ndarray, ids: dict[str, np.ndarray], n_keys: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct string triples of every key, in order of first occurrence in the KB file.

    ``ids``: per triple the subject / predicate / disambiguation index into the distinct
    strings. Returns ``key_var`` (CSR, n_keys+1: key -> its variants), ``var_ids`` (n_var, 3)
    int32 and ``var_of`` (per triple its global variant id; variants of key k are numbered
    ``key_var[k]`` .. ``key_var[k+1]-1``, so variant order is key order). Only the rows of
    colliding keys (more than one variant) go through the general path.
    """
    cols = [np.asarray(ids[c]) for c in STRING_COLUMNS]
    order = np.argsort(key_of, kind="stable")  # by key, KB file order within a key
    first = order[np.searchsorted(key_of[order], np.arange(n_keys))]  # each key's first triple
    same = np.ones(len(key_of), dtype=bool)
    for c in cols:
        same &= c == c[first][key_of]
    if same.all():  # the usual case: one variant per key, variant id = key id
        key_var = np.arange(n_keys + 1, dtype=np.int64)
        return key_var, np.stack([c[first] for c in cols], 1).astype(np.int32), key_of
    bad = np.zeros(n_keys, dtype=bool)
    bad[key_of[~same]] = True
    rows = order[bad[key_of[order]]]  # rows of colliding keys, (key, file) order
    lex = np.lexsort((rows, *(c[rows] for c in reversed(cols)), key_of[rows]))  # identical triples together
    r = rows[lex]
    new = np.ones(len(r), dtype=bool)
    new[1:] = key_of[r][1:] != key_of[r][:-1]
    for c in cols:
        new[1:] |= c[r][1:] != c[r][:-1]
    group = np.cumsum(new) - 1  # per row of r
    g_first, g_key = r[new], key_of[r][new]  # first file row (rows sorted last) and key of a group
    g_order = np.lexsort((g_first, g_key))  # groups by (key, first occurrence)
    n_var = np.ones(n_keys, dtype=np.int64)
    n_var[bad] = np.bincount(g_key, minlength=n_keys)[bad]
    key_var = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(n_var, out=key_var[1:])
    g_rank = np.empty(len(g_order), dtype=np.int64)
    g_rank[g_order] = np.arange(len(g_order))
    g_var = key_var[g_key] + g_rank - np.searchsorted(g_key[g_order], g_key)  # global variant id
    var_of = key_var[key_of]  # variant 0 for every row, then the colliding rows
    var_of[r] = g_var[group]
    var_first = np.empty(int(key_var[-1]), dtype=np.int64)
    var_first[key_var[:-1][~bad]] = first[~bad]
    var_first[g_var] = g_first
    return key_var, np.stack([c[var_first] for c in cols], 1).astype(np.int32), var_of


def collision_report(key_var: np.ndarray, var_ids: np.ndarray, values: dict[str, pa.Array],
                     n: int = N_COLLISION_EXAMPLES) -> tuple[int, list[dict]]:
    """(number of colliding keys, the first ``n`` with their variants' "S（M） ||| P")."""
    counts = np.diff(key_var)
    colliding = np.flatnonzero(counts > 1)
    examples = []
    for k in colliding[:n]:
        variants = []
        for v in range(int(key_var[k]), int(key_var[k + 1])):
            s, p, m = (values[c][int(var_ids[v, j])].as_py() for j, c in enumerate(STRING_COLUMNS))
            variants.append(f"{join_subject(s, m)} ||| {p}")
        examples.append({"key": int(k), "variants": variants})
    return int(len(colliding)), examples


def _save_strings(values: dict[str, pa.Array], key_var: np.ndarray, var_ids: np.ndarray,
                  var_obj: np.ndarray, out_dir: Path) -> dict[str, dict[str, Any]]:
    """The key strings table (models.kb_index.KeyStrings), one .npy per array."""
    arrays: dict[str, np.ndarray] = {}
    for c in STRING_COLUMNS:
        data, off = utf8_table(values[c])
        arrays[f"str_{c}_data"] = np.asarray(data[int(off[0]):int(off[-1])], dtype=np.uint8)
        arrays[f"str_{c}_offsets"] = np.asarray(off, dtype=np.int64) - int(off[0])
    arrays.update(key_var=key_var, var_s=var_ids[:, 0], var_p=var_ids[:, 1], var_m=var_ids[:, 2], var_obj=var_obj)
    files = {}
    for name in STRING_ARRAYS:
        save_array(out_dir / f"{name}.npy", arrays[name])
        files[f"{name}.npy"] = {"rows": int(len(arrays[name]))}
    return files


def _write_objects(kb_file: Path, var_of: np.ndarray, key_var: np.ndarray, out_dir: Path,
                   chunk: int = 1 << 17) -> tuple[dict[str, int], np.ndarray]:
    """Objects in (key, variant) order (stable: KB file order within a variant): blob +
    offsets + key CSR; returns the sizes and the variant CSR (``var_obj``).

    The blob is filled chunk by chunk into a memory-mapped .npy, so only the source column
    and one chunk are in memory at a time.
    """
    order = np.argsort(var_of, kind="stable")
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
    var_obj = np.zeros(int(key_var[-1]) + 1, dtype=np.int64)
    np.cumsum(np.bincount(var_of, minlength=int(key_var[-1])), out=var_obj[1:])
    key_obj = var_obj[key_var]  # a key's objects: those of its variants, which are contiguous
    save_array(out_dir / "key_obj.npy", key_obj)
    return {"obj_data": int(offsets[-1]), "obj_offsets": len(offsets), "key_obj": len(key_obj)}, var_obj


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
    del tables
    log(f"build-trie: {trie.n_keys:,} keys, {len(trie.s_label):,} subject nodes")
    key_var, var_ids, var_of = key_variants(key_of, ids, trie.n_keys)
    del ids, key_of
    n_colliding, examples = collision_report(key_var, var_ids, values)
    if n_colliding:
        msg = (f"build-trie: {n_colliding:,} keys collide after tokenisation ({len(var_ids):,} string "
               f"variants for {trie.n_keys:,} keys; characters outside the vocabulary); answers take each "
               f"key's first variant in the KB file. e.g. {examples[0]['variants']}")
        logger.warning(msg)
        log(f"WARNING {msg}")
    files: dict[str, dict[str, Any]] = {}
    for name, arr in trie.arrays().items():
        save_array(out_dir / f"{name}.npy", arr)
        files[f"{name}.npy"] = {"rows": int(len(arr)), "dtype": str(arr.dtype)}
    log(f"build-trie: trie arrays saved ({trie.nbytes() / 2**20:,.0f} MiB)")
    sizes, var_obj = _write_objects(kb_dir / "kb.parquet", var_of, key_var, out_dir)
    for name, rows in sizes.items():
        files[f"{name}.npy"] = {"rows": rows}
    del var_of
    log("build-trie: object index saved")
    files.update(_save_strings(values, key_var, var_ids, var_obj, out_dir))
    del values
    log("build-trie: key strings saved")
    entities = trie.entity_count()
    meta = {**trie.meta(), "entities": entities, "triples": int(n_rows)}
    atomic_write_text(out_dir / "trie.json", json.dumps(meta, indent=2))
    files["trie.json"] = {}
    return write_manifest(out_dir, files, schema_version=SCHEMA_VERSION, inputs_sha256=key,
                          vocab_sha256=vocab.sha256, **{k: v for k, v in meta.items() if k != "bytes"},
                          trie_bytes=meta["bytes"], string_variants=int(len(var_ids)),
                          colliding_keys=n_colliding, collision_examples=examples)


def load_trie_index(out_dir: str | Path, vocab: CharVocab) -> tuple[KgTrie, KbIndex]:
    """Memory-map a built trie, its object index and its key strings (only from a complete
    output of this schema: an older one lacks the strings table and is refused)."""
    manifest = read_manifest(out_dir)
    if manifest["vocab_sha256"] != vocab.sha256:
        raise ValueError(f"{out_dir}: built with another vocabulary; rebuild the trie")
    missing = [n for n in STRING_ARRAYS if f"{n}.npy" not in manifest["files"]]
    if manifest.get("schema_version", 1) < SCHEMA_VERSION or missing:
        raise ValueError(f"{out_dir}: trie built by schema {manifest.get('schema_version', 1)}, without the "
                         f"key strings table ({missing[0] if missing else 'str_*'}.npy) that answers are "
                         f"read from (schema {SCHEMA_VERSION}); rebuild it: re-run the build-trie step (the "
                         f"pipeline does so by itself, the schema is part of its cache key) or delete {out_dir}")
    trie = KgTrie.load(out_dir)
    index = KbIndex.load(out_dir, trie, vocab)
    if index.names is None:
        raise ValueError(f"{out_dir}: key strings table unreadable; delete {out_dir} and rebuild the trie")
    return trie, index
