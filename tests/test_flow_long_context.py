"""long-context-lm end to end (--compare softmax,hwfa, tiny preset shortened), re-run reuse, CLI refusal."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.long_context_config import MULTIPLES, PRESETS, LongContextConfig
from flows.long_context_lm import long_context_lm, parse_args, train_spec
from tests.conftest import ROOT, stdlib_text

KINDS = ("softmax", "hwfa")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """~400 KB of real Python text (the stdlib, sorted): 60 blocks of 200 lines, 5 of them validation."""
    path = tmp_path_factory.mktemp("lmcorpus") / "corpus.txt"
    path.write_text(stdlib_text(12_000), "utf-8")
    return path


@pytest.fixture(scope="module")
def first_run(prefect_harness, ray_local, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcrun")
    cfg = LongContextConfig(preset="tiny", compare=",".join(KINDS), out=out, corpus=corpus_file, steps=30,
                            eval_tokens=2048)
    return cfg, long_context_lm(cfg)


def test_compare_writes_metrics_plot_and_per_kind_files(first_run):
    cfg, m = first_run
    assert json.loads((cfg.out / "metrics.json").read_text("utf-8")) == m
    assert set(m["runs"]) == set(KINDS) and m["attentions"] == list(KINDS) and m["train_len"] == 64
    for kind in KINDS:
        r = m["runs"][kind]
        assert r["attention"] == kind and r["train_len"] == 64 and r["train_steps"] == 30
        assert r["tokens_per_s"] > 0 and r["train_wall_s"] > 0 and r["cpu"]
        assert [e["length_multiple"] for e in r["eval"]] == list(MULTIPLES)
        assert [e["length"] for e in r["eval"]] == [64 * x for x in MULTIPLES]
        for e in r["eval"]:
            assert math.isfinite(e["bpc"]) and e["bpc"] > 0 and 0.0 <= e["accuracy"] <= 1.0
            assert e["tokens"] == 2048  # the same predicted bytes at every length (2 windows at 16N)
        assert r["eval_text"]["split"] == "validation"
        assert json.loads((cfg.out / kind / "metrics.json").read_text("utf-8")) == r
    assert m["runs"]["hwfa"]["window"] == 16 and m["runs"]["hwfa"]["layers"] == ["window"] * 3 + ["full_nope_logn"]
    assert len(m["table"]) == len(KINDS) * len(MULTIPLES)
    png = cfg.out / "long_context.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (cfg.out / "manifest.json").is_file() and (cfg.out / "report.md").is_file()


def test_rerun_trains_nothing(first_run):
    cfg, m = first_run
    stamp = {p: p.stat().st_mtime_ns for k in KINDS
             for p in (cfg.out / k / "model" / "model.pt", cfg.out / k / "eval" / "eval.json")}
    stamp[cfg.out / "corpus" / "train.npy"] = (cfg.out / "corpus" / "train.npy").stat().st_mtime_ns
    again = long_context_lm(cfg)
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    for k in KINDS:
        r = again["runs"][k]
        assert r["trained_this_run"] is False and r["eval_reused"] is True
        assert r["eval"] == m["runs"][k]["eval"] and r["run_name"] == m["runs"][k]["run_name"]


def test_config_refuses_unknown_and_repeated_kinds():
    with pytest.raises(ValidationError, match="'softmax', 'alibi', 'hwfa', 'vq' or 'performer'"):
        LongContextConfig(attention="rope")
    with pytest.raises(ValidationError, match="'softmax', 'alibi', 'hwfa', 'vq' or 'performer'"):
        LongContextConfig(compare="softmax,flash")
    with pytest.raises(ValidationError, match="more than once"):
        LongContextConfig(compare="hwfa,hwfa")
    with pytest.raises(ValidationError, match="not one of compare"):
        LongContextConfig(attention="vq", compare="softmax,hwfa")
    with pytest.raises(ValidationError, match="extra"):
        LongContextConfig(window=8)


def test_attention_options_lay_over_the_preset_and_are_checked_up_front():
    preset = PRESETS["base"]["options"]["vq"]
    plain = train_spec(LongContextConfig(preset="base", attention="vq"), "vq")
    assert plain["model"]["attention_options"] == {"vq": preset}
    cfg = parse_args(["--preset", "base", "--attention", "vq", "--attention-options", '{"vq": {"exact_window": true}}'])
    spec = train_spec(cfg, "vq")
    assert spec["model"]["attention_options"] == {"vq": {**preset, "exact_window": True}}  # part of the run's name
    assert train_spec(LongContextConfig(preset="base", attention="hwfa"), "hwfa")["model"].get("attention_options") is None
    with pytest.raises(ValidationError, match="does not train"):
        LongContextConfig(attention="hwfa", attention_options={"vq": {"exact_window": True}})
    with pytest.raises(ValidationError, match="takes no options \\['exact_windw'\\]"):
        LongContextConfig(attention="vq", attention_options={"vq": {"exact_windw": True}})
    with pytest.raises(ValidationError, match="would reach no layer"):
        LongContextConfig(attention="hwfa", attention_options={"hwfa": {"window": 3}})
    with pytest.raises(ValidationError, match="attention_options for 'vq'"):
        LongContextConfig(attention="vq", attention_options={"vq": {"codebook_size": "many"}})
    with pytest.raises(SystemExit):
        parse_args(["--attention", "vq", "--attention-options", "[1]"])


def test_cli_refuses_bad_attention_before_ray(tmp_path):
    out = tmp_path / "bad"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.long_context_lm", "--attention", "flashy", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert time.perf_counter() - t0 < 10
    assert "softmax" in r.stderr and "hwfa" in r.stderr and "performer" in r.stderr
    assert not out.exists()  # nothing written, no Ray started
