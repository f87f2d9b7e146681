"""Trainer adapter ``multitask``: fine-tune the trained generator with auxiliary tasks.

The primary task is the generator's seq2seq loss; the auxiliary tasks (``spec.data["aux"]``,
models/multitask_heads.py) are ``subject_tags``, ``predicate_match`` and ``input_grad``. Each
step, :func:`grad_step` computes every task's gradient on the *shared* parameters — the
generator parameters an enabled auxiliary task reaches: embeddings + encoder + ``ln_enc`` for
the tagger and the matcher, the whole generator once ``input_grad`` (whose f is the seq2seq
loss itself) is on — and combines them by ``spec.data["method"]`` (models/multitask.py,
ALGORITHMS.md §4). The primary-only parameters (decoder side) get the primary gradient; each
head gets its own task's gradient. Every gradient is all-reduced (mean over ranks) *before* the
Gram matrix, so all ranks solve the same small problem on the gradients of the global batch
and write the same direction (PCGrad's order is seeded by the step). The exported model is the
plain generator (kind ``seq2seq``), loaded back by the seq2seq adapter; ``spec.warm_start``
(the trained generator's directory) is loaded into it before training.

spec.data: {"method": one of models.multitask.METHODS (default "primary_aux"),
"aux": list of models.multitask_heads.AUX_TASKS, "weights" (one per aux) or "aux_weight"
(for weighted_sum), "holdout": {...} (tasks/validation.py: the validation slice stays out of
training and ``validate`` scores on it), "input_grad_scale" (default 1.0), "n_neg" look-alike
predicates per question (default 3), "trace_dir" (optional: every rank appends one JSON line per
step with a sha256 of its direction, λ and ⟨u, g_i⟩ — for tests and the benchmark)}.

DeepSpeed (pinned 0.19.8) — which ZeRO stages apply a custom gradient:

* **Stage 0 works, and is the only stage accepted.** With a client torch optimizer and fp32,
  ``engine.optimizer`` *is* the torch AdamW: ``_configure_optimizer`` wraps it only for ZeRO or
  fp16/bf16 (engine.py:2358-2366, ``self.optimizer = basic_optimizer``). ``engine.step()`` in the
  default managed-accumulation mode does not reduce (engine.py:3599-3603 calls
  ``allreduce_gradients`` only with ``managed_gradient_accumulation=false``); with
  gradient_accumulation_steps 1 every step is a boundary and ``_take_model_step``
  (engine.py:3505-3516) clips with ``clip_fp32_gradients`` (engine.py:3511: the config's
  gradient_clipping 1.0, one global norm over all of the module's ``.grad``; the norm is averaged
  over ranks, runtime/utils.py:413-419 — the same value here, since every rank holds the same
  gradients), calls ``optimizer.step()`` on ``.grad`` as is (engine.py:3516) and clears ``.grad``
  (``zero_grad``, engine.py:3495). The engine's own all-reduce lives only in ``engine.backward`` →
  ``_backward_epilogue`` → ``allreduce_gradients`` (engine.py:3165, 3073-3095
  ``buffered_allreduce_fallback``), which this path never calls: the reduction is done here,
  before the Gram matrix (and a second mean of identical tensors would be exact anyway).
  Clipping rescales the whole gradient vector uniformly, so the combined direction is kept
  (only its length changes when the global norm exceeds 1). tests/test_train_multitask.py
  checks that the applied update is exactly AdamW on the clipped direction.
* **Stages 1 and 2 do not**: both use ``DeepSpeedZeroOptimizer`` (runtime/zero/stage_1_and_2.py),
  which takes the gradients *during* ``engine.backward``: grad-accumulation hooks
  (``create_gradient_handling_hooks``, stage_1_and_2.py:1354-1379) and ``reduce_gradients`` /
  ``independent_gradient_partition_epilogue`` (stage_1_and_2.py:958-1050) reduce ``.grad`` into
  its flat partitioned ``averaged_gradients``; ``step()`` (stage_1_and_2.py:3013, 3106-3126)
  builds the fp32 partition's gradient from ``averaged_gradients`` alone
  (``flatten(self.averaged_gradients[i])`` → ``single_partition_of_fp32_groups[i].grad``). A
  direction written into ``.grad`` after backward is never read. Stage 3 partitions the
  parameters themselves (no full ``.grad`` to write). Hence :func:`check_spec` refuses
  ``zero_stage`` ≠ 0, and bf16 (its BF16 optimizer wrapper also keeps its own gradient
  buffers). The surrogate-loss route — ``engine.backward(Σ⟨stopgrad(u), θ⟩)``, whose gradient is
  u on every rank, so the engine's own reduction/partitioning applies it unchanged — would carry
  this to stages 1-2; it is not implemented.

AdamW and the "never hurts" guarantee: the rule guarantees ⟨u, g_i⟩ ≥ 0 for the *direction* u,
i.e. no auxiliary loss rises to first order under SGD (Δθ = −ηu). AdamW applies
Δθ = −η(m̂/(√v̂+ε) + wd·θ): a per-coordinate rescaling (plus momentum and decoupled decay), so
⟨Δθ, g_i⟩ ≤ 0 is no longer implied. tests/test_train_multitask.py and bench/multitask.py
measure it (the inner product of the applied update with each g_i, and the auxiliary losses).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

KINDS = ()  # the exported model is a plain Seq2Seq (kind seq2seq): the seq2seq adapter loads it
SUPPORTED_ZERO_STAGES = (0,)


def _options(data: dict) -> dict:
    """spec.data with defaults, validated (ValueError naming the field)."""
    from models.multitask import METHODS
    from models.multitask_heads import AUX_TASKS
    method = data.get("method", "primary_aux")
    if method not in METHODS:
        raise ValueError(f"multitask method {method!r}: choose one of {METHODS}")
    aux = list(data.get("aux", ["subject_tags", "predicate_match"]))
    bad = [a for a in aux if a not in AUX_TASKS]
    if bad or len(set(aux)) != len(aux):
        raise ValueError(f"multitask aux {aux}: give distinct tasks among {AUX_TASKS}")
    weights = data.get("weights")
    if weights is None:
        weights = [float(data.get("aux_weight", 1.0))] * len(aux)
    if len(weights) != len(aux):
        raise ValueError(f"multitask weights {weights}: one per auxiliary task {aux}")
    trace_dir = data.get("trace_dir") or ""
    if trace_dir and not Path(trace_dir).is_absolute():
        raise ValueError(f"multitask trace_dir {trace_dir!r} is relative: Ray Train workers run in their own "
                         f"working directory, so the trace would land there; give an absolute path")
    return {"method": method, "aux": aux, "weights": [float(w) for w in weights],
            "input_grad_scale": float(data.get("input_grad_scale", 1.0)), "n_neg": int(data.get("n_neg", 3)),
            "trace_dir": trace_dir, "holdout": data.get("holdout")}


def check_spec(spec) -> None:
    """Refuse what this adapter cannot train (ValueError with the reason)."""
    if not spec.data_dir or not spec.vocab_dir:
        raise ValueError("task multitask needs data_dir (prepared KgCLUE data) and vocab_dir")
    if not spec.warm_start:
        raise ValueError("task multitask fine-tunes a trained generator: set warm_start to its model directory")
    if spec.zero_stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(
            f"task multitask cannot run ZeRO stage {spec.zero_stage}: at stages 1-2 DeepSpeed's "
            f"DeepSpeedZeroOptimizer takes the gradients inside engine.backward into its own partitioned "
            f"buffers, so the combined direction written into .grad would be ignored by engine.step() "
            f"(stage 3 also partitions the parameters); use zero_stage=0")
    if spec.bf16 or spec.cpu_bf16:
        raise ValueError("task multitask runs in fp32: bf16 wraps the optimizer in DeepSpeed's BF16 optimizer "
                         "(its own gradient buffers, the direction would be ignored) and cpu_bf16 is not "
                         "applied by its gradient step; set bf16=False, cpu_bf16=False")
    if spec.data.get("n_neg", 3) < 1:
        raise ValueError("multitask n_neg must be >= 1 (look-alike predicates per question)")
    _options(spec.data)


# ----------------------------------------------------------------------------- data

def load_rows(spec) -> tuple[list, list, list[dict], object]:
    """(src ids, key ids, the rows they came from, vocab) of the training rows (holdout applied)."""
    from tasks.adapters.seq2seq import load_pairs
    from tasks.validation import labelled_rows
    from tasks.vocab import load_vocab
    holdout = spec.data.get("holdout")
    src, tgt, _ = load_pairs(spec.data_dir, spec.vocab_dir, spec.splits, spec.max_src_len, holdout)
    rows = labelled_rows(spec.data_dir, spec.splits, holdout)  # the same rows, in load_pairs' order
    if len(rows) != len(src):
        raise RuntimeError(f"{len(rows)} rows but {len(src)} pairs: labelled_rows and load_pairs disagree")
    return src, tgt, rows, load_vocab(spec.vocab_dir)


def aux_batch(rows: list[dict], src: list[list[int]], tags, matching, vocab, n_neg: int,
              rng: np.random.Generator, device) -> dict:
    """The auxiliary tensors of one batch: subject tags (aligned with the padded source) and
    question ↔ predicate pairs (gold + up to ``n_neg`` look-alikes per row)."""
    import torch

    from models.seq2seq import make_batch
    from models.vocab import SEP
    width = max(len(s) for s in src)
    t = torch.zeros(len(src), width)
    m = torch.zeros(len(src), width, dtype=torch.bool)
    if tags is not None:
        for b, tg in enumerate(tags):
            if tg is not None:
                k = min(len(tg), len(src[b]))
                t[b, :k] = torch.tensor(tg[:k], dtype=torch.float32)
                m[b, :k] = True
    out = {"tags": t.to(device), "tag_mask": m.to(device)}
    pairs_row, preds, labels = [], [], []
    if matching is not None:
        for b, i in enumerate(rows):
            for _q, p, y in matching.pairs(i, n_neg, rng):
                pairs_row.append(b)
                preds.append(vocab.encode(p) or [SEP])
                labels.append(y)
    if preds:
        pb = make_batch(preds, None, device)
        out.update(pred_ids=pb["src_ids"], pred_mask=pb["src_mask"])
    else:
        out.update(pred_ids=torch.zeros(0, 1, dtype=torch.long, device=device),
                   pred_mask=torch.zeros(0, 1, dtype=torch.bool, device=device))
    out["pair_row"] = torch.tensor(pairs_row, dtype=torch.long, device=device)
    out["pair_label"] = torch.tensor(labels, dtype=torch.float32, device=device)
    return out


# ----------------------------------------------------------------------------- setup

def setup(spec, device, rank: int):
    """The wrapper model (generator + heads), its batches, the custom gradient step,
    validation on the held-out slice and the export of the generator alone."""
    import torch

    from models.multitask_heads import MultiTaskModel
    from models.seq2seq import Seq2Seq, Seq2SeqConfig, make_batch
    from tasks.adapters import TaskSetup
    from tasks.aux_tasks import build_predicate_matching, build_subject_tagging
    opts = _options(spec.data)
    src, tgt, rows, vocab = load_rows(spec)
    tags = build_subject_tagging(rows).tags if "subject_tags" in opts["aux"] else None
    matching = build_predicate_matching(rows) if "predicate_match" in opts["aux"] else None
    torch.manual_seed(spec.seed)  # identical heads on every rank (the generator is warm-started)
    gen = Seq2Seq(Seq2SeqConfig(**{**spec.model, "vocab_size": len(vocab)}))
    model = MultiTaskModel(gen, opts["aux"])

    def batch(idx, step):
        idx = [int(i) for i in idx]
        b = make_batch([src[i] for i in idx], [tgt[i] for i in idx], device)
        rng = np.random.default_rng([spec.seed, step, rank])  # negatives: a function of (seed, step, rank)
        b.update(aux_batch(idx, [src[i] for i in idx], None if tags is None else [tags[i] for i in idx],
                           matching, vocab, opts["n_neg"], rng, device))
        return b, int((b["tgt_ids"] != 0).sum() + b["src_mask"].sum())

    return TaskSetup(model=model, n_rows=len(src), make_batch=batch,
                     grad_step=make_grad_step(opts, rank), validate=make_validate(spec, device),
                     export=lambda m: m.generator)


def make_validate(spec, device):
    """Teacher-forced primary loss on the validation slice (None without holdout/val_every)."""
    holdout = spec.data.get("holdout")
    if not (spec.val_every and holdout):
        return None
    from models.seq2seq import make_batch
    from tasks.adapters.seq2seq import load_pairs
    from tasks.validation import VAL
    vsrc, vtgt, _ = load_pairs(spec.data_dir, spec.vocab_dir, (VAL,), spec.max_src_len, holdout)
    n_val = min(len(vsrc), int(spec.data.get("val_rows", 256)))

    def validate(m):
        total, weight = 0.0, 0
        for a in range(0, n_val, 64):
            b = make_batch(vsrc[a:min(a + 64, n_val)], vtgt[a:min(a + 64, n_val)], device)
            out = m.generator.loss(b)
            loss = out[0] if isinstance(out, tuple) else out
            n = int((b["tgt_ids"][:, 1:] != 0).sum())
            total, weight = total + float(loss) * n, weight + n
        return {"val_loss": total / max(1, weight)}
    return validate


# ----------------------------------------------------------------------------- the gradient step

def _flat_grads(loss, params: list):
    """∂loss/∂params flattened into one (P,) fp32 vector (zeros where a parameter is unreached)."""
    import torch
    if not params:
        return torch.zeros(0, device=loss.device)
    if not loss.requires_grad:
        return torch.cat([torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params])
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in zip(params, gs)])


def _world():
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mean_over_ranks(flat):
    """All-reduce (sum) then divide by the world size, in place; a no-op on one rank."""
    import torch.distributed as dist
    world = _world()
    if world > 1:
        dist.all_reduce(flat)
        flat.div_(world)
    return flat


def _write_grads(params: list, flat) -> None:
    """Set ``p.grad`` of each parameter from consecutive slices of ``flat``."""
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).to(p.dtype).clone()
        off += n


def direction_digest(u) -> str:
    """sha256 of the direction's float32 bytes (equal on every rank iff the bits are)."""
    return hashlib.sha256(u.detach().float().cpu().numpy().tobytes()).hexdigest()


def make_grad_step(opts: dict, rank: int):
    """The trainer's ``grad_step(engine, model, batch, step) -> (loss, parts)``.

    Per step: the task losses; each task's gradient on the shared parameters, the primary's on
    the primary-only ones, each head's on its own; ONE all-reduce of all of them (and of the
    losses) as a flat buffer, mean over ranks; ``combine`` on the reduced shared gradients
    (identical input → identical direction on every rank; PCGrad seed = step); the direction
    into the shared ``.grad``. ``engine.step()`` (stage 0) then clips and applies AdamW.
    """
    import torch

    from models.multitask import combine
    from models.multitask_heads import task_losses
    aux = opts["aux"]
    weights = torch.tensor(opts["weights"], dtype=torch.float64)

    def grad_step(engine, model, batch, step):
        shared, primary_only = model.shared_and_primary_params()
        losses = task_losses(model, batch, opts["input_grad_scale"])  # primary first, then aux order
        names = list(losses)
        own = [primary_only] + [model.head_params(a) for a in aux]  # per task, its non-shared params
        pieces = []
        for name, params in zip(names, own):
            pieces.append(_flat_grads(losses[name], shared + params))
        n_sh = sum(p.numel() for p in shared)
        loss_vec = torch.stack([losses[k].detach().float().reshape(()) for k in names])
        flat = _mean_over_ranks(torch.cat(pieces + [loss_vec]))
        # split back: task i -> (shared part, own part)
        off, g_sh, g_own = 0, [], []
        for params in own:
            n_own = sum(p.numel() for p in params)
            g_sh.append(flat[off:off + n_sh])
            g_own.append(flat[off + n_sh:off + n_sh + n_own])
            off += n_sh + n_own
        mean_losses = flat[off:off + len(names)]
        g0 = g_sh[0]
        G = torch.stack(g_sh[1:]) if aux else g0.new_zeros(0, n_sh)
        u, info = combine(g0, G, opts["method"], weights=weights if aux else None, seed=step)
        _write_grads(shared, u)
        _write_grads(primary_only, g_own[0])
        for a, g in zip(aux, g_own[1:]):
            _write_grads(model.head_params(a), g)
        parts = {"primary": float(mean_losses[0])}
        for i, a in enumerate(aux):
            parts[f"aux_{a}"] = float(mean_losses[1 + i])
            parts[f"lam_{a}"] = float(info["lam"][i])
            parts[f"cos_{a}"] = float(info["cosines"][i])
        if opts["trace_dir"]:
            _trace(opts["trace_dir"], rank, step, u, info, {**parts, "local_primary": float(loss_vec[0])}, aux)
        return mean_losses[0], parts

    return grad_step


def _trace(trace_dir: str, rank: int, step: int, u, info: dict, parts: dict, aux: list[str]) -> None:
    """Append this rank's step record to ``trace_dir/rank{rank}.jsonl``."""
    import torch
    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    rec = {"step": step, "rank": rank, "pid": os.getpid(), "direction_sha256": direction_digest(u),
           "direction_sha256_signless_zero": direction_digest(u + 0.0),  # -0.0 + 0.0 = +0.0
           "negative_zeros": int(((u == 0) & torch.signbit(u)).sum()),
           "norm": float(u.double().norm()), "lam": [float(x) for x in info["lam"]],
           "dots": {a: float(d) for a, d in zip(aux, info["dots"])}, **parts}
    with open(Path(trace_dir) / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
