"""A compact prefix tree over KgCLUE generation targets (pure numpy).

Keys are token sequences ``BOS  S…  SEP  P…  SEP  M…  EOS`` (subject base name, predicate,
disambiguation; ALGORITHMS.md §3, order S, P, M). A nested-dict trie (GENRE, bojone) costs
~1.5 KB per key; this one factorises the key instead:

* subjects: a BFS-ordered CSR trie over the distinct base names (each ending in SEP), so
  ``allowed`` at a subject node is one array slice;
* predicates / disambiguations: global tables of distinct token sequences sorted by token
  order, plus per-subject sorted predicate ids (``sp_*``) and per-(subject, predicate)
  sorted disambiguation ids (``spm_*``). Inside P or M the state is the small set of
  candidate ids still consistent with the prefix, filtered one token at a time.

Everything is a flat numpy array, so a saved trie is memory-mapped on load. A key id is
the rank of (subject, predicate, disambiguation) in that sorted order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from models.seq_table import (Utf8Table, build_bfs_trie, codepoints, common_prefix, compact_offsets, csr_from_groups,
                              find_sorted, is_sorted_unique, sort_table, with_terminator)
from models.vocab import BOS, EOS, SEP, CharVocab

FORMAT_VERSION = 1
ARRAYS = ("s_label", "s_first_child", "s_lo", "s_tokens", "s_offsets", "p_tokens", "p_offsets",
          "m_tokens", "m_offsets", "sp_offsets", "sp_pred", "spm_offsets", "spm_m")
_PHASE_S, _PHASE_P, _PHASE_M, _DONE = range(4)


class ImpossibleState(ValueError):
    """A token that no key allows at this point of the prefix."""


@dataclass(frozen=True)
class TrieState:
    """Where a beam stands: phase, depth inside the current part, and what is still possible.

    ``node`` is the subject-trie node (phase S), the subject id (P) or the entry id (M) or
    the key id (done); ``cands`` the candidate predicate entries (P) or key ids (M).
    """

    phase: int
    node: int
    depth: int = 0
    cands: np.ndarray | None = None


def _distinct(tokens: np.ndarray) -> np.ndarray:
    """Sorted distinct tokens as int64; a Python set beats np.unique on the usual few."""
    if tokens.size <= 32:
        return np.array(sorted(set(tokens.tolist())), dtype=np.int64)
    return np.unique(tokens).astype(np.int64)


# --------------------------------------------------------------------------- the trie
class KgTrie:
    """The prefix tree; build with :meth:`build` / :meth:`from_triples`, or :meth:`load`."""

    bos, sep, eos = BOS, SEP, EOS

    def __init__(self, arrays: dict[str, np.ndarray]):
        missing = set(ARRAYS) - set(arrays)
        if missing:
            raise ValueError(f"trie arrays missing: {sorted(missing)}")
        for name in ARRAYS:
            setattr(self, name, arrays[name])
        self.n_subjects = len(self.s_offsets) - 1
        self.n_keys = len(self.spm_m)
        self.mmapped = False

    # ----- construction
    @classmethod
    def build(cls, vocab: CharVocab, s_strings: Sequence[str] | Utf8Table,
              p_strings: Sequence[str] | Utf8Table, m_strings: Sequence[str] | Utf8Table,
              s_idx: np.ndarray, p_idx: np.ndarray, m_idx: np.ndarray) -> tuple["KgTrie", np.ndarray]:
        """Build from distinct strings and, per triple, indices into them.

        Returns the trie and, for every input triple, its key id (several triples may share
        a key: same subject, predicate and disambiguation, other objects). Tables that are
        already sorted in token order (the ingest writes them so) skip the sort.
        """
        dtype = vocab.token_dtype
        lcps = {}

        def table(name, strings, end):
            cps, off = codepoints(strings)
            tok, off = with_terminator(vocab.lookup(cps), off, end, dtype)
            del cps
            lcp = common_prefix(tok, off)
            if is_sorted_unique(tok, off, lcp):
                lcps[name] = lcp
                return tok, off, None
            tok, off, rank = sort_table(tok, off)
            return tok, off, rank

        s_tok, s_off, s_rank = table("s", s_strings, SEP)
        p_tok, p_off, p_rank = table("p", p_strings, SEP)
        m_tok, m_off, m_rank = table("m", m_strings, EOS)
        s = np.asarray(s_idx, dtype=np.int64) if s_rank is None else s_rank[np.asarray(s_idx)]
        p = np.asarray(p_idx, dtype=np.int64) if p_rank is None else p_rank[np.asarray(p_idx)]
        m = np.asarray(m_idx, dtype=np.int64) if m_rank is None else m_rank[np.asarray(m_idx)]
        n_s, n_p, n_m = len(s_off) - 1, len(p_off) - 1, len(m_off) - 1
        bits_p, bits_m = max(1, int(n_p).bit_length()), max(1, int(n_m).bit_length())
        if int(n_s).bit_length() + bits_p + bits_m <= 63:
            composite = s << (bits_p + bits_m)
            del s
            composite |= p << bits_m
            del p
            composite |= m
            del m
            uniq, key_of = np.unique(composite, return_inverse=True)
            del composite
            ks, kp, km = uniq >> (bits_p + bits_m), (uniq >> bits_m) & ((1 << bits_p) - 1), uniq & ((1 << bits_m) - 1)
        else:  # pragma: no cover - astronomically large KBs
            order = np.lexsort((m, p, s))
            trip = np.stack([s[order], p[order], m[order]], 1)
            keep = np.ones(len(order), bool)
            keep[1:] = np.any(trip[1:] != trip[:-1], axis=1)
            ks, kp, km = trip[keep].T
            key_of = np.empty(len(order), np.int64)
            key_of[order] = np.cumsum(keep) - 1
        # entries = distinct (s, p); keys = distinct (s, p, m), both in sorted order
        new_entry = np.ones(len(ks), dtype=bool)
        new_entry[1:] = (ks[1:] != ks[:-1]) | (kp[1:] != kp[:-1])
        entry_of_key = np.cumsum(new_entry) - 1
        e_s, e_p = ks[new_entry], kp[new_entry]
        label, first_child, lo = build_bfs_trie(s_tok, s_off, lcps.get("s"))
        first_child = compact_offsets(first_child)
        arrays = dict(
            s_label=label, s_first_child=first_child, s_lo=lo, s_tokens=s_tok, s_offsets=s_off,
            p_tokens=p_tok, p_offsets=p_off, m_tokens=m_tok, m_offsets=m_off,
            sp_offsets=compact_offsets(csr_from_groups(e_s, n_s)), sp_pred=e_p.astype(np.int32),
            spm_offsets=compact_offsets(csr_from_groups(entry_of_key, len(e_s))), spm_m=km.astype(np.int32))
        return cls(arrays), key_of.astype(np.int32 if len(uniq) < 2**31 else np.int64)

    @classmethod
    def from_triples(cls, triples: Iterable[tuple[str, str, str]], vocab: CharVocab) -> "KgTrie":
        """Convenience builder for small KBs: (subject base, predicate, disambiguation)."""
        tables: list[dict[str, int]] = [{}, {}, {}]
        idx: list[list[int]] = [[], [], []]
        for triple in triples:
            for j, value in enumerate(triple):
                idx[j].append(tables[j].setdefault(value, len(tables[j])))
        if not idx[0]:
            raise ValueError("cannot build a trie from zero keys")
        strings = [list(t) for t in tables]
        trie, _ = cls.build(vocab, *strings, *(np.asarray(i, dtype=np.int64) for i in idx))
        return trie

    # ----- persistence (writing is the tasks layer's job: tasks/trie_build.py)
    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "KgTrie":
        """Load the arrays a build saved (``NAME.npy``), memory-mapped by default."""
        directory = Path(directory)
        meta = json.loads((directory / "trie.json").read_text("utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: trie format {meta.get('format_version')} != "
                             f"{FORMAT_VERSION}; rebuild it with the build-trie step")
        arrays = {}
        for n in ARRAYS:
            a = np.load(directory / f"{n}.npy", mmap_mode="r" if mmap else None)
            arrays[n] = a.view(np.ndarray)  # still file-backed; avoids np.memmap's per-slice cost
        trie = cls(arrays)
        trie.mmapped = mmap
        return trie

    def meta(self) -> dict:
        return {"format_version": FORMAT_VERSION, "keys": int(self.n_keys),
                "subjects": int(self.n_subjects), "predicates": int(len(self.p_offsets) - 1),
                "disambiguations": int(len(self.m_offsets) - 1), "nodes": int(len(self.s_label)),
                "bytes": self.nbytes()}

    # ----- queries
    def start(self) -> TrieState:
        """The state after BOS."""
        return TrieState(_PHASE_S, 0)

    def _children(self, node: int) -> tuple[int, int]:
        return int(self.s_first_child[node]), int(self.s_first_child[node + 1])

    def allowed(self, state: TrieState) -> np.ndarray:
        """Sorted unique token ids that may follow ``state`` (empty only when terminal)."""
        if state.phase == _PHASE_S:
            a, b = self._children(state.node)
            return np.asarray(self.s_label[a:b], dtype=np.int64)
        if state.phase in (_PHASE_P, _PHASE_M):
            return _distinct(self._next_tokens(state))
        return np.zeros(0, dtype=np.int64)

    def _next_tokens(self, state: TrieState) -> np.ndarray:
        """Token at ``state.depth`` of each candidate predicate (P) or disambiguation (M)."""
        if state.phase == _PHASE_P:
            return self.p_tokens[self.p_offsets[self.sp_pred[state.cands]] + state.depth]
        return self.m_tokens[self.m_offsets[self.spm_m[state.cands]] + state.depth]

    def advance(self, state: TrieState, token: int) -> TrieState:
        """The state after ``token``; raises :class:`ImpossibleState` if no key allows it."""
        token = int(token)
        if state.phase == _PHASE_S:
            a, b = self._children(state.node)
            labels = self.s_label[a:b]
            j = find_sorted(labels, token)
            if j >= len(labels) or int(labels[j]) != token:
                raise ImpossibleState(f"token {token} not allowed after subject node {state.node}")
            child = a + j
            if token != SEP:
                return TrieState(_PHASE_S, child)
            s = int(self.s_lo[child])
            cands = np.arange(self.sp_offsets[s], self.sp_offsets[s + 1], dtype=np.int64)
            return TrieState(_PHASE_P, s, 0, cands)
        if state.phase == _PHASE_P:
            keep = state.cands[self._next_tokens(state) == token]
            if keep.size == 0:
                raise ImpossibleState(f"token {token} not allowed in the predicate at depth {state.depth}")
            if token != SEP:
                return TrieState(_PHASE_P, state.node, state.depth + 1, keep)
            e = int(keep[0])  # predicate ids are unique per subject: SEP closes exactly one
            keys = np.arange(self.spm_offsets[e], self.spm_offsets[e + 1], dtype=np.int64)
            return TrieState(_PHASE_M, e, 0, keys)
        if state.phase == _PHASE_M:
            keep = state.cands[self._next_tokens(state) == token]
            if keep.size == 0:
                raise ImpossibleState(f"token {token} not allowed in the disambiguation at depth {state.depth}")
            if token != EOS:
                return TrieState(_PHASE_M, state.node, state.depth + 1, keep)
            return TrieState(_DONE, int(keep[0]))
        raise ImpossibleState("the key is complete: nothing may follow EOS")

    def is_terminal(self, state: TrieState) -> bool:
        return state.phase == _DONE

    def key_id(self, state: TrieState) -> int:
        if state.phase != _DONE:
            raise ValueError("key_id() needs a terminal state (after EOS)")
        return state.node

    def allowed_prefix(self, prefix_ids: Sequence[int]) -> np.ndarray:
        """Non-incremental form: ``prefix_ids`` starts with BOS."""
        if len(prefix_ids) == 0 or int(prefix_ids[0]) != BOS:
            raise ImpossibleState("a prefix must start with the BOS token")
        state = self.start()
        for t in prefix_ids[1:]:
            state = self.advance(state, t)
        return self.allowed(state)

    # ----- keys and completions
    def key_parts(self, key_id: int) -> tuple[int, int, int]:
        """(subject id, predicate id, disambiguation id) of a key."""
        if not 0 <= key_id < self.n_keys:
            raise IndexError(f"key id {key_id} outside 0..{self.n_keys - 1}")
        e = find_sorted(self.spm_offsets, key_id, side="right") - 1
        s = find_sorted(self.sp_offsets, e, side="right") - 1
        return s, int(self.sp_pred[e]), int(self.spm_m[key_id])

    def subject_keys(self, subject_id: int) -> range:
        """Every key id of one subject: keys are numbered subject by subject, so they form one
        contiguous range (in token order of predicate, then disambiguation)."""
        if not 0 <= subject_id < self.n_subjects:
            raise IndexError(f"subject id {subject_id} outside 0..{self.n_subjects - 1}")
        lo = int(self.spm_offsets[self.sp_offsets[subject_id]])
        hi = int(self.spm_offsets[self.sp_offsets[subject_id + 1]])
        return range(lo, hi)

    def _seq(self, which: str, i: int) -> np.ndarray:
        tok, off = getattr(self, f"{which}_tokens"), getattr(self, f"{which}_offsets")
        return np.asarray(tok[off[i]:off[i + 1]], dtype=np.int64)

    def key_tokens(self, key_id: int) -> np.ndarray:
        """The key's tokens without BOS: S… SEP P… SEP M… EOS."""
        s, p, m = self.key_parts(key_id)
        return np.concatenate([self._seq("s", s), self._seq("p", p), self._seq("m", m)])

    def completions(self, state: TrieState, limit: int | None = None) -> list[np.ndarray]:
        """Remaining token sequences (each ending in EOS) of every key below ``state``."""
        out: list[np.ndarray] = []
        full = limit is None

        def room() -> bool:
            return full or len(out) < limit

        if state.phase == _PHASE_M:
            for k in state.cands:
                if not room():
                    break
                out.append(self._seq("m", int(self.spm_m[k]))[state.depth:])
            return out
        if state.phase == _PHASE_P:
            for e in state.cands:
                tail = self._seq("p", int(self.sp_pred[e]))[state.depth:]
                for k in range(self.spm_offsets[e], self.spm_offsets[e + 1]):
                    if not room():
                        return out
                    out.append(np.concatenate([tail, self._seq("m", int(self.spm_m[k]))]))
            return out
        if state.phase == _PHASE_S:
            depth, v = 0, state.node
            while v != 0:  # depth = steps from the root
                v = self._parent(v)
                depth += 1
            last = state.node
            while self.s_first_child[last + 1] > self.s_first_child[last]:
                last = int(self.s_first_child[last + 1]) - 1  # rightmost child
            for s in range(int(self.s_lo[state.node]), int(self.s_lo[last]) + 1):
                head = self._seq("s", s)[depth:]
                for e in range(self.sp_offsets[s], self.sp_offsets[s + 1]):
                    p = self._seq("p", int(self.sp_pred[e]))
                    for k in range(self.spm_offsets[e], self.spm_offsets[e + 1]):
                        if not room():
                            return out
                        out.append(np.concatenate([head, p, self._seq("m", int(self.spm_m[k]))]))
        return out

    def _parent(self, node: int) -> int:
        return find_sorted(self.s_first_child, node, side="right") - 1

    def entity_count(self) -> int:
        """Distinct (subject, disambiguation) pairs, i.e. KB entities."""
        entry_of_key = np.repeat(np.arange(len(self.spm_offsets) - 1), np.diff(self.spm_offsets))
        s_of_entry = np.repeat(np.arange(self.n_subjects), np.diff(self.sp_offsets))
        pair = s_of_entry[entry_of_key].astype(np.int64) * (len(self.m_offsets) - 1) + self.spm_m
        return int(len(np.unique(pair)))

    def __len__(self) -> int:
        return self.n_keys

    def nbytes(self) -> int:
        return int(sum(np.asarray(getattr(self, n)).nbytes for n in ARRAYS))
