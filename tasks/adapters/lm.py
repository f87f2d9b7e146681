"""Trainer adapter of the decoder-only LM (models/lm.py) on a byte corpus (tasks/lm_corpus.py).

``spec.data``: ``corpus`` (a directory written by ``tasks.lm_corpus.prepare_corpus``),
``seq_len`` (N, tokens per training row; default the model's ``train_len`` or 256) and
optionally ``val_rows`` (validation windows, default 64). A row is a window of N+1 tokens at
offset row·N of the train split; ``validate`` reports the validation cross-entropy
(``val_loss``, nats per byte) and bits per byte (``val_bpc``).
The corpus directory enters the run name by its content (TrainSpec.content hashes every
``data`` option that names a directory with a manifest), not by its path.
"""
from __future__ import annotations

KINDS = ("lm",)


def _seq_len(spec) -> int:
    return int(spec.data.get("seq_len", spec.model.get("train_len", 256)))


def check_spec(spec) -> None:
    if not spec.data.get("corpus"):
        raise ValueError("task lm needs data={'corpus': <a tasks.lm_corpus directory>, 'seq_len': N}")
    if _seq_len(spec) < 2:
        raise ValueError(f"task lm: seq_len {_seq_len(spec)} < 2")
    if "train_len" in spec.model and int(spec.model["train_len"]) != _seq_len(spec):
        raise ValueError(f"task lm: model train_len {spec.model['train_len']} differs from data seq_len "
                         f"{_seq_len(spec)}; the log-n scale and HWFA window assume they agree")


def windows(tokens, rows, seq_len: int, device):
    """(B, seq_len+1) long tensor of the windows starting at row·seq_len."""
    import numpy as np
    import torch
    idx = np.asarray(rows, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64)).to(device)


def setup(spec, device, rank: int):
    import torch

    from models.lm import LM, LMConfig
    from tasks.adapters import TaskSetup
    from tasks.lm_corpus import load_corpus
    N = _seq_len(spec)
    train, vocab_size = load_corpus(spec.data["corpus"], "train")
    n_rows = (len(train) - 1) // N
    if n_rows < 1:
        raise ValueError(f"{spec.data['corpus']}: {len(train)} train tokens, fewer than one row of {N + 1}")
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = LM(LMConfig(**{**spec.model, "vocab_size": vocab_size, "train_len": N}))

    def batch(rows, step):
        ids = windows(train, rows, N, device)
        return {"ids": ids}, int(ids.numel() - ids.size(0))

    validate = None
    if spec.val_every:
        val, _ = load_corpus(spec.data["corpus"], "validation")
        n_val = min((len(val) - 1) // N, int(spec.data.get("val_rows", 64)))

        def validate(m):
            r = m.evaluate(windows(val, range(n_val), N, device))
            return {"val_loss": r["bpc"] * 0.6931471805599453, "val_bpc": r["bpc"], "val_accuracy": r["accuracy"]}
    return TaskSetup(model=model, n_rows=n_rows, make_batch=batch, validate=validate)


def load_model(cfg: dict):
    from models.lm import LM, LMConfig
    return LM(LMConfig.from_dict(cfg))
