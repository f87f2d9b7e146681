"""Candidate re-ranker: a small cross-encoder over (question, predicate, disambiguation, object).

Why: the KgCLUE splits are relation-disjoint (99.75% of dev's gold predicates never occur in
train), so the generator must pick a predicate it has never produced among the subject's trie
keys. Two signals carry across relations: how much of the question a predicate covers (the
look-ahead's LCS) and whether the key's *object* has the type the question asks for (a date
for 什么时候, an address for 在哪里, a person for 谁). The generator never sees objects; this
model does.

Input of one candidate, one sequence::

    BOS question-with-the-subject-masked SEP predicate SEP disambiguation SEP object[:max_obj] EOS

with a segment id per part (0 question, 1 predicate, 2 disambiguation, 3 object, 4 the masked
subject span), so attention relates the question's words to the candidate's. The subject span
is replaced by one UNK token: the question's template, not the entity, says which relation
is asked, and masking keeps the model from memorising entity -> relation. A few exact
string features (LCS coverages, :func:`candidate_features`) enter the score linearly.

Training (:meth:`Ranker.loss`) is a softmax over groups: row 0 of each group is the gold key,
the others are negatives; ``tasks/ranker_data.py`` builds them from training relations only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import Rotary
from models.metrics import lcs_length as lcs_len  # bit-parallel LCS (the official metric's)
from models.seq2seq import EncoderBlock, Seq2SeqConfig
from models.vocab import BOS, EOS, PAD, SEP, UNK

N_FEATURES = 6
SEG_Q, SEG_P, SEG_M, SEG_O, SEG_SUBJ = range(5)


@dataclass(frozen=True)
class RankerConfig:
    vocab_size: int
    d_model: int = 128
    n_head: int = 4
    n_layer: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    max_len: int = 160
    max_obj_len: int = 16
    kind: str = "ranker"

    def encoder_config(self) -> Seq2SeqConfig:
        return Seq2SeqConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_head=self.n_head,
                             n_layer_enc=self.n_layer, n_layer_dec=0, d_ff=self.d_ff, dropout=self.dropout,
                             max_len=self.max_len)

    def to_dict(self) -> dict:
        return asdict(self)


def mask_subject(question: str, subject: str) -> tuple[str, int]:
    """(question with the first occurrence of ``subject`` cut out, where it was; -1 if absent)."""
    at = question.find(subject) if subject else -1
    if at < 0:
        return question, -1
    return question[:at] + question[at + len(subject):], at


def candidate_features(question: str, predicate: str, disambiguation: str, obj: str) -> list[float]:
    """Exact string evidence: LCS coverage of P (by |P| and absolute), P ⊂ Q, M and O coverage, |P|."""
    lp = lcs_len(predicate, question)
    return [lp / max(1, len(predicate)), lp / 4.0, float(bool(predicate) and predicate in question),
            lcs_len(disambiguation, question) / max(1, len(disambiguation)),
            lcs_len(obj[:32], question) / max(1, min(len(obj), 32)), len(predicate) / 8.0]


def encode_candidate(vocab, question: str, subject: str, predicate: str, disambiguation: str, obj: str,
                     max_src_len: int = 64, max_obj_len: int = 16) -> tuple[list[int], list[int], list[float]]:
    """Token ids, segment ids and features of one candidate (see the module docstring)."""
    masked, at = mask_subject(question, subject)
    ids, seg = [BOS], [SEG_Q]
    if at < 0:
        q = vocab.encode(question)[:max_src_len]
        ids += q
        seg += [SEG_Q] * len(q)
    else:
        left, right = vocab.encode(masked[:at]), vocab.encode(masked[at:])
        ids += [*left, UNK, *right][:max_src_len]
        seg += ([SEG_Q] * len(left) + [SEG_SUBJ] + [SEG_Q] * len(right))[:max_src_len]
    for part, s in ((predicate, SEG_P), (disambiguation, SEG_M), (obj[:max_obj_len], SEG_O)):
        t = vocab.encode(part)
        ids += [SEP, *t]
        seg += [s] * (len(t) + 1)
    ids.append(EOS)
    seg.append(SEG_O)
    return ids, seg, candidate_features(masked, predicate, disambiguation, obj)


def make_ranker_batch(cands: Sequence[tuple[list[int], list[int], list[float]]], group: int = 0,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Pad encoded candidates; ``group`` > 0 marks training groups of that size (gold first)."""
    width = max(len(c[0]) for c in cands)
    ids = torch.full((len(cands), width), PAD, dtype=torch.long)
    seg = torch.zeros((len(cands), width), dtype=torch.long)
    for i, (t, s, _) in enumerate(cands):
        ids[i, :len(t)] = torch.as_tensor(t)
        seg[i, :len(s)] = torch.as_tensor(s)
    feats = torch.tensor([c[2] for c in cands], dtype=torch.float32)
    out = {"ids": ids.to(device), "seg": seg.to(device), "mask": (ids != PAD).to(device), "feats": feats.to(device)}
    if group:
        if len(cands) % group:
            raise ValueError(f"{len(cands)} candidates do not split into groups of {group}")
        out["group"] = torch.tensor(group)
    return out


class Ranker(nn.Module):
    """Scores candidates: (N, L) token/segment ids + (N, F) features -> (N,) logits."""

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder_config()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.seg_emb = nn.Embedding(5, cfg.d_model)
        rope = Rotary(cfg.d_model // cfg.n_head, cfg.max_len)
        self.rope = rope
        self.blocks = nn.ModuleList(EncoderBlock(enc, rope) for _ in range(cfg.n_layer))
        self.ln = nn.RMSNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Sequential(nn.Linear(2 * cfg.d_model, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, 1))
        self.feat = nn.Linear(N_FEATURES, 1)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.feat.weight)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, seg: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(ids) + self.seg_emb(seg))
        for block in self.blocks:
            x = block(x, mask)
        h = self.ln(x)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = torch.cat([h[:, 0], (h * m).sum(1) / m.sum(1).clamp_min(1)], dim=-1)
        return (self.head(pooled).squeeze(-1) + self.feat(feats.to(h.dtype)).squeeze(-1)).float()

    def score(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["ids"], batch["seg"], batch["mask"], batch["feats"])

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Softmax cross-entropy over each group of candidates; the gold is row 0 of its group."""
        g = int(batch["group"])
        logits = self.score(batch).view(-1, g)
        return F.cross_entropy(logits, torch.zeros(logits.size(0), dtype=torch.long, device=logits.device))


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Log-softmax of one candidate set's scores (float64): an expert's log-probabilities."""
    s = np.asarray(scores, dtype=np.float64)
    m = s.max()
    return s - (m + np.log(np.exp(s - m).sum()))
