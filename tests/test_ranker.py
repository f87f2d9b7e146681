"""The candidate re-ranker: encoding, training groups, exhaustive scoring, re-ranked decoding."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from models.decoding import constrained_beam_search, sequence_logprobs
from models.ranker import (SEG_M, SEG_O, SEG_P, SEG_Q, SEG_SUBJ, Ranker, RankerConfig, encode_candidate,
                           lcs_len, log_softmax, make_ranker_batch, mask_subject)
from models.vocab import BOS, EOS, SEP, UNK, CharVocab
from models.decoding import Hypothesis
from tasks.evaluate import Reranker, candidate_keys, predict, rerank
from tests.test_decoding import LOOKAHEAD_TRIPLES, build, random_kb, random_questions, tiny_model


def test_lcs_and_subject_mask() -> None:
    assert lcs_len("主讲课程", "主要讲什么课程") == 4
    assert lcs_len("主要成就", "主要讲什么课程") == 2
    assert lcs_len("", "abc") == 0 and lcs_len("abc", "abc") == 3
    assert mask_subject("刘晓华主要讲什么课程", "刘晓华") == ("主要讲什么课程", 0)
    assert mask_subject("请问刘晓华在哪", "王五") == ("请问刘晓华在哪", -1)


def test_encode_candidate_layout() -> None:
    vocab = CharVocab.build(["你知道刘晓华主讲什么课程吗", "主讲课程广东工业大学教授数学"])
    ids, seg, feats = encode_candidate(vocab, "你知道刘晓华主讲什么课程吗", "刘晓华", "主讲课程", "广东工业大学教授", "数学")
    q = vocab.encode("你知道")
    assert ids[0] == BOS and ids[1:4] == q and ids[4] == UNK and seg[4] == SEG_SUBJ
    assert ids[-1] == EOS and ids.count(SEP) == 3 and len(ids) == len(seg)
    p_at = ids.index(SEP)
    assert vocab.decode(ids[p_at + 1:p_at + 5]) == "主讲课程" and set(seg[p_at:p_at + 5]) == {SEG_P}
    assert SEG_M in seg and SEG_O in seg and seg[1] == SEG_Q
    # features on the masked question: P covered fully as a subsequence, not literally contained
    assert feats[0] == pytest.approx(1.0) and feats[2] == 0.0 and len(feats) == 6
    assert encode_candidate(vocab, "刘晓华的主讲课程", "刘晓华", "主讲课程", "", "")[2][2] == 1.0
    assert encode_candidate(vocab, "刘晓华", "刘晓华", "课", "", "")[0][:3] == [BOS, UNK, SEP]


def test_log_softmax_is_a_distribution_and_shift_invariant() -> None:
    s = np.array([0.0, 1.0, 5.0, 2.0, 2.0])
    out = log_softmax(s)
    assert np.exp(out).sum() == pytest.approx(1.0)
    assert out[3] == pytest.approx(out[4]) and int(np.argmax(out)) == 2
    np.testing.assert_allclose(log_softmax(s + 1000.0), out)


def test_training_groups_use_training_relations_only(tmp_path) -> None:
    from tasks.ranker_data import load_ranker_data
    from tasks.sample import prepare_training_set
    prepare_training_set(tmp_path, n_train=200, n_dev=20, n_test=5, k=2)
    data = load_ranker_data(str(tmp_path / "data"), str(tmp_path / "vocab"))
    preds = set(data.predicates)
    for i in range(0, len(data), 7):
        row = data.rows[i]
        neg = data.negatives(i, 7, np.random.default_rng([3, i]))
        assert len(neg) == 7 and neg == data.negatives(i, 7, np.random.default_rng([3, i]))  # a pure function
        for p, m, o in neg:
            assert p in preds and o in data.objects_of[p], "only training predicates and their real objects"
            assert (p, m) != (row["predicate"], row["disambiguation"]), "a negative is never the gold key"
        assert len({p for p, m, _ in neg if m == row["disambiguation"]}) == sum(
            m == row["disambiguation"] for _, m, _ in neg), "no repeated predicate on the same entity"
        group = data.group(i, 8, np.random.default_rng([3, i]))
        assert len(group) == 8 and group[0] == data._enc(row, row["predicate"], row["disambiguation"], row["object"])


def toy_groups(vocab: CharVocab, rng: random.Random, n: int, g: int = 4):
    """Question: 'X的<p>是什么'; gold predicate p, negatives other predicates; objects by type."""
    preds = ["颜色", "高度", "作者", "首都", "面积", "生日", "产地", "语言"]
    cands = []
    for _ in range(n):
        ps = rng.sample(preds, g)
        q = f"甲乙的{ps[0]}是什么"
        cands += [encode_candidate(vocab, q, "甲乙", p, "", f"{p}值") for p in ps]
    return cands


def test_ranker_learns_a_toy_task() -> None:
    vocab = CharVocab.build(["甲乙的是什么值颜色高度作者首都面积生日产地语言"])
    torch.manual_seed(0)
    model = Ranker(RankerConfig(vocab_size=len(vocab), d_model=32, n_head=2, n_layer=1, d_ff=64, dropout=0.0))
    test = make_ranker_batch(toy_groups(vocab, random.Random(1), 64), 4)

    def accuracy() -> float:
        with torch.no_grad():
            return float((model.score(test).view(-1, 4).argmax(1) == 0).float().mean())

    before = accuracy()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(2)
    losses = []
    for _ in range(60):
        loss = model.loss(make_ranker_batch(toy_groups(vocab, rng, 16), 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5, losses
    assert accuracy() >= 0.95 > before


def test_group_size_must_divide() -> None:
    vocab = CharVocab.build(["甲乙的是什么值颜色"])
    with pytest.raises(ValueError, match="groups of 4"):
        make_ranker_batch(toy_groups(vocab, random.Random(0), 2, g=3), 4)


@pytest.mark.parametrize("lookahead,copy_head", [(False, False), (True, False), ("reference", False), (True, True)])
def test_exhaustive_scores_equal_the_beam_search_scores(lookahead, copy_head) -> None:
    vocab, trie = build(random_kb(3, n=14) + LOOKAHEAD_TRIPLES, extra="主要讲什么课程")
    model, batch = tiny_model(len(vocab), seed=4, copy_head=copy_head), random_questions(vocab, 5, seed=5)
    res = constrained_beam_search(model, trie, batch["src_ids"], batch["src_mask"], beam_size=4,
                                  lookahead=lookahead)
    for i, hyps in enumerate(res):
        src = batch["src_ids"][i][batch["src_mask"][i]].tolist()
        got = sequence_logprobs(model, src, [h.tokens for h in hyps], trie, lookahead=lookahead)
        np.testing.assert_allclose(got, [h.score for h in hyps], atol=1e-4)


def test_constrained_exhaustive_scores_are_a_distribution_over_keys() -> None:
    vocab, trie = build(random_kb(5, n=30))
    model = tiny_model(len(vocab), seed=1)
    src = random_questions(vocab, 1, seed=2)["src_ids"][0].tolist()
    keys = [trie.key_tokens(k) for k in range(len(trie))]
    free = sequence_logprobs(model, src, keys)
    constrained = sequence_logprobs(model, src, keys, trie)
    assert np.exp(constrained).sum() == pytest.approx(1.0, abs=1e-5)
    assert np.exp(free).sum() < 1.0 and np.all(constrained >= free - 1e-6)


def test_candidate_keys_beam_first_then_whole_subjects() -> None:
    vocab, trie = build(LOOKAHEAD_TRIPLES + [("王五", "出生地", "")], extra="刘晓华主要讲什么课程")
    model = tiny_model(len(vocab), seed=0)
    batch = make_q(vocab, "刘晓华主要讲什么课程")
    hyps = constrained_beam_search(model, trie, batch["src_ids"], batch["src_mask"], beam_size=2)[0]
    keys = candidate_keys(trie, hyps, n_subjects=1, max_candidates=100)
    assert list(keys[:len(hyps)]) == list(dict.fromkeys(h.key_id for h in hyps))
    s0 = trie.key_parts(hyps[0].key_id)[0]
    same = {k for k in range(len(trie)) if trie.key_parts(k)[0] == s0}
    assert same <= set(keys.tolist()) and len(set(keys.tolist())) == len(keys)
    assert len(candidate_keys(trie, hyps, n_subjects=3, max_candidates=3)) == 3


def make_q(vocab: CharVocab, q: str):
    from models.seq2seq import make_batch
    return make_batch([vocab.encode(q)])


def test_predict_with_a_reranker_picks_the_best_combined_kb_key(tmp_path) -> None:
    from tasks.kb import ingest_kb
    from tasks.trie_build import build_trie_index, load_trie_index
    from tasks.vocab import build_vocab, load_vocab
    triples = [(s, p, m) for s, p, m in random_kb(7, n=60)]
    kb_txt = tmp_path / "kb.txt"
    kb_txt.write_text("".join(f"{s}（{m}）\t{p}\t{s}{p}值\n" if m else f"{s}\t{p}\t{s}{p}值\n"
                              for s, p, m in triples), "utf-8")
    questions = ["".join(random.Random(i).choice("甲乙丙丁戊己庚") for _ in range(6)) for i in range(12)]
    ingest_kb(kb_txt, tmp_path / "kb")
    build_vocab(questions, tmp_path / "kb", tmp_path / "vocab", "test")
    vocab = load_vocab(tmp_path / "vocab")
    build_trie_index(tmp_path / "kb", tmp_path / "vocab", tmp_path / "trie")
    trie, index = load_trie_index(tmp_path / "trie", vocab)
    model = tiny_model(len(vocab), seed=2)
    torch.manual_seed(3)
    ranker = Ranker(RankerConfig(vocab_size=len(vocab), d_model=32, n_head=2, n_layer=1, d_ff=64)).eval()
    rr = Reranker((ranker,), n_subjects=2)
    preds = predict(model, trie, index, vocab, questions, beam=3, reranker=rr)
    plain = predict(model, trie, index, vocab, questions, beam=3)
    kb = {(f"{s}（{m}）" if m else s, p) for s, p, m in triples}
    src = [vocab.encode(q) for q in questions]
    for q, s_ids, pr in zip(questions, src, preds):
        assert (pr.subject, pr.predicate) in kb and pr.obj == f"{pr.subject.split('（')[0]}{pr.predicate}值"
        hyps = constrained_beam_search(model, trie, *make_q(vocab, q).values(), beam_size=3, lookahead=True)[0]
        key, _ = rerank(model, rr, trie, index, vocab, q, s_ids, hyps)
        assert key == pr.key_id
        keys = candidate_keys(trie, hyps, 2, 256)  # fewer than max_candidates: none pruned
        toks = [trie.key_tokens(int(k)) for k in keys]
        enc = []
        for k in keys:
            s, p, m = index.key_strings(int(k))
            enc.append(encode_candidate(vocab, q, s, p, m, index.objects(int(k))[0]))
        with torch.no_grad():
            r = ranker.score(make_ranker_batch(enc)).double().numpy()
        g = sequence_logprobs(model, s_ids, toks, trie, lookahead=True)
        assert key == keys[int(np.argmax(log_softmax(r) + log_softmax(g)))]
    assert len(plain) == len(preds) and all(p.key_id >= 0 for p in plain)


class FavouringGenerator(torch.nn.Module):
    """A stand-in generator whose next-token logits favour one key's tokens at every step."""

    def __init__(self, vocab_size: int, key: np.ndarray):
        super().__init__()
        self.V, self.key = vocab_size, [int(t) for t in key]

    def encode(self, src, mask):
        return torch.zeros(src.size(0), src.size(1), 1)

    def decode(self, memory, mask, tgt, src):
        out = torch.zeros(tgt.size(0), tgt.size(1), self.V)
        for t in range(min(tgt.size(1), len(self.key))):
            out[:, t, self.key[t]] = 5.0
        return out


class FlatRanker(torch.nn.Module):
    def score(self, batch):
        return torch.zeros(batch["ids"].size(0))


def test_reranker_cap_keeps_the_generators_best_keys(tmp_path) -> None:
    """A hub subject with 40 keys, max_candidates 8, the gold key last in token order: the
    generator prefers it, so it must reach the re-ranker (a token-order cap cut it)."""
    from tasks.kb import ingest_kb
    from tasks.trie_build import build_trie_index, load_trie_index
    from tasks.vocab import build_vocab, load_vocab
    chars = "甲乙丙丁戊己庚辛"
    preds = sorted({a + b for a in chars for b in chars})[:40]
    (tmp_path / "kb.txt").write_text("".join(f"王五\t{p}\t{p}值\n" for p in preds) + "赵六\t甲甲\t某\n", "utf-8")
    ingest_kb(tmp_path / "kb.txt", tmp_path / "kb")
    build_vocab(["王五是什么"], tmp_path / "kb", tmp_path / "vocab", "t")
    vocab = load_vocab(tmp_path / "vocab")
    build_trie_index(tmp_path / "kb", tmp_path / "vocab", tmp_path / "trie", log=lambda *_: None)
    trie, index = load_trie_index(tmp_path / "trie", vocab)
    hub = trie.key_parts(index.key_ids("王五", preds[0], "")[0])[0]
    keys = [k for k in range(len(trie)) if trie.key_parts(k)[0] == hub]
    gold = max(keys, key=lambda k: trie.key_tokens(k).tolist())
    assert len(keys) == 40 and index.key_ids("王五", preds[-1], "") == [gold]
    gen = FavouringGenerator(len(vocab), trie.key_tokens(gold))
    src = vocab.encode("王五是什么")
    hyps = [Hypothesis(keys[0], 0.0, trie.key_tokens(keys[0]))]  # the beam found another key of 王五
    rr = Reranker((FlatRanker(),), n_subjects=1, max_candidates=8)
    key, _ = rerank(gen, rr, trie, index, vocab, "王五是什么", src, hyps)
    assert key == gold
    from tasks.evaluate import generator_scores, top_by_score
    model = tiny_model(len(vocab), seed=3)
    toks = [trie.key_tokens(k) for k in keys]
    np.testing.assert_allclose(generator_scores(model, src, toks, trie, True, batch=7),
                               sequence_logprobs(model, src, toks, trie, lookahead=True), atol=1e-9)
    assert top_by_score(np.array([0.0, 3.0, 1.0, 3.0, -1.0]), 3).tolist() == [1, 2, 3]
