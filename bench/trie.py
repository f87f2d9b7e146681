"""Trie benchmark: our KB ingest + vocabulary + trie/index build versus a nested-dict trie.

    python -m bench.trie --json FILE [--scale full|small] [--work DIR]

1. Generates a synthetic KB with the official KB's shape (bench/synth_kb.py; full = 20.56M
   triples, small = 1%), cached in --work.
2. In a fresh subprocess (so its peak RSS is its own): streaming ingest -> vocabulary ->
   trie + object index, then the incremental ``allowed()`` latency per decoding step over
   random keys of the memory-mapped trie.
3. Baselines on the same keys, at a scale where the nested dict fits (--baseline-triples):
   a GENRE-style nested-dict trie (the anchor: ~30 GB / ~30 min for the full KB) and
   marisa-trie, each in a fresh subprocess, memory by RSS delta; ours on the same keys.
Prints and writes one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np

from bench import emit

ROOT = Path(__file__).resolve().parent.parent
SCALES = {"full": 1.0, "small": 0.01}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sub(mode: str, *args: str) -> dict:
    """Run one measurement in a fresh interpreter; it prints a JSON line last."""
    out = subprocess.run([sys.executable, "-m", "bench.trie", "--_measure", mode, *args], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench.trie {mode} failed:\n{out.stderr[-4000:]}")
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- measurements
def measure_ours(kb: str, work: str, latency_keys: str = "2000") -> dict:
    from tasks.kb import ingest_kb
    from tasks.trie_build import build_trie_index, load_trie_index
    from tasks.vocab import build_vocab, load_vocab
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    w = Path(work)
    for d in ("kb", "vocab", "trie"):
        (w / d / "manifest.json").unlink(missing_ok=True)  # measure a cold build
    t0 = time.perf_counter()
    peaks = {"imports": _peak_rss()}
    m_kb = ingest_kb(kb, w / "kb", progress=lambda n, r, b: log(f"ingest: {n:,} lines") if n % 5_000_000 < 1_300_000 else None)
    t1 = time.perf_counter()
    peaks["ingest"] = _peak_rss()
    build_vocab([], w / "kb", w / "vocab", m_kb["source_sha256"])
    t2 = time.perf_counter()
    peaks["vocab"] = _peak_rss()
    m_trie = build_trie_index(w / "kb", w / "vocab", w / "trie",
                              log=lambda m: (log(m), peaks.__setitem__(m.split(":")[1].strip()[:40], _peak_rss())))
    t3 = time.perf_counter()
    peak = _peak_rss()
    peaks["trie_index"] = peak
    vocab = load_vocab(w / "vocab")
    trie, index = load_trie_index(w / "trie", vocab)
    rng = np.random.default_rng(0)
    lat, steps = [], 0
    for k in rng.integers(0, trie.n_keys, int(latency_keys)).tolist():
        state = trie.start()
        for tok in trie.key_tokens(k).tolist():
            a = time.perf_counter_ns()
            allowed = trie.allowed(state)
            state = trie.advance(state, tok)
            lat.append(time.perf_counter_ns() - a)
            steps += 1
            assert allowed.size
        assert trie.key_id(state) == k and index.objects(k)
    trie_bytes = trie.nbytes()
    index_bytes = sum(m_trie["files"][f"{n}.npy"]["bytes"] for n in ("obj_data", "obj_offsets", "key_obj"))
    lat_us = np.array(lat) / 1e3
    return {"build_s": round(t3 - t0, 2), "ingest_s": round(t1 - t0, 2), "vocab_s": round(t2 - t1, 2),
            "trie_index_s": round(t3 - t2, 2), "peak_rss_gib": round(peak / 2**30, 3),
            "keys": m_trie["keys"], "triples": m_kb["triples"], "entities": m_trie["entities"],
            "subject_nodes": m_trie["nodes"], "trie_bytes": trie_bytes,
            "bytes_per_key": round(trie_bytes / m_trie["keys"], 2), "index_bytes": index_bytes,
            "fast_chunks": m_kb["fast_chunks"], "slow_chunks": m_kb["slow_chunks"],
            "allowed_step_p50_us": round(float(np.percentile(lat_us, 50)), 2),
            "allowed_step_p99_us": round(float(np.percentile(lat_us, 99)), 2), "latency_steps": steps,
            "peak_rss_gib_after": {k: round(v / 2**30, 3) for k, v in peaks.items()}}


def _baseline_keys(kb: str, n: int, work: str) -> list[list[int]]:
    """Token-id keys (BOS S SEP P SEP M EOS) of the first n triples, with our vocabulary."""
    from models.vocab import BOS, EOS, SEP
    from tasks.kgclue_data import split_subject
    from tasks.vocab import load_vocab
    vocab = load_vocab(Path(work) / "vocab")
    keys = set()
    with open(kb, encoding="utf-8") as f:
        for line in islice(f, n):
            s, p, _ = line.rstrip("\n").split("\t")
            base, m = split_subject(s)
            keys.add((BOS, *vocab.encode(base), SEP, *vocab.encode(p), SEP, *vocab.encode(m), EOS))
    return [list(k) for k in sorted(keys)]


def measure_nested(kb: str, n: str, work: str) -> dict:
    keys = _baseline_keys(kb, int(n), work)
    before = _rss()
    t0 = time.perf_counter()
    root: dict = {}
    for key in keys:  # GENRE-style: one dict per node
        node = root
        for t in key:
            node = node.setdefault(t, {})
    build = time.perf_counter() - t0
    used = _rss() - before
    lat = []
    for key in keys[:: max(1, len(keys) // 1000)]:
        for i in range(1, len(key)):
            a = time.perf_counter_ns()
            node = root
            for t in key[:i]:  # GENRE re-walks the prefix at every step
                node = node[t]
            list(node)
            lat.append(time.perf_counter_ns() - a)
    return {"keys": len(keys), "build_s": round(build, 3), "bytes_per_key": round(used / len(keys), 1),
            "allowed_step_p50_us": round(float(np.percentile(lat, 50)) / 1e3, 2),
            "allowed_step_p99_us": round(float(np.percentile(lat, 99)) / 1e3, 2)}


def measure_marisa(kb: str, n: str, work: str) -> dict:
    import marisa_trie
    keys = ["".join(map(chr, k)) for k in _baseline_keys(kb, int(n), work)]
    before = _rss()
    t0 = time.perf_counter()
    trie = marisa_trie.Trie(keys)
    build = time.perf_counter() - t0
    used = _rss() - before
    return {"keys": len(keys), "build_s": round(build, 3), "bytes_per_key": round(len(trie.tobytes()) / len(keys), 2),
            "rss_bytes_per_key": round(used / len(keys), 1)}


def measure_ours_keys(kb: str, n: str, work: str) -> dict:
    """Our trie on exactly the baseline's keys (bytes per key at the same scale)."""
    from models.trie import KgTrie
    from tasks.kgclue_data import split_subject
    from tasks.vocab import load_vocab
    vocab = load_vocab(Path(work) / "vocab")
    with open(kb, encoding="utf-8") as f:
        triples = [(*split_subject(s), p) for s, p, _ in (ln.rstrip("\n").split("\t") for ln in islice(f, int(n)))]
    t0 = time.perf_counter()
    trie = KgTrie.from_triples(((b, p, m) for b, m, p in triples), vocab)
    return {"keys": trie.n_keys, "build_s": round(time.perf_counter() - t0, 3),
            "bytes_per_key": round(trie.nbytes() / trie.n_keys, 2)}


MEASURES = {"ours": measure_ours, "nested": measure_nested, "marisa": measure_marisa, "ours_keys": measure_ours_keys}


# --------------------------------------------------------------------------- driver
def run(scale_name: str, work: Path, baseline_triples: int, latency_keys: int) -> dict:
    from bench.synth_kb import generate
    from tasks.hw import cpu_label
    work.mkdir(parents=True, exist_ok=True)
    scale = SCALES[scale_name]
    kb = work / f"kb-{scale_name}.txt"
    meta_path = work / f"kb-{scale_name}.json"
    if not (kb.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("bytes") == kb.stat().st_size):
        t0 = time.perf_counter()
        meta = generate(kb, scale, log=lambda m: print(m, file=sys.stderr, flush=True))
        meta["generate_s"] = round(time.perf_counter() - t0, 1)
        meta_path.write_text(json.dumps(meta))
    ours = _sub("ours", str(kb), str(work / scale_name), str(latency_keys))
    n = str(min(baseline_triples, ours["triples"]))
    nested = _sub("nested", str(kb), n, str(work / scale_name))
    marisa = _sub("marisa", str(kb), n, str(work / scale_name))
    same = _sub("ours_keys", str(kb), n, str(work / scale_name))
    return {
        "bench": "trie", "scale": scale_name, "kb": json.loads(meta_path.read_text()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu": cpu_label()},
        "keys": ours["keys"], "ours": ours, "ours_at_baseline_scale": same,
        "nested_dict": nested, "marisa": marisa,
        "allowed_p50_us": ours["allowed_step_p50_us"], "allowed_p99_us": ours["allowed_step_p99_us"],
        "ratios": {"nested_dict_over_ours_bytes_per_key": round(nested["bytes_per_key"] / same["bytes_per_key"], 1),
                   "marisa_over_ours_bytes_per_key": round(marisa["bytes_per_key"] / same["bytes_per_key"], 2),
                   "nested_dict_extrapolated_full_gib": round(nested["bytes_per_key"] * ours["keys"] / 2**30, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trie", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=False, help="write the result here")
    ap.add_argument("--scale", choices=sorted(SCALES), default="small")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-trie")
    ap.add_argument("--baseline-triples", type=int, default=1_000_000)
    ap.add_argument("--latency-keys", type=int, default=2000)
    ap.add_argument("--_measure", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._measure:
        print(json.dumps(MEASURES[a._measure[0]](*a._measure[1:])))
        return 0
    result = run(a.scale, a.work, a.baseline_triples, a.latency_keys)
    emit(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
