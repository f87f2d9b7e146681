"""bench.attention end to end at toy lengths: every impl in a fresh process, the linear-only
lengths skip SDPA, the ratios and growth figures are computed from the measured rows."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from bench.attention import ALLOCATORS, IMPLS, LINEAR_IMPLS, ratios
from tests.conftest import ROOT


def test_bench_runs_every_impl_and_skips_sdpa_at_linear_only_lengths(tmp_path):
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    r = subprocess.run([sys.executable, "-m", "bench.attention", "--lengths", "128,256", "--linear-lengths", "512",
                        "--repeat", "1", "--threads", "1", "--json", str(out), "--plot", str(png)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    got = {(x["impl"], x["seq_len"]) for x in doc["results"]}
    want = {(i, n) for i in IMPLS for n in (128, 256)} | {(i, 512) for i in IMPLS if i in LINEAR_IMPLS}
    assert got == want
    assert all(x.get("fwd_bwd_s") and x["fwd_bwd_s"] > 0 for x in doc["results"]), doc["results"]
    assert all(x["page_faults_per_call"] >= 0 for x in doc["results"])
    assert doc["config"]["allocator"] == "default" and doc["config"]["allocator_env"] == {}
    assert doc["machine"]["cpu"] and doc["config"]["window"]["window"] > 0
    assert set(doc["ratios"]["sdpa_over_window"]) == {"128", "256"}
    assert set(doc["ratios"]["growth_window"]) == {"256", "512"}
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_ratios_from_rows():
    rows = [{"impl": "sdpa", "seq_len": 8192, "fwd_bwd_s": 4.0}, {"impl": "sdpa", "seq_len": 16384, "fwd_bwd_s": 16.0},
            {"impl": "sdpa", "seq_len": 32768, "fwd_bwd_s": 64.0},
            {"impl": "vq", "seq_len": 8192, "fwd_bwd_s": 1.0}, {"impl": "vq", "seq_len": 16384, "fwd_bwd_s": 2.0},
            {"impl": "vq", "seq_len": 32768, "fwd_bwd_s": 4.0},
            {"impl": "performer", "seq_len": 8192, "fwd_bwd_s": 5.0},
            {"impl": "performer", "seq_len": 16384, "fwd_bwd_s": 10.0}]
    r = ratios(rows)
    assert r["sdpa_over_vq"] == {"8192": 4.0, "16384": 8.0, "32768": 16.0}
    assert r["growth_sdpa"] == {"16384": 4.0, "32768": 4.0} and r["growth_vq"] == {"16384": 2.0, "32768": 2.0}
    assert r["vq_32k_over_8k"] == 4.0 and r["sdpa_32k_over_8k"] == 16.0
    assert r["performer_crossover_len"] == 16384


def test_heap_allocator_takes_large_blocks_from_the_heap():
    """The --allocator setting does what the bench says: under glibc's defaults a 64 MiB tensor
    is an mmapped block (returned to the kernel on free, faulted in anew next time); with "heap"
    it comes from the heap, whose freed blocks are kept for reuse."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33: no mallinfo2, and the heap setting is glibc's")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    held = {}
    for name, extra in ALLOCATORS.items():
        r = subprocess.run([sys.executable, "-c", "from bench.attention import mmapped_bytes as f; print(f(64))"],
                           cwd=ROOT, env=dict(clean, **extra), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        held[name] = int(r.stdout.split()[-1])
    assert held["default"] >= 64 * 2 ** 20, held
    assert held["heap"] < 2 ** 20, held
