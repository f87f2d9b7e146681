"""Distributed training: a Ray Train TorchTrainer whose workers run a DeepSpeed engine.

Every training task shares this path through a small adapter (tasks/adapters/): ``seq2seq``
(the KgCLUE generator), ``ranker`` (its re-ranker), and the tasks of later stages. The adapter
brings the model, rows and batches, and optional hooks: a custom gradient step, a validation
pass with early stopping, extra losses. Randomness a model owns is drawn from a generator
seeded by (seed, step), identical on every rank (:func:`step_generator`).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tasks.ray_runtime import ensure_ray  # noqa: F401  (re-exported: tasks.train.ensure_ray)
from tasks.replicas import replica_hashes
from tasks.train_budget import StepBudget
from tasks.train_progress import ProgressRouter, progress_actor

from tasks.model_dir import (MODEL_CONFIG, MODEL_FILE, load_trained_model, ranker_dir,  # noqa: F401 (re-exported)
                             trained_ranker_dirs, warm_start_weights)
PROGRESS_EVERY = 5  # steps per progress item: rank 0's tokens/s is measured over this window
_NOT_IDENTITY = ("data_dir", "vocab_dir", "warm_start", "fail_at_step", "fail_marker")  # paths / fault injection


@dataclass(frozen=True)
class TrainSpec:
    """Everything that defines a training run; its *content* is hashed into the run name.

    Paths are not identity: ``data_dir``, ``vocab_dir`` and ``warm_start`` enter the run name
    through the content their manifests record (each listed file's sha256), so the same
    ``--out`` with other data, another vocabulary or another start model is another run, and
    the same inputs anywhere are the same run. Inputs without a manifest (a corpus file) go
    in ``inputs_sha256``.
    """

    model: dict = field(default_factory=dict)  # the task's model config fields
    task: str = "seq2seq"         # a key of tasks.adapters.ADAPTERS
    data_dir: str = ""            # KgCLUE tasks: prepared data (tasks.kgclue_data output)
    vocab_dir: str = ""
    data: dict = field(default_factory=dict)   # the task's own data options (holdout, group, corpus, ...)
    inputs_sha256: dict = field(default_factory=dict)  # content hashes of inputs without a manifest
    warm_start: str = ""          # a trained model directory (with manifest) to start from
    steps: int = 200
    micro_batch: int = 32         # per worker
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.01
    zero_stage: int = 1
    num_workers: int = 2
    use_gpu: bool = False
    bf16: bool = False            # GPU: bf16 weights/activations through DeepSpeed
    cpu_bf16: bool = False        # CPU workers: bf16 autocast in the forward (fp32 weights and optimizer)
    seed: int = 0
    checkpoint_every: int = 50
    max_train_s: float = 0.0      # a budget for the training loop, seconds (0: off): tasks/train_budget.py
    val_every: int = 0            # run the task's validation pass every N steps (0: never)
    patience: int = 0             # early stopping after N validations without a new best (0: off)
    max_src_len: int = 64
    splits: tuple[str, ...] = ("train",)
    fail_at_step: int = -1        # fault injection (tests): raise at this step ...
    fail_marker: str = ""         # ... once: the first failure creates this file

    def __post_init__(self) -> None:
        from tasks.adapters import adapter
        mod = adapter(self.task)  # ValueError naming the tasks for an unknown one
        if hasattr(mod, "check_spec"):
            mod.check_spec(self)
        if not self.max_train_s >= 0:
            raise ValueError(f"max_train_s={self.max_train_s}: a number of seconds >= 0 (0: no budget)")
        if self.patience and not self.val_every:
            raise ValueError(f"patience={self.patience} needs val_every > 0 (a validation pass to stop on)")

    def _data_dirs(self) -> dict[str, str]:
        """Options in ``data`` that name a finished directory (a manifest): inputs, by content."""
        return {k: v for k, v in self.data.items()
                if isinstance(v, str) and v and (Path(v) / "manifest.json").is_file()}

    def content(self) -> dict:
        """The inputs' content: each manifest directory's file hashes (data_dir, vocab_dir,
        warm_start, and any ``data`` option naming one, e.g. a corpus), plus ``inputs_sha256``."""
        out = dict(self.inputs_sha256)
        for name in ("data_dir", "vocab_dir", "warm_start"):
            d = getattr(self, name)
            if d:
                out[name] = manifest_content_sha256(d)
        for k, d in self._data_dirs().items():
            out[f"data.{k}"] = manifest_content_sha256(d)
        return out

    def run_name(self) -> str:
        body = {k: v for k, v in asdict(self).items() if k not in _NOT_IDENTITY}
        body["data"] = {k: v for k, v in self.data.items() if k not in self._data_dirs()}  # paths: by content
        body["content"] = self.content()
        return f"{self.task}-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    def accelerator(self) -> tuple[str, str]:
        """(DeepSpeed accelerator, torch.distributed backend) the workers use."""
        return ("cuda", "nccl") if self.use_gpu else ("cpu", "gloo")

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


def manifest_content_sha256(directory: str | Path) -> str:
    """One hash of what a finished directory holds: its manifest's (name, sha256) pairs.

    The manifest's sha256 values were computed from the files when they were written; reading
    them here trusts the manifest (``read_manifest`` checks sizes, not hashes)."""
    from tasks.storage import read_manifest
    files = read_manifest(directory)["files"]
    pairs = sorted((name, e["sha256"]) for name, e in files.items())
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


# --------------------------------------------------------------------------- data
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
def step_generator(seed: int, step: int):
    """The model-owned randomness of ``step``: the same torch.Generator on every rank."""
    import torch
    state = np.random.SeedSequence([seed, step, 0x5EED]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def call_hooks(model, name: str, *args) -> None:
    """Call ``name(*args)`` on every submodule that defines it (models.attention's interface)."""
    for m in model.modules():
        fn = getattr(m, name, None)
        if callable(fn):
            fn(*args)


def _all_reduce(world: int):
    import torch.distributed as dist

    def reduce(t):
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t
    return reduce


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    accel = config.get("accelerator", "cpu")
    os.environ["DS_ACCELERATOR"] = accel  # before DeepSpeed picks its accelerator
    import deepspeed
    import ray.train
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from tasks.adapters import adapter, split_loss
    if get_accelerator().device_name() != accel:  # a process that imported DeepSpeed earlier
        import deepspeed.accelerator.real_accelerator as ra
        ra.ds_accelerator = None
        if get_accelerator().device_name() != accel:
            raise RuntimeError(f"DeepSpeed accelerator is {get_accelerator().device_name()!r}, expected {accel!r}")

    spec = TrainSpec(**{**config["spec"], "splits": tuple(config["spec"]["splits"])})
    sink = config.get("sink")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if sink is not None:  # where each rank runs (multi-node placement, shown by the driver)
        sink.push.remote({"event": "worker-start", "rank": rank, "world": world, "pid": os.getpid(),
                          "node_id": ray.get_runtime_context().get_node_id(), "accelerator": accel})
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    if not spec.use_gpu:
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    task = adapter(spec.task)
    setup = task.setup(spec, device, rank)
    model = setup.model
    exported = setup.export(model) if setup.export else model
    ckpt = ray.train.get_checkpoint()
    if spec.warm_start and not ckpt:
        warm_start_weights(exported, spec.warm_start)
    autocast = bool(spec.cpu_bf16 and not spec.use_gpu)
    loss_fn = setup.loss_fn or (lambda m, b: split_loss(m.loss(b)))

    class WithLoss(torch.nn.Module):  # the engine's forward must return the loss
        def __init__(self, m):
            super().__init__()
            self.model = m
            self.parts: dict = {}

        def forward(self, batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, self.parts = loss_fn(self.model, batch)
                return loss

    opt = make_optimizer(model.parameters(), spec)
    warm = max(1, spec.warmup)
    plan = StepBudget(spec.max_train_s, spec.steps, spec.steps)  # the planned step count; the LR decays to it
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / max(1, plan.total)))
    wrapped = WithLoss(model)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=opt, lr_scheduler=sched,
                                           config=spec.ds_config())
    engine.checkpoint_engine = safe_checkpoint_engine(TorchCheckpointEngine)()
    start, val = 0, {"best": float("inf"), "best_step": 0, "bad": 0, "history": []}
    best_sd = None
    if ckpt:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="state")
            if (Path(d) / BEST_FILE).is_file():
                best_sd = torch.load(Path(d) / BEST_FILE, map_location="cpu", weights_only=True)
        start = int(client["step"])
        val = client.get("val", val)
        plan = StepBudget.resume(spec.max_train_s, spec.steps, client.get("budget"))
        if sink is not None and rank == 0:  # the driver reports where training goes on from
            sink.push.remote({"event": "resume", "step": start})
    reduce = _all_reduce(world)
    global_batch = spec.micro_batch * world
    t_last, tok_last, losses = time.perf_counter(), 0, []
    t_start = t_last
    parts_log: dict[str, list[float]] = {}
    stop = False
    done = start
    for step in range(start, spec.steps):
        if step >= plan.total:
            break
        if step == spec.fail_at_step and spec.fail_marker and not os.path.exists(spec.fail_marker):
            Path(spec.fail_marker).touch()
            raise RuntimeError(f"injected failure at step {step} (fail_at_step)")
        call_hooks(model, "train_step_begin", step, step_generator(spec.seed, step))
        torch.manual_seed(hash((spec.seed, step, rank)) & 0x7FFFFFFF)  # dropout stream per (step, rank)
        rows = batch_indices(setup.n_rows, step, global_batch, spec.seed, rank, world)
        batch, n_tokens = setup.make_batch(rows, step)
        if setup.grad_step is not None:
            loss, parts = setup.grad_step(engine, model, batch, step)
        else:
            loss = engine(batch)
            engine.backward(loss)
            parts = wrapped.parts
        engine.step()
        call_hooks(model, "train_step_end", step, step_generator(spec.seed, step), reduce)
        losses.append(float(loss.detach()))
        for k, v in parts.items():
            parts_log.setdefault(k, []).append(float(v))
        tok_last += n_tokens * world
        done = step + 1
        if plan.due(done):
            plan.replan(done, start, time.perf_counter() - t_start, rank, reduce)
        total = plan.total
        if setup.validate is not None and spec.val_every and (done % spec.val_every == 0 or done == total):
            t_val = time.perf_counter()
            model.eval()
            with torch.no_grad():
                v = {k: float(x) for k, x in setup.validate(model).items()}
            model.train()
            plan.last_val_s = time.perf_counter() - t_val
            val["history"].append({"step": done, **v})
            if v["val_loss"] < val["best"]:
                val.update(best=v["val_loss"], best_step=done, bad=0)
                best_sd = {k: t.detach().float().cpu().clone() for k, t in exported.state_dict().items()}
            else:
                val["bad"] += 1
            if sink is not None and rank == 0:
                sink.push.remote({"event": "validation", "step": done, **v, "best_step": val["best_step"]})
            stop = bool(spec.patience and val["bad"] >= spec.patience)
        if sink is not None and rank == 0 and (done % PROGRESS_EVERY == 0 or done == total or stop):
            now = time.perf_counter()
            rate = tok_last / max(1e-9, now - t_last)
            item = {"step": done, "steps": total, "loss": float(np.mean(losses[-PROGRESS_EVERY:])),
                    "tokens_per_s": rate, "lr": sched.get_last_lr()[0],
                    "eta_s": (total - done) * (now - t_start) / max(1, done - start)}
            item.update({k: float(np.mean(v[-PROGRESS_EVERY:])) for k, v in parts_log.items()})
            sink.push.remote(item)
            t_last, tok_last = now, 0
        if done % spec.checkpoint_every == 0 or done == total or stop:
            t_ck = time.perf_counter()
            _checkpoint(engine, spec, exported if setup.export else None, model, rank, done, losses, val, best_sd,
                        lambda: plan.state(time.perf_counter() - t_start))
            plan.last_ckpt_s = time.perf_counter() - t_ck
        if stop:
            break


BEST_FILE = "best.pt"


def _checkpoint(engine, spec: TrainSpec, part, model, rank: int, done: int, losses: list[float], val: dict,
                best_sd, budget: Callable[[], dict]) -> None:
    """Save the engine's state (every rank: its shard) and, on rank 0, the exported model
    (``part``: the adapter's export of the model, None for the whole model). ``budget()``: the
    step plan and the loop's seconds so far (tasks/train_budget.py), kept and reported."""
    import ray.train
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="state", client_state={"step": done, "val": val, "budget": budget()})
        if part is not None:
            export = part.state_dict()
        elif spec.zero_stage == 3:
            export = engine._zero3_consolidated_16bit_state_dict()
        else:
            export = engine.module.state_dict()
        if rank == 0:
            sd = {k.removeprefix("model."): v.detach().float().cpu() for k, v in export.items()}
            if best_sd is not None:
                torch.save(best_sd, Path(tmp) / BEST_FILE)
            torch.save(best_sd if best_sd is not None else sd, Path(tmp) / MODEL_FILE)
            cfg = (part if part is not None else model).cfg.to_dict()
            (Path(tmp) / MODEL_CONFIG).write_text(json.dumps(cfg))
            if val["history"]:
                (Path(tmp) / "validation.json").write_text(json.dumps(val))
        ray.train.report({"step": done, "loss": float(np.mean(losses[-10:])), **budget(),
                          "replica_sha256": replica_hashes(engine.module if spec.zero_stage < 3 else None)},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


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
    validations: list[dict] = field(default_factory=list)  # the validation passes, in order
    replica_sha256: list[str] = field(default_factory=list)  # every rank's state hash at the last checkpoint
    loop_s: float = 0.0  # the training loop's seconds (steps, validations, checkpoints; all attempts), no start-up


def make_optimizer(params, spec: TrainSpec):
    """The client optimizer DeepSpeed wraps: torch AdamW, its fused kernel (one pass over each
    tensor). Under ZeRO-1/2 DeepSpeed hands it one flat fp32 partition; on a 1.1M-element tensor
    the default CPU loop took 5.0 ms per step on one thread of an AVX2 EPYC and the fused kernel
    0.97 ms (``python -m bench.optimizer_step``, bench/results/optimizer-step.json)."""
    import torch
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=True)


def train(spec: TrainSpec, storage: str, ray_address: str | None = None, max_failures: int = 2,
          on_progress: Callable[[dict], None] | None = None, poll_s: float = 2.0,
          progress: str = "latest") -> TrainResult:
    """Fit (or resume) the run; return where its last checkpoint is.

    ``on_progress`` gets every validation and resume item (``{"event": "resume", "step": N}``
    when a worker group restarts from its checkpoint at step N) and, per poll of ``poll_s``, the newest step
    item (``progress="latest"``) or every step item the workers pushed (``"every"``: one per
    5 steps, which costs a fast training on a small machine ~20% through Prefect logging)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    router = ProgressRouter(on_progress, progress)  # refuses a bad mode before Ray starts
    ensure_ray(ray_address)
    sink = progress_actor()
    cpus = max(1, (os.cpu_count() or 2) // spec.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": asdict(spec), "sink": sink, "threads_per_worker": cpus,
                           "accelerator": spec.accelerator()[0]},
        torch_config=TorchConfig(backend=spec.accelerator()[1]),
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
    while True:
        alive = th.is_alive()
        router.route(ray.get(sink.drain.remote()))
        if not alive:
            break
        th.join(poll_s)
    if "error" in box:
        raise box["error"]
    result = box["result"]
    if result.checkpoint is None:
        raise RuntimeError(f"run {spec.run_name()} finished without a checkpoint")
    history = router.history
    rates = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    return TrainResult(spec.run_name(), result.checkpoint.path,
                       int(result.metrics.get("step", spec.steps)) if result.metrics else spec.steps,
                       float(result.metrics.get("loss", float("nan"))) if result.metrics else float("nan"),
                       float(np.median(rates)) if rates else 0.0, time.perf_counter() - t0, history,
                       router.placements, router.validations, list((result.metrics or {}).get("replica_sha256") or []),
                       float((result.metrics or {}).get("loop_s", 0.0)))
