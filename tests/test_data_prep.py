"""KgCLUE data prep: real files, a malformed corpus, conservation, thresholds."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.kgclue_data import (DataQualityError, join_subject, load_split, prepare, read_split,
                               split_subject)
from tasks.storage import IncompleteOutput, read_manifest


def test_real_kgclue_rows_and_zero_quarantined(kgclue_dir, tmp_path):
    files = {s: kgclue_dir / f"{s}.json" for s in ("train", "dev", "test")}
    m = prepare(files, tmp_path)
    assert {s: v["rows"] for s, v in m["splits"].items()} == {"train": 18000, "dev": 2000, "test": 3000}
    assert all(v["quarantined"] == 0 for v in m["splits"].values())
    dev = load_split(tmp_path, "dev").to_pylist()
    assert dev[0]["subject"] == "刘晓华" and dev[0]["disambiguation"] == "广东工业大学教授"
    assert dev[0]["predicate"] == "主讲课程" and dev[0]["object"] == "《固体物理》"
    # every labelled subject round-trips through split/join
    for r in json.loads("[" + ",".join((kgclue_dir / "dev.json").read_text("utf-8").splitlines()) + "]"):
        s = r["answer"].split(" ||| ")[0]
        assert join_subject(*split_subject(s)) == s
    test_rows = pq.read_table(tmp_path / "test.parquet")
    assert test_rows.column("subject").null_count == 3000


@pytest.mark.parametrize("subject,expected", [
    ("刘晓华（广东工业大学教授）", ("刘晓华", "广东工业大学教授")),
    ("完美（中国）有限公司", ("完美（中国）有限公司", "")),
    ("魔幻城堡（（韩）金善贤手绘涂色书）", ("魔幻城堡", "（韩）金善贤手绘涂色书")),
    ("语言学（语言学（语言理论））", ("语言学", "语言学（语言理论）")),
    ("无括号", ("无括号", "")),
    ("（只有括号）", ("（只有括号）", "")),
    ("空括号（）", ("空括号（）", "")),
    ("不平衡（括号", ("不平衡（括号", "")),
])
def test_split_subject(subject, expected):
    assert split_subject(subject) == expected
    assert join_subject(*split_subject(subject)) == subject


GOOD = '{"id": %d, "question": "问题%d是什么？", "answer": "主体%d（义项） ||| 属性 ||| 值 %d"}'
MALFORMED = [  # (raw line bytes, expected reason fragment)
    (b'{"id": 100, "question": "q", "answer": "a ||| b"}', "answer has 2 part(s)"),
    (b'{"id": 101, "question": "q", "answer": "a ||| b ||| c ||| d"}', "answer has 4 part(s)"),
    (b'{"id": 102, "question": "", "answer": "a ||| b ||| c"}', "empty question"),
    (b'{"id": 103, "answer": "a ||| b ||| c"}', "missing field 'question'"),
    (b'{"question": "q", "answer": "a ||| b ||| c"}', "missing field 'id'"),
    (b'{"id": 104, "question": "q"}', "missing field 'answer'"),
    (b'{"id": "105", "question": "q", "answer": "a ||| b ||| c"}', "'id' must be an integer"),
    (b'{"id": 106, "question": 7, "answer": "a ||| b ||| c"}', "'question' must be a string"),
    (b'{"id": 107, "question": "q", "answer": "a |||  ||| c"}', "empty predicate"),
    (b'{"id": 108, "question": "q", "answer": "a ||| b ||| c"', "not JSON"),
    (b'[1, 2, 3]', "not a JSON object"),
    (b'{"id": 109, "question": "\xff\xfe", "answer": "a ||| b ||| c"}', "not UTF-8"),
    (b'{"id": 110, "question": "q\x00", "answer": "a ||| b ||| c"}', "NUL byte"),
    (b'   ', "blank line"),
    (b'{"id": 0, "question": "dup", "answer": "a ||| b ||| c"}', "duplicate id 0 (first at line 1)"),
    (b'{"id": true, "question": "q", "answer": "a ||| b ||| c"}', "'id' must be an integer"),
]


def _write_corpus(path: Path, bom: bool = True, crlf: bool = True) -> list[bytes]:
    good = [(GOOD % (i, i, i, i)).encode() for i in range(40)]
    lines = good[:20] + [raw for raw, _ in MALFORMED] + good[20:]
    nl = b"\r\n" if crlf else b"\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + nl.join(lines) + nl)
    return lines


def test_malformed_corpus_quarantined_line_by_line(tmp_path):
    src = tmp_path / "train.json"
    _write_corpus(src)
    res = read_split(src, "train")
    assert res.rows_in == 40 + len(MALFORMED)
    assert len(res.rows) == 40 and res.rows_in == len(res.rows) + len(res.bad)
    for bad, (_, reason) in zip(res.bad, MALFORMED):
        assert bad.line == 21 + MALFORMED.index((_, reason))
        assert reason in bad.reason, (bad.line, bad.reason)
    # BOM and CRLF are handled, not quarantined: line 1 parses, objects keep inner spaces
    assert res.rows[0]["id"] == 0 and res.rows[0]["object"] == "值 0"


def test_bad_fraction_fails_clearly_and_loses_nothing(tmp_path):
    src = tmp_path / "train.json"
    _write_corpus(src)
    with pytest.raises(DataQualityError) as e:
        prepare({"train": src}, tmp_path / "out", max_bad_fraction=0.05)
    msg = str(e.value)
    assert "train.json" in msg and f"{len(MALFORMED)} of {40 + len(MALFORMED)}" in msg
    assert "--max-bad-fraction" in msg and "line 21" in msg
    q = (tmp_path / "out" / "quarantine.jsonl").read_text("utf-8").splitlines()
    assert len(q) == len(MALFORMED)
    with pytest.raises(IncompleteOutput):
        read_manifest(tmp_path / "out")  # a failed step leaves no manifest
    m = prepare({"train": src}, tmp_path / "out", max_bad_fraction=0.5)
    assert m["splits"]["train"] == {"source": str(src), "lines": 56, "rows": 40, "quarantined": 16}
    rec = json.loads(q[0])
    assert set(rec) == {"file", "line", "field", "value", "reason", "fix"}


def test_prepare_skips_when_inputs_unchanged_and_redoes_when_changed(tmp_path):
    src = tmp_path / "dev.json"
    src.write_text("\n".join(GOOD % (i, i, i, i) for i in range(5)) + "\n", "utf-8")
    m1 = prepare({"dev": src}, tmp_path / "o")
    mtime = (tmp_path / "o" / "dev.parquet").stat().st_mtime_ns
    assert prepare({"dev": src}, tmp_path / "o") == m1
    assert (tmp_path / "o" / "dev.parquet").stat().st_mtime_ns == mtime
    src.write_text("\n".join(GOOD % (i, i, i, i) for i in range(6)) + "\n", "utf-8")
    assert prepare({"dev": src}, tmp_path / "o")["splits"]["dev"]["rows"] == 6


def test_conservation_is_counted_from_the_file_not_the_parser(tmp_path):
    """count in = out + quarantined is checked against the file's own line count, so a parser
    that lost a line fails loudly (before: an assert on the parser's own counter)."""
    from tasks.kgclue_data import check_conservation, count_lines
    f = tmp_path / "x.json"
    f.write_bytes(b'{"a": 1}\n\n{"b": 2}')  # 3 lines, the last unterminated
    assert count_lines(f) == 3
    f.write_bytes(b"a\r\nb\r\n")
    assert count_lines(f) == 2
    check_conservation(f, 3, 2, 1)
    with pytest.raises(AssertionError, match="row conservation violated.*3 lines but 2 rows"):
        check_conservation(f, 3, 2, 0)
