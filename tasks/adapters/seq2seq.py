"""Trainer adapter of the KgCLUE generator (models/seq2seq.py): question -> trie key."""
from __future__ import annotations

KINDS = ("seq2seq",)


def check_spec(spec) -> None:
    if not spec.data_dir or not spec.vocab_dir:
        raise ValueError("task seq2seq needs data_dir (prepared KgCLUE data) and vocab_dir")


def load_pairs(data_dir: str, vocab_dir: str, splits: tuple[str, ...], max_src_len: int,
               holdout: dict | None = None):
    """Token ids of (question, key) pairs: key = BOS S SEP P SEP M EOS."""
    from models.vocab import BOS, EOS, SEP
    from tasks.validation import labelled_rows
    from tasks.vocab import load_vocab
    vocab = load_vocab(vocab_dir)
    src, tgt = [], []
    for r in labelled_rows(data_dir, splits, holdout):
        src.append(vocab.encode(r["question"])[:max_src_len] or [SEP])
        tgt.append([BOS, *vocab.encode(r["subject"]), SEP, *vocab.encode(r["predicate"]), SEP,
                    *vocab.encode(r["disambiguation"]), EOS])
    if not src:
        raise ValueError(f"{data_dir}: no labelled rows in {splits} to train on")
    return src, tgt, len(vocab)


def setup(spec, device, rank: int):
    import torch

    from models.seq2seq import Seq2Seq, Seq2SeqConfig, make_batch
    from tasks.adapters import TaskSetup
    src, tgt, vocab_size = load_pairs(spec.data_dir, spec.vocab_dir, spec.splits, spec.max_src_len,
                                      spec.data.get("holdout"))
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = Seq2Seq(Seq2SeqConfig(**{**spec.model, "vocab_size": vocab_size}))

    def batch(rows, step):
        b = make_batch([src[i] for i in rows], [tgt[i] for i in rows], device)
        return b, int((b["tgt_ids"] != 0).sum() + b["src_mask"].sum())

    validate = None
    holdout = spec.data.get("holdout")
    if spec.val_every and holdout:  # teacher-forced loss on the validation slice (held-out relations)
        from tasks.validation import VAL
        vsrc, vtgt, _ = load_pairs(spec.data_dir, spec.vocab_dir, (VAL,), spec.max_src_len, holdout)
        n_val = min(len(vsrc), int(spec.data.get("val_rows", 256)))

        def validate(m):
            total, weight = 0.0, 0
            for a in range(0, n_val, 64):
                b = make_batch(vsrc[a:a + 64][:n_val - a], vtgt[a:a + 64][:n_val - a], device)
                loss = m.loss(b)
                loss = loss[0] if isinstance(loss, tuple) else loss
                n = int((b["tgt_ids"][:, 1:] != 0).sum())
                total, weight = total + float(loss) * n, weight + n
            return {"val_loss": total / max(1, weight)}
    return TaskSetup(model=model, n_rows=len(src), make_batch=batch, validate=validate)


def load_model(cfg: dict):
    from models.seq2seq import Seq2Seq, Seq2SeqConfig
    return Seq2Seq(Seq2SeqConfig(**{k: v for k, v in cfg.items() if k != "kind"}))

