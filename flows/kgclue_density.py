"""The ``density`` stage of kgclue-pipeline (on with ``--density``): a VAE on the trained
encoder's pooled question encodings, trained on the trainer's ``vae`` task (Ray Train +
DeepSpeed, the same checkpoint/resume/progress paths), then log q(x) for every dev/test
question and the checks of tasks/density.py, as a table artifact and ``density.json``."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import reporting
from tasks.steps import train_step
from tasks.storage import atomic_path, write_json_atomic

VAE_MODEL = dict(z_dim=16, hidden=(256, 256), likelihood="gaussian", samples=5, activation="tanh")
DENSITY_K = 500  # importance samples per question (the stage's estimate; stderr reported)


def _questions(cfg, split: str) -> list[dict]:
    from tasks.validation import labelled_rows
    if split == "train":
        return labelled_rows(cfg.out / "data", ["train"], cfg.holdout())
    return pq.read_table(cfg.out / "data" / f"{split}.parquet").to_pylist()


def density_stage(cfg, model_dir: str, vocab_dir: str, eval_name: str, eval_rows: list[dict],
                  max_src_len: int, ray_address: str | None, max_failures: int) -> dict:
    """Train the density VAE (cached by content) and score dev/test and corrupted questions."""
    import torch

    from models.metrics import normalize
    from models.vae import log_px
    from tasks.density import CORRUPTIONS, accuracy_by_decile, auroc, corrupt, pooled_encodings, write_encodings
    from tasks.train import TrainSpec, load_trained_model
    from tasks.vae_data import prepare_vae_data
    from tasks.vocab import load_vocab
    torch.manual_seed(cfg.seed)
    root = cfg.out / "density"
    gen, vocab = load_trained_model(model_dir), load_vocab(vocab_dir)

    def enc(qs: list[str]) -> np.ndarray:
        return pooled_encodings(gen, vocab, qs, max_src_len)

    train_q = [r["question"] for r in _questions(cfg, "train")]
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(train_q))
    n_val = max(1, len(train_q) // 10)
    x_train = enc([train_q[i] for i in order[n_val:]])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6  # standardised inputs; log q is up to this fixed Jacobian
    std = lambda x: ((x - mu) / sd).astype(np.float32)  # noqa: E731
    x_val = enc([train_q[i] for i in order[:n_val]])
    x_eval = enc([r["question"] for r in eval_rows])
    npz = root / "encodings.npz"
    write_encodings(npz, {"train": std(x_train), "valid": std(x_val), "test": std(x_eval)})
    data_m = prepare_vae_data(root / "data", source=npz, likelihood="gaussian", seed=cfg.seed)
    # A step cap, not a schedule: the VAE trains until its validation bound stops improving (at
    # 1,500 steps the tiny run's bound was still falling ~5 nats per 100 steps).
    steps = cfg.preset_values()["density_steps"]
    spec = TrainSpec(task="vae", data_dir=str((root / "data").resolve()), model=dict(VAE_MODEL), steps=steps,
                     micro_batch=128, lr=1e-3, warmup=50, zero_stage=cfg.preset_values()["zero_stage"],
                     num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, seed=cfg.seed, checkpoint_every=max(50, steps // 5),
                     val_every=max(50, steps // 15), patience=4)
    m = train_step.with_options(name="train-density")(asdict(spec), str((cfg.out / "ray").resolve()),
                                                     str(root / "model"), ray_address, max_failures)
    vae = load_trained_model(root / "model")

    def score(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        est, se = log_px(vae, torch.as_tensor(std(x)), K=DENSITY_K, seed=seed)
        return est.numpy(), se.numpy()

    lq_eval, se_eval = score(x_eval, 1)
    # correctness of each eval prediction (the object, as the official EM-O)
    preds = [json.loads(x) for x in (cfg.out / "eval" / f"{eval_name}_predict.json").read_text("utf-8").splitlines()]
    correct = np.array([normalize(p["answer"].split(" ||| ")[2]) == normalize(r["object"])
                        for p, r in zip(preds, eval_rows)])
    questions = [r["question"] for r in eval_rows]
    kb_objects = [line.split("\t")[2] for line in (cfg.out / "kb.txt").read_text("utf-8").splitlines()[:20000]
                  if line.count("\t") == 2] if (cfg.out / "kb.txt").is_file() else []
    alphabet = sorted({c for q in train_q for c in q})
    checks = []
    for i, kind in enumerate(CORRUPTIONS):
        if kind == "kb_objects" and not kb_objects:
            continue
        bad = corrupt(questions, kind, cfg.seed, alphabet=alphabet, other=kb_objects)
        lq_bad, _ = score(enc(bad), 2 + i)
        checks.append({"corruption": kind, "n": len(bad), "auroc": auroc(lq_eval, lq_bad),
                       "median_log_q_real": float(np.median(lq_eval)), "median_log_q_corrupted": float(np.median(lq_bad))})
    test_rows = pq.read_table(cfg.out / "data" / "test.parquet").to_pylist() if (cfg.out / "data" / "test.parquet").is_file() else []
    lq_test = score(enc([r["question"] for r in test_rows]), 9)[0] if test_rows else np.zeros(0)
    deciles = accuracy_by_decile(lq_eval, correct)
    table = pa.table({"split": [eval_name] * len(eval_rows) + ["test"] * len(test_rows),
                      "id": [int(r["id"]) for r in eval_rows] + [int(r["id"]) for r in test_rows],
                      "question": questions + [r["question"] for r in test_rows],
                      "log_q": np.concatenate([lq_eval, lq_test]),
                      "correct": [bool(c) for c in correct] + [None] * len(test_rows)})
    with atomic_path(cfg.out / "eval" / "density.parquet") as tmp:
        pq.write_table(table, tmp)
    per_split = [{"split": s, "n": int(len(v)), "mean_log_q": float(np.mean(v)), "p10": float(np.percentile(v, 10)),
                  "median": float(np.median(v)), "p90": float(np.percentile(v, 90))}
                 for s, v in ((eval_name, lq_eval), ("test", lq_test)) if len(v)]
    out = {"vae_run_name": m["run_name"], "vae_steps": m["steps"], "k": DENSITY_K,
           "mean_stderr": float(np.mean(se_eval)), "per_split": per_split, "auroc": checks, "deciles": deciles,
           "input_dim": int(x_train.shape[1]), "data_rows": data_m["files"]["prepared.npz"]["rows"]}
    write_json_atomic(root / "density.json", out)
    reporting.table("kgclue-density-auroc", checks, "AUROC: real questions vs corrupted ones, by log q(x)")
    reporting.table("kgclue-density-deciles", deciles, f"Answer accuracy per density decile of {eval_name}")
    reporting.table("kgclue-density-splits", per_split, "log q(x) of question encodings per split (nats)")
    return out
