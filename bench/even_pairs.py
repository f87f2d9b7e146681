"""Length extrapolation on "even pairs" (ALGORITHMS.md §6): HWFA versus full+RoPE and ALiBi.

    python -m bench.even_pairs --json FILE [--steps 1000] [--train-len 64] [--threads 1]

The task (Delétang et al.'s "even pairs"; Su's HWFA post reports 100% extrapolation): a binary
string x1..xn over {a, b}; is the number of "ab"/"ba" pairs even? That holds iff x1 == xn, so the
answer needs the first symbol from arbitrarily far away — a global dependency.

Setup (one tiny decoder-only LM per pattern, same size, seed and data):
* input ``BOS x1 .. xn``; at every position t ≥ 1 the model predicts the answer for the prefix
  x1..xt (``same``/``diff``), so one training string of length N trains every length 1..N —
  the curriculum over lengths ≤ N comes for free (``--answer end`` labels only one random
  position per string, i.e. one random length ≤ N per example, as a one-answer-per-string task);
* train on strings of length N (never longer), AdamW, warmup + cosine;
* test on fresh strings of length N (``acc_1x``) and 8·N (``acc_8x``): accuracy of the answer at
  the LAST position (the task's answer); ``acc_all_8x`` averages over all positions 1..8N.

Patterns: ``hwfa`` (L−1 window layers + RoPE, one full NoPE/log-n layer, default window),
``softmax_rope`` (every layer full softmax + RoPE: the named baseline), ``alibi``.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

from bench import emit

BOS, A, B_, SAME, DIFF = 0, 1, 2, 3, 4
VOCAB = 5
PATTERNS = {"hwfa": "hwfa", "softmax_rope": "softmax", "alibi": "alibi"}


def make_strings(n_rows: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (R, 1+length) = BOS x1..xn, answers (R, 1+length): at t ≥ 1 SAME iff x1 == xt; −100 at BOS)."""
    x = torch.randint(A, B_ + 1, (n_rows, length), generator=g)
    answers = torch.where(x == x[:, :1], SAME, DIFF)
    bos = torch.full((n_rows, 1), BOS)
    return torch.cat((bos, x), 1), torch.cat((torch.full((n_rows, 1), -100), answers), 1)


def train_batch(batch: int, length: int, answer: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids, ans = make_strings(batch, length, g)
    if answer == "end":  # one answer per string, at a random length 1..N
        keep = torch.randint(1, length + 1, (batch,), generator=g)
        ans = torch.where(torch.arange(length + 1)[None] == keep[:, None], ans, -100)
    return {"ids": ids, "targets": ans}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(pattern: str, a: argparse.Namespace):
    from models.lm import LM, LMConfig
    torch.manual_seed(a.seed)
    cfg = LMConfig(vocab_size=VOCAB, d_model=a.d_model, n_head=a.n_head, n_layer=a.n_layer, d_ff=2 * a.d_model,
                   train_len=a.train_len + 1, max_len=8 * a.train_len + 1, pattern=pattern,
                   window=a.window, norm=a.norm)
    model = LM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(a.seed + 1)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        loss, parts = model.loss(train_batch(a.batch, a.train_len, a.answer, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    times = {"train_wall_s": round(time.perf_counter() - t0, 1), "train_cpu_s": round(time.process_time() - cpu0, 1)}
    return model.eval(), cfg, {**times, "final_loss": round(parts["ce"], 5), "final_train_acc": round(parts["accuracy"], 4)}


@torch.no_grad()
def accuracy(model, length: int, n_rows: int, seed: int, batch: int = 64) -> tuple[float, float]:
    """(accuracy of the answer at the last position, accuracy over all positions) on fresh strings."""
    g = torch.Generator().manual_seed(seed)
    last, every, n = 0, 0, 0
    for s in range(0, n_rows, batch):
        ids, ans = make_strings(min(batch, n_rows - s), length, g)
        pred = model(ids)[:, 1:, SAME:DIFF + 1].argmax(-1) + SAME  # (R, length)
        hit = pred == ans[:, 1:]
        last, every, n = last + int(hit[:, -1].sum()), every + float(hit.float().mean(1).sum()), n + ids.size(0)
    return last / n, every / n


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info["cpu"] = fields.get("model name", platform.processor())
        info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4")))
        info["cores"] = text.count("processor\t:")
    except OSError:
        info["cpu"] = platform.processor()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.even_pairs", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--train-len", type=int, default=64, help="N: training string length")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--window", type=int, default=None, help="HWFA window (default: largest with field <= 3N/4)")
    ap.add_argument("--norm", choices=("pre", "post"), default="pre")
    ap.add_argument("--answer", choices=("each", "end"), default="each")
    ap.add_argument("--test-rows", type=int, default=512)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    result: dict = {"bench": "even_pairs", "baseline": "softmax_rope", "machine": machine(),
                    "config": {k: v for k, v in vars(a).items() if k != "json"}}
    for name in a.patterns.split(","):
        model, cfg, stats = train(PATTERNS[name], a)
        cpu0 = time.process_time()
        acc_1x, all_1x = accuracy(model, a.train_len, a.test_rows, a.seed + 100)
        acc_8x, all_8x = accuracy(model, 8 * a.train_len, a.test_rows, a.seed + 200)
        stats["test_cpu_s"] = round(time.process_time() - cpu0, 1)
        result[name] = {"acc_1x": acc_1x, "acc_8x": acc_8x, "acc_all_1x": round(all_1x, 4),
                        "acc_all_8x": round(all_8x, 4), "layers": cfg.layers(), "params": model.n_params(), **stats}
        print(f"{name}: acc_1x {acc_1x:.4f} acc_8x {acc_8x:.4f} ({stats})", file=sys.stderr, flush=True)
    result["total_cpu_s"] = round(time.process_time(), 1)
    emit(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
