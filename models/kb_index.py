"""(subject, predicate[, disambiguation]) -> object lookups over a built KgTrie, and the strings
of every key.

Objects are stored once, grouped by key id: ``obj_data`` (UTF-8 bytes), ``obj_offsets``
(one entry per stored object) and ``key_obj`` (CSR: key id -> its objects). All arrays are
memory-mapped on load.

Key strings (:class:`KeyStrings`): the trie holds token ids only, and with a vocabulary that
lacks some characters of the KB (a ``--from-run`` vocabulary on a new KB) several string
triples tokenise to the same key ("colliding" keys: 张三X and 张三Y both become 张三[UNK]).
So the build keeps, per key, its *variants*: the distinct (S, P, M) string triples that
tokenise to it, in order of first occurrence in the KB file (``key_var`` CSR, ids into three
string tables), and stores the objects grouped by variant (``var_obj`` CSR; within a variant
in KB file order). Variant 0 of a key is the one of its first triple in the file, so the
key's first object is variant 0's first object: an answer (variant 0's S and P, its first
object) is always one real KB triple, never a mixture of variants.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.trie import ImpossibleState, KgTrie
from models.vocab import EOS, SEP, CharVocab

INDEX_ARRAYS = ("obj_data", "obj_offsets", "key_obj")
STRING_COLUMNS = ("subject", "predicate", "disambiguation")
STRING_ARRAYS = (*(f"str_{c}_{part}" for c in STRING_COLUMNS for part in ("data", "offsets")),
                 "key_var", "var_s", "var_p", "var_m", "var_obj")


class StringTable:
    """Strings as one UTF-8 byte buffer plus n+1 byte offsets (memory-mappable)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.data[int(self.offsets[i]):int(self.offsets[i + 1])]).decode("utf-8")


class KeyStrings:
    """Per key its string variants (S base, P, M) and each variant's object range."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.tables = tuple(StringTable(arrays[f"str_{c}_data"], arrays[f"str_{c}_offsets"])
                            for c in STRING_COLUMNS)
        self.key_var, self.var_obj = arrays["key_var"], arrays["var_obj"]
        self.var_ids = (arrays["var_s"], arrays["var_p"], arrays["var_m"])
        self.n_keys = len(self.key_var) - 1

    def n_variants(self, key_id: int) -> int:
        return int(self.key_var[key_id + 1]) - int(self.key_var[key_id])

    def variant(self, key_id: int, j: int = 0) -> tuple[str, str, str]:
        """(subject base, predicate, disambiguation) of variant ``j`` of a key (0: first in file)."""
        if not 0 <= j < self.n_variants(key_id):
            raise IndexError(f"key {key_id} has {self.n_variants(key_id)} string variant(s), not {j + 1}")
        v = int(self.key_var[key_id]) + j
        return tuple(t[int(ids[v])] for t, ids in zip(self.tables, self.var_ids))  # type: ignore[return-value]

    def object_range(self, key_id: int, j: int) -> tuple[int, int]:
        v = int(self.key_var[key_id]) + j
        return int(self.var_obj[v]), int(self.var_obj[v + 1])


class KbIndex:
    """Object lookup by key id or by strings; ``names``: the key strings (None: an old build)."""

    def __init__(self, trie: KgTrie, vocab: CharVocab, arrays: dict[str, np.ndarray],
                 names: KeyStrings | None = None):
        self.trie, self.vocab, self.names = trie, vocab, names
        self.obj_data, self.obj_offsets, self.key_obj = (arrays[n] for n in INDEX_ARRAYS)
        if len(self.key_obj) != trie.n_keys + 1 or (names is not None and names.n_keys != trie.n_keys):
            raise ValueError(f"index has {len(self.key_obj) - 1} keys, trie has {trie.n_keys}: "
                             f"they come from different builds; rebuild both")

    @classmethod
    def load(cls, directory: str | Path, trie: KgTrie, vocab: CharVocab) -> "KbIndex":
        """Memory-map the arrays; the key strings only when the build wrote them."""
        directory = Path(directory)
        load = lambda n: np.load(directory / f"{n}.npy", mmap_mode="r").view(np.ndarray)  # noqa: E731
        names = None
        if all((directory / f"{n}.npy").is_file() for n in STRING_ARRAYS):
            names = KeyStrings({n: load(n) for n in STRING_ARRAYS})
        return cls(trie, vocab, {n: load(n) for n in INDEX_ARRAYS}, names)

    def key_strings(self, key_id: int, variant: int = 0) -> tuple[str, str, str]:
        """The real (subject base, predicate, disambiguation) of a key: its variant 0 (the
        first in the KB file) unless told otherwise."""
        if self.names is None:
            raise ValueError("this trie build has no key strings table; rebuild the trie")
        return self.names.variant(key_id, variant)

    def _decode(self, lo: int, hi: int, out: list[str]) -> list[str]:
        for j in range(lo, hi):
            o = bytes(self.obj_data[self.obj_offsets[j]:self.obj_offsets[j + 1]]).decode("utf-8")
            if o not in out:
                out.append(o)
        return out

    def objects(self, key_id: int, variant: int | None = None) -> list[str]:
        """Distinct objects of a key, first-in-file first (variant by variant); of one string
        variant only when ``variant`` is given."""
        if variant is None:
            return self._decode(int(self.key_obj[key_id]), int(self.key_obj[key_id + 1]), [])
        if self.names is None:
            raise ValueError("this trie build has no key strings table; rebuild the trie")
        return self._decode(*self.names.object_range(key_id, variant), [])

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

    def _matching_variants(self, key_id: int, subject: str, predicate: str, disambiguation: str | None) -> list[int]:
        """Variants of a key whose strings are exactly these (all of them without a strings table)."""
        if self.names is None:
            return []
        out = []
        for j in range(self.names.n_variants(key_id)):
            s, p, m = self.names.variant(key_id, j)
            if (s, p) == (subject, predicate) and disambiguation in (None, m):
                out.append(j)
        return out

    def lookup(self, subject: str, predicate: str, disambiguation: str | None = None) -> list[str]:
        """Objects for (subject, predicate[, disambiguation]); [] when the KB has none.

        Without a disambiguation, the objects of every matching entity, in key (token) order.
        Of a colliding key, the objects of the variants with exactly these strings; of every
        variant when none has them (strings that only match after tokenisation).
        """
        out: list[str] = []
        for k in self.key_ids(subject, predicate, disambiguation):
            exact = self._matching_variants(k, subject, predicate, disambiguation)
            if not exact or len(exact) == self.names.n_variants(k):
                self._decode(int(self.key_obj[k]), int(self.key_obj[k + 1]), out)
                continue
            for j in exact:
                self._decode(*self.names.object_range(k, j), out)
        return out
