"""Auxiliary heads and losses for multi-task fine-tuning of the KgCLUE generator.

The primary task is the generator's own seq2seq loss (models/seq2seq.py ``Seq2Seq.loss``).
Three auxiliary tasks (labels from tasks/aux_tasks.py, no extra annotation) read the
generator through its public API only (``encode``, ``decode``, ``tok_emb``):

* ``subject_tags``: a per-character 0/1 tagger on the encoder output (is this question
  character inside the subject's base name?) — :class:`SubjectTagger`, BCE over tagged rows;
* ``predicate_match``: question ↔ predicate matching, both sides encoded by the *generator's
  encoder* and mean-pooled, scored by a bilinear :class:`PredicateMatcher` — BCE over the gold
  predicate (1) and look-alike training predicates (0);
* ``input_grad``: the input-gradient penalty (ALGORITHMS.md §2, models/gradient_penalty.py)
  ‖∇ₓ f(x)‖² on the source *embeddings* x, with f the per-sample seq2seq loss; no head.

Which generator parameters each task reaches (the "shared" set of the gradient rule,
models/multitask.py) is :func:`reached_prefixes`. :class:`MultiTaskModel` holds the generator
and the heads; only the generator is exported. Pure torch.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.gradient_penalty import input_gradient_penalty
from models.vocab import PAD

AUX_TASKS = ("subject_tags", "predicate_match", "input_grad")
# Generator parameter-name prefixes each task's loss reaches. The tagger and the matcher sit on
# the encoder output, so they reach the embeddings, the encoder and its final norm; the
# input-gradient penalty differentiates the full seq2seq loss, so it reaches everything.
_ENCODER_SIDE = ("tok_emb.", "encoder.", "ln_enc.")
REACHES = {"subject_tags": _ENCODER_SIDE, "predicate_match": _ENCODER_SIDE, "input_grad": ("",)}


def reached_prefixes(aux: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Union of the generator-parameter prefixes the auxiliary tasks ``aux`` reach."""
    unknown = sorted(set(aux) - set(AUX_TASKS))
    if unknown:
        raise ValueError(f"unknown auxiliary tasks {unknown}; choose among {AUX_TASKS}")
    out: list[str] = []
    for name in aux:
        out.extend(p for p in REACHES[name] if p not in out)
    return tuple(out)


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the True positions: h (B, S, C), mask (B, S) bool -> (B, C)."""
    w = mask.to(h.dtype)[..., None]  # (B, S, 1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


class SubjectTagger(nn.Module):
    """Per-position subject logit from the encoder memory: (B, S, C) -> (B, S)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        return self.net(memory)[..., 0]

    def loss(self, memory: torch.Tensor, tags: torch.Tensor, tag_mask: torch.Tensor) -> torch.Tensor:
        """Mean BCE over positions with a tag (``tag_mask`` (B, S) bool; tags (B, S) 0/1);
        0 (no graph) when the batch holds no tagged position."""
        if not bool(tag_mask.any()):
            return memory.new_zeros(())
        logits = self(memory)  # (B, S)
        return F.binary_cross_entropy_with_logits(logits[tag_mask].float(), tags[tag_mask].float())


class PredicateMatcher(nn.Module):
    """Bilinear score of a pooled question (C,) and a pooled predicate (C,): ⟨A q, B p⟩/√C + b."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj_q = nn.Linear(d_model, d_model, bias=False)
        self.proj_p = nn.Linear(d_model, d_model, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))  # (1,): DeepSpeed cannot broadcast a 0-dim parameter

    def forward(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """q (N, C), p (N, C) -> logits (N,)."""
        return (self.proj_q(q) * self.proj_p(p)).sum(-1) / q.size(-1) ** 0.5 + self.bias

    def loss(self, q: torch.Tensor, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean BCE of the pairs (labels (N,) 0/1)."""
        return F.binary_cross_entropy_with_logits(self(q, p).float(), labels.float())


class MultiTaskModel(nn.Module):
    """The generator plus the heads of the enabled auxiliary tasks (``heads`` by task name)."""

    def __init__(self, generator: nn.Module, aux: tuple[str, ...] | list[str]):
        super().__init__()
        reached_prefixes(aux)  # validates the names
        self.generator = generator
        self.aux = tuple(aux)
        d = generator.cfg.d_model
        heads = {}
        if "subject_tags" in self.aux:
            heads["subject_tags"] = SubjectTagger(d)
        if "predicate_match" in self.aux:
            heads["predicate_match"] = PredicateMatcher(d)
        self.heads = nn.ModuleDict(heads)

    def shared_and_primary_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The generator's parameters split into (shared: reached by an auxiliary task,
        primary-only: reached by the seq2seq loss alone), in ``named_parameters`` order (tied
        weights once)."""
        prefixes = reached_prefixes(self.aux) if self.aux else ()
        shared, primary = [], []
        for name, p in self.generator.named_parameters():
            (shared if any(name.startswith(x) for x in prefixes) else primary).append(p)
        return shared, primary

    def head_params(self, task: str) -> list[nn.Parameter]:
        """The parameters of ``task``'s own head (none for input_grad)."""
        return list(self.heads[task].parameters()) if task in self.heads else []


# ----------------------------------------------------------------------------- losses

def primary_loss(generator: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The generator's own training loss (``.loss`` may return a tensor or (tensor, parts))."""
    out = generator.loss(batch)
    return out[0] if isinstance(out, tuple) else out


def subject_tag_loss(generator: nn.Module, tagger: SubjectTagger, batch: Mapping[str, torch.Tensor],
                     memory: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of the tagger on the question's encoder memory; batch needs ``tags``, ``tag_mask``."""
    if memory is None:
        memory = generator.encode(batch["src_ids"], batch["src_mask"])
    return tagger.loss(memory, batch["tags"], batch["tag_mask"] & batch["src_mask"])


def predicate_match_loss(generator: nn.Module, matcher: PredicateMatcher, batch: Mapping[str, torch.Tensor],
                         memory: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of question ↔ predicate pairs, both sides through the generator's encoder.

    batch: ``pred_ids``/``pred_mask`` (N, L) the predicates' characters, ``pair_row`` (N,) the
    question row of each pair, ``pair_label`` (N,) 1 for the gold predicate, 0 for a look-alike."""
    if batch["pair_row"].numel() == 0:
        return batch["src_ids"].new_zeros((), dtype=torch.float32)
    if memory is None:
        memory = generator.encode(batch["src_ids"], batch["src_mask"])
    q = masked_mean(memory, batch["src_mask"])[batch["pair_row"]]  # (N, C)
    p = masked_mean(generator.encode(batch["pred_ids"], batch["pred_mask"]), batch["pred_mask"])  # (N, C)
    return matcher.loss(q, p, batch["pair_label"])


def per_sample_seq2seq_loss(generator: nn.Module, batch: Mapping[str, torch.Tensor],
                            src_emb: torch.Tensor) -> torch.Tensor:
    """(B,) mean token cross-entropy of each row, with the encoder's token embeddings replaced
    by ``src_emb`` (B, S, C) (a forward hook on ``tok_emb`` during ``encode`` only)."""
    handle = generator.tok_emb.register_forward_hook(lambda _m, _inp, _out: src_emb)
    try:
        memory = generator.encode(batch["src_ids"], batch["src_mask"])
    finally:
        handle.remove()
    tgt = batch["tgt_ids"]
    logits = generator.decode(memory, batch["src_mask"], tgt[:, :-1], batch["src_ids"])  # (B, T-1, V)
    ce = F.cross_entropy(logits.transpose(1, 2).float(), tgt[:, 1:], ignore_index=PAD, reduction="none")
    n = (tgt[:, 1:] != PAD).sum(1).clamp_min(1)  # (B,)
    return ce.sum(1) / n


def input_grad_loss(generator: nn.Module, batch: Mapping[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """``scale`` · mean_b ‖∇ₓ f(x_b)‖², x = the source embeddings, f the per-sample seq2seq loss;
    differentiable (create_graph), so it trains the whole generator.

    The penalty's gradient is a double backward, which the fused CPU/flash attention kernels do
    not implement: its forward runs on scaled_dot_product_attention's MATH backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x = generator.tok_emb(batch["src_ids"])  # (B, S, C): the penalty is also a function of the embeddings
    with sdpa_kernel([SDPBackend.MATH]):
        pen = input_gradient_penalty(lambda e: per_sample_seq2seq_loss(generator, batch, e), x, create_graph=True)
    return scale * pen


def task_losses(model: MultiTaskModel, batch: Mapping[str, torch.Tensor],
                input_grad_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """{"primary": ..., <aux task>: ...} for ``model.aux``, in that order; the tagger and the
    matcher share one encoder pass of the questions."""
    gen = model.generator
    out = {"primary": primary_loss(gen, batch)}
    memory = None
    if "subject_tags" in model.aux or "predicate_match" in model.aux:
        memory = gen.encode(batch["src_ids"], batch["src_mask"])
    for name in model.aux:
        if name == "subject_tags":
            out[name] = subject_tag_loss(gen, model.heads[name], batch, memory)
        elif name == "predicate_match":
            out[name] = predicate_match_loss(gen, model.heads[name], batch, memory)
        else:
            out[name] = input_grad_loss(gen, batch, input_grad_scale)
    return out
