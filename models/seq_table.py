"""Tables of token sequences in CSR form (one flat token array + offsets), pure numpy: the
building blocks of models/trie.py -- strings to code points without a Python object per string,
terminators, longest common prefixes of neighbours, sort + dedupe with each input's rank, and a
BFS-ordered CSR trie over sorted prefix-free sequences. All vectorised per depth, O(total tokens)."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


def find_sorted(a: np.ndarray, x: int, side: str = "left") -> int:
    """``np.searchsorted(a, x, side)`` for one scalar, with ``x`` cast to ``a``'s dtype first.

    A Python int (or int64) against an int32 array makes numpy cast the *whole* array to a common
    type before the binary search: a full copy per call (28 ms on 15M offsets instead of 4 µs;
    the full-KB re-ranker spent 90% of its time there). Offsets of this module are int32 when
    they fit (:func:`compact_offsets`), so every scalar lookup goes through here."""
    if a.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        if not info.min <= x <= info.max:  # outside the dtype: before or after every element
            return 0 if x < info.min else len(a)
    return int(np.searchsorted(a, a.dtype.type(x), side=side))


def compact_offsets(offsets: np.ndarray) -> np.ndarray:
    """int32 offsets when they fit (halves the per-key cost), else int64."""
    return offsets.astype(np.int32) if offsets[-1] < np.iinfo(np.int32).max else offsets


class Utf8Table(NamedTuple):
    """Strings as one UTF-8 buffer plus byte offsets (e.g. an Arrow string array's buffers)."""

    data: np.ndarray      # uint8
    offsets: np.ndarray   # int64, n+1


def codepoints(strings: Sequence[str] | Utf8Table) -> tuple[np.ndarray, np.ndarray]:
    """(code points uint32, per-string offsets int64) without a Python object per string."""
    if isinstance(strings, Utf8Table):
        data, boff = strings
        lo, hi = int(boff[0]), int(boff[-1])
        cps = np.frombuffer(bytes(data[lo:hi]).decode("utf-8").encode("utf-32-le"), dtype=np.uint32)
        starts = np.zeros(hi - lo + 1, dtype=np.int64)  # code points before each byte
        np.cumsum((data[lo:hi] & 0xC0) != 0x80, out=starts[1:])
        return cps, starts[np.asarray(boff) - lo]
    strings = list(strings)
    cps = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32)
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, strings), dtype=np.int64, count=len(strings)), out=offsets[1:])
    return cps, offsets


def with_terminator(tokens: np.ndarray, offsets: np.ndarray, end: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Append ``end`` to every sequence of a CSR token table."""
    n = len(offsets) - 1
    lens = np.diff(offsets)
    out = np.full(len(tokens) + n, end, dtype=dtype)
    dest = np.arange(len(tokens), dtype=np.int64) + np.repeat(np.arange(n, dtype=np.int64), lens)
    out[dest] = tokens
    new_off = offsets + np.arange(n + 1, dtype=np.int64)
    return out, new_off


def common_prefix(tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """lcp[i] = common prefix length of sequences i-1 and i (lcp[0] = 0), vectorised per depth."""
    n = len(offsets) - 1
    lens = np.diff(offsets)
    starts = offsets[:-1]
    lcp = np.zeros(n, dtype=np.int32)
    active = np.arange(1, n)
    d = 0
    while active.size:
        ok = (lens[active] > d) & (lens[active - 1] > d)
        a = active[ok]
        a = a[tokens[starts[a] + d] == tokens[starts[a - 1] + d]]
        lcp[a] += 1
        active, d = a, d + 1
    return lcp


def is_sorted_unique(tokens: np.ndarray, offsets: np.ndarray, lcp: np.ndarray) -> bool:
    """True when the (terminated, prefix-free) sequences are strictly increasing."""
    i = np.arange(1, len(offsets) - 1)
    if i.size == 0:
        return True
    lens = np.diff(offsets)
    if np.any((lcp[i] >= lens[i]) | (lcp[i] >= lens[i - 1])):
        return False  # equal sequences (or one a prefix of the other)
    return bool(np.all(tokens[offsets[i - 1] + lcp[i]] < tokens[offsets[i] + lcp[i]]))


def sort_table(tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """General path: sort and dedupe sequences; returns (tokens, offsets, rank of each input)."""
    n = len(offsets) - 1
    lens = np.diff(offsets)
    width = int(lens.max(initial=1))
    padded = np.zeros((n, width), dtype=">u4")  # zero pads sort first: shorter-prefix-first order
    row = np.repeat(np.arange(n), lens)
    col = np.arange(len(tokens)) - np.repeat(offsets[:-1], lens)
    padded[row, col] = tokens
    keys = padded.view(f"S{4 * width}").ravel()
    order = np.argsort(keys, kind="stable")
    new = np.ones(n, dtype=bool)
    new[1:] = keys[order][1:] != keys[order][:-1]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.cumsum(new) - 1
    keep = order[new]
    seqs = [tokens[offsets[i]:offsets[i + 1]] for i in keep]
    out_off = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(lens[keep], out=out_off[1:])
    flat = np.concatenate(seqs) if seqs else tokens[:0]
    return flat.astype(tokens.dtype), out_off, rank


def build_bfs_trie(tokens: np.ndarray, offsets: np.ndarray, lcp: np.ndarray | None = None):
    """CSR trie in BFS order over sorted, prefix-free sequences.

    Returns (label, first_child, lo): node u's children are ids ``first_child[u]`` ..
    ``first_child[u+1]-1`` in label order; ``lo[u]`` is the first sequence below u. Node 0
    is the root. Work is O(total tokens), all vectorised per depth.
    """
    n = len(offsets) - 1
    lens = np.diff(offsets)
    starts_at = offsets[:-1]
    if lcp is None:
        lcp = common_prefix(tokens, offsets)
    labels, los, parents = [np.zeros(1, tokens.dtype)], [np.zeros(1, np.int32)], [np.zeros(0, np.int64)]
    alive = np.arange(n)
    prev_starts, prev_base, next_base = None, 0, 1
    d = 0
    while alive.size:
        starts = alive[lcp[alive] <= d]  # a new node at depth d begins at these sequences
        labels.append(tokens[starts_at[starts] + d])
        los.append(starts.astype(np.int32))
        if prev_starts is None:
            parents.append(np.zeros(len(starts), np.int64))
        else:
            parents.append(prev_base + np.searchsorted(prev_starts, starts, side="right") - 1)
        prev_starts, prev_base, next_base = starts, next_base, next_base + len(starts)
        d += 1
        alive = alive[lens[alive] > d]
    parent = np.concatenate(parents)
    n_nodes = next_base
    counts = np.bincount(parent, minlength=n_nodes)
    first_child = np.empty(n_nodes + 1, dtype=np.int64)
    first_child[0] = 1
    np.cumsum(counts, out=first_child[1:])
    first_child[1:] += 1
    return np.concatenate(labels), first_child, np.concatenate(los)


def csr_from_groups(group: np.ndarray, n_groups: int) -> np.ndarray:
    """Offsets for a sorted array of group ids (CSR row pointers)."""
    offsets = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(group, minlength=n_groups), out=offsets[1:])
    return offsets
