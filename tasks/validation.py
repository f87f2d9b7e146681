"""The validation slice: a seeded, relation-disjoint part of train's relations, held out.

KgCLUE's splits are relation-disjoint (dev's predicates are almost never train's), so a
validation set that tells how the pipeline's choices generalise must be relation-disjoint from
what the models train on too. ``holdout`` = {"frac": 0.1, "seed": 0} picks ~10% of train's
distinct predicates by a seeded permutation; their rows leave ``train`` and form ``val``.
The generator and the re-rankers never see them; every choice the pipeline makes (look-ahead
rule, ensemble size, expert weights, the multi-task stage) is made on ``val``, never on dev.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

VAL = "val"  # the pseudo-split name


def held_out_predicates(predicates: Iterable[str], frac: float, seed: int) -> frozenset[str]:
    """The predicates of the validation slice: round(frac * n) of them, by a seeded permutation
    of the sorted distinct predicates (so the slice is a pure function of the data and seed)."""
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"holdout frac {frac}: give a fraction in [0, 1)")
    uniq = sorted(set(predicates))
    n = int(round(frac * len(uniq)))
    if frac > 0 and len(uniq) >= 2:
        n = min(max(n, 1), len(uniq) - 1)  # never empty, never all of train
    order = np.random.default_rng([seed, 7919]).permutation(len(uniq))
    return frozenset(uniq[i] for i in order[:n])


def labelled_rows(data_dir: str | Path, splits: Iterable[str], holdout: dict | None = None) -> list[dict]:
    """Labelled rows of ``splits`` from prepared Parquet. With ``holdout``, ``train`` loses the
    held-out relations' rows and the pseudo-split ``val`` is exactly those rows."""
    import pyarrow.parquet as pq

    cache: dict[str, list[dict]] = {}

    def read(split: str) -> list[dict]:
        if split not in cache:
            cache[split] = [r for r in pq.read_table(Path(data_dir) / f"{split}.parquet").to_pylist()
                            if r["subject"] is not None]
        return cache[split]

    out: list[dict] = []
    for split in splits:
        if split == VAL or (split == "train" and holdout):
            if not holdout:
                raise ValueError("the 'val' split needs a holdout ({'frac': ..., 'seed': ...})")
            train = read("train")
            held = held_out_predicates((r["predicate"] for r in train), float(holdout["frac"]), int(holdout["seed"]))
            keep_val = split == VAL
            out.extend(r for r in train if (r["predicate"] in held) == keep_val)
        else:
            out.extend(read(split))
    return out
