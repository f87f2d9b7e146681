"""The density stage's own maths: AUROC, corruptions, deciles, pooled encodings."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.density import CORRUPTIONS, accuracy_by_decile, auroc, corrupt


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 55).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(pos, neg) == pytest.approx(brute, abs=1e-12)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0


def test_corruptions_keep_counts_and_change_text():
    qs = ["刘晓华是哪里人", "完美有限公司的总部在哪里", "a"]
    shuffled = corrupt(qs, "char_shuffled", 0)
    assert [sorted(s) for s in shuffled] == [sorted(q) for q in qs] and shuffled[1] != qs[1]
    rand = corrupt(qs, "random_chars", 0, alphabet="甲乙丙丁")
    assert [len(r) for r in rand] == [len(q) for q in qs] and set("".join(rand)) <= set("甲乙丙丁")
    assert set(corrupt(qs, "kb_objects", 0, other=["x", "y"])) <= {"x", "y"}
    assert corrupt(qs, "char_shuffled", 3) == corrupt(qs, "char_shuffled", 3)
    with pytest.raises(ValueError, match="choose one of"):
        corrupt(qs, "reversed", 0)
    assert len(CORRUPTIONS) == 3


def test_accuracy_by_decile_orders_by_density():
    log_q = np.arange(100.0)
    correct = log_q >= 50  # the typical half is right
    rows = accuracy_by_decile(log_q, correct)
    assert [r["decile"] for r in rows] == list(range(1, 11)) and sum(r["n"] for r in rows) == 100
    assert [r["accuracy"] for r in rows] == [0.0] * 5 + [1.0] * 5
    assert rows[0]["log_q_max"] < rows[1]["log_q_min"]
