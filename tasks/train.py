"""Distributed training: a Ray Train TorchTrainer whose workers run a DeepSpeed engine.

Two tasks share this path: ``seq2seq`` (the generator, models/seq2seq.py) and ``ranker``
(the candidate re-ranker, models/ranker.py, on groups from tasks/ranker_data.py).

* Same code on a laptop (``ray.init()`` local, CPU workers, gloo, fp32) and on a cluster
  (``ray_address``, GPU workers, NCCL, bf16); the ZeRO stage comes from the config.
* Checkpoint every ``checkpoint_every`` steps through ``ray.train.report``; on start each
  worker loads ``ray.train.get_checkpoint()`` (model, optimizer, scheduler, step). Batch
  order and dropout are pure functions of (seed, step, rank), so a resumed run continues
  exactly where the checkpoint was taken.
* The run name is a hash of everything that defines the result, so a Prefect retry (or a
  re-run) of the same config finds the run's storage and resumes instead of restarting.
* Checkpoints load with ``weights_only=True`` (allow-listing the three DeepSpeed classes
  its ZeRO checkpoints hold), never with arbitrary unpickling.
* Rank 0 streams progress (step, loss, tokens/s, ETA) to a Ray actor the driver polls, so
  the Prefect task (not a worker log) shows it live.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tasks.ray_runtime import ensure_ray  # noqa: F401  (re-exported: tasks.train.ensure_ray)

MODEL_FILE, MODEL_CONFIG = "model.pt", "model_config.json"
TASKS = ("seq2seq", "ranker")
_LATER_FIELDS = ("task", "group", "cpu_bf16")  # left out of the run name at their defaults


@dataclass(frozen=True)
class TrainSpec:
    """Everything that defines a training run (hashed into the run name)."""

    data_dir: str                 # prepared data (tasks.kgclue_data output)
    vocab_dir: str
    model: dict                   # Seq2SeqConfig fields
    steps: int = 200
    micro_batch: int = 32         # per worker
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.01
    zero_stage: int = 1
    num_workers: int = 2
    use_gpu: bool = False
    bf16: bool = False            # GPU only; CPU trains in fp32
    seed: int = 0
    checkpoint_every: int = 50
    max_src_len: int = 64
    splits: tuple[str, ...] = ("train",)
    fail_at_step: int = -1        # fault injection (tests): raise at this step ...
    fail_marker: str = ""         # ... once: the first failure creates this file
    task: str = "seq2seq"         # "seq2seq" (the generator) or "ranker" (the re-ranker)
    group: int = 8                # ranker: candidates per question (the gold + group-1 negatives)
    cpu_bf16: bool = False        # CPU workers: bf16 autocast in the forward (fp32 weights and optimizer)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"TrainSpec.task {self.task!r}: choose one of {TASKS}")
        if self.task == "ranker" and self.group < 2:
            raise ValueError(f"TrainSpec.group {self.group}: the ranker needs the gold and at least one negative")

    def run_name(self) -> str:
        defaults = {f.name: f.default for f in fields(self)}
        body = {k: v for k, v in asdict(self).items() if k not in ("fail_at_step", "fail_marker")
                and not (k in _LATER_FIELDS and v == defaults[k])}  # older run names stay valid
        return f"{self.task}-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    def ds_config(self) -> dict:
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.micro_batch * self.num_workers,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": bool(self.use_gpu and self.bf16)},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }


# --------------------------------------------------------------------------- data
def load_pairs(data_dir: str, vocab_dir: str, splits: tuple[str, ...], max_src_len: int):
    """Token ids of (question, key) pairs: key = BOS S SEP P SEP M EOS."""
    import pyarrow.parquet as pq

    from models.vocab import BOS, EOS, SEP
    from tasks.vocab import load_vocab
    vocab = load_vocab(vocab_dir)
    src, tgt = [], []
    for split in splits:
        for r in pq.read_table(Path(data_dir) / f"{split}.parquet").to_pylist():
            if r["subject"] is None:
                continue
            src.append(vocab.encode(r["question"])[:max_src_len] or [SEP])
            tgt.append([BOS, *vocab.encode(r["subject"]), SEP, *vocab.encode(r["predicate"]), SEP,
                        *vocab.encode(r["disambiguation"]), EOS])
    return src, tgt, len(vocab)


def batch_indices(n: int, step: int, global_batch: int, seed: int, rank: int, world: int) -> np.ndarray:
    """This rank's rows for ``step``: epochs are seeded permutations, so any step is reproducible."""
    per_epoch = max(1, n // global_batch)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    rows = perm[k * global_batch:(k + 1) * global_batch]
    return rows[rank::world]


# --------------------------------------------------------------------------- checkpoint I/O
def safe_checkpoint_engine(base_cls):
    """A DeepSpeed checkpoint engine that loads with ``weights_only=True``."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    allowed = [ZeroStageEnum, LossScaler, fragment_address]

    class SafeTorchCheckpointEngine(base_cls):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine


# --------------------------------------------------------------------------- worker
def _task_setup(spec: TrainSpec, device, rank: int):
    """(model, training rows, batch maker(rows, step) -> (batch, tokens)) of the spec's task."""
    import torch
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    if spec.task == "ranker":
        from models.ranker import Ranker, RankerConfig, make_ranker_batch
        from tasks.ranker_data import load_ranker_data
        data = load_ranker_data(spec.data_dir, spec.vocab_dir, spec.splits, max_src_len=spec.max_src_len)
        model = Ranker(RankerConfig(**{**spec.model, "vocab_size": len(data.vocab)}))

        def ranker_batch(rows, step):
            rng = np.random.default_rng([spec.seed, step, rank])  # negatives: a function of (seed, step, rank)
            batch = make_ranker_batch([c for i in rows for c in data.group(int(i), spec.group, rng)],
                                      spec.group, device)
            return batch, int(batch["mask"].sum())
        return model, len(data), ranker_batch
    from models.seq2seq import Seq2Seq, Seq2SeqConfig, make_batch
    src, tgt, vocab_size = load_pairs(spec.data_dir, spec.vocab_dir, spec.splits, spec.max_src_len)
    model = Seq2Seq(Seq2SeqConfig(**{**spec.model, "vocab_size": vocab_size}))

    def seq2seq_batch(rows, step):
        batch = make_batch([src[i] for i in rows], [tgt[i] for i in rows], device)
        return batch, int((batch["tgt_ids"] != 0).sum() + batch["src_mask"].sum())
    return model, len(src), seq2seq_batch


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed
    import ray.train
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    spec = TrainSpec(**{**config["spec"], "splits": tuple(config["spec"]["splits"])})
    sink = config.get("sink")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if sink is not None:  # where each rank runs (multi-node placement, shown by the driver)
        sink.push.remote({"event": "worker-start", "rank": rank, "world": world, "pid": os.getpid(),
                          "node_id": ray.get_runtime_context().get_node_id()})
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    if not spec.use_gpu:
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    model, n_rows, make_step_batch = _task_setup(spec, device, rank)
    autocast = bool(spec.cpu_bf16 and not spec.use_gpu)

    class WithLoss(torch.nn.Module):  # the engine's forward must return the loss
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return self.model.loss(batch)

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    total, warm = spec.steps, max(1, spec.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / max(1, total)))
    engine, _, _, _ = deepspeed.initialize(model=WithLoss(model), optimizer=opt, lr_scheduler=sched,
                                           config=spec.ds_config())
    engine.checkpoint_engine = safe_checkpoint_engine(TorchCheckpointEngine)()
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="state")
        start = int(client["step"])
    global_batch = spec.micro_batch * world
    t_last, tok_last, losses = time.perf_counter(), 0, []
    t_start = t_last
    for step in range(start, total):
        if step == spec.fail_at_step and spec.fail_marker and not os.path.exists(spec.fail_marker):
            Path(spec.fail_marker).touch()
            raise RuntimeError(f"injected failure at step {step} (fail_at_step)")
        torch.manual_seed(hash((spec.seed, step, rank)) & 0x7FFFFFFF)  # dropout stream per (step, rank)
        rows = batch_indices(n_rows, step, global_batch, spec.seed, rank, world)
        batch, n_tokens = make_step_batch(rows, step)
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        tok_last += n_tokens * world
        done = step + 1
        if sink is not None and rank == 0 and (done % 5 == 0 or done == total):
            now = time.perf_counter()
            rate = tok_last / max(1e-9, now - t_last)
            sink.push.remote({"step": done, "steps": total, "loss": float(np.mean(losses[-5:])),
                              "tokens_per_s": rate, "lr": sched.get_last_lr()[0],
                              "eta_s": (total - done) * (now - t_start) / max(1, done - start)})
            t_last, tok_last = now, 0
        if done % spec.checkpoint_every == 0 or done == total:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag="state", client_state={"step": done})
                export = (engine._zero3_consolidated_16bit_state_dict() if spec.zero_stage == 3
                          else engine.module.state_dict())
                if rank == 0:
                    sd = {k.removeprefix("model."): v.detach().float().cpu() for k, v in export.items()}
                    torch.save(sd, Path(tmp) / MODEL_FILE)
                    (Path(tmp) / MODEL_CONFIG).write_text(json.dumps(model.cfg.to_dict()))
                ray.train.report({"step": done, "loss": float(np.mean(losses[-10:]))},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp))


# --------------------------------------------------------------------------- driver
def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressSink:
        def __init__(self):
            self.items: list[dict] = []

        def push(self, item: dict) -> None:
            self.items.append(item)

        def drain(self) -> list[dict]:
            out, self.items = self.items, []
            return out

    return ProgressSink.remote()


@dataclass
class TrainResult:
    run_name: str
    checkpoint_dir: str
    steps: int
    final_loss: float
    tokens_per_s: float
    wall_s: float
    history: list[dict] = field(default_factory=list)
    placements: list[dict] = field(default_factory=list)  # one "worker-start" per (re)started rank


def train(spec: TrainSpec, storage: str, ray_address: str | None = None, max_failures: int = 2,
          on_progress: Callable[[dict], None] | None = None, poll_s: float = 2.0) -> TrainResult:
    """Fit (or resume) the run; return where its last checkpoint is."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(ray_address)
    sink = _progress_actor()
    cpus = max(1, (os.cpu_count() or 2) // spec.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": asdict(spec), "sink": sink, "threads_per_worker": cpus},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                               resources_per_worker=None if spec.use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=spec.run_name(), storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    th.start()
    history: list[dict] = []
    placements: list[dict] = []
    while True:
        alive = th.is_alive()
        for item in ray.get(sink.drain.remote()):
            if item.get("event") == "worker-start":
                placements.append(item)
                continue
            history.append(item)
            if on_progress:
                on_progress(item)
        if not alive:
            break
        th.join(poll_s)
    if "error" in box:
        raise box["error"]
    result = box["result"]
    if result.checkpoint is None:
        raise RuntimeError(f"run {spec.run_name()} finished without a checkpoint")
    rates = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    return TrainResult(spec.run_name(), result.checkpoint.path, spec.steps,
                       float(result.metrics.get("loss", float("nan"))) if result.metrics else float("nan"),
                       float(np.median(rates)) if rates else 0.0, time.perf_counter() - t0, history,
                       placements)


def ranker_dir(run_dir: str | Path, member: int) -> Path:
    """Where a run keeps re-ranker ``member`` of its ensemble (``ranker``, ``ranker-1``, ...)."""
    return Path(run_dir) / ("ranker" if member == 0 else f"ranker-{member}")


def trained_ranker_dirs(run_dir: str | Path) -> list[Path]:
    """The re-rankers a run has finished, in member order (stops at the first one missing)."""
    out: list[Path] = []
    while (ranker_dir(run_dir, len(out)) / "manifest.json").is_file():
        out.append(ranker_dir(run_dir, len(out)))
    return out


def load_trained_model(checkpoint_dir: str | Path):
    """The exported model of a checkpoint (``weights_only=True``), in eval mode: a Seq2Seq, or a
    Ranker when its config says ``kind: ranker``."""
    import torch

    d = Path(checkpoint_dir)
    raw = json.loads((d / MODEL_CONFIG).read_text())
    if raw.get("kind") == "ranker":
        from models.ranker import Ranker, RankerConfig
        model = Ranker(RankerConfig(**raw))
    else:
        from models.seq2seq import Seq2Seq, Seq2SeqConfig
        model = Seq2Seq(Seq2SeqConfig(**raw))
    model.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval()
