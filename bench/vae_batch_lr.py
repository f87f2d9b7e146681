"""How the plain VAE's loss estimator, batch and learning rate move binarised-MNIST NLL at equal
steps: a one-process probe (no Ray, no DeepSpeed) that sized the ``base`` preset of vae-density.

    python -m bench.vae_batch_lr --json FILE [--steps 20000] [--threads 2]
        [--configs mc:100:1e-3,analytic:100:1e-3,analytic:200:1e-3,analytic:200:2e-3,...]

Each config ``KL:BATCH:LR`` trains the base model (784-200-200-50 tanh, M = 1) from the same
initial weights (seed 0) for ``--steps`` AdamW steps (warm-up 200, then linear decay to 0), with
the KL term sampled inside the log-weight (``mc``) or in closed form (``analytic``); then the
NLL of the first 2,000 validation images at K = 500 (same noise for every config). Lower is
better. Equal *steps*, not equal time: the trainer's step is overhead-bound (see the preset's
comment in flows/vae_density.py), so a larger batch costs little extra wall there.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import emit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "mc:100:1e-3,analytic:100:1e-3,analytic:200:1e-3,analytic:200:2e-3,analytic:200:3e-3,analytic:400:2e-3"


def run(kl: str, batch: int, lr: float, steps: int, data: Path, threads: int) -> dict:
    import numpy as np
    import torch

    from models.vae import VAE, VAEConfig, log_px
    torch.set_num_threads(threads)
    d = np.load(data)
    train = torch.as_tensor(d["train"]).float()
    valid = torch.as_tensor(d["valid"][:2000]).float()
    torch.manual_seed(0)
    model = VAE(VAEConfig(samples=1, kl=kl))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for s in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr * min(1.0, (s + 1) / 200) * (1 - s / steps)
        loss, _ = model.loss({"x": train[torch.randint(0, len(train), (batch,), generator=g)]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wall = time.perf_counter() - t0
    est, _ = log_px(model.eval(), valid, K=500, seed=0)
    return {"kl": kl, "batch": batch, "lr": lr, "steps": steps, "wall_s": round(wall, 1),
            "valid_nll_k500": round(float(-est.mean()), 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/binarized-mnist/binarized_mnist.npz")
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=DEFAULT, help="comma-separated KL:BATCH:LR")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    from tasks.hw import cpu_label
    rows = []
    for c in a.configs.split(","):
        kl, batch, lr = c.split(":")
        rows.append(run(kl, int(batch), float(lr), a.steps, a.data, a.threads))
        print(rows[-1], flush=True)
    result = {"bench": "vae_batch_lr", "cpu": cpu_label(), "steps": a.steps, "valid_rows": 2000, "k": 500,
              "results": rows}
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
