"""(subject, predicate[, disambiguation]) -> object lookups over a built KgTrie.

Objects are stored once, grouped by key id: ``obj_data`` (UTF-8 bytes), ``obj_offsets``
(one entry per stored object) and ``key_obj`` (CSR: key id -> its objects, in KB file
order). All three are memory-mapped on load.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.trie import ImpossibleState, KgTrie
from models.vocab import EOS, SEP, CharVocab

INDEX_ARRAYS = ("obj_data", "obj_offsets", "key_obj")


class KbIndex:
    """Object lookup by key id or by strings."""

    def __init__(self, trie: KgTrie, vocab: CharVocab, arrays: dict[str, np.ndarray]):
        self.trie, self.vocab = trie, vocab
        self.obj_data, self.obj_offsets, self.key_obj = (arrays[n] for n in INDEX_ARRAYS)
        if len(self.key_obj) != trie.n_keys + 1:
            raise ValueError(f"index has {len(self.key_obj) - 1} keys, trie has {trie.n_keys}: "
                             f"they come from different builds; rebuild both")

    @classmethod
    def load(cls, directory: str | Path, trie: KgTrie, vocab: CharVocab) -> "KbIndex":
        directory = Path(directory)
        return cls(trie, vocab, {n: np.load(directory / f"{n}.npy", mmap_mode="r") for n in INDEX_ARRAYS})

    def objects(self, key_id: int) -> list[str]:
        """Distinct objects of a key, first-in-file first."""
        out: list[str] = []
        for j in range(int(self.key_obj[key_id]), int(self.key_obj[key_id + 1])):
            o = bytes(self.obj_data[self.obj_offsets[j]:self.obj_offsets[j + 1]]).decode("utf-8")
            if o not in out:
                out.append(o)
        return out

    def key_ids(self, subject: str, predicate: str, disambiguation: str | None = None) -> list[int]:
        """Key ids for the strings; every disambiguation when ``disambiguation`` is None."""
        state = self.trie.start()
        try:
            for t in [*self.vocab.encode(subject), SEP, *self.vocab.encode(predicate), SEP]:
                state = self.trie.advance(state, t)
            if disambiguation is not None:
                for t in [*self.vocab.encode(disambiguation), EOS]:
                    state = self.trie.advance(state, t)
                return [self.trie.key_id(state)]
        except ImpossibleState:
            return []
        return [int(k) for k in state.cands]

    def lookup(self, subject: str, predicate: str, disambiguation: str | None = None) -> list[str]:
        """Objects for (subject, predicate[, disambiguation]); [] when the KB has none.

        Without a disambiguation, the objects of every matching entity, in key (token) order.
        """
        out: list[str] = []
        for k in self.key_ids(subject, predicate, disambiguation):
            out.extend(o for o in self.objects(k) if o not in out)
        return out
