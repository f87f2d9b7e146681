"""bench.train_throughput measures both sides one way: the same windows, the same median."""
from __future__ import annotations

import pytest

from bench.train_throughput import plain_torch, timed_rate
from tasks.train import PROGRESS_EVERY, TrainSpec


def test_timed_rate_takes_the_median_of_full_windows_after_warmup():
    assert PROGRESS_EVERY == 5
    hist = [{"step": 5, "tokens_per_s": 1.0}, {"step": 10, "tokens_per_s": 100.0},
            {"event": "validation", "step": 10, "val_loss": 3.0},
            {"step": 15, "tokens_per_s": 300.0}, {"step": 20, "tokens_per_s": 200.0},
            {"step": 22, "tokens_per_s": 9e9}]  # the last, partial window
    assert timed_rate(hist, warmup=5) == (200.0, 3)   # windows 6-10, 11-15, 16-20
    assert timed_rate(hist, warmup=10) == (250.0, 2)
    with pytest.raises(ValueError, match="no full 5-step window"):
        timed_rate(hist, warmup=20)


def test_plain_torch_side_reports_the_trainers_windows(tmp_path):
    from models.seq2seq import PRESETS
    from tasks.sample import prepare_training_set
    data_dir, vocab_dir = map(str, prepare_training_set(tmp_path, None, n_train=200, n_dev=10, n_test=5))
    spec = TrainSpec(data_dir=data_dir, vocab_dir=vocab_dir, model=dict(PRESETS["tiny"]), steps=12, micro_batch=4,
                     num_workers=2, checkpoint_every=12, seed=0)
    import torch
    threads = torch.get_num_threads()
    try:
        r = plain_torch(spec, warmup=0, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert (r["windows"], r["window_steps"]) == (2, PROGRESS_EVERY) and r["tokens_per_s"] > 0
