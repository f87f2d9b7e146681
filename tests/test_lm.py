"""Decoder-only LM: patterns, incremental decoding == full pass for every registered kind,
aux losses, metrics, 16·N lengths, beam reordering of caches."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from models.attention import ATTENTION_REGISTRY, KVCache, _load_builtin_kinds, register_attention
from models.attention_pattern import hwfa_default_window, layer_kinds, receptive_field
from models.lm import LM, LMConfig

V = 11
_load_builtin_kinds()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and the test machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(pattern="softmax", seed=0, **kw) -> LM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, d_model=32, n_head=2, n_layer=3, d_ff=64, train_len=8, pattern=pattern)
    return LM(LMConfig(**{**cfg, **kw})).double().eval()


def test_hwfa_default_window_is_largest_within_three_quarters():
    for L, N in [(24, 512), (4, 64), (2, 8), (3, 2), (7, 100)]:
        w = hwfa_default_window(L, N)
        assert receptive_field(w, L - 1) <= 0.75 * N < receptive_field(w + 1, L - 1)
    assert hwfa_default_window(24, 512) == 17  # 369 <= 384; the post's w=16 (346) is alpha 0.68
    with pytest.raises(ValueError, match="n_layer >= 2"):
        hwfa_default_window(1, 512)


def test_layer_kinds_patterns():
    assert layer_kinds("softmax", 2, 64) == [("softmax", {}), ("softmax", {})]
    assert layer_kinds("hwfa", 3, 64, window=5) == [("window", {"window": 5})] * 2 + \
        [("full_nope_logn", {"train_len": 64})]
    assert layer_kinds("hwfa", 4, 64)[0] == ("window", {"window": hwfa_default_window(4, 64)})
    assert layer_kinds("vq", 2, 64, options={"vq": {"codebook_size": 8}}) == [("vq", {"codebook_size": 8})] * 2
    assert layer_kinds(["window", ("alibi", {})], 2, 16, window=2) == [("window", {"window": 2}), ("alibi", {})]
    with pytest.raises(ValueError, match="unknown attention pattern"):
        layer_kinds("bogus", 2, 64)
    with pytest.raises(ValueError, match="lists 1 layers"):
        layer_kinds(["alibi"], 2, 64)


def test_config_roundtrip_and_validation():
    cfg = LMConfig(vocab_size=V, pattern=["window", ["full_nope_logn", {"train_len": 8}]], window=3,
                   attention_options={"window": {"block": 4}})
    d = cfg.to_dict()
    assert d["kind"] == "lm" and d["pattern"] == ["window", ["full_nope_logn", {"train_len": 8}]]
    assert LMConfig.from_dict(d) == cfg
    assert LMConfig(vocab_size=V, train_len=32).context_len == 512
    with pytest.raises(ValueError, match="norm"):
        LMConfig(vocab_size=V, norm="mid")
    with pytest.raises(ValueError, match="even integer"):
        LMConfig(vocab_size=V, d_model=30, n_head=4)


def registered(kind: str) -> None:
    if kind not in ATTENTION_REGISTRY:
        pytest.skip(f"attention kind {kind!r} is not registered yet")


CASES = {
    "softmax": dict(pattern="softmax"),
    "alibi": dict(pattern="alibi"),
    "window": dict(pattern=["window"] * 3, window=3),
    "full_nope_logn": dict(pattern=["full_nope_logn"] * 3),
    "hwfa": dict(pattern="hwfa", window=3),
    "hwfa-post-norm": dict(pattern="hwfa", window=3, norm="post"),
    "vq": dict(pattern="vq"),
    "performer": dict(pattern="performer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_incremental_equals_full_pass(case):
    """Token-by-token steps, and steps of 3 tokens, through the caches equal one full pass
    (T = 20 > w, so the window caches roll over and RoPE offsets keep counting)."""
    kw = CASES[case]
    for kind, _ in layer_kinds(kw["pattern"], 3, 8, kw.get("window")):
        registered(kind)
    m = tiny(**kw)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    full = m(ids)  # (B, T, V)
    for chunk in (1, 3):
        cache, outs = m.new_cache(), []
        for s in range(0, 20, chunk):
            outs.append(m(ids[:, s:s + chunk], cache))
        assert cache.length == 20
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-9, msg=f"{case}, chunk {chunk}")


@pytest.mark.parametrize("case", ["hwfa", "alibi", "softmax"])
def test_cache_index_select_reorders_rows(case):
    m = tiny(**CASES[case])
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(2))
    _, cache = m.step(ids[:, :9])
    idx = torch.tensor([2, 2, 0])
    logits, _ = m.step(ids[idx, 9:], cache.index_select(idx))
    torch.testing.assert_close(logits, m(ids[idx])[:, -1], rtol=0, atol=1e-9)


def test_generate_greedy_matches_full_argmax():
    m = tiny("hwfa", window=3)
    out = m.generate(torch.tensor([[1, 2, 3]]), n_new=10)
    assert out.shape == (1, 13)
    for t in range(3, 13):
        assert out[0, t] == m(out[:, :t])[0, -1].argmax()


def test_runs_at_16x_train_len_and_refuses_beyond():
    for pattern in ("hwfa", "softmax", "alibi"):
        m = tiny(pattern, window=3)  # train_len 8 -> max_len 128
        r = m.evaluate(torch.randint(0, V, (2, 128)))
        assert math.isfinite(r["bpc"]) and 0 <= r["accuracy"] <= 1 and r["tokens"] == 2 * 127
    with pytest.raises(ValueError, match="exceeds max_len 128"):
        m(torch.zeros(1, 129, dtype=torch.long))


def test_loss_metrics_and_overfit():
    torch.manual_seed(0)
    m = LM(LMConfig(vocab_size=V, d_model=32, n_head=2, n_layer=2, d_ff=64, train_len=16, pattern="hwfa"))
    ids = torch.arange(17).remainder(5)[None].repeat(4, 1)  # a period-5 sequence
    loss, parts = m.loss({"ids": ids})
    assert parts["bpc"] == pytest.approx(parts["ce"] / math.log(2)) and parts["aux"] == 0.0
    assert loss.item() == pytest.approx(parts["ce"], rel=1e-6) and parts["ce"] == pytest.approx(math.log(V), rel=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(60):
        loss, parts = m.loss({"ids": ids})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["accuracy"] == 1.0 and parts["ce"] < 0.1
    ev = m.evaluate(ids)
    assert ev["accuracy"] == 1.0 and ev["bpc"] < 0.2
    # explicit targets, -100 ignored
    targets = torch.full_like(ids, -100)
    targets[:, -1] = 3
    _, p = m.loss({"ids": ids, "targets": targets})
    assert p["accuracy"] in (0.0, 1.0)


_AUX_KIND = "test_lm_aux"
if _AUX_KIND not in ATTENTION_REGISTRY:
    @register_attention(_AUX_KIND)
    class _AuxAttention(nn.Module):
        """A causal identity-ish kind that holds a fixed aux loss after each forward."""

        def __init__(self, d_model, n_head, dropout=0.0, rope=None, cross=False, layer=0, n_layer=1):
            super().__init__()
            self.proj = nn.Linear(d_model, d_model, bias=False)
            self.aux_loss = None

        def new_cache(self):
            return KVCache()

        def forward(self, x, context=None, *, causal=True, key_mask=None, cache=None):
            self.aux_loss = torch.tensor(0.25)
            return self.proj(x)


def test_aux_losses_are_added_to_the_loss():
    m = tiny([_AUX_KIND] * 3)
    loss, parts = m.loss({"ids": torch.randint(0, V, (2, 9))})
    assert parts["aux"] == pytest.approx(0.75)
    assert loss.item() == pytest.approx(parts["ce"] + 0.75, rel=1e-6)


def test_corpus_split_by_document_and_adapter_batches(tmp_path):
    from types import SimpleNamespace

    from tasks.adapters import lm as adapter
    from tasks.lm_corpus import is_validation, load_corpus, prepare_corpus
    src = tmp_path / "text.txt"
    src.write_text("".join(f"line {i} of the corpus\n" for i in range(400)))
    m = prepare_corpus(tmp_path / "corpus", str(src), val_fraction=0.5, seed=1, lines_per_doc=20)
    n_val = sum(is_validation(f"block-{b}", 1, 0.5) for b in range(20))
    assert m["files"]["validation.npy"]["documents"] == n_val and m["files"]["train.npy"]["documents"] == 20 - n_val
    train, vocab = load_corpus(tmp_path / "corpus", "train")
    assert vocab == 256 and train.dtype.name == "uint8"
    assert prepare_corpus(tmp_path / "corpus", str(src), val_fraction=0.5, seed=1, lines_per_doc=20) == m  # reused
    spec = SimpleNamespace(data={"corpus": str(tmp_path / "corpus"), "seq_len": 16}, seed=0, val_every=1,
                           model=dict(d_model=32, n_head=2, n_layer=2, d_ff=64, pattern="hwfa"))
    adapter.check_spec(spec)
    s = adapter.setup(spec, "cpu", 0)
    b, n = s.make_batch([0, 3], 0)
    assert b["ids"].shape == (2, 17) and n == 32
    assert torch.equal(b["ids"][1], torch.from_numpy(train[48:65].astype("int64")))
    loss, parts = s.model.loss(b)
    assert math.isfinite(loss.item()) and set(s.validate(s.model)) >= {"val_loss", "val_bpc"}
    assert isinstance(adapter.load_model(s.model.cfg.to_dict()), LM)
    with pytest.raises(ValueError, match="needs data"):
        adapter.check_spec(SimpleNamespace(data={}, model={}))
