"""Evaluation reads answers from the key strings table, and cuts questions at the trained length."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from models.vocab import SEP, UNK
from tasks.evaluate import Reranker, predict, run_eval
from tasks.kb import ingest_kb
from tasks.minikb import write_kb_txt
from tasks.storage import write_manifest
from tasks.trie_build import build_trie_index, load_trie_index
from tasks.vocab import build_vocab, load_vocab
from tests.test_decoding import tiny_model

QUESTIONS = ["甲的颜色是什么", "甲的作者是谁", "乙有多高", "甲乙丙丁的颜色"]


def kb_with_vocab(tmp_path: Path, triples, vocab_triples, name: str = "t"):
    """A KB built (trie + index) with the vocabulary of *another* KB, as ``--from-run`` does."""
    write_kb_txt(vocab_triples, tmp_path / "vocab_kb.txt")
    ingest_kb(tmp_path / "vocab_kb.txt", tmp_path / "vocab_kb")
    build_vocab(QUESTIONS, tmp_path / "vocab_kb", tmp_path / "vocab", "v")
    write_kb_txt(triples, tmp_path / f"{name}.txt")
    ingest_kb(tmp_path / f"{name}.txt", tmp_path / f"{name}_kb")
    manifest = build_trie_index(tmp_path / f"{name}_kb", tmp_path / "vocab", tmp_path / f"{name}_trie",
                                log=lambda *_: None)
    vocab = load_vocab(tmp_path / "vocab")
    trie, index = load_trie_index(tmp_path / f"{name}_trie", vocab)
    return manifest, vocab, trie, index


def test_answers_carry_the_kb_characters_not_unk(tmp_path: Path) -> None:
    """Ω and ☆ are outside the run's vocabulary: the answer still spells them."""
    triples = [("甲Ω", "颜色", "红"), ("甲Ω（书☆）", "作者", "某人"), ("乙", "高度", "三米")]
    _, vocab, trie, index = kb_with_vocab(tmp_path, triples, [("甲", "颜色", "红"), ("乙（书）", "作者高度", "x")])
    assert UNK in vocab.encode("甲Ω")  # the premise: the vocabulary lacks it
    model = tiny_model(len(vocab), seed=0)
    preds = predict(model, trie, index, vocab, QUESTIONS * 3, beam=3)
    kb = {(s, p): o for s, p, o in triples}
    for p in preds:
        assert "[UNK]" not in p.answer()
        assert kb[(p.subject, p.predicate)] == p.obj, p.answer()
    every_key = {index.key_strings(k) for k in range(len(trie))}
    assert every_key == {("甲Ω", "颜色", ""), ("甲Ω", "作者", "书☆"), ("乙", "高度", "")}


def test_keys_that_tokenise_alike_are_reported_not_merged(tmp_path: Path, caplog) -> None:
    triples = [("张三X", "性别", "男"), ("张三Y", "性别", "女"), ("张三X", "性别", "未知"), ("李四", "性别", "男")]
    with caplog.at_level(logging.WARNING, logger="tasks.trie_build"):
        manifest, vocab, trie, index = kb_with_vocab(tmp_path, triples, [("张三", "性别", "男"), ("李四", "性别", "男")])
    assert manifest["colliding_keys"] == 1 and manifest["keys"] == 2 and manifest["string_variants"] == 3
    assert manifest["collision_examples"] == [{"key": 0, "variants": ["张三X ||| 性别", "张三Y ||| 性别"]}]
    assert any("collide" in r.getMessage() for r in caplog.records)
    key = index.key_ids("张三X", "性别", "")[0]
    assert key == index.key_ids("张三Y", "性别", "")[0], "the premise: one key for both strings"
    assert index.key_strings(key) == ("张三X", "性别", ""), "the answer: the first variant in the KB file"
    assert index.key_strings(key, 1) == ("张三Y", "性别", "")
    assert index.objects(key, 0) == ["男", "未知"] and index.objects(key, 1) == ["女"]
    assert index.objects(key)[0] == "男", "the key's first object is its first variant's"
    assert index.lookup("张三Y", "性别", "") == ["女"] and index.lookup("张三X", "性别") == ["男", "未知"]
    model = tiny_model(len(vocab), seed=1)
    for p in predict(model, trie, index, vocab, ["张三X的性别", "张三Y的性别"], beam=2):
        assert p.answer() in ("张三X ||| 性别 ||| 男", "李四 ||| 性别 ||| 男")


def test_an_old_trie_without_the_strings_table_is_refused(tmp_path: Path) -> None:
    kb_with_vocab(tmp_path, [("甲", "颜色", "红")], [("甲", "颜色", "红")])
    d = tmp_path / "t_trie"
    m = json.loads((d / "manifest.json").read_text("utf-8"))
    files = [n for n in m["files"] if not n.startswith(("str_", "var_", "key_var"))]
    for n in set(m["files"]) - set(files):
        (d / n).unlink()
    write_manifest(d, files, schema_version=1, vocab_sha256=m["vocab_sha256"])
    with pytest.raises(ValueError, match="rebuild"):
        load_trie_index(d, load_vocab(tmp_path / "vocab"))


def test_a_model_is_evaluated_with_its_trained_max_src_len(tmp_path: Path, monkeypatch) -> None:
    import tasks.evaluate as ev
    from tasks.evaluate import trained_max_src_len

    model_dir, old_dir = tmp_path / "model", tmp_path / "old"
    for d in (model_dir, old_dir):
        d.mkdir()
        (d / "model_config.json").write_text("{}")
    write_manifest(model_dir, ["model_config.json"], spec={"max_src_len": 5, "steps": 1})
    write_manifest(old_dir, ["model_config.json"], run_name="old")
    assert trained_max_src_len(model_dir) == 5 and trained_max_src_len(old_dir) == 64
    _, vocab, trie, index = kb_with_vocab(tmp_path, [("甲", "颜色", "红"), ("甲", "作者", "某人"), ("乙", "高度", "三米")],
                                          [("甲", "颜色作者", "红"), ("乙", "高度", "x")])
    widths, cuts = [], []
    real_search, real_encode = ev.constrained_beam_search, ev.encode_candidate

    def search(model, trie, src_ids, src_mask, **kw):
        widths.append(int(src_mask.sum(1).max()))
        return real_search(model, trie, src_ids, src_mask, **kw)

    def encode(*args):
        cuts.append(args[6])  # max_src_len, passed positionally by tasks.evaluate
        return real_encode(*args)

    monkeypatch.setattr(ev, "constrained_beam_search", search)
    monkeypatch.setattr(ev, "encode_candidate", encode)

    class Flat:
        def score(self, batch):
            import torch
            return torch.zeros(batch["ids"].size(0))

    n = trained_max_src_len(model_dir)
    rows = [{"id": i, "question": q * 3} for i, q in enumerate(QUESTIONS)]  # 18+ characters each
    m = run_eval(tiny_model(len(vocab)), trie, index, vocab, rows, tmp_path, "dev", beam=2,
                 reranker=Reranker((Flat(),), max_src_len=n), max_src_len=n)
    assert widths and max(widths) == 5 and m["max_src_len"] == 5
    assert cuts and set(cuts) == {5}
    src = ev.encode_questions(["甲的颜色是什么甲的颜色"], vocab, n)
    assert len(src[0]) == 5 and ev.encode_questions([""], vocab, n) == [[SEP]]
