"""A synthetic knowledge base with the official KgCLUE KB's shape, in its file format.

Official figures (ALGORITHMS.md §3): 3,121,457 entities, 245,838 relations, 20,559,652
triples. Here, at ``scale`` 1.0: the same counts; base names of 2-9 characters drawn from
~6,000 CJK characters with a Zipf-like frequency, 27% of entities with a （disambiguation）
of 3-14 characters, ~15% of entities sharing a base name with another (homonyms),
a heavy-tailed out-degree (the real KB has hub entities with thousands of triples): 0.03% of
entities are hubs with log-uniform 500-8,000 triples, the rest 1 + Poisson(~4.8), for the
official mean of 6.59; relations drawn Zipf-like (a few thousand frequent, a long tail),
relation names of 2-7 characters, objects of 1-16 characters with occasional spaces.
Deterministic per seed.

``--answers FILE ...`` appends the gold triples of labelled KgCLUE files, so the pipeline can be
scored against the KB; ``--gold-hubs F`` turns a fraction F of those gold subjects into hubs
(300-3,000 extra triples each), so the re-ranker's candidate cap is exercised on them.

    python -m bench.synth_kb --scale 0.01 --out /tmp/kb.txt [--answers dev.json --gold-hubs 0.05]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ENTITIES, RELATIONS, TRIPLES = 3_121_457, 245_838, 20_559_652
_CJK = np.arange(0x4E00, 0x4E00 + 6000, dtype=np.uint32)


def _strings(rng: np.random.Generator, n: int, lo: int, hi: int, p: np.ndarray) -> list[str]:
    """n random strings with lengths in [lo, hi], characters drawn with weights p."""
    lens = rng.integers(lo, hi + 1, n)
    cps = _CJK[rng.choice(len(_CJK), size=int(lens.sum()), p=p)]
    text = cps.astype("<u4").tobytes().decode("utf-32-le")
    ends = np.cumsum(lens)
    starts = ends - lens
    return [text[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


HUB_FRAC, HUB_LO, HUB_HI = 0.0003, 500, 8000


def heavy_tailed_degrees(rng: np.random.Generator, n_ent: int, n_tri: int) -> np.ndarray:
    """Out-degrees summing to ``n_tri``: hubs (log-uniform HUB_LO..HUB_HI) and 1 + Poisson."""
    hub = rng.random(n_ent) < HUB_FRAC
    hub_deg = np.exp(rng.uniform(np.log(HUB_LO), np.log(HUB_HI), int(hub.sum()))).astype(np.int64)
    rest = n_tri - int(hub_deg.sum())
    lam = max(0.0, rest / max(1, n_ent - int(hub.sum())) - 1)
    degree = 1 + rng.poisson(lam, n_ent)
    degree[hub] = hub_deg
    # exact triple count: the Poisson draw's surplus is taken one triple at a time from random
    # non-hub entities that keep at least one; a shortfall is spread over random non-hub
    # entities one triple each (never piled on one entity, which would make a fake hub)
    excess = int(degree.sum()) - n_tri
    while excess > 0:
        can = np.flatnonzero(~hub & (degree > 1))
        if can.size == 0:
            break
        take = rng.choice(can, size=min(excess, can.size), replace=False)
        degree[take] -= 1
        excess -= take.size
    short = n_tri - int(degree.sum())
    if short > 0:
        rest = np.flatnonzero(~hub) if (~hub).any() else np.arange(n_ent)
        np.add.at(degree, rng.choice(rest, size=short, replace=short > rest.size), 1)
    return degree


def gold_lines(files: list[Path], rng: np.random.Generator, relations: list[str], gold_hubs: float,
               char_p: np.ndarray) -> tuple[list[str], int]:
    """Lines of the labelled files' answers, plus extra triples for the gold subjects chosen as hubs."""
    import json
    lines, subjects = [], []
    for f in files:
        for raw in Path(f).read_text("utf-8").splitlines():
            if not raw.strip():
                continue
            parts = json.loads(raw).get("answer", "").split(" ||| ")
            if len(parts) == 3:
                lines.append("\t".join(parts) + "\n")
                subjects.append(parts[0])
    hubs = sorted(set(subjects))
    hubs = [hubs[i] for i in rng.permutation(len(hubs))[:int(round(gold_hubs * len(hubs)))]]
    extra = 0
    for s in hubs:
        k = int(rng.integers(300, 3001))
        rel = rng.choice(len(relations), size=k)
        objs = _strings(rng, k, 1, 16, char_p)
        lines.extend(f"{s}\t{relations[r]}\t{o}\n" for r, o in zip(rel.tolist(), objs))
        extra += k
    return lines, extra


def generate(path: str | Path, scale: float = 1.0, seed: int = 0, log=print, answers: list[Path] | None = None,
             gold_hubs: float = 0.0) -> dict:
    """Write the KB to ``path`` (official format); return its counts."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_ent = max(10, int(ENTITIES * scale))
    n_rel = max(10, int(RELATIONS * scale))
    n_tri = max(n_ent, int(TRIPLES * scale))
    char_p = 1.0 / np.arange(1, len(_CJK) + 1) ** 0.9
    char_p /= char_p.sum()
    n_base = int(n_ent * 0.85)
    bases = _strings(rng, n_base, 2, 9, char_p)
    base_of = np.concatenate([np.arange(n_base), rng.integers(0, n_base, n_ent - n_base)])
    has_m = rng.random(n_ent) < 0.27
    has_m[n_base:] = True  # homonyms are told apart by their disambiguation
    ms = _strings(rng, int(has_m.sum()), 3, 14, char_p)
    it = iter(ms)
    subjects = [f"{bases[b]}（{next(it)}）" if h else bases[b] for b, h in zip(base_of.tolist(), has_m.tolist())]
    del bases, ms
    relations = _strings(rng, n_rel, 2, 7, char_p)
    rel_p = 1.0 / np.arange(1, n_rel + 1) ** 1.1
    rel_p /= rel_p.sum()
    degree = heavy_tailed_degrees(rng, n_ent, n_tri)
    ent_of = np.repeat(np.arange(n_ent), degree)[:n_tri]
    log(f"synth-kb: {n_ent:,} entities, {n_rel:,} relations, {n_tri:,} triples ({time.perf_counter() - t0:.0f}s)")
    written = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for a in range(0, n_tri, 1_000_000):
            b = min(n_tri, a + 1_000_000)
            rel = rng.choice(n_rel, size=b - a, p=rel_p)
            objs = _strings(rng, b - a, 1, 16, char_p)
            space = rng.random(b - a) < 0.05
            lines = [f"{subjects[e]}\t{relations[r]}\t{o[:3] + ' ' + o[3:] if s and len(o) > 4 else o}\n"
                     for e, r, o, s in zip(ent_of[a:b].tolist(), rel.tolist(), objs, space.tolist())]
            f.write("".join(lines))
            written += len(lines)
        gold, extra = gold_lines(list(answers or []), rng, relations, gold_hubs, char_p)
        f.write("".join(gold))
    log(f"synth-kb: wrote {path} ({Path(path).stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s")
    return {"entities": n_ent, "relations": n_rel, "triples": written + len(gold), "synthetic_triples": written,
            "gold_triples": len(gold) - extra, "gold_hub_triples": extra, "max_degree": int(degree.max()),
            "hubs": int((degree >= HUB_LO).sum()), "bytes": Path(path).stat().st_size}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--answers", type=Path, nargs="*", help="labelled KgCLUE files whose answers join the KB")
    ap.add_argument("--gold-hubs", type=float, default=0.0, help="fraction of gold subjects made hubs")
    a = ap.parse_args()
    print(generate(a.out, a.scale, a.seed, answers=a.answers, gold_hubs=a.gold_hubs))
