"""models/kb_index.py directly: its string tables, and a real trie build read back key by key."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.kb_index import INDEX_ARRAYS, STRING_ARRAYS, KbIndex, KeyStrings, StringTable
from tests.test_evaluate_strings import kb_with_vocab


def _table(strings: list[str]) -> StringTable:
    raw = [s.encode("utf-8") for s in strings]
    offsets = np.concatenate(([0], np.cumsum([len(b) for b in raw]))).astype(np.int64)
    return StringTable(np.frombuffer(b"".join(raw), dtype=np.uint8), offsets)


def test_string_table_round_trips_multibyte_and_empty_strings() -> None:
    strings = ["", "甲乙", "a", "☆Ω", "", "长长的名字（书）"]
    t = _table(strings)
    assert len(t) == len(strings)
    assert [t[i] for i in range(len(t))] == strings


def test_key_strings_variants_and_object_ranges() -> None:
    s, p, m = _table(["张三X", "张三Y"]), _table(["性别"]), _table(["", "书"])
    arrays = {"key_var": np.array([0, 2, 3]), "var_s": np.array([0, 1, 1]), "var_p": np.array([0, 0, 0]),
              "var_m": np.array([0, 0, 1]), "var_obj": np.array([0, 2, 3, 5])}
    for name, t in zip(("subject", "predicate", "disambiguation"), (s, p, m)):
        arrays[f"str_{name}_data"], arrays[f"str_{name}_offsets"] = t.data, t.offsets
    ks = KeyStrings(arrays)
    assert ks.n_keys == 2 and [ks.n_variants(k) for k in range(2)] == [2, 1]
    assert ks.variant(0) == ("张三X", "性别", "") and ks.variant(0, 1) == ("张三Y", "性别", "")
    assert ks.variant(1) == ("张三Y", "性别", "书")
    assert [ks.object_range(0, 0), ks.object_range(0, 1), ks.object_range(1, 0)] == [(0, 2), (2, 3), (3, 5)]
    with pytest.raises(IndexError, match="key 1 has 1 string variant"):
        ks.variant(1, 1)


def _random_kb(seed: int, n: int = 60) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    chars = "甲乙丙丁戊己庚辛壬癸天地玄黄宇宙洪荒"
    subjects = ["".join(rng.choices(chars, k=rng.randint(1, 3))) + rng.choice(["", "（书）", "（人物）"])
                for _ in range(12)]
    preds = ["颜色", "作者", "高度", "出生地"]
    return [(rng.choice(subjects), rng.choice(preds), f"答{rng.randint(0, 9)}{i % 3}") for i in range(n)]


def _split(subject: str) -> tuple[str, str]:
    if subject.endswith("）") and "（" in subject:
        base, m = subject[:-1].split("（", 1)
        return base, m
    return subject, ""


def test_a_real_build_reads_back_every_triple(tmp_path: Path) -> None:
    """Every (S, P, M) of the KB file gives back exactly its objects, first in file first; every key
    names real strings; a missing key gives []."""
    triples = _random_kb(seed=3)
    _, vocab, trie, index = kb_with_vocab(tmp_path, triples, triples)
    expected: dict[tuple[str, str, str], list[str]] = {}
    for s, p, o in triples:
        objs = expected.setdefault((*_split(s), p), [])
        if o not in objs:
            objs.append(o)
    assert len(trie) == len(expected)
    for (base, m, p), objs in expected.items():
        (key,) = index.key_ids(base, p, m)
        assert index.key_strings(key) == (base, p, m)
        assert index.objects(key) == objs == index.objects(key, variant=0)
        assert index.lookup(base, p, m) == objs
    assert {index.key_strings(k) for k in range(len(trie))} == {(b, p, m) for b, m, p in expected}
    assert index.lookup("不存在", "颜色") == [] and index.key_ids("不存在", "颜色") == []
    # without a disambiguation: the objects of every entity with that base name and predicate
    base, m, p = next(iter(expected))
    union = [o for (b2, m2, p2), objs in expected.items() if (b2, p2) == (base, p) for o in objs]
    assert sorted(index.lookup(base, p)) == sorted(dict.fromkeys(union))


def test_load_refuses_another_builds_trie_and_old_builds_lack_strings(tmp_path: Path) -> None:
    triples = _random_kb(seed=4)
    _, vocab, trie, _ = kb_with_vocab(tmp_path / "a", triples, triples)
    _, _, small_trie, _ = kb_with_vocab(tmp_path / "b", triples[:5], triples)
    with pytest.raises(ValueError, match="different builds; rebuild both"):
        KbIndex.load(tmp_path / "a" / "t_trie", small_trie, vocab)
    old = tmp_path / "old"
    old.mkdir()
    for name in INDEX_ARRAYS:  # a build from before the strings table
        shutil.copy(tmp_path / "a" / "t_trie" / f"{name}.npy", old / f"{name}.npy")
    index = KbIndex.load(old, trie, vocab)
    assert index.names is None and all(not (old / f"{n}.npy").exists() for n in STRING_ARRAYS)
    with pytest.raises(ValueError, match="no key strings table; rebuild the trie"):
        index.key_strings(0)
    assert index.objects(0)  # objects still read without the strings
