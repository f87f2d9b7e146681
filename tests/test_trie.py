"""KgTrie: the post's example, random round trips, brute-force equality, mmap save/load."""
from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest

from models.trie import ImpossibleState, KgTrie
from models.vocab import BOS, EOS, SEP, CharVocab
from tasks.kb import ingest_kb
from tasks.minikb import write_kb_txt
from tasks.trie_build import build_trie_index, load_trie_index
from tasks.vocab import build_vocab, load_vocab

SENTENCES = ["明月几时有", "明天会更好", "明天下雨", "明天下午开会", "明天下午放假", "明年见", "今夕是何年", "今天去哪里玩"]


def test_post_example():
    vocab = CharVocab.build(SENTENCES)
    trie = KgTrie.from_triples([(s, "", "") for s in SENTENCES], vocab)
    expect = {"": "明今", "明": "月天年", "明天": "会下", "明天下": "雨午", "明天下午": "开放"}
    for prefix, allowed in expect.items():
        got = trie.allowed_prefix([BOS, *vocab.encode(prefix)])
        assert set(got.tolist()) == set(vocab.encode(allowed))
    with pytest.raises(ImpossibleState):
        trie.allowed_prefix([BOS, *vocab.encode("明后")])
    with pytest.raises(ImpossibleState):
        trie.allowed_prefix(vocab.encode("明"))  # no BOS


def test_random_walks_always_end_on_a_key():
    vocab = CharVocab.build(SENTENCES)
    trie = KgTrie.from_triples([(s, "", "") for s in SENTENCES], vocab)
    rng = np.random.default_rng(0)
    for _ in range(1000):
        state, out = trie.start(), []
        while not trie.is_terminal(state):
            allowed = trie.allowed(state)
            assert allowed.size, "a non-terminal state must allow something"
            tok = int(allowed[np.argmax(rng.normal(size=allowed.size))])
            out.append(tok)
            state = trie.advance(state, tok)
        assert vocab.decode(out[:out.index(SEP)]) in SENTENCES
        assert trie.key_tokens(trie.key_id(state)).tolist() == out


def _random_triples(n: int, seed: int, alphabet: str = "abcdef") -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    word = lambda lo, hi: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return sorted({(word(1, 5), word(1, 4), word(0, 3)) for _ in range(n)})


def _key(vocab, s, p, m):
    return (*vocab.encode(s), SEP, *vocab.encode(p), SEP, *vocab.encode(m), EOS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_every_key_accepted_every_non_key_prefix_rejected(seed):
    triples = _random_triples(4000, seed)
    vocab = CharVocab.build("abcdefgh")
    trie = KgTrie.from_triples(triples, vocab)
    keys = [_key(vocab, *t) for t in triples]
    nxt: dict[tuple, set] = defaultdict(set)
    for k in keys:
        for i in range(len(k)):
            nxt[k[:i]].add(k[i])
    assert len(trie) == len(keys)
    ids = set()
    for k in keys:  # every key accepted, incremental == non-incremental
        state = trie.start()
        for i, tok in enumerate(k):
            allowed = trie.allowed(state)
            assert set(allowed.tolist()) == nxt[k[:i]]
            np.testing.assert_array_equal(allowed, trie.allowed_prefix([BOS, *k[:i]]))
            state = trie.advance(state, tok)
        assert trie.is_terminal(state)
        ids.add(trie.key_id(state))
        assert tuple(trie.key_tokens(trie.key_id(state)).tolist()) == k
    assert ids == set(range(len(keys)))
    rng = random.Random(seed)
    alphabet = [SEP, EOS, *vocab.encode("abcdefgh")]
    rejected = 0
    for _ in range(3000):  # random sequences: rejected exactly when they leave every key
        seq = [rng.choice(alphabet) for _ in range(rng.randint(1, 12))]
        is_prefix = all(tuple(seq[:i]) in nxt and seq[i] in nxt[tuple(seq[:i])] for i in range(len(seq)))
        if is_prefix:
            trie.allowed_prefix([BOS, *seq])
        else:
            rejected += 1
            with pytest.raises(ImpossibleState):
                trie.allowed_prefix([BOS, *seq])
    assert rejected > 1000


def test_completions_match_brute_force():
    triples = _random_triples(500, 5)
    vocab = CharVocab.build("abcdef")
    trie = KgTrie.from_triples(triples, vocab)
    keys = [_key(vocab, *t) for t in triples]
    prefixes = {k[:i] for k in keys for i in range(len(k))}
    for pre in random.Random(0).sample(sorted(prefixes), 300):
        state = trie.start()
        for t in pre:
            state = trie.advance(state, t)
        got = sorted(tuple(c.tolist()) for c in trie.completions(state))
        assert got == sorted(k[len(pre):] for k in keys if k[:len(pre)] == pre)
        assert len(trie.completions(state, limit=2)) == min(2, len(got))


def test_subject_keys_are_exactly_the_keys_of_that_subject():
    """``subject_keys`` (the narrow contract the re-ranker's candidate pool uses) against a
    brute force: walk every triple's key through the trie and group the key ids by subject text."""
    triples = _random_triples(800, 3)
    vocab = CharVocab.build("abcdef")
    trie = KgTrie.from_triples(triples, vocab)
    by_text: dict[str, set] = defaultdict(set)
    for t in triples:
        state = trie.start()
        for tok in _key(vocab, *t):
            state = trie.advance(state, tok)
        by_text[t[0]].add(trie.key_id(state))
    assert len(by_text) == trie.n_subjects
    seen = set()
    for keys in by_text.values():
        s = trie.key_parts(min(keys))[0]
        assert list(trie.subject_keys(s)) == sorted(keys)  # contiguous, complete, nothing else
        seen.add(s)
    assert seen == set(range(trie.n_subjects))
    with pytest.raises(IndexError):
        trie.subject_keys(trie.n_subjects)


def test_empty_or_terminal_states():
    vocab = CharVocab.build("ab")
    with pytest.raises(ValueError):
        KgTrie.from_triples([], vocab)
    trie = KgTrie.from_triples([("a", "b", "")], vocab)
    state = trie.start()
    for t in _key(vocab, "a", "b", ""):
        state = trie.advance(state, t)
    assert trie.allowed(state).size == 0
    with pytest.raises(ImpossibleState):
        trie.advance(state, EOS)
    with pytest.raises(ValueError):
        trie.key_id(trie.start())


def test_unknown_characters_become_unk_keys_consistently():
    vocab = CharVocab.build("ab")
    trie = KgTrie.from_triples([("aX", "b", ""), ("aY", "b", ""), ("ab", "b", "")], vocab)
    assert len(trie) == 2  # aX and aY collapse to a[UNK]


def test_build_save_mmap_load_and_lookup(tmp_path):
    triples = [("张三（演员）", "性别", "男"), ("张三（歌手）", "性别", "女"), ("张三", "职业", "农民"),
               ("李四", "出生地", "北京"), ("李四", "出生地", "上海"), ("王五（书）", "作者", "某人")]
    write_kb_txt(triples, tmp_path / "kb.txt")
    ingest_kb(tmp_path / "kb.txt", tmp_path / "kb")
    build_vocab(["张三是谁"], tmp_path / "kb", tmp_path / "vocab", "k")
    vocab = load_vocab(tmp_path / "vocab")
    m = build_trie_index(tmp_path / "kb", tmp_path / "vocab", tmp_path / "trie", log=lambda *_: None)
    assert m["keys"] == 5 and m["entities"] == 5 and m["triples"] == 6
    assert m["colliding_keys"] == 0 and m["string_variants"] == 5 and m["collision_examples"] == []
    trie, index = load_trie_index(tmp_path / "trie", vocab)
    assert [index.key_strings(k) for k in index.key_ids("张三", "性别")] == [("张三", "性别", "歌手"),
                                                                          ("张三", "性别", "演员")]
    assert trie.mmapped and isinstance(np.load(tmp_path / "trie" / "s_label.npy", mmap_mode="r"), np.memmap)
    assert index.lookup("张三", "性别", "演员") == ["男"]
    assert index.lookup("张三", "性别", "歌手") == ["女"]
    assert index.lookup("张三", "性别") == ["女", "男"], "no disambiguation: all of them, in key order"
    assert index.lookup("李四", "出生地") == ["北京", "上海"], "several objects: file order, first wins"
    assert index.lookup("李四", "职业") == [] and index.lookup("赵六", "性别") == []
    state = trie.start()
    for t in _key(vocab, "王五", "作者", "书"):
        state = trie.advance(state, t)
    assert index.objects(trie.key_id(state)) == ["某人"]
    mtime = (tmp_path / "trie" / "s_label.npy").stat().st_mtime_ns
    build_trie_index(tmp_path / "kb", tmp_path / "vocab", tmp_path / "trie", log=lambda *_: None)
    assert (tmp_path / "trie" / "s_label.npy").stat().st_mtime_ns == mtime, "same inputs: not rebuilt"


def test_key_lookups_on_a_large_trie_do_not_copy_its_offsets():
    """key_parts / key_tokens / advance search int32 offsets for one scalar; a Python int used to
    make numpy cast the whole array first (28 ms per key at the official KB's size)."""
    import tracemalloc
    vocab = CharVocab.build("abcdefghij")
    letters = "abcdefghij"
    triples = [(letters[i % 10] + letters[(i // 10) % 10] + letters[(i // 100) % 10] + letters[i // 1000 % 10],
                letters[j % 10] + letters[j // 10], "") for i in range(10_000) for j in range(20)]
    trie = KgTrie.from_triples(triples, vocab)
    assert trie.spm_offsets.dtype == np.int32 and len(trie) == 200_000
    keys = [0, 77_777, 199_999]
    tokens = [trie.key_tokens(k) for k in keys]  # warm
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for k, toks in zip(keys, tokens):
            s, p, m = trie.key_parts(k)
            assert np.array_equal(trie.key_tokens(k), toks)
            state = trie.start()
            for t in toks:
                state = trie.advance(state, int(t))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < trie.spm_offsets.nbytes // 4, f"{peak} bytes for three key lookups"
