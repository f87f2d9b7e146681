"""Build and load the character vocabulary (questions + KB strings), saved with its hash."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from models.seq_table import codepoints
from models.vocab import CharVocab
from tasks.kb import read_distinct, utf8_table
from tasks.storage import atomic_write_text, read_manifest, reusable, write_manifest

SCHEMA_VERSION = 1


def build_vocab(questions: Iterable[str], kb_dir: str | Path, out_dir: str | Path,
                inputs_sha256: str) -> dict[str, Any]:
    """Characters of every question and of every distinct KB subject/predicate/disambiguation.

    Objects are not generated (they are looked up), so they do not enter the vocabulary.
    """
    out_dir = Path(out_dir)
    if (manifest := reusable(out_dir, inputs_sha256=inputs_sha256)) is not None:
        return manifest
    chars: set[str] = set()
    for q in questions:
        chars.update(q)
    for column in ("subject", "predicate", "disambiguation"):
        cps, _ = codepoints(utf8_table(read_distinct(kb_dir, column)))
        chars.update(map(chr, np.unique(cps).tolist()))
    vocab = CharVocab(tuple(sorted(chars)))
    atomic_write_text(out_dir / "vocab.json", vocab.to_json())
    return write_manifest(out_dir, {"vocab.json": {"rows": len(vocab)}}, schema_version=SCHEMA_VERSION,
                          inputs_sha256=inputs_sha256, vocab_sha256=vocab.sha256, size=len(vocab))


def load_vocab(out_dir: str | Path) -> CharVocab:
    manifest = read_manifest(out_dir)
    vocab = CharVocab.from_json((Path(out_dir) / "vocab.json").read_text("utf-8"))
    if vocab.sha256 != manifest["vocab_sha256"]:
        raise ValueError(f"{out_dir}/vocab.json: hash differs from its manifest; rebuild the vocabulary")
    return vocab
