"""Longest common subsequence: the one implementation the project uses (pure Python/numpy).

Two forms of the same recurrence ``L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j] else
max(L[i-1][j], L[i][j-1])``:

* :func:`lcs_row` / :func:`lcs_length`: one pair, bit-parallel over ``b`` (Hyyrö 2004),
  O(len(a)) big-int operations; any hashable items (characters, token ids). Used by the
  official metric (models/metrics.py) and by the look-ahead's prefix row (models/decoding.py).
* :func:`lcs_rows`: many sequences against one ``b`` at once, one numpy step per column of
  the (C, L) matrix, optionally continuing from a given DP row. Used by the look-ahead's
  completions (models/decoding.py) and by the mini-KB's predicate similarity (tasks/minikb.py).

:func:`lcs_length_dp` is the plain O(len(a)·len(b)) programme the fast forms are tested against.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def _items(x: Sequence[Hashable]) -> Sequence[Hashable]:
    """Plain Python items (numpy scalars hash and compare slower)."""
    return x.tolist() if isinstance(x, np.ndarray) else x


def _steps(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Hyyrö's bit vector after all of ``a``: bit i is 0 where row[i+1] = row[i] + 1 (a step)."""
    match: dict[Hashable, int] = {}
    for i, x in enumerate(b):
        match[x] = match.get(x, 0) | (1 << i)
    full = v = (1 << len(b)) - 1
    for x in a:
        u = v & match.get(x, 0)
        v = ((v + u) | (v - u)) & full
    return v


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a  # bits over the shorter sequence
    if len(b) == 0:
        return 0
    return len(b) - _steps(a, b).bit_count()


def lcs_row(a: Sequence[Hashable], b: Sequence[Hashable]) -> np.ndarray:
    """row[i] = LCS(a, b[:i]) for i = 0..len(b), int32 (bit-parallel over ``b``)."""
    m = len(b)
    v = _steps(_items(a), _items(b))
    bits = np.unpackbits(np.frombuffer(v.to_bytes((m + 7) // 8 or 1, "little"), np.uint8),
                         bitorder="little")[:m]
    return np.concatenate([[0], np.cumsum(1 - bits.astype(np.int32))]).astype(np.int32)


def lcs_rows(seqs: np.ndarray, b: Sequence[int] | np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """DP rows of many sequences: out[c, i] = LCS(x + seqs[c], b[:i]), with x the sequence whose
    row is ``start`` (none: empty). ``seqs`` (C, L) int, padded with a value absent from ``b``
    (e.g. -1). Returns (C, len(b)+1) int32.

    One numpy step per column of ``seqs``, vectorised over rows and over ``b``:
    new[i] = max(old[i], old[i-1] + match[i], new[i-1]) is a cumulative max.
    """
    C, m = seqs.shape[0], len(b)
    R = np.zeros((C, m + 1), dtype=np.int32) if start is None else np.tile(start.astype(np.int32), (C, 1))
    q = np.asarray(b, dtype=np.int64)[None, :]  # (1, m)
    for j in range(seqs.shape[1]):
        match = seqs[:, j:j + 1] == q  # (C, m)
        t = np.maximum(R[:, 1:], R[:, :-1] + match)
        np.maximum.accumulate(t, axis=1, out=R[:, 1:])
    return R


def lcs_length_dp(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Reference O(len(a)·len(b)) dynamic programme (the tests' naive form)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]
