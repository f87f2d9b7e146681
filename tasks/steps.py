"""Thin Prefect task wrappers over the data steps (plain functions live beside them).

No retries here: these steps are deterministic, so a ValueError would fail again. Each
step caches by content itself (its manifest records the inputs' hashes), so Prefect's own
result cache is off.
"""
from __future__ import annotations

import hashlib
import os
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import reporting
from tasks.kb import ingest_kb
from tasks.kgclue_data import prepare
from tasks.minikb import MiniKbConfig, build_triples, gold_triples, write_kb_txt
from tasks.storage import MANIFEST, atomic_path, read_manifest, reusable, write_manifest
from tasks.trie_build import build_trie_index
from tasks.vocab import build_vocab


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(files: dict[str, str], out_dir: str, max_bad_fraction: float) -> dict[str, Any]:
    """Validate KgCLUE files into Parquet + quarantine; publish counts."""
    t0 = time.perf_counter()
    manifest = prepare({k: Path(v) for k, v in files.items()}, Path(out_dir), max_bad_fraction)
    rows = [{"split": s, **{k: v for k, v in m.items() if k != "source"}} for s, m in manifest["splits"].items()]
    reporting.table("data-prep-counts", rows, "Lines read, rows kept and lines quarantined per split")
    bad = [json.loads(x) for x in (Path(out_dir) / "quarantine.jsonl").read_text("utf-8").splitlines()[:200]]
    if bad:
        reporting.table("data-prep-quarantine", bad, "Quarantined lines (first 200): file, line, reason, fix")
    get_run_logger().info("prepare-data: %s in %.1fs", rows, time.perf_counter() - t0)
    return manifest


@task(name="build-kb", cache_policy=NO_CACHE)
def build_kb(data_out: str, out_root: str, kb_file: str | None, labelled: list[str],
             cfg: MiniKbConfig, chunk_bytes: int, max_bad_fraction: float) -> dict[str, Any]:
    """Ingest the official KB, or write the mini-KB (kb.txt) from labelled rows and ingest it."""
    logger = get_run_logger()
    if kb_file is None:
        rows: list[dict] = []
        for split in labelled:
            rows.extend(pq.read_table(Path(data_out) / f"{split}.parquet").to_pylist())
        triples = build_triples(gold_triples(rows), cfg)
        kb_file = str(Path(out_root) / "kb.txt")
        write_kb_txt(triples, kb_file)
        logger.info("build-kb: %s mini-KB with %d triples from %s -> %s", cfg.protocol, len(triples), labelled, kb_file)

    def progress(lines: int, rows_out: int, bad: int) -> None:
        logger.info("build-kb: %s lines read, %s triples, %s quarantined", f"{lines:,}", f"{rows_out:,}", bad)

    return ingest_kb(kb_file, Path(out_root) / "kb", chunk_bytes, max_bad_fraction, progress)


@task(name="build-vocab", cache_policy=NO_CACHE)
def build_vocab_step(data_out: str, kb_out: str, out_dir: str) -> dict[str, Any]:
    """Characters of all questions and KB strings."""
    data_m, kb_m = read_manifest(data_out), read_manifest(kb_out)
    key = hashlib.sha256(json.dumps([data_m["inputs_sha256"], kb_m["source_sha256"]]).encode()).hexdigest()
    questions: list[str] = []
    for name in data_m["files"]:
        if name.endswith(".parquet"):
            questions.extend(pq.read_table(Path(data_out) / name, columns=["question"])["question"].to_pylist())
    return build_vocab(questions, kb_out, out_dir, key)


@task(name="build-trie", cache_policy=NO_CACHE)
def build_trie_step(kb_out: str, vocab_out: str, out_dir: str) -> dict[str, Any]:
    """The prefix tree over (S, P, M) keys plus the object index."""
    logger = get_run_logger()
    return build_trie_index(kb_out, vocab_out, out_dir, log=logger.info)


# --------------------------------------------------------------------------- training / evaluation
def _transient(task, task_run, state) -> bool:
    """Retry only failures that a second attempt can fix (a worker or node lost), not bad input."""
    try:
        state.result()
    except (ValueError, TypeError, KeyError, FileNotFoundError):
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


@task(name="train-seq2seq", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=_transient)
def train_step(spec_dict: dict, storage: str, model_out: str, ray_address: str | None,
               max_failures: int = 2) -> dict[str, Any]:
    """Ray Train + DeepSpeed; resumes the same run name after a crash; exports the model.

    One task for both trainings: the flow names it ``train-ranker`` (``with_options``) for the
    re-ranker, whose spec has ``task="ranker"``."""
    import shutil

    from tasks.train import MODEL_CONFIG, MODEL_FILE, TrainSpec, train
    logger = get_run_logger()
    spec = TrainSpec(**{**spec_dict, "splits": tuple(spec_dict["splits"])})
    name = spec.run_name()  # content-addressed: the inputs' manifest hashes, not their paths
    if (done := reusable(model_out, run_name=name)) is not None:
        logger.info("train-%s: %s already trained (%s); not recomputed", spec.task, name, model_out)
        return done
    res = train(spec, storage, ray_address, max_failures, on_progress=prefect_progress(spec))
    out = Path(model_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest is written
    files = [MODEL_FILE, MODEL_CONFIG] + [f for f in ("validation.json",) if (Path(res.checkpoint_dir) / f).is_file()]
    for f in files:
        with atomic_path(out / f) as tmp:
            shutil.copyfile(Path(res.checkpoint_dir) / f, tmp)
    manifest = write_manifest(out, files, run_name=name, steps=res.steps,
                              final_loss=res.final_loss, tokens_per_s=res.tokens_per_s, train_wall_s=res.wall_s,
                              train_loop_s=res.loop_s, checkpoint=res.checkpoint_dir, spec=spec_dict, content=spec.content(),
                              accelerator=spec.accelerator()[0], validations=res.validations)
    reporting.table("train-history" if spec.task == "seq2seq" else f"train-{spec.task}-history", [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
                                      for h in res.history], f"Training of {name}: loss and tokens/s per 5 steps")
    return manifest


def prefect_progress(spec):
    """The trainer's ``on_progress`` in a Prefect run: a log line per item and a progress
    artifact (``train-progress``, or ``train-TASK-progress``) that shows step, loss and ETA."""
    logger = get_run_logger()
    key = "train-progress" if spec.task == "seq2seq" else f"train-{spec.task}-progress"
    pid = reporting.progress(key, 0.0, f"{spec.run_name()}: starting Ray Train ({spec.num_workers} workers)")

    def on_progress(p: dict) -> None:
        if p.get("event") == "resume":
            logger.info("train-%s: resumed from the checkpoint at step %d", spec.task, p["step"])
            return
        if p.get("event") == "validation":
            logger.info("train-%s: validation at step %s: %s", spec.task, p["step"],
                        {k: round(v, 4) for k, v in p.items() if isinstance(v, float)})
            return
        extra = "".join(f" · {k} {v:.4f}" for k, v in p.items()
                        if k not in ("step", "steps", "loss", "tokens_per_s", "lr", "eta_s") and isinstance(v, float))
        desc = (f"step {p['step']}/{p['steps']} · loss {p['loss']:.4f}{extra} · {p['tokens_per_s']:,.0f} tokens/s · "
                f"ETA {p['eta_s']:.0f}s")
        logger.info("train-%s: %s", spec.task, desc)
        reporting.update_progress(pid, 100.0 * p["step"] / p["steps"], desc)

    return on_progress


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_step(model_dir: str, vocab_dir: str, trie_dir: str, rows: list[dict], out_dir: str, name: str,
                  beam: int, lookahead: bool | str, constrained: bool = True,
                  ranker_dirs: list[str] | None = None, max_src_len: int | None = None) -> dict[str, Any]:
    """Beam search (+ re-ranking when ``ranker_dirs`` hold trained re-rankers) + KB lookup +
    official metrics for ``rows``; predictions on disk."""
    import torch

    from tasks.evaluate import Reranker, run_eval, trained_max_src_len
    from tasks.train import load_trained_model
    from tasks.trie_build import load_trie_index
    from tasks.vocab import load_vocab
    logger = get_run_logger()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    vocab = load_vocab(vocab_dir)
    trie, index = load_trie_index(trie_dir, vocab)
    model = load_trained_model(model_dir)
    if max_src_len is None:  # the length the model was trained with (no train/eval skew)
        max_src_len = trained_max_src_len(model_dir)
    reranker = (Reranker(tuple(load_trained_model(d) for d in ranker_dirs), lookahead=lookahead,
                         max_src_len=trained_max_src_len(ranker_dirs[0])) if ranker_dirs else None)
    pid = reporting.progress(f"evaluate-{name.replace('_', '-')}", 0.0, f"decoding {len(rows)} questions")

    def progress(done: int, total: int) -> None:
        reporting.update_progress(pid, 100.0 * done / max(1, total), f"{done}/{total} questions decoded")

    metrics = run_eval(model, trie, index, vocab, rows, Path(out_dir), name, beam=beam, lookahead=lookahead,
                       constrained=constrained, reranker=reranker, progress=progress, max_src_len=max_src_len)
    logger.info("evaluate %s: %s", name, metrics)
    return metrics
