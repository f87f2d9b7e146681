"""Trie-constrained batched beam search with the lookahead re-weighting (ALGORITHMS.md §3).

The look-ahead has two conventions (``lookahead="ours"`` or ``"reference"``, see
:func:`lookahead_weights`); ``lookahead=True`` means ``"ours"``, the default until a
validation slice picks one, ``False`` turns it off.

B questions × K beams are flattened to N = B*K rows; every time step makes one ``step_fn`` call
for all rows. Each row carries its :class:`~models.trie.KgTrie` state; the model's log-probs are
restricted to ``trie.allowed(state)`` (one ``index_put`` per step) and renormalised over that
set. A beam that reaches a terminal state (after EOS) is kept with its score and competes with
the live beams; a question stops once its K rows are all terminal, the search at ``max_len``.

``step_fn(tokens, state) -> (logprobs, state)``: ``tokens`` (N, t) long are every row's tokens
so far (BOS first); ``logprobs`` (N, V); ``state`` (e.g. a KV cache, or None) is reordered by
the search with ``state.index_select(rows)``, rows always in blocks of K per question.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from models.lcs import lcs_row as lcs_prefix_row  # row[i] = LCS(prefix, question[:i])
from models.lcs import lcs_rows
from models.seq_table import find_sorted
from models.trie import KgTrie
from models.vocab import BOS, EOS, PAD, SEP

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
_LIVE, _DONE, _DEAD = 0, 1, 2


class DecodingError(RuntimeError):
    """The trie and the search disagree (e.g. an empty allowed set on a live beam)."""


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam: trie key id, summed constrained log-prob, key tokens (no BOS, ends in EOS)."""

    key_id: int
    score: float
    tokens: np.ndarray


# --------------------------------------------------------------------------- lookahead
LOOKAHEAD_RULES = ("ours", "reference")
Lookahead = bool | str | None  # False/None: off; True: "ours"; or a rule name


def lookahead_rule(lookahead: Lookahead) -> str | None:
    """The rule a ``lookahead`` argument names: None (off), "ours" (also for True) or "reference"."""
    if lookahead is None or isinstance(lookahead, (bool, np.bool_)):
        return "ours" if lookahead else None
    if isinstance(lookahead, str) and lookahead in LOOKAHEAD_RULES:
        return str(lookahead)
    raise ValueError(f"lookahead={lookahead!r}: use True/False or one of {LOOKAHEAD_RULES}")


def lookahead_question(question: Sequence[int], rule: str) -> np.ndarray:
    """The question side of the look-ahead's LCS, as token ids.

    ``question`` is the encoder's source as the model saw it (already cut at ``max_src_len``
    tokens by the caller, tasks/evaluate.py). ``"ours"``: those ids as they are.
    ``"reference"``: ``BOS + ids + SEP``, bojone's ``[CLS] Q [SEP]`` (our BOS stands for his
    [CLS]; his source is cut at maxlen//2+1 = 65 tokens, ALGORITHMS.md §3). Neither BOS
    nor the keys' EOS ever occurs in a prefix or a completion, but the SEP does: under the
    reference rule one [SEP] of the key (after S, or after P) may match the question's final SEP.
    """
    q = np.asarray(question, dtype=np.int64)
    if rule == "ours":
        return q
    if rule == "reference":
        return np.concatenate([[BOS], q, [SEP]]).astype(np.int64)
    raise ValueError(f"lookahead rule {rule!r}: use one of {LOOKAHEAD_RULES}")


def completion_matrix(trie: KgTrie, state: Any, max_completions: int) -> tuple[np.ndarray, bool]:
    """Remaining tokens of the keys below ``state`` as a (C, L) matrix padded with -1.

    The flag says whether the list is complete (fewer than ``max_completions`` keys).
    """
    comps = trie.completions(state, limit=max_completions)
    if not comps:
        return np.zeros((0, 0), dtype=np.int64), True
    lens = np.fromiter((len(c) for c in comps), dtype=np.int64, count=len(comps))
    flat = np.concatenate(comps).astype(np.int64)
    mat = np.full((len(comps), int(lens.max())), -1, dtype=np.int64)  # (C, L)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    mat[np.repeat(np.arange(len(comps)), lens), np.arange(len(flat)) - starts] = flat
    return mat, len(comps) < max_completions


def weights_from_completions(mat: np.ndarray, prefix: Sequence[int], question: np.ndarray,
                             allowed: np.ndarray) -> np.ndarray:
    """Per allowed token (sorted): max(1, max over completions c starting with it of gain(c)+1)."""
    weights = np.ones(len(allowed), dtype=np.float64)
    if mat.shape[0] == 0 or mat.shape[1] == 0 or len(question) == 0:
        return weights
    row0 = lcs_prefix_row(prefix, question)  # (m+1,)
    body = np.where(mat == EOS, -1, mat)  # the end token takes no part in the LCS
    gain = lcs_rows(body, question, start=row0)[:, -1] - row0[-1]  # (C,)
    first = mat[:, 0]
    pos = np.searchsorted(allowed, first)
    ok = (pos < len(allowed)) & (allowed[np.minimum(pos, len(allowed) - 1)] == first)
    np.maximum.at(weights, pos[ok], gain[ok] + 1.0)
    return weights


def lookahead_weights(trie: KgTrie, state: Any, prefix: Sequence[int], question: np.ndarray,
                      allowed: np.ndarray, max_completions: int = 2000, rule: str = "ours") -> np.ndarray:
    """bojone's AutoQA.predict weights for ``allowed`` (sorted): max over completions of gain+1.

    What the code computes, per allowed token a (weight 1 when no examined completion starts
    with a)::

        q = lookahead_question(question, rule)     # "ours": Q; "reference": BOS Q SEP
        w(a) = max(1, max over completions c with c[0] = a of
                   LCS(prefix + c', q) - LCS(prefix, q) + 1)

    over token ids, with ``prefix`` the decoded tokens after BOS (S, its SEP, and whatever of
    P / its SEP / M follows), ``c`` the remaining tokens of a full key below the prefix (P and
    M, each part's SEP included) and ``c'`` = c without its final EOS (bojone's keys have no
    end token). Under ``"ours"`` the SEPs take part but can never match (the question holds
    no SEP); under ``"reference"`` one of them may match the question's final SEP, so a key
    whose only new match lies after a SEP gains less (the reference code exactly).

    Differences from the reference that remain: only the first ``max_completions``
    completions in token order are examined (the reference enumerates every key below the
    prefix), and the question is the model's source cut at ``max_src_len`` tokens. The
    callers apply the weights only once S is complete (a SEP decoded) and more than one
    token is allowed, as the reference does; ``p ** (1/w)`` is then renormalised over
    ``allowed``.
    """
    mat, _ = completion_matrix(trie, state, max_completions)
    return weights_from_completions(mat, prefix, lookahead_question(question, rule), allowed)


# --------------------------------------------------------------------------- beam search
def _constrained_logprobs(logprobs: torch.Tensor, live: np.ndarray, allowed: list[np.ndarray],
                          weights: list[np.ndarray] | None, done: np.ndarray) -> torch.Tensor:
    """(N, V): log-probs (÷ weights) renormalised over each live row's allowed set, else -inf.

    A finished row gets 0 at PAD (it continues at no cost); one index_put for the whole step.
    """
    N, V = logprobs.shape
    cand = torch.full((N, V), float("-inf"))
    if len(live):
        sizes = np.fromiter((a.size for a in allowed), dtype=np.int64, count=len(allowed))
        seg = torch.from_numpy(np.repeat(np.arange(len(live)), sizes))  # live-row index per entry
        r = torch.from_numpy(live)[seg]
        c = torch.from_numpy(np.concatenate(allowed))
        v = logprobs[r, c].float()
        if weights is not None:
            v = v / torch.from_numpy(np.concatenate(weights)).float()  # p ** (1/weight)
        mx = torch.full((len(live),), float("-inf")).scatter_reduce(0, seg, v, "amax")
        z = torch.zeros(len(live)).index_add_(0, seg, (v - mx[seg]).exp())
        cand.index_put_((r, c), v - (mx + z.log())[seg])  # renormalised over the allowed set
    cand[torch.from_numpy(done), PAD] = 0.0
    return cand


def _free_logprobs(logprobs: torch.Tensor, live: np.ndarray, done: np.ndarray) -> torch.Tensor:
    """(N, V) without a constraint: live rows keep the model's log-probs, finished rows PAD."""
    cand = torch.full_like(logprobs, float("-inf"))
    idx = torch.from_numpy(live)
    cand[idx] = logprobs[idx]
    cand[torch.from_numpy(done), PAD] = 0.0
    return cand


def beam_search(step_fn: StepFn, trie: KgTrie | None, n_questions: int, beam_size: int, max_len: int,
                state: Any = None, *, lookahead: Lookahead = False,
                question_ids: Sequence[np.ndarray] | None = None, max_completions: int = 2000,
                n_best: int | None = None) -> list[list[Hypothesis]]:
    """Per question, its finished hypotheses, best first (at most ``n_best``, default K).

    ``trie=None`` runs the same search unconstrained (a beam ends at EOS; key ids are -1):
    the baseline that prices the constraint. ``lookahead``: False, True (= "ours") or a rule
    of :func:`lookahead_weights`, applied to rows whose S is complete with >1 allowed token;
    ``question_ids`` are the sources as the model saw them (cut at ``max_src_len``).
    """
    rule = lookahead_rule(lookahead)
    if rule and trie is None:
        raise ValueError("lookahead needs a trie")
    if rule and (question_ids is None or len(question_ids) != n_questions):
        raise ValueError("lookahead needs question_ids: one token-id array per question")
    K, n_best = beam_size, beam_size if n_best is None else n_best
    qid = np.arange(n_questions)  # global question index of each active question
    N = n_questions * K
    states: list[Any] = [trie.start() if trie is not None else None] * N
    comps: list[np.ndarray | None] = [None] * N  # complete completion matrices, carried along
    status = np.zeros(N, dtype=np.int8)
    sep_seen = np.zeros(N, dtype=bool)
    tokens = np.full((N, 1), BOS, dtype=np.int64)
    scores = torch.zeros(n_questions, K)
    scores[:, 1:] = float("-inf")  # all beams start equal: keep one copy
    scores = scores.view(-1)
    results: list[list[Hypothesis]] = [[] for _ in range(n_questions)]
    questions = None if not rule else [lookahead_question(q, rule) for q in question_ids]

    def harvest(rows: np.ndarray, q: int) -> None:
        done = [r for r in rows if status[r] == _DONE]
        done.sort(key=lambda r: -float(scores[r]))
        for r in done[:n_best]:
            toks = tokens[r, 1:]
            end = int(np.flatnonzero(toks == EOS)[0]) + 1
            key = trie.key_id(states[r]) if trie is not None else -1
            results[q].append(Hypothesis(key, float(scores[r]), toks[:end].copy()))

    for _ in range(max_len):
        N = len(states)
        B = N // K
        logprobs, state = step_fn(torch.from_numpy(tokens), state)
        logprobs = logprobs.float().cpu()  # (N, V); the search itself runs on the CPU
        V = logprobs.size(1)
        live = np.flatnonzero(status == _LIVE)
        if trie is None:
            allowed = []
        else:
            allowed = [trie.allowed(states[i]) for i in live]
        for i, a in zip(live, allowed):
            if a.size == 0:
                raise DecodingError(f"empty allowed set on a live beam (question {qid[i // K]}, "
                                    f"tokens {tokens[i].tolist()}): the trie state is corrupt")
        weights = None
        if rule:
            weights = []
            for i, a in zip(live, allowed):
                if not (sep_seen[i] and a.size > 1):
                    weights.append(np.ones(a.size))
                    continue
                mat = comps[i]
                if mat is None:
                    mat, complete = completion_matrix(trie, states[i], max_completions)
                    comps[i] = mat if complete else None
                weights.append(weights_from_completions(mat, tokens[i, 1:], questions[qid[i // K]], a))
        if trie is None:
            cand = _free_logprobs(logprobs, live, np.flatnonzero(status == _DONE))
        else:
            cand = _constrained_logprobs(logprobs, live, allowed, weights, np.flatnonzero(status == _DONE))
        top_v, top_i = (scores[:, None] + cand).view(B, K * V).topk(K, dim=1)  # (B, K)
        parent = (top_i // V + torch.arange(B)[:, None] * K).view(-1).numpy()
        new_tok = (top_i % V).view(-1).numpy().copy()
        finite = torch.isfinite(top_v).view(-1).tolist()
        new_states: list[Any] = [None] * N
        new_comps: list[np.ndarray | None] = [None] * N
        new_status = np.full(N, _DEAD, dtype=np.int8)
        old_status = status.tolist()
        for j, (p, t) in enumerate(zip(parent.tolist(), new_tok.tolist())):
            if not finite[j]:
                new_tok[j] = PAD
            elif old_status[p] == _DONE:
                new_states[j], new_status[j] = states[p], _DONE
            elif trie is None:
                new_status[j] = _DONE if t == EOS else _LIVE
            else:
                new_states[j] = s = trie.advance(states[p], t)
                if trie.is_terminal(s):
                    new_status[j] = _DONE
                else:
                    new_status[j] = _LIVE
                    mat = comps[p]
                    if mat is not None:  # the child's completions: rows starting with t, shifted
                        new_comps[j] = mat[mat[:, 0] == t, 1:]
        sep_seen = sep_seen[parent] | (new_tok == SEP)
        states, comps, status, scores = new_states, new_comps, new_status, top_v.reshape(-1)
        tokens = np.concatenate([tokens[parent], new_tok[:, None]], axis=1)
        finished = (status != _LIVE).reshape(B, K).all(axis=1)  # (B,)
        for b in np.flatnonzero(finished):
            harvest(np.arange(b * K, (b + 1) * K), int(qid[b]))
        if finished.all():
            return results
        keep = np.flatnonzero(np.repeat(~finished, K))
        if finished.any():  # drop finished questions from every per-row structure
            states, comps = [states[j] for j in keep], [comps[j] for j in keep]
            status, sep_seen, tokens = status[keep], sep_seen[keep], tokens[keep]
            scores = scores[torch.from_numpy(keep)]
            qid = qid[~finished]
        if state is not None:
            state = state.index_select(torch.from_numpy(parent[keep]))
    for b, q in enumerate(qid):  # max_len reached: keep what has finished
        harvest(np.arange(b * K, (b + 1) * K), int(q))
    return results


# --------------------------------------------------------------------------- model glue
def model_step_fn(model: torch.nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor) -> StepFn:
    """A step function running ``model.decode_step`` on the last token, memory encoded once."""
    memory = model.encode(src_ids, src_mask)  # (B, S, C)

    def step(tokens: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        return model.decode_step(memory, src_mask, tokens[:, -1].to(memory.device), cache, src_ids=src_ids)

    return step


def question_ids_of(src_ids: torch.Tensor, src_mask: torch.Tensor) -> list[np.ndarray]:
    """The unpadded source ids of each question (the lookahead's LCS reference)."""
    return [row[m].numpy().astype(np.int64) for row, m in zip(src_ids.cpu(), src_mask.cpu())]


@torch.inference_mode()
def constrained_beam_search(model: torch.nn.Module, trie: KgTrie, src_ids: torch.Tensor,
                            src_mask: torch.Tensor, beam_size: int = 4, max_len: int | None = None,
                            lookahead: Lookahead = False, max_completions: int = 2000,
                            n_best: int | None = None) -> list[list[Hypothesis]]:
    """Trie-constrained beam search of a :class:`~models.seq2seq.Seq2Seq` over a batch
    (``lookahead``: see :func:`beam_search`; the LCS question is each unpadded source row)."""
    model.eval()
    max_len = model.cfg.max_len if max_len is None else min(max_len, model.cfg.max_len)
    step = model_step_fn(model, src_ids, src_mask)
    return beam_search(step, trie, src_ids.size(0), beam_size, max_len, lookahead=lookahead,
                       question_ids=question_ids_of(src_ids, src_mask) if lookahead_rule(lookahead) else None,
                       max_completions=max_completions, n_best=n_best)


@torch.inference_mode()
def unconstrained_beam_search(model: torch.nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor,
                              beam_size: int = 4, max_len: int | None = None) -> list[list[Hypothesis]]:
    """The same batched beam search without the trie (the constraint's baseline)."""
    model.eval()
    max_len = model.cfg.max_len if max_len is None else min(max_len, model.cfg.max_len)
    step = model_step_fn(model, src_ids, src_mask)
    return beam_search(step, None, src_ids.size(0), beam_size, max_len)


@torch.inference_mode()
def greedy_unconstrained(model: torch.nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor,
                         max_len: int | None = None) -> list[np.ndarray]:
    """Plain argmax decoding without the trie: per question its tokens (no BOS, EOS kept)."""
    model.eval()
    max_len = model.cfg.max_len if max_len is None else min(max_len, model.cfg.max_len)
    B = src_ids.size(0)
    memory = model.encode(src_ids, src_mask)
    last = torch.full((B,), BOS, dtype=torch.long, device=src_ids.device)
    out, cache = [], None
    ended = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
    for _ in range(max_len):
        logprobs, cache = model.decode_step(memory, src_mask, last, cache, src_ids=src_ids)
        last = logprobs.argmax(dim=-1).masked_fill(ended, PAD)
        out.append(last)
        ended |= last == EOS
        if ended.all():
            break
    seqs = torch.stack(out, dim=1).cpu().numpy()  # (B, T)
    res = []
    for row in seqs:
        end = np.flatnonzero(row == EOS)
        res.append(row[:end[0] + 1] if end.size else row[row != PAD])
    return res


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, src_ids: Sequence[int], keys: Sequence[Sequence[int]],
                      trie: KgTrie | None = None, lookahead: Lookahead = False,
                      max_completions: int = 2000) -> np.ndarray:
    """Teacher-forced log-score of every key (tokens without BOS, ending in EOS) for one question.

    ``trie=None``: the model's log p(key | question). With a trie, each step is renormalised
    over the trie's allowed set and, with ``lookahead`` (True = "ours", or a rule of
    :func:`lookahead_weights`), re-weighted as the beam search does (same rule, same
    ``max_completions``, ``src_ids`` as the LCS question), so a key gets the score the beam
    search would give it.
    The encoder runs once and the decoder once over all keys: the generator scores a
    re-ranker's whole candidate set exhaustively, where the beam kept only its top few.
    """
    if len(keys) == 0:
        return np.zeros(0)
    rule = lookahead_rule(lookahead)
    if rule and trie is None:
        raise ValueError("lookahead needs a trie")
    src = torch.as_tensor(list(src_ids), dtype=torch.long)[None]
    mask = src != PAD
    memory = model.encode(src, mask)
    n, width = len(keys), max(len(k) for k in keys) + 1
    tgt = torch.full((n, width), PAD, dtype=torch.long)
    tgt[:, 0] = BOS
    for i, k in enumerate(keys):
        tgt[i, 1:len(k) + 1] = torch.as_tensor(np.asarray(k, dtype=np.int64))
    if trie is None:
        out = model.decode(memory.expand(n, -1, -1), mask.expand(n, -1), tgt[:, :-1], src.expand(n, -1))
        lp = torch.log_softmax(out.float(), dim=-1).gather(2, tgt[:, 1:, None])[..., 0]
        return (lp * (tgt[:, 1:] != PAD)).sum(1).double().numpy()
    # Walk the keys as a trie of prefixes: the decoder is causal, so keys sharing a prefix share
    # the distribution after it; each distinct prefix ("node") is normalised once, in one gather.
    question = lookahead_question(src_ids, rule or "ours")
    node_of: dict[tuple[int, ...], int] = {}
    node_row, node_pos, node_allowed, node_w = [], [], [], []
    picks: list[list[tuple[int, int]]] = []  # per key: (node, token)
    state_of: dict[tuple[int, ...], Any] = {(): trie.start()}
    for i, k in enumerate(keys):
        prefix, sep, path = (), False, []
        for t, tok in enumerate(int(x) for x in k):
            node = node_of.get(prefix)
            if node is None:
                state = state_of[prefix]
                allowed = trie.allowed(state)
                w = np.ones(allowed.size)
                if rule and sep and allowed.size > 1:
                    mat, _ = completion_matrix(trie, state, max_completions)
                    w = weights_from_completions(mat, prefix, question, allowed)
                node = node_of[prefix] = len(node_row)
                node_row.append(i)
                node_pos.append(t)
                node_allowed.append(allowed)
                node_w.append(w)
            path.append((node, tok))
            nxt = prefix + (tok,)
            if t + 1 < len(k) and nxt not in state_of:
                try:
                    state_of[nxt] = trie.advance(state_of[prefix], tok)
                except ValueError as e:  # ImpossibleState
                    raise DecodingError(f"key {list(k)} leaves the trie at position {t}") from e
            prefix = nxt
            sep = sep or tok == SEP
        picks.append(path)
    sizes = np.fromiter((a.size for a in node_allowed), dtype=np.int64, count=len(node_allowed))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat_tok = np.concatenate(node_allowed).astype(np.int64)
    rows, pos = np.asarray(node_row, dtype=np.int64), np.asarray(node_pos, dtype=np.int64)
    if hasattr(model, "decode_at"):  # the distribution at each distinct prefix only: (nodes, V)
        at = model.decode_at(memory, mask, tgt[:, :-1], torch.from_numpy(rows * (width - 1) + pos), src)
        flat_node = torch.from_numpy(np.repeat(np.arange(len(rows)), sizes))
        v = at[flat_node, torch.from_numpy(flat_tok)].double().numpy()
    else:  # any decoder with the teacher-forced interface (bench.decode_at's baseline): every position
        out = model.decode(memory.expand(n, -1, -1), mask.expand(n, -1), tgt[:, :-1], src.expand(n, -1))
        logp = torch.log_softmax(out.float(), dim=-1)  # (n, T, V)
        v = logp[torch.from_numpy(np.repeat(rows, sizes)), torch.from_numpy(np.repeat(pos, sizes)),
                 torch.from_numpy(flat_tok)].double().numpy()
    v = v / np.concatenate(node_w)
    mx = np.maximum.reduceat(v, starts)
    lse = mx + np.log(np.add.reduceat(np.exp(v - np.repeat(mx, sizes)), starts))
    norm = v - np.repeat(lse, sizes)
    totals = np.zeros(n)
    for i, (k, path) in enumerate(zip(keys, picks)):
        for t, (node, tok) in enumerate(path):
            a = node_allowed[node]
            j = find_sorted(a, tok)
            if j >= a.size or a[j] != tok:
                raise DecodingError(f"key {list(k)} leaves the trie at position {t}")
            totals[i] += norm[starts[node] + j]
    return totals

