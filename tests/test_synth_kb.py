"""bench/synth_kb.py: the synthetic KB at the official KB's shape has its heavy tail (hub
entities with thousands of triples), exact counts, homonyms, and is a pure function of its seed."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np

from bench.synth_kb import HUB_FRAC, HUB_HI, HUB_LO, generate, heavy_tailed_degrees


def test_degrees_have_hubs_and_sum_exactly():
    n_ent, n_tri = 200_000, 1_317_000  # the official mean out-degree, 6.59
    d = heavy_tailed_degrees(np.random.default_rng(0), n_ent, n_tri)
    assert d.sum() == n_tri and d.min() >= 1
    hubs = d >= HUB_LO
    assert abs(hubs.mean() - HUB_FRAC) < 4 * np.sqrt(HUB_FRAC / n_ent)  # ~60 hubs, within 4 sigma
    assert d.max() > 3000 and d.max() <= HUB_HI
    # a heavy tail, not Poisson: the hubs (0.03% of entities) carry several percent of the triples
    assert d[hubs].sum() / n_tri > 0.02
    assert np.median(d[~hubs]) <= 7  # the rest: 1 + Poisson around the official mean
    assert d[~hubs].max() < 40  # neither the surplus nor a shortfall piles triples on one entity
    for seed in range(6):  # both signs of the Poisson error occur over seeds; the count is exact
        d = heavy_tailed_degrees(np.random.default_rng(seed), 20_000, 131_700)
        assert d.sum() == 131_700 and d.min() >= 1 and d[d < HUB_LO].max() < 40


def test_generate_writes_the_counts_it_reports_with_homonyms_and_gold_hubs(tmp_path):
    ans = tmp_path / "dev.json"
    ans.write_text("".join(json.dumps({"id": i, "question": "q", "answer": f"主体{i} ||| 关系{i} ||| 对象{i}"},
                                      ensure_ascii=False) + "\n" for i in range(40)), "utf-8")
    kb = tmp_path / "kb.txt"
    r = generate(kb, scale=0.002, seed=3, log=lambda *_: None, answers=[ans], gold_hubs=0.1)
    lines = kb.read_text("utf-8").splitlines()
    assert len(lines) == r["triples"] and all(line.count("\t") == 2 for line in lines)
    assert r["gold_triples"] == 40 and 4 * 300 <= r["gold_hub_triples"] <= 4 * 3000
    per_subject = Counter(line.split("\t")[0] for line in lines)
    assert sum(1 for s, c in per_subject.items() if s.startswith("主体") and c >= 300) == 4  # 10% of 40
    bases = Counter(s.split("（")[0] for s in per_subject if not s.startswith("主体"))
    assert sum(1 for c in bases.values() if c > 1) > 0.02 * len(bases), "homonyms: shared base names"
    again = tmp_path / "again.txt"
    generate(again, scale=0.002, seed=3, log=lambda *_: None, answers=[ans], gold_hubs=0.1)
    assert again.read_bytes() == kb.read_bytes()
