"""KB ingest (fast and exact paths), object normalisation, mini-KB protocols."""
from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from tasks.kb import KbFormatError, _fast_chunk, _slow_chunk, ingest_kb
from tasks.kgclue_data import normalize_object
from tasks.minikb import MiniKbConfig, build_triples, gold_triples, lcs_lengths, write_kb_txt
from tasks.storage import IncompleteOutput, read_manifest

WS = [" ", "  ", "\u00a0", "\u3000", "\u2003", "\u200b", "\x1c", "\u0085"]


def _random_kb(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    chars = "张三李四王五赵六（）中国人民大学教授演员歌曲abc123"
    out = []
    for _ in range(n):
        s = "".join(rng.choice(chars[:20]) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.3:
            s += "（" + "".join(rng.choice(chars) for _ in range(rng.randint(1, 6))) + "）"
        p = "".join(rng.choice(chars[:24]) for _ in range(rng.randint(1, 4)))
        o = rng.choice(WS[:4]) * rng.randint(0, 1) + "".join(
            rng.choice(chars) + (rng.choice(WS) if rng.random() < 0.2 else "") for _ in range(rng.randint(1, 8)))
        out.append((s, p, o))
    return out


def test_fast_and_exact_paths_agree_on_clean_data():
    triples = [t for t in _random_kb(3000) if normalize_object(t[2])]
    chunk = "".join(f"{s}\t{p}\t{o}\n" for s, p, o in triples).encode()
    fast = _fast_chunk(chunk)
    assert fast is not None, "a clean chunk must take the Arrow path"
    bad: list = []
    slow = _slow_chunk(chunk, 1, "kb.txt", bad)
    assert not bad
    assert fast.to_pylist() == slow.to_pylist()
    assert [r["object"] for r in fast.to_pylist()] == [normalize_object(o) for _, _, o in triples]


def test_chunking_does_not_change_the_output(tmp_path):
    triples = [t for t in _random_kb(2000, seed=1) if normalize_object(t[2])]
    kb = tmp_path / "kb.txt"
    write_kb_txt(triples, kb)
    a = ingest_kb(kb, tmp_path / "a", chunk_bytes=1 << 20)
    b = ingest_kb(kb, tmp_path / "b", chunk_bytes=997)  # many chunks, cut mid-line
    assert a["triples"] == b["triples"] == len(triples) and b["fast_chunks"] > 10
    assert pq.read_table(tmp_path / "a" / "kb.parquet").to_pylist() == \
        pq.read_table(tmp_path / "b" / "kb.parquet").to_pylist()
    assert a["files"]["subjects.parquet"]["sha256"] == b["files"]["subjects.parquet"]["sha256"]


BAD_KB = [
    (b"only\ttwo", "2 tab-separated column(s)"),
    (b"a\tb\tc\td", "4 tab-separated column(s)"),
    (b"", "blank line"),
    (b"a\t\tc", "empty relation"),
    (b"\tb\tc", "empty head"),
    (b"a\tb\t  ", "empty tail"),
    (b"a\tb\tc\x00", "NUL byte"),
    (b"a\tb\t\xc3\x28", "not UTF-8"),
    (b"a\rb\tb\tc", "carriage return inside a field"),
    (b"x" * (1 << 20 + 1), "over the 1048576-byte limit"),
]


def test_bad_kb_lines_are_quarantined_and_counted(tmp_path):
    good = [f"实体{i}\t属性{i % 3}\t值{i}".encode() for i in range(200)]
    lines = good[:100] + [raw for raw, _ in BAD_KB] + good[100:]
    kb = tmp_path / "kb.txt"
    kb.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    m = ingest_kb(kb, tmp_path / "o", chunk_bytes=4096, max_bad_fraction=0.2)
    assert m["lines"] == 210 and m["triples"] == 200 and m["quarantined"] == 10
    import json
    q = [json.loads(x) for x in (tmp_path / "o" / "quarantine.jsonl").read_text("utf-8").splitlines()]
    assert [r["line"] for r in q] == list(range(101, 111))
    for rec, (_, reason) in zip(q, BAD_KB):
        assert reason in rec["reason"], rec
    rows = pq.read_table(tmp_path / "o" / "kb.parquet").to_pylist()
    assert rows[0] == {"subject": "实体0", "disambiguation": "", "predicate": "属性0", "object": "值0"}


def test_kb_over_bad_fraction_fails_with_no_manifest(tmp_path):
    kb = tmp_path / "kb.txt"
    kb.write_bytes(b"a\tb\tc\nbad line\nalso bad\n")
    with pytest.raises(KbFormatError, match="2 of 3 lines bad"):
        ingest_kb(kb, tmp_path / "o")
    with pytest.raises(IncompleteOutput):
        read_manifest(tmp_path / "o")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(KbFormatError, match="no usable triple"):
        ingest_kb(tmp_path / "empty.txt", tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="--kb"):
        ingest_kb(tmp_path / "missing.txt", tmp_path / "m")


def _gold(kgclue_dir):
    from tasks.kgclue_data import read_split
    return gold_triples(read_split(kgclue_dir / "dev.json", "dev").rows)


@pytest.mark.parametrize("protocol", ["mini", "hard"])
def test_mini_kb_byte_identical_for_same_seed(kgclue_dir, tmp_path, protocol):
    gold = _gold(kgclue_dir)
    paths = []
    for i, seed in enumerate((7, 7, 8)):
        p = tmp_path / f"kb{i}.txt"
        write_kb_txt(build_triples(gold, MiniKbConfig(protocol, seed=seed)), p)
        paths.append(p.read_bytes())
    assert paths[0] == paths[1]
    assert paths[0] != paths[2]


def test_mini_kb_contents(kgclue_dir):
    gold = _gold(kgclue_dir)
    kb = build_triples(gold, MiniKbConfig("mini", k=6, seed=0))
    subjects = {s for s, _, _ in gold}
    assert set(gold) <= set(kb)
    assert len(kb) == len(gold) + 6 * len(subjects)
    sp = [(s, p) for s, p, _ in kb]
    assert len(sp) == len(set(sp)), "a distractor must not repeat a subject's predicate"


def test_hard_kb_similar_predicates_and_homonyms(kgclue_dir):
    gold = _gold(kgclue_dir)
    cfg = MiniKbConfig("hard", k=6, homonyms=2, seed=0)
    kb = build_triples(gold, cfg)
    preds = sorted({p for _, p, _ in gold})
    from tasks.minikb import pad_codepoints as _pad
    s0, g0, _ = sorted(gold)[0]
    mine = [p for s, p, _ in kb if s == s0 and p != g0]
    lcs = dict(zip(preds, lcs_lengths(g0, preds, _pad(preds))))
    others = sorted((lcs[p] for p in preds if p != g0), reverse=True)
    assert sorted((lcs[p] for p in mine), reverse=True) == others[:6], "distractors are the most similar"
    base = s0.split("（")[0]
    twins = {s for s, _, _ in kb if s.startswith(base + "（") and s != s0 and s not in {t[0] for t in gold}}
    assert len(twins) >= 1
    # homonym rule: a twin carries its origin's gold predicate with probability p_gold = 0.1
    # (never otherwise: its predicates are the gold one's look-alikes)
    def twin_gold_rate(c):
        kb_c = build_triples(gold, c)
        labelled = {t[0] for t in gold}
        gold_of_base: dict[str, set[str]] = {}
        for s, p, _ in gold:
            gold_of_base.setdefault(s.split("（")[0], set()).add(p)
        preds_of: dict[str, set[str]] = {}
        for s, p, _ in kb_c:
            if s not in labelled:
                preds_of.setdefault(s, set()).add(p)
        hits = [bool(ps & gold_of_base.get(s.split("（")[0], set())) for s, ps in preds_of.items()]
        return sum(hits) / len(hits), len(hits)
    rate, n = twin_gold_rate(cfg)
    assert n > 1000 and abs(rate - 0.1) < 4 * (0.1 * 0.9 / n) ** 0.5 + 0.01, (rate, n)
    assert twin_gold_rate(MiniKbConfig("hard", k=6, homonyms=2, seed=0, p_gold=0.0))[0] < 0.01
    assert twin_gold_rate(MiniKbConfig("hard", k=6, homonyms=2, seed=0, p_gold=1.0))[0] > 0.99


def test_lcs_lengths_matches_python():
    def lcs(a, b):
        dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
        return dp[-1][-1]
    from tasks.minikb import pad_codepoints as _pad
    rng = random.Random(3)
    cands = ["".join(rng.choice("主要讲课程成就") for _ in range(rng.randint(1, 7))) for _ in range(200)]
    for q in ["主讲课程", "主要成就", "课", "程课讲"]:
        assert list(lcs_lengths(q, cands, _pad(cands))) == [lcs(q, c) for c in cands]
