"""Auxiliary KgCLUE tasks without extra labels (tasks/aux_tasks.py), on hand-made rows."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.aux_tasks import build_predicate_matching, build_subject_tagging, subject_tags


def _row(q, s, p, o="x", m=""):
    return {"question": q, "subject": s, "predicate": p, "object": o, "disambiguation": m}


TRAIN = [
    _row("你知道守望星光是哪家公司出品的吗？", "守望星光", "出品公司", "韩玉玲原创音乐",
         "韩玉玲、刘东考演唱歌曲"),
    _row("龙晶用繁体字怎么写？", "龙晶", "繁体", "龍晶", "游戏"),
    _row("刘晓华主讲什么课程？", "刘晓华", "主讲课程", "高等数学", "广东工业大学教授"),
    _row("刘晓华有什么主要成就？", "刘晓华", "主要成就", "省级奖励"),
    _row("无罪无我的和声是谁？", "无罪无我", "和声", "章韵"),
    _row("武汉大学的主管部门是？", "武汉大学", "主管部门", "教育部"),
]


def test_subject_tags_exact_substring():
    assert subject_tags("龙晶用繁体字怎么写？", "龙晶") == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert subject_tags("阿Q正传的作者？", "阿Q正传") == [1, 1, 1, 1, 0, 0, 0, 0]
    assert subject_tags("AA与AA", "AA") == [1, 1, 0, 1, 1]  # every occurrence
    assert subject_tags("龙晶怎么写", "龍晶") is None  # no fuzzy match: a traditional-form miss
    assert subject_tags("龙晶怎么写", "") is None


def test_build_subject_tagging_counts_untagged():
    rows = [*TRAIN, _row("守望星光是谁唱的？", "守望 星光", "演唱", "韩玉玲")]
    st = build_subject_tagging(rows)
    assert st.n_tagged == 6 and st.n_untagged == 1 and st.tags[-1] is None
    for r, t in zip(rows[:-1], st.tags[:-1]):
        assert len(t) == len(r["question"])
        tagged = "".join(c for c, b in zip(r["question"], t) if b)
        assert tagged == r["subject"]  # each subject occurs once here
    assert st.coverage == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match="row 0"):
        build_subject_tagging([{"question": None, "subject": "x"}])


def test_predicate_matching_look_alikes_from_training_only():
    pm = build_predicate_matching(TRAIN, n_similar_pool=2)
    assert pm.predicates == sorted({r["predicate"] for r in TRAIN})
    # 主讲课程's closest training relations share 主 (LCS 1): 主要成就 and 主管部门; never itself
    assert "主讲课程" not in pm.similar["主讲课程"]
    assert set(pm.similar["主讲课程"]) <= {"主要成就", "主管部门"}
    assert pm.similar["主要成就"][0] in {"主讲课程", "主管部门"}
    rng = np.random.default_rng(0)
    pairs = pm.pairs(2, n_neg=2, rng=rng)
    assert pairs[0] == (TRAIN[2]["question"], "主讲课程", 1)
    assert [lab for _, _, lab in pairs] == [1, 0, 0]
    assert len({p for _, p, _ in pairs}) == 3  # distinct, gold not repeated as a negative
    assert all(p in pm.predicates for _, p, _ in pairs[1:])


def test_dev_rows_get_training_negatives_only():
    dev = [_row("武汉大学的主管单位？", "武汉大学", "主管单位")]  # a relation unseen in training
    pm = build_predicate_matching(dev, train_rows=TRAIN, n_similar_pool=3)
    assert "主管单位" not in pm.predicates
    assert pm.similar["主管单位"][0] == "主管部门"  # LCS 2, the closest training relation
    pairs = pm.pairs(0, n_neg=5, rng=np.random.default_rng(1))
    assert len(pairs) == 4 and all(p in pm.predicates for _, p, _ in pairs[1:])


def test_pairs_are_reproducible_from_the_seed():
    pm = build_predicate_matching(TRAIN, n_similar_pool=4)
    a = [pm.pairs(i, 3, np.random.default_rng(7)) for i in range(len(pm))]
    b = [pm.pairs(i, 3, np.random.default_rng(7)) for i in range(len(pm))]
    assert a == b
    with pytest.raises(ValueError, match="at least 2"):
        build_predicate_matching([TRAIN[0]])
