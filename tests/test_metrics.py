"""Official KgCLUE metrics: LCS, f1_sim, score formula, and gold against itself on dev.json."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from models.metrics import KEYS, f1_sim, lcs_length, lcs_length_dp, normalize, score, split_answer

DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kgclue" / "dev.json"


def test_f1_sim_closed_forms() -> None:
    assert f1_sim("abc", "abd") == pytest.approx(4 / 6)
    assert f1_sim("刘晓华（广东工业大学教授）", "刘晓华（广东工业大学教授）") == 1.0
    assert f1_sim("", "") == 0.0
    assert f1_sim("abc", "") == 0.0
    assert f1_sim("主讲课程", "主要成就") == pytest.approx(2 * 1 / 8)  # LCS 主
    assert f1_sim("刘晓华主讲课程", "刘晓华主要成就") == pytest.approx(2 * 4 / 14)
    assert f1_sim("《固体物理》", "固体物理学") == pytest.approx(2 * 4 / 11)


def test_lcs_is_subsequence_not_substring() -> None:
    assert lcs_length("a1b2c3", "abc") == 3
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("甲乙丙ab") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("甲乙丙ab") for _ in range(rng.randint(0, 70)))
        assert lcs_length(a, b) == lcs_length_dp(a, b) == lcs_length(b, a)


def test_normalize_and_split() -> None:
    assert normalize("  GB/T   6983-2008 \t") == "gb/t 6983-2008"
    assert split_answer("刘晓华（广东工业大学教授） ||| 主讲课程 ||| 《固体物理》")[1] == "主讲课程"
    with pytest.raises(ValueError, match="3 parts"):
        split_answer("a|||b|||c")


def test_score_hand_computed() -> None:
    golds = [("刘晓华（广东工业大学教授）", "主讲课程", "《固体物理》"), ("龙编站", "坐标", "21°N")]
    preds = [("刘晓华（广东工业大学教授）", "主要成就", "《固体物理》"), ("龙编站", "坐标", "21°n 105°E")]
    m = score(preds, golds)
    assert list(m) == list(KEYS) and m["n_eval"] == 2
    assert m["em_s"] == 100.0 and m["em_p"] == 50.0 and m["em_all"] == 0.0
    assert m["em_o"] == 50.0  # "21°n" == normalize("21°N"), the rest differs
    f1_o2 = 2 * 4 / (len("21°n 105°e") + len("21°n"))
    assert m["f1_o"] == pytest.approx(100 * (1 + f1_o2) / 2)
    assert m["f1_p"] == pytest.approx(100 * (2 * 1 / 8 + 1) / 2)
    assert m["score"] == pytest.approx(0.5 * m["em_o"] + 0.5 * m["f1_o"])
    all1 = f1_sim("刘晓华（广东工业大学教授）主要成就《固体物理》", "刘晓华（广东工业大学教授）主讲课程《固体物理》")
    all2 = f1_sim("龙编站坐标21°n 105°e", "龙编站坐标21°n")
    assert m["f1_all"] == pytest.approx(100 * (all1 + all2) / 2)
    with pytest.raises(ValueError, match="1 predictions for 2"):
        score(preds[:1], golds)


def test_gold_against_itself_on_dev() -> None:
    if not DEV.exists():
        pytest.skip(f"KgCLUE dev set not found at {DEV} (copy it to ../shared/data/kgclue/)")
    with DEV.open(encoding="utf-8") as f:
        golds = [split_answer(json.loads(line)["answer"]) for line in f if line.strip()]
    assert len(golds) == 2000
    m = score(golds, golds)
    assert m.pop("n_eval") == 2000
    assert m == {k: 100.0 for k in KEYS if k != "n_eval"}
