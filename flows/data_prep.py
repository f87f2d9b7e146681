"""data-prep: KgCLUE files -> validated Parquet -> knowledge base -> vocabulary -> trie.

    python -m flows.data_prep --data-dir DIR --out DIR [--kb FILE] [--labelled FILE ...]
                              [--kb-protocol mini|hard]
"""
from __future__ import annotations

import flows  # noqa: F401  (embedded defaults before prefect is imported)

import argparse
import sys
import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows._cli import DataDir, InputFile, run_cli
from tasks import reporting
from tasks.kgclue_data import discover
from tasks.minikb import MiniKbConfig
from tasks.sample import write_sample
from tasks.steps import build_kb, build_trie_step, build_vocab_step, prepare_data
from tasks.storage import write_json_atomic


class DataPrepConfig(BaseModel):
    """Parameters of the data-prep flow (validated before any work starts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    out: Path
    data_dir: DataDir = Field(None, description="KgCLUE datasets/ folder; None: a generated sample")
    kb: InputFile = Field(None, description="official-format KB (head\\trelation\\ttail); None: mini-KB")
    labelled: tuple[Path, ...] = Field((), description="labelled KgCLUE files for the mini-KB")
    kb_protocol: Literal["mini", "hard"] = "mini"
    kb_k: int = Field(6, ge=0, le=100)
    kb_homonyms: int = Field(2, ge=0, le=100)
    seed: int = 0
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    kb_chunk_mib: int = Field(64, ge=1, le=4096)

    @field_validator("labelled")
    @classmethod
    def _labelled_exist(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        for p in v:
            if not p.is_file():
                raise ValueError(f"{p}: no such labelled file")
        return v

    @model_validator(mode="after")
    def _labelled_needs_no_kb(self) -> "DataPrepConfig":
        if self.kb is not None and self.labelled:
            raise ValueError("--labelled builds the mini-KB; it has no effect with --kb")
        return self


def input_files(cfg: DataPrepConfig) -> tuple[dict[str, str], list[str]]:
    """(split name -> file) and the splits that feed the mini-KB."""
    data_dir = cfg.data_dir or write_sample(cfg.out / "sample")
    files = {s: str(p) for s, p in discover(data_dir).items()}
    for i, p in enumerate(cfg.labelled):
        files[f"labelled-{i}-{p.stem}"] = str(p)
    if cfg.labelled:
        kb_splits = [s for s in files if s.startswith("labelled-")]
    else:
        kb_splits = [s for s in files if s != "test"]
    return files, kb_splits


@flow(name="data-prep", log_prints=True)
def data_prep(config: DataPrepConfig) -> dict:
    """Run the data steps; write metrics.json under ``config.out``; return the metrics."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    out = config.out
    files, kb_splits = input_files(config)
    data_m = prepare_data(files, str(out / "data"), config.max_bad_fraction)
    mini = MiniKbConfig(config.kb_protocol, config.kb_k, config.kb_homonyms, seed=config.seed)
    kb_m = build_kb(str(out / "data"), str(out), str(config.kb) if config.kb else None, kb_splits, mini,
                    config.kb_chunk_mib << 20, config.max_bad_fraction)
    vocab_m = build_vocab_step(str(out / "data"), str(out / "kb"), str(out / "vocab"))
    trie_m = build_trie_step(str(out / "kb"), str(out / "vocab"), str(out / "trie"))
    metrics = {
        "rows": {s: m["rows"] for s, m in data_m["splits"].items()},
        "quarantined": sum(m["quarantined"] for m in data_m["splits"].values()),
        "kb_quarantined": kb_m["quarantined"],
        "kb_protocol": "official" if config.kb else config.kb_protocol,
        "kb_triples": kb_m["triples"],
        "kb_subjects": trie_m["entities"],
        "kb_subject_names": trie_m["subjects"],
        "kb_predicates": trie_m["predicates"],
        "trie_keys": trie_m["keys"],
        "trie_bytes": trie_m["trie_bytes"],
        "vocab_size": vocab_m["size"],
        "vocab_sha256": vocab_m["vocab_sha256"],
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(out / "metrics.json", metrics)
    reporting.markdown("data-prep-report", "# data-prep\n\n" + reporting.md_table(
        [{"metric": k, "value": v} for k, v in metrics.items() if k != "rows"]) + "\n" + reporting.md_table(
        [{"split": s, "rows": n} for s, n in metrics["rows"].items()]), "Counts of the data-prep run")
    logger.info("data-prep done: %s", metrics)
    return metrics


def parse_args(argv: list[str] | None = None) -> DataPrepConfig:
    ap = argparse.ArgumentParser(prog="python -m flows.data_prep", description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, help="KgCLUE datasets/ folder (default: a generated sample)")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--kb", type=Path, help="official-format KB file; without it the mini-KB is built")
    ap.add_argument("--labelled", type=Path, nargs="+", default=(), help="labelled files for the mini-KB")
    ap.add_argument("--kb-protocol", choices=("mini", "hard"), default="mini")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-bad-fraction", type=float, default=0.01)
    a = ap.parse_args(argv)
    return DataPrepConfig(out=a.out, data_dir=a.data_dir, kb=a.kb, labelled=tuple(a.labelled),
                          kb_protocol=a.kb_protocol, seed=a.seed, max_bad_fraction=a.max_bad_fraction)


def main(argv: list[str] | None = None) -> int:
    return run_cli("data-prep", parse_args, data_prep, argv, lambda cfg, m: (
        f"data-prep: wrote {cfg.out / 'metrics.json'}: rows={m['rows']} quarantined={m['quarantined']} "
        f"kb_triples={m['kb_triples']} trie_keys={m['trie_keys']}"))


if __name__ == "__main__":
    sys.exit(main())
