"""Per-task trainer adapters: what the one trainer (tasks/train.py) needs from a task.

The trainer owns Ray Train, DeepSpeed, checkpoint/resume, progress and ZeRO; a task brings
one small module here, registered in :data:`ADAPTERS`, with

* ``setup(spec, device, rank) -> TaskSetup``: the model, the number of training rows and a
  batch maker, plus the optional hooks of :class:`TaskSetup`;
* ``load_model(cfg: dict) -> nn.Module``: rebuild the exported model from its
  ``model_config.json`` (``load_trained_model`` dispatches on the config's ``kind``);
* ``KINDS``: the model-config kinds it loads (``kind`` of the exported config);
* optionally ``check_spec(spec)``: raise ValueError for a spec this task cannot train.

Randomness a model owns (a codebook restart, a feature redraw) must not come from the
per-rank dropout stream: the trainer passes a ``torch.Generator`` seeded by (seed, step),
identical on every rank, to each submodule's ``train_step_begin`` / ``train_step_end``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

ADAPTERS: dict[str, str] = {          # task name -> module (imported on first use)
    "seq2seq": "tasks.adapters.seq2seq",
    "ranker": "tasks.adapters.ranker",
    "lm": "tasks.adapters.lm",
    "vae": "tasks.adapters.vae",
    "multitask": "tasks.adapters.multitask",
}

Batch = Any  # whatever the task's model.loss (or loss_fn) takes: usually a dict of tensors


@dataclass
class TaskSetup:
    """What one rank trains.

    ``make_batch(rows, step) -> (batch, n_tokens)``: ``rows`` are this rank's row indices for
    the step (a pure function of seed, step, rank); ``n_tokens`` feeds the tokens/s figure
    (for non-token data: the number of items).

    ``loss_fn(model, batch) -> (loss, parts)``: default ``model.loss(batch)``, which may return
    a tensor or ``(tensor, {name: float})``; extra losses the model's modules hold
    (``models.attention.aux_losses``) are the model's business and already in its loss.

    ``grad_step(engine, model, batch, step) -> (loss, parts)``: a custom gradient step (for
    per-task gradients): it must leave in the engine what ``engine.step()`` applies. When set,
    the trainer calls it instead of ``engine(batch)`` + ``engine.backward(loss)``.

    ``validate(model) -> {metric: float}`` with ``"val_loss"``, lower is better: run every
    ``spec.val_every`` steps on rank 0's model copy (every rank runs it, so ranks agree);
    with ``spec.patience`` > 0 training stops after that many validations without a new
    best, and the exported model is the best one.

    ``export(model) -> nn.Module``: the part of the trained model that is exported (and that a
    ``spec.warm_start`` model is loaded into), e.g. the generator inside a multi-task wrapper
    with auxiliary heads; default the whole model. Its ``cfg.to_dict()`` is the exported config.
    """

    model: Any
    n_rows: int
    make_batch: Callable[[Any, int], tuple[Batch, int]]
    loss_fn: Callable[[Any, Batch], tuple[Any, dict]] | None = None
    grad_step: Callable[[Any, Any, Batch, int], tuple[Any, dict]] | None = None
    validate: Callable[[Any], dict[str, float]] | None = None
    export: Callable[[Any], Any] | None = None


def adapter(task: str):
    """The adapter module of ``task`` (ValueError naming the registered tasks otherwise)."""
    if task not in ADAPTERS:
        raise ValueError(f"training task {task!r}: choose one of {sorted(ADAPTERS)}")
    try:
        return importlib.import_module(ADAPTERS[task])
    except ModuleNotFoundError as e:
        if e.name == ADAPTERS[task]:
            raise ValueError(f"training task {task!r} is registered but {ADAPTERS[task]} is not installed") from None
        raise


def adapter_for_kind(kind: str):
    """The adapter whose ``KINDS`` include the exported model config's ``kind``."""
    for task, mod in ADAPTERS.items():
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        if kind in getattr(m, "KINDS", ()):
            return m
    raise ValueError(f"no training task loads a model of kind {kind!r}")


def split_loss(out) -> tuple[Any, dict]:
    """``model.loss`` may return a tensor or (tensor, parts): normalise to (tensor, parts)."""
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}
