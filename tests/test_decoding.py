"""Trie-constrained beam search: trie paths, exhaustive equivalence, the lookahead rule."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.decoding import (DecodingError, beam_search, constrained_beam_search,
                             greedy_unconstrained, lcs_prefix_row, lcs_rows,
                             lookahead_weights)
from models.metrics import lcs_length_dp
from models.seq2seq import Seq2Seq, Seq2SeqConfig, make_batch
from models.trie import KgTrie
from models.vocab import BOS, EOS, SEP, CharVocab

SENTENCES = ["明月几时有", "明天会更好", "明天下雨", "明天下午开会", "明天下午放假", "明年见",
             "今夕是何年", "今天去哪里玩"]
# the post's 8 sentences as subjects, with real predicate / disambiguation structure
POST_TRIPLES = [(s, "出处", "") for s in SENTENCES] + [("明天下雨", "作者", "歌曲"),
                                                      ("明天下雨", "作者", "小说")]
QUESTION = "刘晓华主要讲什么课程"
LOOKAHEAD_TRIPLES = [("刘晓华", "主要成就", "广东工业大学教授"), ("刘晓华", "主讲课程", "广东工业大学教授"),
                     ("刘晓明", "主讲课程", ""), ("刘晓明", "出生地", "")]


def build(triples: list[tuple[str, str, str]], extra: str = "") -> tuple[CharVocab, KgTrie]:
    vocab = CharVocab.build(["".join(t) for t in triples] + [extra])
    return vocab, KgTrie.from_triples(triples, vocab)


def walk(trie: KgTrie, tokens: np.ndarray):
    """The trie state after BOS + tokens (raises if they are not a trie path)."""
    state = trie.start()
    for t in tokens:
        state = trie.advance(state, int(t))
    return state


def assert_trie_path(trie: KgTrie, hyp) -> None:
    state = walk(trie, hyp.tokens)
    assert trie.is_terminal(state) and trie.key_id(state) == hyp.key_id
    np.testing.assert_array_equal(hyp.tokens, trie.key_tokens(hyp.key_id))


def random_step_fn(V: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def step(tokens: torch.Tensor, state):
        return F.log_softmax(3.0 * torch.randn(tokens.size(0), V, generator=g), dim=-1), state

    return step


def test_post_example_allowed_sets_and_random_logits() -> None:
    vocab, trie = build(POST_TRIPLES)
    table = {"": "明今", "明": "月天年", "明天": "会下", "明天下": "雨午", "明天下午": "开放"}
    for prefix, expect in table.items():
        got = trie.allowed_prefix([BOS] + vocab.encode(prefix))
        assert vocab.decode(got) == "".join(sorted(expect)), prefix
    n = 1000  # 1,000 random logit draws, decoded as one batch
    res = beam_search(random_step_fn(len(vocab), 0), trie, n, beam_size=2, max_len=24)
    seen = set()
    for hyps in res:
        assert hyps and hyps[0].score >= hyps[-1].score
        for h in hyps:
            assert_trie_path(trie, h)
        subject = vocab.decode(hyps[0].tokens[: list(hyps[0].tokens).index(SEP)])
        assert subject in SENTENCES
        seen.add(subject)
    assert seen == set(SENTENCES)


def random_kb(seed: int, n: int = 80) -> list[tuple[str, str, str]]:
    """Synthetic triples over a small alphabet, so subjects share prefixes."""
    rng = random.Random(seed)
    chars = "甲乙丙丁戊己庚辛壬癸"
    word = lambda lo, hi: "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))
    subjects = [word(1, 4) for _ in range(20)]
    return sorted({(rng.choice(subjects), word(1, 3), rng.choice(["", "", word(1, 3)])) for _ in range(n)})


def tiny_model(vocab_size: int, seed: int = 0, copy_head: bool = False) -> Seq2Seq:
    torch.manual_seed(seed)
    return Seq2Seq(Seq2SeqConfig(vocab_size=vocab_size, d_model=64, n_head=4, n_layer_enc=1,
                                 n_layer_dec=2, d_ff=128, max_len=32, copy_head=copy_head)).eval()


def random_questions(vocab: CharVocab, n: int, seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    return make_batch([[rng.randrange(5, len(vocab)) for _ in range(rng.randint(4, 14))] for _ in range(n)])


@pytest.mark.parametrize("lookahead", [False, True])
def test_untrained_model_only_decodes_trie_paths(lookahead: bool) -> None:
    vocab, trie = build(random_kb(1))
    model, batch = tiny_model(len(vocab)), random_questions(vocab, 40, seed=2)
    res = constrained_beam_search(model, trie, batch["src_ids"], batch["src_mask"], beam_size=4,
                                  lookahead=lookahead)
    for hyps in res:
        assert len(hyps) == 4 and len({h.key_id for h in hyps}) == 4
        assert all(a.score >= b.score for a, b in zip(hyps, hyps[1:])) and hyps[0].score <= 0
        for h in hyps:
            assert_trie_path(trie, h)
    for i in (0, 17, 39):  # batching (and dropping finished questions) changes nothing
        one = constrained_beam_search(model, trie, batch["src_ids"][i:i + 1], batch["src_mask"][i:i + 1],
                                      beam_size=4, lookahead=lookahead)[0]
        assert [h.key_id for h in one] == [h.key_id for h in res[i]]
        np.testing.assert_allclose([h.score for h in one], [h.score for h in res[i]], atol=1e-4)


def exhaustive_scores(model: Seq2Seq, trie: KgTrie, src: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Teacher-forced score of every key: sum of log-probs renormalised over the allowed set."""
    keys = [np.concatenate([[BOS], trie.key_tokens(k)]) for k in range(len(trie))]
    batch = make_batch([src[mask].tolist()] * len(keys), keys)
    with torch.no_grad():
        lp = F.log_softmax(model(batch["src_ids"], batch["src_mask"], batch["tgt_ids"][:, :-1]), -1)
    out = np.zeros(len(keys))
    for k, key in enumerate(keys):
        for t in range(len(key) - 1):
            allowed = torch.from_numpy(trie.allowed_prefix(key[:t + 1]))
            out[k] += float(lp[k, t, key[t + 1]] - torch.logsumexp(lp[k, t, allowed], 0))
    return out


def test_beam_search_equals_exhaustive_scorer() -> None:
    vocab, trie = build(random_kb(3, n=14) + LOOKAHEAD_TRIPLES)
    model, batch = tiny_model(len(vocab), seed=4), random_questions(vocab, 6, seed=5)
    n = len(trie)
    res = constrained_beam_search(model, trie, batch["src_ids"], batch["src_mask"], beam_size=n)
    for i, hyps in enumerate(res):
        ref = exhaustive_scores(model, trie, batch["src_ids"][i], batch["src_mask"][i])
        assert sorted(h.key_id for h in hyps) == list(range(n))  # beam >= keys: nothing pruned
        assert hyps[0].key_id == int(np.argmax(ref))
        np.testing.assert_allclose([h.score for h in hyps], ref[[h.key_id for h in hyps]], atol=1e-4)


def preferring_step_fn(vocab: CharVocab, after: str, probs: dict[str, float]):
    """Fixed log-probs: after token ``after`` the given probabilities, elsewhere uniform."""
    V = len(vocab)

    def step(tokens: torch.Tensor, state):
        lp = torch.full((tokens.size(0), V), 1.0 / V)
        for i, row in enumerate(tokens.tolist()):
            if row[-1] == vocab.encode(after)[0]:
                rest = (1.0 - sum(probs.values())) / (V - len(probs))
                lp[i] = rest
                for ch, p in probs.items():
                    lp[i, vocab.encode(ch)[0]] = p
        return lp.log(), state

    return step


def test_lookahead_flips_main_achievement_to_courses_taught() -> None:
    """ALGORITHMS.md §3 Tests 3: the model prefers 主要, the question covers 主讲课程."""
    vocab, trie = build(LOOKAHEAD_TRIPLES[:2], extra=QUESTION)
    step = preferring_step_fn(vocab, "主", {"要": 0.4, "讲": 0.2})
    q = [np.asarray(vocab.encode(QUESTION))]
    predicate = lambda h: vocab.decode(h.tokens, stop_at_eos=False).split("[SEP]")[1]
    plain = beam_search(step, trie, 1, beam_size=1, max_len=30)[0][0]
    ahead = beam_search(step, trie, 1, beam_size=1, max_len=30, lookahead=True, question_ids=q)[0][0]
    assert predicate(plain) == "主要成就" and predicate(ahead) == "主讲课程"
    state = walk(trie, vocab.encode("刘晓华") + [SEP] + vocab.encode("主"))
    allowed = trie.allowed(state)
    w = lookahead_weights(trie, state, np.asarray(vocab.encode("刘晓华") + [SEP] + vocab.encode("主")),
                          q[0], allowed)
    assert dict(zip(vocab.decode(allowed), w)) == {"要": 2.0, "讲": 4.0}  # LCS gains 1 and 3


def test_lookahead_waits_for_the_subject() -> None:
    """Before SEP no re-weighting, although the weights would flip 张三 to 张四五六."""
    vocab, trie = build([("张三", "年龄", ""), ("张四五六", "年龄", "")], extra="多大")
    step = preferring_step_fn(vocab, "张", {"三": 0.4, "四": 0.2})
    q = np.asarray(vocab.encode("张四五六多大"))
    hyp = beam_search(step, trie, 1, beam_size=1, max_len=30, lookahead=True, question_ids=[q])[0][0]
    assert vocab.decode(hyp.tokens).startswith("张三")
    state = walk(trie, vocab.encode("张"))
    w = lookahead_weights(trie, state, np.asarray(vocab.encode("张")), q, trie.allowed(state))
    assert 0.4 ** (1 / w[0]) < 0.2 ** (1 / w[1])  # (weights 1 and 4) had they been applied


def bojone_weights(trie: KgTrie, prefix: list[int], question_ids: list[int], allowed: np.ndarray) -> np.ndarray:
    """Direct transcription of AutoQA.predict's loop (plain DP LCS, every completion): his
    ``question_ids`` are ``[CLS] Q [SEP]``, his keys ``S [SEP] P [SEP] M`` (no end token)."""
    weights = {int(a): 1.0 for a in allowed}
    lcs0 = lcs_length_dp(prefix, question_ids)
    for c in trie.completions(walk(trie, prefix)):
        body = prefix + [int(t) for t in c if t != EOS]
        w = lcs_length_dp(body, question_ids) - lcs0
        weights[int(c[0])] = max(w + 1, weights[int(c[0])])
    return np.asarray([weights[int(a)] for a in allowed])


@pytest.mark.parametrize("rule", ["ours", "reference"])
def test_lookahead_weights_match_the_reference_loop(rule: str) -> None:
    """"reference": bojone's loop on [CLS] Q [SEP] (BOS for [CLS]); "ours": the same loop on Q."""
    triples = random_kb(7, n=120)
    vocab, trie = build(triples)
    rng = random.Random(8)
    checked = 0
    for s, p, m in triples[::3]:
        key = vocab.encode(s) + [SEP] + vocab.encode(p) + [SEP] + vocab.encode(m) + [EOS]
        question = [rng.randrange(5, len(vocab)) for _ in range(rng.randint(3, 12))]
        his = [BOS, *question, SEP] if rule == "reference" else question
        for cut in range(len(vocab.encode(s)) + 1, len(key)):
            prefix = key[:cut]
            state = walk(trie, prefix)
            allowed = trie.allowed(state)
            got = lookahead_weights(trie, state, np.asarray(prefix), np.asarray(question), allowed, rule=rule)
            np.testing.assert_array_equal(got, bojone_weights(trie, prefix, his, allowed))
            checked += len(allowed) > 1
    assert checked > 20
    state = walk(trie, vocab.encode(triples[0][0]) + [SEP])  # the cap: only one completion examined
    allowed = trie.allowed(state)
    capped = lookahead_weights(trie, state, np.asarray([]), np.asarray(vocab.encode(triples[0][1])),
                               allowed, max_completions=1)
    assert (capped > 1).sum() <= 1


SEP_TRIPLES = [("刘", "甲", "乙"), ("刘", "丙", "")]  # 甲's gain lies after a SEP, 丙's before one


def test_reference_lookahead_differs_from_ours_where_the_seps_match() -> None:
    """Question 刘丙乙, the model prefers 甲 (0.4) to 丙 (0.2) after 刘[SEP].

    ours: both keys cover one more character (甲…乙 the 乙, 丙 the 丙): weights 2 and 2, 甲 stays.
    reference ([CLS] 刘丙乙 [SEP]): 刘[SEP] already matches 2; 刘[SEP]甲[SEP]乙 still 2 (gain 0),
    刘[SEP]丙[SEP] matches 刘丙[SEP] = 3 (gain 1): weights 1 and 2, and 0.2**0.5 > 0.4 flips to 丙.
    """
    vocab, trie = build(SEP_TRIPLES, extra="刘丙乙")
    V, q = len(vocab), np.asarray(vocab.encode("刘丙乙"))
    prefer = {vocab.encode("甲")[0]: 0.4, vocab.encode("丙")[0]: 0.2}

    def step(tokens: torch.Tensor, state):
        lp = torch.full((tokens.size(0), V), 1.0 / V)
        for i, row in enumerate(tokens.tolist()):
            if row[-1] == SEP:
                lp[i] = (1.0 - sum(prefer.values())) / (V - len(prefer))
                for t, p in prefer.items():
                    lp[i, t] = p
        return lp.log(), state

    predicate = lambda la: vocab.decode(beam_search(  # noqa: E731
        step, trie, 1, beam_size=1, max_len=12, lookahead=la, question_ids=[q])[0][0].tokens,
        stop_at_eos=False).split("[SEP]")[1]
    assert predicate(False) == predicate(True) == predicate("ours") == "甲"
    assert predicate("reference") == "丙"
    state = walk(trie, vocab.encode("刘") + [SEP])
    allowed, prefix = trie.allowed(state), np.asarray(vocab.encode("刘") + [SEP])
    weights = lambda rule: dict(zip(vocab.decode(allowed),  # noqa: E731
                                    lookahead_weights(trie, state, prefix, q, allowed, rule=rule)))
    assert weights("ours") == {"甲": 2.0, "丙": 2.0} and weights("reference") == {"甲": 1.0, "丙": 2.0}
    with pytest.raises(ValueError, match="lookahead"):
        beam_search(step, trie, 1, beam_size=1, max_len=12, lookahead="bojone", question_ids=[q])


def test_carried_completions_equal_fresh_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search filters a parent's completion matrix for its child: same rows as the trie's."""
    import models.decoding as dec

    vocab, trie = build(random_kb(9, n=150))
    real, real_matrix, seen, built = dec.weights_from_completions, dec.completion_matrix, [], []

    def matrix(*args):
        built.append(1)
        return real_matrix(*args)

    def check(mat, prefix, question, allowed):
        fresh, _ = real_matrix(trie, walk(trie, prefix), 10_000)
        rows = lambda x: sorted(tuple(t for t in r if t >= 0) for r in x.tolist())
        assert rows(mat) == rows(fresh)
        seen.append(len(prefix))
        return real(mat, prefix, question, allowed)

    monkeypatch.setattr(dec, "weights_from_completions", check)
    monkeypatch.setattr(dec, "completion_matrix", matrix)
    qs = [np.asarray(vocab.encode(s + p)) for s, p, _ in random_kb(9, n=150)[:30]]
    beam_search(random_step_fn(len(vocab), 3), trie, 30, beam_size=3, max_len=30, lookahead=True,
                question_ids=qs)
    assert len(seen) > 50 and len(seen) - len(built) > 20  # many matrices were carried


def test_lcs_rows_matches_dp() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 6, 11)
    seqs = rng.integers(0, 6, (30, 9))
    seqs[::4, 6:] = -1  # padding changes nothing
    got = lcs_rows(seqs, q)[:, -1]
    ref = [lcs_length_dp([t for t in s if t >= 0], q.tolist()) for s in seqs]
    np.testing.assert_array_equal(got, ref)
    for s in seqs[:10]:  # the bit-parallel prefix row equals the DP row
        s = s[s >= 0]
        np.testing.assert_array_equal(lcs_prefix_row(s, q), lcs_rows(s[None, :], q)[0])


def test_one_shared_lcs_for_metrics_lookahead_and_minikb() -> None:
    """models/lcs.py is the project's LCS: metrics, decoding and the mini-KB use it, and its
    bit-parallel, batched and continued forms agree with the plain DP."""
    import models.decoding as dec
    import models.lcs as lcs
    import models.metrics as met
    import tasks.minikb as minikb
    assert met.lcs_length is lcs.lcs_length and dec.lcs_rows is lcs.lcs_rows and dec.lcs_prefix_row is lcs.lcs_row
    assert minikb.lcs_rows is lcs.lcs_rows
    rng = random.Random(4)
    for _ in range(100):
        a = [rng.randrange(4) for _ in range(rng.randint(0, 12))]
        b = [rng.randrange(4) for _ in range(rng.randint(0, 12))]
        c = [rng.randrange(4) for _ in range(rng.randint(1, 6))]
        ref = lcs.lcs_length_dp(a, b)
        assert lcs.lcs_length(a, b) == lcs.lcs_length(b, a) == int(lcs.lcs_row(a, b)[-1]) == ref
        assert int(lcs.lcs_rows(np.asarray([a + [-1]]), b)[0, -1]) == ref  # -1 padding matches nothing
        np.testing.assert_array_equal(lcs.lcs_rows(np.asarray([c]), b, start=lcs.lcs_row(a, b))[0],
                                      lcs.lcs_row(a + c, b))  # continuing a row = the longer sequence
    assert lcs.lcs_length("主讲课程", "主要讲什么课程") == 4


def test_empty_allowed_set_on_live_beam_raises() -> None:
    vocab, trie = build(POST_TRIPLES)

    class Broken:
        def __getattr__(self, name):
            return getattr(trie, name)

        def allowed(self, state):
            return np.zeros(0, np.int64) if state.phase == 1 else trie.allowed(state)

    with pytest.raises(DecodingError, match="empty allowed set"):
        beam_search(random_step_fn(len(vocab), 1), Broken(), 2, beam_size=2, max_len=24)


def test_max_len_and_greedy_unconstrained() -> None:
    vocab, trie = build(POST_TRIPLES)
    assert beam_search(random_step_fn(len(vocab), 2), trie, 3, beam_size=2, max_len=3) == [[], [], []]
    model, batch = tiny_model(len(vocab)), random_questions(vocab, 5, seed=3)
    out = greedy_unconstrained(model, batch["src_ids"], batch["src_mask"], max_len=6)
    assert len(out) == 5 and all(len(o) <= 6 for o in out)
    # every token is the argmax of the teacher-forced decoder given the tokens before it
    from models.vocab import BOS
    with torch.no_grad():
        for i, toks in enumerate(out):
            prefix = torch.tensor([[BOS, *[int(t) for t in toks[:-1]]]])
            logits = model(batch["src_ids"][i:i + 1], batch["src_mask"][i:i + 1], prefix)  # (1, T, V)
            assert logits[0].argmax(-1).tolist() == [int(t) for t in toks], (i, toks)
