"""kgclue-pipeline end to end (short training), --from-run against another KB and eval file."""
from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from flows.kgclue import METRIC_KEYS, KgcluePipelineConfig, kgclue_pipeline
from tasks.sample import write_sample


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("kgsample"), n_train=300, n_dev=40, n_test=20)


@pytest.fixture(scope="module")
def first_run(prefect_harness, ray_local, sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("kgrun")
    cfg = KgcluePipelineConfig(preset="tiny", out=out, data_dir=sample, steps=40, ranker_steps=20)
    return cfg, kgclue_pipeline(cfg)


def test_pipeline_writes_metrics_predictions_and_artifacts(first_run):
    cfg, metrics = first_run
    assert set(METRIC_KEYS) <= set(metrics) and metrics["n_eval"] == 40
    assert json.loads((cfg.out / "metrics.json").read_text("utf-8")) == metrics
    assert 0 <= metrics["score"] <= 100 and metrics["train_tokens_per_s"] > 0
    assert metrics["reranked"] is True and len(metrics["ranker_run_names"]) == 1  # tiny: one re-ranker
    assert (cfg.out / "ranker" / "manifest.json").is_file()
    lines = (cfg.out / "eval" / "kgclue_predict.json").read_text("utf-8").splitlines()
    assert len(lines) == 20
    rec = json.loads(lines[0])
    assert set(rec) == {"id", "question", "answer"} and rec["answer"].count(" ||| ") == 2
    assert (cfg.out / "eval" / "kgclue_predict.zip").is_file()
    # every predicted (S, P, M) is a KB key: constrained decoding never leaves the trie
    kb = {tuple(x.split("\t")[:2]) for x in (cfg.out / "kb.txt").read_text("utf-8").splitlines()}
    for line in lines:
        s, p, _ = json.loads(line)["answer"].split(" ||| ")
        assert (s, p) in kb


def test_rerun_recomputes_nothing(first_run):
    cfg, metrics = first_run
    stamp = {p: p.stat().st_mtime_ns for p in [cfg.out / "data" / "train.parquet", cfg.out / "trie" / "s_label.npy",
                                                cfg.out / "model" / "model.pt", cfg.out / "ranker" / "model.pt"]}
    t0 = time.perf_counter()
    again = kgclue_pipeline(cfg)
    assert {k: again[k] for k in METRIC_KEYS} == {k: metrics[k] for k in METRIC_KEYS}
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    assert time.perf_counter() - t0 < 60


def test_from_run_evaluates_against_another_kb_and_eval_file(first_run, sample, tmp_path):
    cfg, _ = first_run
    kb = tmp_path / "knowledge.txt"  # an official-format KB: the sample's own answers only
    rows = [json.loads(x) for x in (sample / "dev.json").read_text("utf-8").splitlines()]
    kb.write_text("".join("\t".join(r["answer"].split(" ||| ")) + "\n" for r in rows), "utf-8")
    out = tmp_path / "reuse"
    m = kgclue_pipeline(KgcluePipelineConfig(preset="tiny", out=out, data_dir=sample, kb=kb,
                                             eval_file=sample / "dev.json", from_run=cfg.out))
    assert m["eval_set"] == "eval" and m["kb_protocol"] == "official" and m["n_eval"] == 40
    assert m["run_name"] == json.loads((cfg.out / "model" / "manifest.json").read_text())["run_name"]
    assert not (out / "ray").exists() and not (out / "model").exists(), "no training with --from-run"
    assert m["kb_triples"] == 40


def test_held_out_eval_file_joins_the_mini_kb(first_run, sample, tmp_path):
    """--eval-file without --kb: the mini-KB holds the held-out answers too, so every gold key is
    reachable; the earlier run's re-ranker scores it (no training)."""
    cfg, _ = first_run
    held = write_sample(tmp_path / "held", n_train=1, n_dev=30, n_test=1, seed=7) / "dev.json"
    out = tmp_path / "held-run"
    m = kgclue_pipeline(KgcluePipelineConfig(preset="tiny", out=out, data_dir=sample, eval_file=held,
                                             from_run=cfg.out))
    assert m["eval_set"] == "eval" and m["n_eval"] == 30 and m["reranked"] is True
    kb = {tuple(x.split("\t")[:2]) for x in (out / "kb.txt").read_text("utf-8").splitlines()}
    gold = [json.loads(x)["answer"].split(" ||| ")[:2] for x in held.read_text("utf-8").splitlines()]
    assert all(tuple(g) in kb for g in gold)
    assert not (out / "ray").exists() and not (out / "ranker").exists()


def test_from_run_must_be_a_finished_run(tmp_path):
    with pytest.raises(ValidationError, match="from_run"):
        KgcluePipelineConfig(out=tmp_path, from_run=tmp_path)
