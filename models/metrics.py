"""Official KgCLUE metrics (baselines/evaluate_f1_em.py): EM and LCS-based F1 on S, P, O, All.

``f1_sim(a, b) = 2·LCS(a, b) / (len(a) + len(b))`` with LCS the longest common *subsequence*
(0 when both are empty); strings are normalised with ``' '.join(t.lower().split())`` first.
Score = 0.5·EM_O + 0.5·F1_O; everything is reported ×100.
"""
from __future__ import annotations

from typing import Sequence

from models.lcs import lcs_length, lcs_length_dp  # noqa: F401  (the project's one LCS; re-exported)

KEYS = ("score", "em_s", "em_p", "em_o", "em_all", "f1_s", "f1_p", "f1_o", "f1_all", "n_eval")


def normalize(text: str) -> str:
    """The scorer's normalisation: lower-case, collapse whitespace."""
    return " ".join(text.lower().split())


def f1_sim(a: str, b: str) -> float:
    """2·LCS(a, b) / (len(a) + len(b)); 0 when both strings are empty."""
    if not a and not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def split_answer(answer: str) -> tuple[str, str, str]:
    """'S ||| P ||| O' -> (S, P, O); raises with the offending text otherwise."""
    parts = answer.split(" ||| ")
    if len(parts) != 3:
        raise ValueError(f"answer {answer!r} does not split into 3 parts on ' ||| '")
    return parts[0], parts[1], parts[2]


def score(predictions: Sequence[tuple[str, str, str]], golds: Sequence[tuple[str, str, str]]) -> dict:
    """KgCLUE metrics of (S, P, O) predictions against golds (S = full subject with （M）)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers; "
                         "predict every question (use ('', '', '') for a missing one)")
    if not golds:
        raise ValueError("no gold answers to score")
    sums = dict.fromkeys(KEYS[1:-1], 0.0)
    for pred, gold in zip(predictions, golds):
        ps, pp, po = (normalize(t) for t in pred)
        gs, gp, go = (normalize(t) for t in gold)
        sums["em_s"] += ps == gs
        sums["em_p"] += pp == gp
        sums["em_o"] += po == go
        sums["em_all"] += (ps, pp, po) == (gs, gp, go)
        sums["f1_s"] += f1_sim(ps, gs)
        sums["f1_p"] += f1_sim(pp, gp)
        sums["f1_o"] += f1_sim(po, go)
        sums["f1_all"] += f1_sim(ps + pp + po, gs + gp + go)
    n = len(golds)
    out = {k: 100.0 * v / n for k, v in sums.items()}
    out["score"] = 0.5 * out["em_o"] + 0.5 * out["f1_o"]
    out["n_eval"] = n
    return {k: out[k] for k in KEYS}
