"""A synthetic knowledge base with the official KgCLUE KB's shape, in its file format.

Official figures (ALGORITHMS.md §3): 3,121,457 entities, 245,838 relations, 20,559,652
triples. Here, at ``scale`` 1.0: the same counts; base names of 2-9 characters drawn from
~6,000 CJK characters with a Zipf-like frequency, 27% of entities with a （disambiguation）
of 3-14 characters, ~15% of entities sharing a base name with another (homonyms),
out-degree ~ 1 + Poisson(5.6), relations drawn Zipf-like (a few thousand frequent, a long
tail), relation names of 2-7 characters, objects of 1-16 characters with occasional
spaces. Deterministic per seed.

    python -m bench.synth_kb --scale 0.01 --out /tmp/kb.txt
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


def generate(path: str | Path, scale: float = 1.0, seed: int = 0, log=print) -> dict:
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
    degree = 1 + rng.poisson(n_tri / n_ent - 1, n_ent)
    degree[-1] += max(0, n_tri - int(degree.sum()))  # exact triple count
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
    log(f"synth-kb: wrote {path} ({Path(path).stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s")
    return {"entities": n_ent, "relations": n_rel, "triples": written, "bytes": Path(path).stat().st_size}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    generate(a.out, a.scale, a.seed)
