"""models/seq_table.py against plain-Python references: code points, terminators, neighbour
LCPs, sort + dedupe with ranks, and the BFS CSR trie (every path spells exactly one sequence)."""
from __future__ import annotations

import numpy as np

from models.seq_table import (Utf8Table, build_bfs_trie, codepoints, common_prefix, find_sorted, is_sorted_unique,
                              sort_table, with_terminator)


def table(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=off[1:])
    return np.array([t for s in seqs for t in s], dtype=np.int64), off


def rows(tok: np.ndarray, off: np.ndarray) -> list[list[int]]:
    return [tok[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]


def test_codepoints_from_strings_and_utf8_buffers_agree() -> None:
    strings = ["北京", "", "a€𝄞b", "大学"]
    cps, off = codepoints(strings)
    assert rows(cps, off) == [[ord(c) for c in s] for s in strings]
    raw = [s.encode("utf-8") for s in strings]
    boff = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in raw], out=boff[1:])
    cps2, off2 = codepoints(Utf8Table(np.frombuffer(b"".join(raw), dtype=np.uint8), boff))
    assert np.array_equal(cps, cps2) and np.array_equal(off, off2)


def test_sort_dedupe_lcp_and_trie_match_python() -> None:
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 5, size=rng.integers(0, 5))) for _ in range(200)]
    tok, off = with_terminator(*table(seqs), end=9, dtype=np.int64)
    assert rows(tok, off) == [s + [9] for s in seqs]
    s_tok, s_off, rank = sort_table(tok, off)
    want = sorted({tuple(s + [9]) for s in seqs})
    assert [tuple(r) for r in rows(s_tok, s_off)] == want
    assert [want[r] for r in rank] == [tuple(s + [9]) for s in seqs]  # each input's rank in the sorted table
    lcp = common_prefix(s_tok, s_off)
    ref = [0] + [next((d for d, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                 for x, y in zip(want, want[1:])]
    assert lcp.tolist() == ref
    assert is_sorted_unique(s_tok, s_off, lcp) and not is_sorted_unique(tok, off, common_prefix(tok, off))
    label, first_child, lo = build_bfs_trie(s_tok, s_off, lcp)
    paths = []

    def walk(u: int, path: list[int]) -> None:
        kids = range(first_child[u], first_child[u + 1])
        if not kids:
            paths.append(tuple(path))
        for c in kids:
            assert list(want[lo[c]][:len(path) + 1]) == path + [label[c]]  # lo: the first sequence below c
            walk(c, path + [int(label[c])])

    walk(0, [])
    assert sorted(paths) == want and len(paths) == len(want)


def test_find_sorted_equals_bisect_for_every_dtype_and_out_of_range_value():
    import bisect
    rng = np.random.default_rng(0)
    for dtype in (np.int32, np.int64, np.uint16, np.uint32):
        a = np.sort(rng.integers(0, 60_000, 500)).astype(dtype)
        ref = a.tolist()
        for x in [-5, 0, 1, 59_999, 70_000, 2**40, *rng.integers(0, 60_000, 200).tolist()]:
            assert find_sorted(a, x) == bisect.bisect_left(ref, x), (dtype, x)
            assert find_sorted(a, np.int64(x), side="right") == bisect.bisect_right(ref, x), (dtype, x)


def test_find_sorted_does_not_copy_the_array():
    """numpy casts an int32 array whole to search for a Python int: 8 MB per call here."""
    import tracemalloc
    a = np.arange(1_000_000, dtype=np.int32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        j = find_sorted(a, 123_456, side="right")
        ours = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        np.searchsorted(a, 123_456, side="right")  # what it replaces
        plain = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert j == 123_457
    assert ours < 64 << 10, f"find_sorted allocated {ours} bytes"
    assert plain > a.nbytes  # the check can see a copy: numpy's own call makes one
