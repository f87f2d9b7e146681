"""Trainer adapter of the candidate re-ranker (models/ranker.py), on groups from tasks/ranker_data.py."""
from __future__ import annotations

import numpy as np

KINDS = ("ranker",)


def check_spec(spec) -> None:
    if not spec.data_dir or not spec.vocab_dir:
        raise ValueError("task ranker needs data_dir (prepared KgCLUE data) and vocab_dir")
    if int(spec.data.get("group", 8)) < 2:
        raise ValueError(f"ranker group {spec.data.get('group')}: the ranker needs the gold and at least one negative")


def setup(spec, device, rank: int):
    import torch

    from models.ranker import Ranker, RankerConfig, make_ranker_batch
    from tasks.adapters import TaskSetup
    from tasks.ranker_data import load_ranker_data
    group = int(spec.data.get("group", 8))
    data = load_ranker_data(spec.data_dir, spec.vocab_dir, spec.splits, max_src_len=spec.max_src_len,
                            holdout=spec.data.get("holdout"))
    torch.manual_seed(spec.seed)
    model = Ranker(RankerConfig(**{**spec.model, "vocab_size": len(data.vocab)}))

    def batch(rows, step):
        rng = np.random.default_rng([spec.seed, step, rank])  # negatives: a function of (seed, step, rank)
        b = make_ranker_batch([c for i in rows for c in data.group(int(i), group, rng)], group, device)
        return b, int(b["mask"].sum())
    return TaskSetup(model=model, n_rows=len(data), make_batch=batch)


def load_model(cfg: dict):
    from models.ranker import Ranker, RankerConfig
    return Ranker(RankerConfig(**cfg))
