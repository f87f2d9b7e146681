"""kgclue-pipeline: data prep -> KB -> vocabulary -> trie -> train -> evaluate -> report.

    python -m flows.kgclue --preset tiny|base --data-dir DIR --out DIR [--kb FILE]
                           [--eval-file FILE] [--from-run DIR] [--ray-address ADDR]

``tiny`` runs the whole DAG on a 2-core CPU in minutes (the README's main command); ``base``
is the real run on the full train split. ``--from-run`` evaluates the model an earlier run
trained, against another ``--kb`` / ``--eval-file``, without training again. Every stage
caches by content: a re-run with the same inputs recomputes nothing.
"""
from __future__ import annotations

import flows  # noqa: F401  (embedded defaults before prefect is imported)

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows._cli import DataDir, InputFile, run_cli
from tasks import reporting
from tasks.minikb import MiniKbConfig
from tasks.steps import (build_kb, build_trie_step, build_vocab_step, evaluate_step, prepare_data,
                         train_step)
from tasks.storage import read_manifest, write_json_atomic
from tasks.train import ranker_dir, trained_ranker_dirs

PRESETS = {
    #        model preset, steps, micro batch/worker, lr, warmup, dev questions evaluated (None: all),
    #        re-ranker: steps, groups of candidates per worker and step, lr, ensemble size (seeds)
    "tiny": dict(model="tiny", steps=600, micro_batch=32, lr=2e-3, warmup=30, eval_limit=None, test_limit=None,
                 ranker_steps=300, ranker_micro_batch=16, ranker_lr=1e-3, rankers=1),
    "base": dict(model="base", steps=1200, micro_batch=32, lr=1e-3, warmup=100, eval_limit=None, test_limit=None,
                 ranker_steps=3000, ranker_micro_batch=16, ranker_lr=1e-3, rankers=3),
}
METRIC_KEYS = ("score", "em_s", "em_p", "em_o", "em_all", "f1_s", "f1_p", "f1_o", "f1_all", "n_eval")


class KgcluePipelineConfig(BaseModel):
    """Parameters of kgclue-pipeline (and of its train-seq2seq stage flow)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    preset: Literal["tiny", "base"] = "tiny"
    out: Path = Path("runs/kgclue")
    data_dir: DataDir = Field(None, description="KgCLUE datasets/ folder; None: a generated sample")
    kb: InputFile = Field(None, description="official-format KB; None: the mini-KB protocol")
    kb_protocol: Literal["mini", "hard"] = "mini"
    eval_file: InputFile = Field(None, description="a labelled KgCLUE-format file to score (default: dev)")
    from_run: Path | None = Field(None, description="evaluate this earlier run's model; no training")
    ray_address: str | None = Field(None, description="Ray cluster address; None: local Ray (or RAY_ADDRESS)")
    num_workers: int = Field(2, ge=1, le=1024)
    zero_stage: int = Field(1, ge=0, le=3)
    use_gpu: bool = False
    steps: int | None = Field(None, ge=1, description="override the preset's training steps")
    micro_batch: int | None = Field(None, ge=1, le=4096)
    global_batch: int | None = Field(None, ge=1, le=1 << 20, description=(
        "rows per optimizer step over all workers; must divide by num_workers, and sets "
        "micro_batch = global_batch / num_workers"))
    beam: int = Field(4, ge=1, le=64)
    lookahead: bool = True
    rerank: bool = Field(True, description="train the candidate re-ranker and re-rank the beam's subjects' keys")
    ranker_steps: int | None = Field(None, ge=1, description="override the preset's re-ranker training steps")
    rankers: int | None = Field(None, ge=1, le=8, description="override the preset's re-ranker ensemble size")
    seed: int = 0
    max_failures: int = Field(2, ge=0, le=100)

    @field_validator("from_run")
    @classmethod
    def _run(cls, v: Path | None) -> Path | None:
        if v is not None and not (v / "model" / "manifest.json").is_file():
            raise ValueError(f"{v}: not a finished kgclue-pipeline run (no model/manifest.json)")
        return v

    @field_validator("ray_address")
    @classmethod
    def _ray_answers(cls, v: str | None) -> str | None:
        """host:port or ray://host:port must accept a TCP connection within 0.5 s (no Ray
        job starts before this passes); None and "auto" are resolved by Ray itself."""
        if v is None or v.strip() in ("auto", "local"):
            return v
        host, port = ray_host_port(v)
        try:
            socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ValueError(
                f"{v!r}: nothing answers at {host}:{port} ({e.strerror or type(e).__name__} within "
                f"{RAY_CONNECT_TIMEOUT_S} s); start the cluster (infra/README.md), fix the address, or "
                f"omit ray_address (--ray-address) for a local Ray") from None
        return v

    @model_validator(mode="after")
    def _batches(self) -> "KgcluePipelineConfig":
        if self.global_batch is None:
            return self
        if self.global_batch % self.num_workers:
            raise ValueError(f"global_batch={self.global_batch} is not divisible by num_workers="
                             f"{self.num_workers}; choose global_batch as a multiple of num_workers "
                             f"(micro_batch = global_batch / num_workers per worker)")
        per_worker = self.global_batch // self.num_workers
        if self.micro_batch is not None and self.micro_batch != per_worker:
            raise ValueError(f"micro_batch={self.micro_batch} contradicts global_batch={self.global_batch} / "
                             f"num_workers={self.num_workers} = {per_worker}; give one of micro_batch, "
                             f"global_batch")
        if per_worker > 4096:
            raise ValueError(f"global_batch={self.global_batch} / num_workers={self.num_workers} = {per_worker} "
                             f"rows per worker, over the micro_batch limit 4096")
        return self

    @model_validator(mode="after")
    def _cluster(self) -> "KgcluePipelineConfig":
        if self.use_gpu and self.ray_address is None:
            import torch
            if not torch.cuda.is_available():
                raise ValueError("use_gpu=True but no GPU here and no ray_address of a GPU cluster")
        if (self.ray_address is None and not os.environ.get("RAY_ADDRESS") and not self.use_gpu
                and not self.from_run and self.num_workers > (os.cpu_count() or 1)):
            raise ValueError(f"num_workers={self.num_workers} but a local Ray has {os.cpu_count()} CPU(s): "
                             f"the training would wait for CPUs forever; lower num_workers or give "
                             f"ray_address of a cluster")
        return self

    def preset_values(self) -> dict:
        p = dict(PRESETS[self.preset])
        if self.steps is not None:
            p["steps"] = self.steps
        if self.ranker_steps is not None:
            p["ranker_steps"] = self.ranker_steps
        if self.rankers is not None:
            p["rankers"] = self.rankers
        if self.micro_batch is not None:
            p["micro_batch"] = self.micro_batch
        if self.global_batch is not None:
            p["micro_batch"] = self.global_batch // self.num_workers
        return p


RAY_CONNECT_TIMEOUT_S = 0.5


def ray_host_port(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``ray://host:port``; ValueError for anything else."""
    from urllib.parse import urlsplit
    a = address.strip()
    parts = urlsplit(a if "://" in a else f"//{a}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("", "ray") or not parts.hostname or port is None or port == 0:
        raise ValueError(f"{address!r}: give host:port (a Ray head's GCS, e.g. 10.0.0.5:6379), "
                         f"ray://host:port (Ray Client, e.g. ray://head:10001), or 'auto'")
    return parts.hostname, port


def versions() -> dict[str, str]:
    """The stack this run used (for the report)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "ray", "deepspeed", "prefect", "pyarrow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def _data_stages(cfg: KgcluePipelineConfig, vocab_dir: str) -> dict:
    """prepare_data -> build_kb -> build_vocab (unless reusing a run's) -> build_trie."""
    from flows.data_prep import DataPrepConfig, input_files
    out = cfg.out
    files, kb_splits = input_files(DataPrepConfig(out=out, data_dir=cfg.data_dir, kb=cfg.kb,
                                                  kb_protocol=cfg.kb_protocol, seed=cfg.seed))
    if cfg.eval_file is not None:  # validated and prepared with the other splits (data/eval.parquet)
        files["eval"] = str(cfg.eval_file)
        if cfg.kb is None:  # the mini-KB holds every labelled answer: the eval file's too
            kb_splits = [*kb_splits, "eval"]
    data_m = prepare_data(files, str(out / "data"), 0.01)
    kb_m = build_kb(str(out / "data"), str(out), str(cfg.kb) if cfg.kb else None, kb_splits,
                    MiniKbConfig(cfg.kb_protocol, seed=cfg.seed), 64 << 20, 0.01)
    vocab_m = read_manifest(vocab_dir) if cfg.from_run else build_vocab_step(str(out / "data"), str(out / "kb"), vocab_dir)
    trie_m = build_trie_step(str(out / "kb"), vocab_dir, str(out / "trie"))
    return {"data": data_m, "kb": kb_m, "vocab": vocab_m, "trie": trie_m}


def _train_spec(cfg: KgcluePipelineConfig, vocab_dir: str) -> dict:
    from dataclasses import asdict

    from models.seq2seq import PRESETS as MODEL_PRESETS
    from tasks.train import TrainSpec
    p = cfg.preset_values()
    spec = TrainSpec(data_dir=str((cfg.out / "data").resolve()), vocab_dir=str(Path(vocab_dir).resolve()),
                     model=dict(MODEL_PRESETS[p["model"]]), steps=p["steps"], micro_batch=p["micro_batch"],
                     lr=p["lr"], warmup=p["warmup"], zero_stage=cfg.zero_stage, num_workers=cfg.num_workers,
                     use_gpu=cfg.use_gpu, bf16=cfg.use_gpu, seed=cfg.seed,
                     checkpoint_every=max(20, p["steps"] // 10))
    return asdict(spec)


def _ranker_spec(cfg: KgcluePipelineConfig, vocab_dir: str, member: int = 0) -> dict:
    """The re-ranker's training spec; ensemble members differ only in their seed."""
    from dataclasses import asdict

    from models.ranker import RankerConfig
    from tasks.train import TrainSpec
    p = cfg.preset_values()
    model = {k: v for k, v in RankerConfig(vocab_size=5).to_dict().items() if k != "vocab_size"}
    spec = TrainSpec(data_dir=str((cfg.out / "data").resolve()), vocab_dir=str(Path(vocab_dir).resolve()),
                     model=model, steps=p["ranker_steps"], micro_batch=p["ranker_micro_batch"], lr=p["ranker_lr"],
                     warmup=min(100, max(1, p["ranker_steps"] // 10)), zero_stage=cfg.zero_stage,
                     num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, bf16=cfg.use_gpu, seed=cfg.seed + member,
                     checkpoint_every=max(20, p["ranker_steps"] // 10), task="ranker", group=8,
                     cpu_bf16=not cfg.use_gpu)
    return asdict(spec)


def _eval_rows(cfg: KgcluePipelineConfig) -> tuple[str, list[dict]]:
    name = "dev" if cfg.eval_file is None else "eval"
    rows = pq.read_table(cfg.out / "data" / f"{name}.parquet").to_pylist()
    limit = cfg.preset_values()["eval_limit"]
    return name, rows[:limit] if limit else rows


@flow(name="train-seq2seq", log_prints=True)
def train_seq2seq_flow(config: KgcluePipelineConfig) -> dict:
    """The data stages (cached) and the training stage alone."""
    vocab_dir = str(config.out / "vocab")
    _data_stages(config, vocab_dir)
    return train_step(_train_spec(config, vocab_dir), str((config.out / "ray").resolve()),
                      str(config.out / "model"), config.ray_address, config.max_failures)


@flow(name="kgclue-pipeline", log_prints=True)
def kgclue_pipeline(config: KgcluePipelineConfig) -> dict:
    """The main DAG; writes ``metrics.json`` under ``config.out`` and returns it."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    if config.from_run:
        vocab_dir, model_dir = str(config.from_run / "vocab"), str(config.from_run / "model")
        ranker_root = config.from_run
    else:
        vocab_dir, model_dir, ranker_root = str(out / "vocab"), str(out / "model"), out
    n_rankers = config.preset_values()["rankers"]
    if config.from_run and config.rankers is None:  # every re-ranker the earlier run trained
        n_rankers = len(trained_ranker_dirs(ranker_root))
    ranker_dirs = [str(ranker_dir(ranker_root, i)) for i in range(n_rankers)]
    stages = _data_stages(config, vocab_dir)
    if config.from_run:
        model_m = read_manifest(model_dir)
        logger.info("kgclue-pipeline: evaluating %s's model %s (no training)", config.from_run, model_m["run_name"])
    else:
        model_m = train_step(_train_spec(config, vocab_dir), str((out / "ray").resolve()), model_dir,
                             config.ray_address, config.max_failures)
    ranker_ms: list[dict] = []
    if config.rerank and not config.from_run:
        for i, d in enumerate(ranker_dirs):
            ranker_ms.append(train_step.with_options(name="train-ranker")(
                _ranker_spec(config, vocab_dir, i), str((out / "ray").resolve()), d, config.ray_address,
                config.max_failures))
    elif config.rerank:
        found = [d for d in ranker_dirs if (Path(d) / "manifest.json").is_file()]
        if not found:
            logger.warning("kgclue-pipeline: %s has no trained re-ranker; evaluating the beam search alone",
                           config.from_run)
        ranker_dirs = found
        ranker_ms = [read_manifest(d) for d in found]
    ranker_arg = ranker_dirs if ranker_ms else None
    name, rows = _eval_rows(config)
    eval_dir = str(out / "eval")
    Path(eval_dir).mkdir(parents=True, exist_ok=True)
    m_eval = evaluate_step(model_dir, vocab_dir, str(out / "trie"), rows, eval_dir, name, config.beam, config.lookahead,
                           ranker_dirs=ranker_arg)
    test_rows = []
    if (out / "data" / "test.parquet").is_file():
        test_rows = pq.read_table(out / "data" / "test.parquet").to_pylist()
        limit = config.preset_values()["test_limit"]
        test_rows = test_rows[:limit] if limit else test_rows
    if test_rows:
        evaluate_step(model_dir, vocab_dir, str(out / "trie"), test_rows, eval_dir, "kgclue", config.beam,
                      config.lookahead, ranker_dirs=ranker_arg)
    metrics = {k: m_eval[k] for k in METRIC_KEYS}
    metrics.update({
        "eval_set": name, "kb_protocol": "official" if config.kb else config.kb_protocol, "preset": config.preset,
        "train_tokens_per_s": model_m.get("tokens_per_s"), "train_steps": model_m.get("steps"),
        "final_loss": model_m.get("final_loss"), "run_name": model_m.get("run_name"),
        "decode_questions_per_s": m_eval["questions_per_s"], "beam": config.beam, "lookahead": config.lookahead,
        "reranked": ranker_arg is not None, "ranker_run_names": [m.get("run_name") for m in ranker_ms],
        "ranker_train_wall_s": round(sum(m.get("train_wall_s") or 0 for m in ranker_ms), 1),
        "kb_triples": stages["kb"]["triples"], "trie_keys": stages["trie"]["keys"],
        "vocab_sha256": stages["vocab"]["vocab_sha256"], "wall_s": round(time.perf_counter() - t0, 1),
    })
    write_json_atomic(out / "metrics.json", metrics)
    reporting.table("kgclue-metrics", [{"metric": k, "value": v} for k, v in metrics.items()],
                    f"KgCLUE metrics on {name} ({metrics['kb_protocol']} KB)")
    cfg_rows = [{"parameter": k, "value": str(v)} for k, v in config.model_dump().items()]
    reporting.markdown("kgclue-report", "\n".join([
        f"# kgclue-pipeline — {config.preset}", "",
        f"**Score {metrics['score']:.2f}** (EM-O {metrics['em_o']:.2f}, F1-O {metrics['f1_o']:.2f}) on "
        f"{metrics['n_eval']} {name} questions, {metrics['kb_protocol']} KB"
        + (" (mini-KB protocol: not comparable to the leaderboard)" if not config.kb else ""), "",
        reporting.md_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items()}]),
        "## Config", reporting.md_table(cfg_rows),
        "## Data", reporting.md_table([{"split": s, **{k: v for k, v in m.items() if k != "source"}}
                                       for s, m in stages["data"]["splits"].items()]),
        f"vocab sha256 `{stages['vocab']['vocab_sha256'][:16]}…`, KB source sha256 "
        f"`{stages['kb']['source_sha256'][:16]}…`, trie keys {stages['trie']['keys']:,}", "",
        "## Versions", reporting.md_table([versions()]),
    ]), "Metrics, config, data hashes and versions of this run")
    logger.info("kgclue-pipeline: %s", json.dumps(metrics, ensure_ascii=False))
    return metrics


def parse_args(argv: list[str] | None = None) -> KgcluePipelineConfig:
    ap = argparse.ArgumentParser(prog="python -m flows.kgclue", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--data-dir", type=Path, help="KgCLUE datasets/ folder (default: a generated sample)")
    ap.add_argument("--out", type=Path, default=Path("runs/kgclue"))
    ap.add_argument("--kb", type=Path, help="official-format KB (head\\trelation\\ttail)")
    ap.add_argument("--kb-protocol", choices=("mini", "hard"), default="mini")
    ap.add_argument("--eval-file", type=Path, help="labelled KgCLUE-format file to score (default: dev)")
    ap.add_argument("--from-run", type=Path, help="evaluate this earlier run's model, no training")
    ap.add_argument("--ray-address", help="Ray cluster address (default: local Ray, or RAY_ADDRESS)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--micro-batch", type=int, help="rows per worker per step (default: the preset's)")
    ap.add_argument("--global-batch", type=int, help="rows per step over all workers (sets --micro-batch)")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--no-lookahead", action="store_true")
    ap.add_argument("--no-rerank", action="store_true", help="skip the re-ranker (beam search alone)")
    ap.add_argument("--ranker-steps", type=int, help="re-ranker training steps (default: the preset's)")
    ap.add_argument("--rankers", type=int, help="re-ranker ensemble size (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    return KgcluePipelineConfig(preset=a.preset, out=a.out, data_dir=a.data_dir, kb=a.kb, kb_protocol=a.kb_protocol,
                                eval_file=a.eval_file, from_run=a.from_run, ray_address=a.ray_address,
                                num_workers=a.num_workers, zero_stage=a.zero_stage, use_gpu=a.use_gpu,
                                steps=a.steps, micro_batch=a.micro_batch, global_batch=a.global_batch,
                                beam=a.beam, lookahead=not a.no_lookahead, rerank=not a.no_rerank,
                                ranker_steps=a.ranker_steps, rankers=a.rankers, seed=a.seed)


def _stop_ray() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return run_cli("kgclue-pipeline", parse_args, kgclue_pipeline, argv, lambda cfg, m: (
        f"kgclue-pipeline: Score {m['score']:.2f} (EM-O {m['em_o']:.2f}, F1-O {m['f1_o']:.2f}) on "
        f"{m['n_eval']} {m['eval_set']} questions; wrote {cfg.out / 'metrics.json'}"), cleanup=_stop_ray)


if __name__ == "__main__":
    sys.exit(main())
